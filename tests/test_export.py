"""`export slurm` and `export flux` on every recorded machine, against the real `slurmd -C`
(Debian package slurmd; its hwloc reads a recorded tree through HWLOC_FSROOT) and the
RFC 20 schema (tests/flux, with its provenance).

slurmd's hwloc needs the hex mask files (`core_cpus`, `package_cpus`...) that a real
kernel writes beside the `*_list` ones; the hand-built trees hold only one form, so
`hwloc_tree` copies a tree and adds the other form, computed from the same lists. hwloc's
x86 backend is switched off there: it reads this machine's CPUID, not the tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nvml_fixture as nf
import pytest
from rpool_agent.probes.nvidia import probe_gpus
from rpool_agent.probes.nvidia_caps import parse_mig_minors
from rpool_agent.probes.sysfs import format_cpulist, parse_cpulist

from rpool_agent.detect import topology_report
from rpool_agent.errors import ProbeError
from rpool_agent.export_flux import flux_notes, flux_r
from rpool_agent.export_slurm import gpu_type, mig_type, real_memory_mib, slurm_export

TREES = Path(__file__).resolve().parent / "trees"
FLUX = Path(__file__).resolve().parent / "flux"
CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"
ALL_TREES = sorted(p.name for p in TREES.iterdir() if p.is_dir())
CPU_TREES = [n for n in ALL_TREES if (TREES / n / CPU / "cpu0").is_dir()]
fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake once
NODE_FIELDS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")


# --- helpers ----------------------------------------------------------------------------


def slurmd() -> str:
    path = shutil.which("slurmd") or (
        "/usr/sbin/slurmd" if os.access("/usr/sbin/slurmd", os.X_OK) else None
    )
    if path is None:
        message = "slurmd is not installed (Debian package: slurmd)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def slurmd_c(root: Path | None) -> dict[str, str]:
    """`slurmd -C`'s node line as {key: value}; `root`: a tree for its hwloc."""
    env = dict(os.environ)
    if root is not None:
        env.update(HWLOC_FSROOT=str(root), HWLOC_COMPONENTS="-x86")
    done = subprocess.run(
        [slurmd(), "-C"], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    # slurmd's complaints go to stderr, which may interleave with the line; join stdout.
    line = next(w for w in done.stdout.splitlines() if "NodeName=" in w)
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def fields(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split())


def mask(cpus: list[int]) -> str:
    value, words = sum(1 << c for c in cpus), max(cpus) // 32 + 1
    return ",".join(f"{value >> 32 * w & 0xFFFFFFFF:08x}" for w in reversed(range(words)))


def hwloc_tree(src: Path, dst: Path) -> Path:
    """A copy of `src` with both forms of each topology file, as a real kernel has."""
    shutil.copytree(src, dst)
    for listed in dst.glob(f"{CPU}/cpu*/topology/*_list"):
        hex_file = listed.with_name(listed.name[: -len("_list")])
        if not hex_file.exists():
            hex_file.write_text(mask(parse_cpulist(listed.read_text())) + "\n")
    return dst


def machine(
    base: Path,
    cores: list[list[int]],
    package_of: list[int],
    *,
    host: str = "synth",
    mib: int = 65536,
) -> Path:
    """A small recorded tree: `cores` (threads per core), one package index per core, one
    NUMA node per package, both forms of every topology file."""

    def put(rel: str, text: str) -> None:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text + "\n")

    every = sorted(c for core in cores for c in core)
    for name in ("online", "present", "possible"):
        put(f"{CPU}/{name}", format_cpulist(every))
    packages = sorted(set(package_of))
    for k, threads in enumerate(cores):
        pkg = [c for j, t in enumerate(cores) if package_of[j] == package_of[k] for c in t]
        for c in threads:
            topo = f"{CPU}/cpu{c}/topology"
            for name, cpus in (("core_cpus", threads), ("thread_siblings", threads)):
                put(f"{topo}/{name}_list", format_cpulist(cpus))
                put(f"{topo}/{name}", mask(cpus))
            for name in ("package_cpus", "core_siblings"):
                put(f"{topo}/{name}_list", format_cpulist(pkg))
                put(f"{topo}/{name}", mask(pkg))
            put(f"{topo}/core_id", str(k))
            put(f"{topo}/physical_package_id", str(package_of[k]))
    put(f"{NODE}/online", format_cpulist(packages))
    for n in packages:
        cpus = sorted(c for j, t in enumerate(cores) if package_of[j] == n for c in t)
        put(f"{NODE}/node{n}/cpulist", format_cpulist(cpus))
        put(f"{NODE}/node{n}/cpumap", mask(cpus))
        put(f"{NODE}/node{n}/distance", " ".join("10" if m == n else "20" for m in packages))
        kib = mib * 1024 // len(packages)
        put(f"{NODE}/node{n}/meminfo", f"Node {n} MemTotal:       {kib} kB")
    put("proc/meminfo", f"MemTotal:       {mib * 1024} kB")
    put("proc/sys/kernel/hostname", host)
    put("proc/cpuinfo", "".join(f"processor\t: {c}\nvendor_id\t: GenuineIntel\n\n" for c in every))
    return base


def assert_valid(line: str, registered: dict[str, str] | None = None) -> None:
    """Slurm takes the line: CPUs multiply up, and (given what slurmd registers) nothing
    is above it, or slurmctld drains the node ("Low socket*core*thread count", "Low CPUs")."""
    f = {k: int(v) for k, v in fields(line).items() if k in NODE_FIELDS}
    product = f["Boards"] * f["SocketsPerBoard"] * f["CoresPerSocket"] * f["ThreadsPerCore"]
    assert f["CPUs"] == product, line
    if registered is not None:
        r = {k: int(registered[k]) for k in NODE_FIELDS}
        assert product <= r["SocketsPerBoard"] * r["CoresPerSocket"] * r["ThreadsPerCore"]
        assert f["CPUs"] <= r["CPUs"]


# --- slurm: recorded trees, synthetic shapes, the live machine ----------------------------


@pytest.mark.parametrize("name", ALL_TREES)
def test_slurm_node_line_matches_slurmd_or_says_why(name: str, tmp_path: Path) -> None:
    if name not in CPU_TREES:
        with pytest.raises(ProbeError):  # export refuses it with detect's one line
            topology_report(TREES / name)
        pytest.skip(f"{name} records only the NVIDIA driver's files, no CPUs")
    report = topology_report(TREES / name)
    out = slurm_export(report)
    assert_valid(out.node_line)
    ours = fields(out.node_line)
    assert ours["NodeName"] == report["host"]
    theirs = slurmd_c(hwloc_tree(TREES / name, tmp_path / name))
    regular = int(theirs["CPUs"]) == int(theirs["SocketsPerBoard"]) * int(
        theirs["CoresPerSocket"]
    ) * int(theirs["ThreadsPerCore"])
    if regular:
        assert {k: ours[k] for k in NODE_FIELDS} == {k: theirs[k] for k in NODE_FIELDS}
    else:  # slurmd's quotients do not multiply up: ours must, within what it registers
        assert_valid(out.node_line, theirs)
        assert any("different thread counts" in n for n in out.notes)
    if report["offline_pus"]:
        assert any("present but offline" in n for n in out.notes)
    restricted = report["allowed_pus"] < report["pus"]
    assert ("CpuSpecList" in ours) == restricted
    expected_mib = sum(n["memory_bytes"] for n in report["numa"]["nodes"]) >> 20
    assert ours["RealMemory"] == str(expected_mib)


def test_every_tree_with_cpus_is_exported() -> None:
    """The parametrized list is the folder's: a new recorded tree is tested without edits."""
    assert {"two_socket_ht", "offline_cpus", "cgroup_v2_cpuset", "old_kernel_hex"} <= set(CPU_TREES)


def test_restricted_cpuset_reserves_the_rest_by_abstract_id() -> None:
    # cgroup_v2_cpuset: 8 cores x 2 threads (n, n+8); the job may use 2-6,10-13.
    out = slurm_export(topology_report(TREES / "cgroup_v2_cpuset"))
    # abstract id = core * 2 + thread: CPUs 0,8,1,9 -> 0-3; 14 -> 13; 7,15 -> 14,15
    assert fields(out.node_line)["CpuSpecList"] == "0-3,13-15"
    assert any("cpuset.cpus.effective" in n for n in out.notes)


def test_hybrid_cores_slurmd_misdescribes_we_print_one_thread_per_core(tmp_path: Path) -> None:
    # 4 P-cores with 2 threads (0-7) and 4 E-cores with 1 (8-11), one socket
    cores = [[2 * k, 2 * k + 1] for k in range(4)] + [[8 + k] for k in range(4)]
    root = machine(tmp_path / "hybrid", cores, [0] * 8)
    out = slurm_export(topology_report(root))
    theirs = slurmd_c(root)
    assert theirs["CPUs"] == "12" and theirs["ThreadsPerCore"] == "1"  # 12 != 1 * 8 * 1
    assert fields(out.node_line)["CPUs"] == "8"
    assert fields(out.node_line)["ThreadsPerCore"] == "1"
    assert_valid(out.node_line, theirs)
    assert any("4 with 2, 4 with 1" in n for n in out.notes)


@pytest.mark.parametrize(("per_socket", "configured"), [((4, 2), 6), ((4, 3), 6)])
def test_uneven_sockets_become_one_socket(
    tmp_path: Path, per_socket: tuple[int, int], configured: int
) -> None:
    cores, packages, cpu = [], [], 0
    for socket, count in enumerate(per_socket):
        for _ in range(count):
            cores.append([cpu])
            packages.append(socket)
            cpu += 1
    root = machine(tmp_path / "uneven", cores, packages)
    out = slurm_export(topology_report(root))
    theirs = slurmd_c(root)
    assert theirs["SocketsPerBoard"] == "2"  # slurmd invents two equal sockets
    assert int(theirs["CoresPerSocket"]) == sum(per_socket) // 2
    ours = fields(out.node_line)
    assert (ours["SocketsPerBoard"], ours["CoresPerSocket"]) == ("1", str(configured))
    assert_valid(out.node_line, theirs)
    note = next(n for n in out.notes if "different core counts" in n)
    assert ("left out" in note) == (configured < sum(per_socket))


def test_live_machine_matches_slurmd_c() -> None:
    report = topology_report("/")
    out = slurm_export(report)
    theirs = slurmd_c(None)
    ours = fields(out.node_line)
    if report["allowed_pus"] < report["pus"]:
        ours.pop("CpuSpecList")  # slurmd -C does not say what this process may not use
    if "Gres" not in theirs:  # slurmd without its NVML plugin (Debian: a separate package)
        ours.pop("Gres", None)  # autodetects no GPU; with the plugin, Gres= is compared
    if any("different" in n for n in out.notes):
        assert_valid(out.node_line, theirs)
    else:  # a regular machine: every field, RealMemory and Gres included
        assert ours == theirs


def test_real_memory_rounds_like_slurmds_float(tmp_path: Path) -> None:
    """Against slurmd's own expression compiled by the real gcc (`get_memory`)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "mem.c"
    src.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n#include <stdint.h>\n"
        "int main(int c, char **v) { for (int i = 1; i < c; i++) {"
        " long pages = atol(v[i]);"
        ' printf("%lu\\n", (unsigned long)(uint64_t)((float)pages * (4096 / 1048576.0)));'
        " } return 0; }\n"
    )
    subprocess.run([cc, "-o", str(tmp_path / "mem"), str(src)], check=True)
    pages = [1, 255, 256, 6182852, (1 << 24) + 1, (1 << 26) + 255, (1 << 28) + 12345, 3 << 27]
    done = subprocess.run(
        [str(tmp_path / "mem"), *map(str, pages)], capture_output=True, text=True, check=True
    )
    expected = [int(v) for v in done.stdout.split()]
    assert [real_memory_mib(p * 4096, 4096) for p in pages] == expected


# --- slurm: GPUs ------------------------------------------------------------------------


def test_gpu_type_names_as_slurm_autodetect() -> None:
    assert gpu_type("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert gpu_type("Tesla V100-SXM2-16GB") == "tesla_v100-sxm2-16gb"
    assert mig_type("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB MIG 3g.20gb") == (
        "nvidia_a100_3g.20gb"
    )
    assert mig_type("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb") == (
        "nvidia_a100_1c.3g.20gb"
    )
    assert mig_type("NVIDIA A100", "something else") is None


def two_socket_96(base: Path) -> Path:
    """2 sockets x 24 cores x 2 threads (first threads 0-47, siblings 48-95): the machine
    tests/trees/gpu-procfs-4 and gpu-nvml-8 record GPUs of."""
    cores = [[k, k + 48] for k in range(48)]
    return machine(base, cores, [k // 24 for k in range(48)], host="dgx.example.org")


def test_gres_lines_from_procfs_gpus(tmp_path: Path) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-procfs-4", root, dirs_exist_ok=True)
    out = slurm_export(topology_report(root))
    kind = "nvidia_h100_80gb_hbm3"
    assert fields(out.node_line)["Gres"] == f"gpu:{kind}:4"
    assert fields(out.node_line)["NodeName"] == "dgx"
    # index order = PCI bus order (1b, 3d, 89, b1); File= is the minor (2, 3, 0, 1)
    assert out.gres_lines == [
        f"NodeName=dgx Name=gpu Type={kind} File=/dev/nvidia2 Cores=0-23",
        f"NodeName=dgx Name=gpu Type={kind} File=/dev/nvidia3 Cores=0-23",
        f"NodeName=dgx Name=gpu Type={kind} File=/dev/nvidia0 Cores=24-47",
        f"NodeName=dgx Name=gpu Type={kind} File=/dev/nvidia1 Cores=24-47",
    ]
    assert out.text().splitlines() == [
        "# slurm.conf",
        out.node_line,
        "# gres.conf",
        *out.gres_lines,
    ]


def test_a_jobs_cuda_visible_devices_is_said(tmp_path: Path) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-procfs-4", root, dirs_exist_ok=True)
    gpus = probe_gpus(
        root, environ={"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    )
    report = topology_report(root, gpu_report=gpus)
    out = slurm_export(report)
    assert out.gres_lines == [
        "NodeName=dgx Name=gpu Type=nvidia_h100_80gb_hbm3 File=/dev/nvidia0 Cores=24-47"
    ]
    for notes in (out.notes, flux_notes(report)):
        assert any("CUDA_VISIBLE_DEVICES='2'" in n for n in notes)


def test_gres_cores_whole_socket_when_numa_is_smaller(tmp_path: Path) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-procfs-4", root, dirs_exist_ok=True)
    for bus in (root / "sys/bus/pci/devices").iterdir():  # SNC2: a GPU near half a socket
        near = (bus / "local_cpulist").read_text().split(",")[0]  # e.g. "0-23"
        lo = int(near.split("-")[0])
        (bus / "local_cpulist").write_text(f"{lo}-{lo + 11}\n")
    out = slurm_export(topology_report(root))
    assert out.gres_lines[0].endswith("Cores=0-23")
    assert any("numa_node_as_socket" in n for n in out.notes)


def test_gpu_without_minor_is_left_out_and_said(tmp_path: Path) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-procfs-4", root, dirs_exist_ok=True)
    info = root / "proc/driver/nvidia/gpus/0000:1b:00.0/information"
    info.write_text(info.read_text().replace("Device Minor:    2", "Device Minor:    ?"))
    out = slurm_export(topology_report(root))
    assert len(out.gres_lines) == 3
    assert fields(out.node_line)["Gres"] == "gpu:nvidia_h100_80gb_hbm3:3"
    assert any("minor number" in n for n in out.notes)


_CHILD = """
import json, sys
from rpool_agent.detect import topology_report
from rpool_agent.errors import ProbeError
from rpool_agent.probes.nvidia import probe_gpus
print(json.dumps(topology_report(sys.argv[1], gpu_report=probe_gpus(sys.argv[1], nvml=True))))
"""


def nvml_report(lib_dir: Path, root: Path, config: Path) -> dict:
    """detect's report with GPUs from the real pynvml on the fake libnvidia-ml.so.1."""
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir), "FAKE_NVML_CONFIG": str(config)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


MIG_GPUS = [
    {
        "name": "NVIDIA A100-SXM4-40GB",
        "pci_bus_id": "00000000:18:00.0",
        "minor": 0,
        "mig_mode": 1,
        "migs": [
            {"name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "gi": 1, "ci": 0},
            {"name": "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "gi": 2, "ci": 0},
        ],
    },
    {"name": "NVIDIA A100-SXM4-40GB", "pci_bus_id": "00000000:9a:00.0", "minor": 1},
]


def test_mig_devices_use_multiple_files(fake_nvml_dir: Path, tmp_path: Path) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-nvml-8", root, dirs_exist_ok=True)
    caps = root / "proc/driver/nvidia-caps/mig-minors"
    caps.parent.mkdir(parents=True)
    caps.write_text(
        "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n"
        "gpu0/gi2/access 21\ngpu0/gi2/ci0/access 22\ngpu1/gi1/access 84\n"
    )
    report = nvml_report(fake_nvml_dir, root, nf.write_config(tmp_path / "nvml.conf", MIG_GPUS))
    assert report["mig_minors"] == {
        "gpu0/gi1/access": 12,
        "gpu0/gi1/ci0/access": 13,
        "gpu0/gi2/access": 21,
        "gpu0/gi2/ci0/access": 22,
    }
    out = slurm_export(report)
    caps_dir = "/dev/nvidia-caps/nvidia-cap"
    mig_files = "MultipleFiles=/dev/nvidia0,{0}{1},{0}{2}"
    assert out.gres_lines == [
        "NodeName=dgx Name=gpu Type=nvidia_a100_3g.20gb "
        + mig_files.format(caps_dir, 12, 13)
        + " Cores=0-23",
        "NodeName=dgx Name=gpu Type=nvidia_a100_3g.20gb "
        + mig_files.format(caps_dir, 21, 22)
        + " Cores=0-23",
        "NodeName=dgx Name=gpu Type=nvidia_a100-sxm4-40gb File=/dev/nvidia1 Cores=24-47",
    ]
    assert fields(out.node_line)["Gres"] == "gpu:nvidia_a100_3g.20gb:2,gpu:nvidia_a100-sxm4-40gb:1"

    caps.unlink()  # without the driver's table: the parent's file only, and a note
    out = slurm_export(nvml_report(fake_nvml_dir, root, tmp_path / "nvml.conf"))
    assert "MultipleFiles=/dev/nvidia0 " in out.gres_lines[0]
    assert any("mig-minors" in n for n in out.notes)


def test_parse_mig_minors_skips_what_is_not_a_pair() -> None:
    assert parse_mig_minors("config 1\n\ngarbage\ngpu0/gi1/access 12\nx y\n") == {
        "config": 1,
        "gpu0/gi1/access": 12,
    }


# --- flux ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r_validator():
    jsonschema = pytest.importorskip("jsonschema")  # in the test extras
    schema = json.loads((FLUX / "rfc20_r_v1.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def ascending_idset(text: str) -> bool:
    """RFC 22 beyond the schema's pattern: ids ascending and unique."""
    ids: list[int] = []
    for part in text.strip("[]").split(","):
        lo, _, hi = part.partition("-")
        if hi and int(hi) <= int(lo):
            return False
        ids += range(int(lo), int(hi or lo) + 1)
    return ids == sorted(set(ids))


def test_schema_accepts_the_rfcs_own_example(r_validator) -> None:
    example = json.loads((FLUX / "spec_20_example1.json").read_text())
    assert list(r_validator.iter_errors(example)) == []
    bad = json.loads(json.dumps(example))
    bad["execution"]["R_lite"][0]["children"]["core"] = "01-3"  # leading zero
    assert list(r_validator.iter_errors(bad))


@pytest.mark.parametrize("name", CPU_TREES)
def test_flux_r_validates_on_every_tree(name: str, r_validator) -> None:
    report = topology_report(TREES / name)
    r = flux_r(report)
    assert list(r_validator.iter_errors(r)) == []
    entry = r["execution"]["R_lite"][0]
    assert entry["rank"] == "0"
    assert entry["children"]["core"] == f"0-{report['cores'] - 1}"
    assert ascending_idset(entry["children"]["core"])
    assert "gpu" not in entry["children"]
    assert r["execution"]["nodelist"] == [report["host"]]
    assert (r["execution"]["starttime"], r["execution"]["expiration"]) == (0.0, 0.0)
    notes = flux_notes(report)
    assert any("may use only" in n for n in notes) == (report["allowed_pus"] < report["pus"])


def test_flux_r_with_gpus_and_a_lifetime(tmp_path: Path, r_validator) -> None:
    root = two_socket_96(tmp_path / "node")
    shutil.copytree(TREES / "gpu-procfs-4", root, dirs_exist_ok=True)
    r = flux_r(topology_report(root), rank=7, starttime=1676560542, expiration=1676562342)
    assert list(r_validator.iter_errors(r)) == []
    assert r["execution"]["R_lite"] == [{"rank": "7", "children": {"core": "0-47", "gpu": "0-3"}}]
    assert r["execution"]["nodelist"] == ["dgx"]
    assert r["execution"]["expiration"] > r["execution"]["starttime"]


# --- the command line --------------------------------------------------------------------

CLI = [sys.executable, "-m", "rpool_agent.cli"]


def test_export_slurm_command_prints_the_export_and_its_notes(tmp_path: Path) -> None:
    tree = TREES / "cgroup_v2_cpuset"
    done = subprocess.run(
        [*CLI, "export", "slurm", "--sysroot", str(tree)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out = slurm_export(topology_report(tree))
    assert done.stdout == out.text()
    assert all(f"rpool-agent: {n}\n" in done.stderr for n in out.notes)
    target = tmp_path / "node.conf"
    done = subprocess.run(
        [*CLI, "export", "slurm", "--sysroot", str(tree), "-o", str(target)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout == "" and target.read_text() == out.text()


def test_export_flux_command_is_one_r_document(r_validator) -> None:
    tree = TREES / "two_socket_ht"
    done = subprocess.run(
        [*CLI, "export", "flux", "--sysroot", str(tree), "--rank", "5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # one line: R files are compact JSON
    r = json.loads(done.stdout)
    assert list(r_validator.iter_errors(r)) == []
    assert r == flux_r(topology_report(tree), rank=5)


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["export", "lsf"], 2, "invalid choice: 'lsf'"),
        (["export"], 2, "the following arguments are required"),
        (["export", "flux", "--rank", "-1"], 2, "expected a whole number >= 0"),
        (["export", "slurm", "--sysroot", "/nonexistent"], 1, "is not a directory"),
    ],
)
def test_export_refuses_in_one_line(argv: list[str], code: int, says: str) -> None:
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True)
    assert done.returncode == code
    assert says in done.stderr.splitlines()[-1] and "Traceback" not in done.stderr
    assert done.stdout == ""
