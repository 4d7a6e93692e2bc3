"""detect: recorded trees -> pools and topology reports; `rpool-agent detect` as a real
subprocess; every format it writes re-read by the formats validator and by real ctest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import nvml_fixture as nf
import pytest
from rpool_agent.probes.gpu import Gpu, MigDevice
from rpool_agent.probes.nvidia import GpuReport

from rpool_agent.detect import detect_pool, topology_report
from rpool_agent.errors import ConfigError, ProbeError
from rpool_agent.formats import dumps, parse_text
from rpool_agent.pool import INSTANCE_ID_RE, Pool

fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake NVML once
FORMATS = ("canary", "canary-nodes", "ctest")
NO_GPUS = GpuReport((), None, None, "none", None)

# tree -> (cpu ids, their threads, their NUMA nodes) for the default (per-core) pool
CORE_POOLS: dict[str, tuple[list[str], list[list[int]], list[int]]] = {
    "two_socket_ht": (
        [str(i) for i in range(8)],
        [[i, i + 8] for i in range(8)],
        [0, 0, 1, 1, 2, 2, 3, 3],
    ),
    "offline_cpus": (["0", "1", "2"], [[0, 4], [1], [2, 6]], [0, 0, 0]),
    "cgroup_v2_cpuset": (
        ["2", "3", "4", "5", "6"],
        [[2, 10], [3, 11], [4, 12], [5, 13], [6]],  # 14 is outside the cpuset
        [0] * 5,
    ),
    "memory_only_node": ([str(i) for i in range(8)], [[i] for i in range(8)], [0] * 4 + [1] * 4),
    "no_node_dir": (["0", "1"], [[0, 2], [1, 3]], [0, 0]),
    "old_kernel_hex": (["0", "1", "2", "3"], [[0, 4], [1, 5], [2, 6], [3]], [0, 0, 1, 1]),
    "core_id_repeat": (
        [str(i) for i in range(8)],
        [[i, i + 8] for i in range(8)],
        [0] * 4 + [1] * 4,
    ),
    # /proc/self/cpuset names /batch/job7 on /dev/cpuset (cpus 2-5)
    "cpuset_legacy": (["2", "3", "4", "5"], [[2], [3], [4], [5]], [0, 0, 1, 1]),
    # the cgroup's folder is out of sight: /proc/self/status says 1-2,5-6
    "cgroupns": (["1", "2"], [[1, 5], [2, 6]], [0, 0]),
}

# tree -> the counts of its topology report
COUNTS: dict[str, dict[str, Any]] = {
    "two_socket_ht": dict(
        packages=2, numa_nodes=4, cores=8, pus=16, offline_pus=0, pus_per_numa=[4, 4, 4, 4],
        allowed_pus=16, allowed_cores=8, allowed_cpulist="0-15", allowed_nodelist="0-3",
    ),
    "offline_cpus": dict(
        packages=1, numa_nodes=1, cores=3, pus=5, offline_pus=3, pus_per_numa=[5],
        allowed_pus=5, allowed_cores=3, allowed_cpulist="0-2,4,6", allowed_nodelist="0",
    ),
    "cgroup_v2_cpuset": dict(
        packages=1, numa_nodes=1, cores=8, pus=16, offline_pus=0, pus_per_numa=[16],
        allowed_pus=9, allowed_cores=5, allowed_cpulist="2-6,10-13", allowed_nodelist="0",
    ),
    "memory_only_node": dict(
        packages=1, numa_nodes=3, cores=8, pus=8, offline_pus=0, pus_per_numa=[4, 4, 0],
        allowed_pus=8, allowed_cores=8, allowed_cpulist="0-7", allowed_nodelist="0,4",
        allowed_cpu_nodelist="0-1",  # memory from 0 and the CXL node 4; CPUs on 0 and 1
    ),
    "no_node_dir": dict(
        packages=1, numa_nodes=1, cores=2, pus=4, offline_pus=0, pus_per_numa=[4],
        allowed_pus=4, allowed_cores=2, allowed_cpulist="0-3", allowed_nodelist="0",
    ),
    "old_kernel_hex": dict(
        packages=2, numa_nodes=2, cores=4, pus=7, offline_pus=1, pus_per_numa=[4, 3],
        allowed_pus=7, allowed_cores=4, allowed_cpulist="0-6", allowed_nodelist="0-1",
    ),
    "core_id_repeat": dict(
        packages=2, numa_nodes=2, cores=8, pus=16, offline_pus=0, pus_per_numa=[8, 8],
        allowed_pus=16, allowed_cores=8, allowed_cpulist="0-15", allowed_nodelist="0-1",
    ),
    "cpuset_legacy": dict(
        packages=2, numa_nodes=2, cores=8, pus=8, offline_pus=0, pus_per_numa=[4, 4],
        allowed_pus=4, allowed_cores=4, allowed_cpulist="2-5", allowed_nodelist="1",
        allowed_cpu_nodelist="0-1",
    ),
    "cgroupns": dict(
        packages=1, numa_nodes=1, cores=4, pus=8, offline_pus=0, pus_per_numa=[8],
        allowed_pus=4, allowed_cores=2, allowed_cpulist="1-2,5-6", allowed_nodelist="0",
    ),
}  # fmt: skip


def cpus_of(pool: Pool) -> list[tuple[str, list[int], int | None]]:
    return [
        (i.id, i.properties["threads"], i.properties.get("numa_node"))
        for i in pool.local.resources["cpus"]
    ]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "detect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


# --- pools from recorded trees ----------------------------------------------------------------


@pytest.mark.parametrize("tree", sorted(CORE_POOLS))
def test_pool_per_core(trees: Path, tree: str) -> None:
    ids, threads, nodes = CORE_POOLS[tree]
    pool = detect_pool(trees / tree, gpu_report=NO_GPUS)
    assert cpus_of(pool) == list(zip(ids, threads, nodes, strict=True))
    assert all(i.slots == 1 for i in pool.local.resources["cpus"])
    assert pool.local.resources["gpus"] == []


@pytest.mark.parametrize("tree", sorted(CORE_POOLS))
def test_pool_per_hyperthread(trees: Path, tree: str) -> None:
    _, threads, _ = CORE_POOLS[tree]
    pool = detect_pool(trees / tree, hyperthreads=True, gpu_report=NO_GPUS)
    usable = sorted(c for t in threads for c in t)
    assert [i.id for i in pool.local.resources["cpus"]] == [str(c) for c in usable]
    assert [i.properties["threads"] for i in pool.local.resources["cpus"]] == [[c] for c in usable]


def test_pool_properties_and_numa_summary(trees: Path) -> None:
    pool = detect_pool(trees / "memory_only_node", gpu_report=NO_GPUS)
    assert pool.local.id == "armada"  # the recorded host name is the node id
    assert pool.additional_properties["agent_version"]
    numa = pool.additional_properties["numa"]
    assert sorted(numa) == ["0", "1", "4"]
    assert numa["4"] == {"cpus": [], "gpus": [], "memory_bytes": 128 * 1024**3}
    assert numa["1"]["cpus"] == [4, 5, 6, 7]


def test_numa_summary_lists_usable_cpus_only(trees: Path) -> None:
    pool = detect_pool(trees / "cgroup_v2_cpuset", gpu_report=NO_GPUS)
    assert pool.additional_properties["numa"]["0"]["cpus"] == [2, 3, 4, 5, 6, 10, 11, 12, 13]


@pytest.mark.parametrize("tree", sorted(COUNTS))
def test_topology_report_counts(trees: Path, tree: str) -> None:
    report = topology_report(trees / tree, gpu_report=NO_GPUS)
    assert {k: report[k] for k in COUNTS[tree]} == COUNTS[tree]
    assert report["gpus"] == 0
    json.dumps(report)  # JSON-ready all the way down


# --- GPUs (dataclasses as the NVIDIA probe returns them) ---------------------------------------


def gpu(index: int, numa: int | None, migs: tuple[MigDevice, ...] = ()) -> Gpu:
    return Gpu(
        index=index,
        uuid=f"GPU-{index:08d}-aaaa-bbbb-cccc-dddddddddddd",
        name="NVIDIA H100 80GB HBM3",
        memory_bytes=80 * 1024**3,
        pci_bus_id=f"0000:{0x3B + index:02x}:00.0",
        minor_number=7 - index,
        numa_node=numa,
        cpu_affinity=None,
        compute_capability="9.0",
        mig_enabled=bool(migs),
        mig_devices=migs,
    )


def mig(index: int, gi: int | None) -> MigDevice:
    return MigDevice(index, f"MIG-{index}-0000", "1g.10gb", 10 * 1024**3, gi, None)


REPORT = GpuReport(
    gpus=(gpu(0, 0), gpu(1, 2, (mig(0, 7), mig(3, 8))), gpu(2, None)),
    driver_version="550.54.15",
    cuda_driver_version="12.4",
    source="nvml",
    problem=None,
)


def test_gpu_instances(trees: Path) -> None:
    notes: list[str] = []
    pool = detect_pool(
        trees / "two_socket_ht", slots_per_gpu=4, mig=False, gpu_report=REPORT, notes=notes
    )
    gpus = pool.local.resources["gpus"]
    assert [(g.id, g.slots) for g in gpus] == [("0", 4), ("2", 4)]
    assert notes == ["GPU 1 is in MIG mode: left out (--no-mig)"]
    assert gpus[0].properties == {
        "index": 0,
        "uuid": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_bytes": 80 * 1024**3,
        "pci_bus_id": "0000:3b:00.0",
        "minor_number": 7,
        "compute_capability": "9.0",
        "numa_node": 0,
        "vendor": "NVIDIA",
    }
    assert "numa_node" not in gpus[1].properties  # unknown is absent, not null
    numa = pool.additional_properties["numa"]
    assert [numa[n]["gpus"] for n in "0123"] == [["0"], [], [], []]


def test_mig_gpu_is_its_mig_devices_by_default(trees: Path) -> None:
    """Issue 12, item 2: CUDA cannot use a MIG-mode GPU whole; it used to be offered whole
    unless --mig was given. A MIG-mode GPU with no MIG device offers nothing, and says so."""
    empty = replace(gpu(2, None), mig_enabled=True)
    report = replace(REPORT, gpus=(*REPORT.gpus[:2], empty))
    notes: list[str] = []
    pool = detect_pool(trees / "two_socket_ht", gpu_report=report, notes=notes)
    assert [g.id for g in pool.local.resources["gpus"]] == ["0", "1_0", "1_3"]
    assert notes == [
        "GPU 2 is in MIG mode with no MIG device: left out (create MIG devices, or turn "
        "MIG off: nvidia-smi -i 2 -mig 0)"
    ]


def test_mig_devices_replace_their_gpu(trees: Path) -> None:
    pool = detect_pool(trees / "two_socket_ht", mig=True, gpu_report=REPORT)
    gpus = pool.local.resources["gpus"]
    assert [g.id for g in gpus] == ["0", "1_0", "1_3", "2"]
    assert all(INSTANCE_ID_RE.match(g.id) for g in gpus)
    assert gpus[2].properties == {
        "uuid": "MIG-3-0000",
        "parent_index": 1,
        "parent_uuid": "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd",
        "memory_bytes": 10 * 1024**3,
        "name": "1g.10gb",
        "gpu_instance_id": 8,
        "numa_node": 2,
        "vendor": "NVIDIA",
    }
    assert pool.additional_properties["numa"]["2"]["gpus"] == ["1_0", "1_3"]


@pytest.mark.parametrize("form", FORMATS)
def test_every_format_validates_with_gpus(trees: Path, form: str) -> None:
    for mig_on in (False, True):
        pool = detect_pool(trees / "two_socket_ht", mig=mig_on, gpu_report=REPORT)
        again = parse_text(dumps(pool, form), format=form)
        assert [i.id for i in again.local.resources["gpus"]] == [
            i.id for i in pool.local.resources["gpus"]
        ]
        if form != "ctest":  # the CTest spec holds ids and slots only
            assert again.local.instance("cpus", "3").properties == {
                "threads": [3, 11],
                "numa_node": 1,
            }


def test_bad_inputs_raise_typed_errors(trees: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        detect_pool(trees / "two_socket_ht", slots_per_gpu=0, gpu_report=NO_GPUS)
    with pytest.raises(ProbeError, match="not a directory"):
        detect_pool(tmp_path / "missing", gpu_report=NO_GPUS)
    with pytest.raises(ProbeError, match="no CPUs found"):
        detect_pool(tmp_path, gpu_report=NO_GPUS)
    empty = tmp_path / "empty_cpuset"
    shutil.copytree(trees / "cgroup_v2_cpuset", empty)
    (empty / "sys/fs/cgroup/ci.slice/runner.service/cpuset.cpus.effective").write_text("30\n")
    with pytest.raises(ProbeError, match="none of the online CPUs"):
        detect_pool(empty, gpu_report=NO_GPUS)


# --- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMATS)
def test_cli_formats_validate(trees: Path, form: str) -> None:
    done = cli("--sysroot", str(trees / "cgroup_v2_cpuset"), "--format", form)
    assert done.returncode == 0, done.stderr
    pool = parse_text(done.stdout, format=form)
    assert [i.id for i in pool.local.resources["cpus"]] == ["2", "3", "4", "5", "6"]
    # no GPUs in the tree: nothing on stderr (every job's prologue would print it), exit 0
    assert done.stderr == ""


def test_cli_says_why_there_is_no_gpu_under_verbose(trees: Path) -> None:
    done = cli("--sysroot", str(trees / "cgroup_v2_cpuset"), "-v")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("rpool-agent: no NVIDIA GPUs: no proc/driver/nvidia/gpus/")
    assert len(done.stderr.splitlines()) == 1


def test_cli_default_is_canary_yaml_and_hyperthreads(trees: Path) -> None:
    done = cli("--sysroot", str(trees / "offline_cpus"), "--hyperthreads")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("resource_pool:")
    pool = parse_text(done.stdout, format="canary")
    assert [i.id for i in pool.local.resources["cpus"]] == ["0", "1", "2", "4", "6"]
    assert pool.local.id == "hotplug"


def test_cli_json_report(trees: Path) -> None:
    done = cli("--sysroot", str(trees / "two_socket_ht"), "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {k: report[k] for k in COUNTS["two_socket_ht"]} == COUNTS["two_socket_ht"]
    assert report["cpu"]["model_name"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert report["numa"]["nodes"][2]["distances"] == [21, 21, 10, 11]
    assert report["nvidia"]["source"] == "none"


def test_cli_output_file(trees: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.yaml"
    done = cli("--sysroot", str(trees / "no_node_dir"), "-o", str(out))
    assert done.returncode == 0 and done.stdout == ""
    assert [i.id for i in parse_text(out.read_text()).local.resources["cpus"]] == ["0", "1"]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--sysroot", "/nonexistent/tree"], 1, "is not a directory"),
        (["--format", "xml"], 2, "argument -f/--format: invalid choice: 'xml'"),
        (["--slots-per-gpu", "0"], 2, "slots-per-gpu"),
        (["-o", "/nonexistent/dir/pool.yaml"], 1, "cannot write"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args: list[str], code: int, says: str) -> None:
    done = cli(*args)
    assert done.returncode == code
    assert says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("ctest") is None, reason="ctest (cmake) not installed")
def test_real_ctest_accepts_the_spec(trees: Path, tmp_path: Path) -> None:
    """ctest itself reads the spec and hands a test a core and a MIG device."""
    spec = tmp_path / "spec.json"
    pool = detect_pool(trees / "cgroup_v2_cpuset", mig=True, gpu_report=REPORT)
    spec.write_text(dumps(pool, "ctest"))
    (tmp_path / "CTestTestfile.cmake").write_text(
        f'add_test(t "{sys.executable}" -c "import os; print(sorted('
        "(k, v) for k, v in os.environ.items() if k.startswith('CTEST_RESOURCE')))\")\n"
        'set_tests_properties(t PROPERTIES RESOURCE_GROUPS "cpus:1,gpus:1")\n'
    )
    done = subprocess.run(
        ["ctest", "--resource-spec-file", str(spec), "-V"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    given = dict(re.findall(r"\('(CTEST_RESOURCE_GROUP_0_\w+)', '([^']*)'\)", done.stdout))
    assert re.fullmatch(r"id:[2-6],slots:1", given["CTEST_RESOURCE_GROUP_0_CPUS"])
    assert re.fullmatch(r"id:(0|1_0|1_3|2),slots:1", given["CTEST_RESOURCE_GROUP_0_GPUS"])


def test_cli_mig_with_fake_nvml(fake_nvml_dir: Path, tmp_path: Path) -> None:
    """Live root, the real pynvml over the fake libnvidia-ml.so.1 (no driver here)."""
    config = nf.write_config(
        tmp_path / "nvml.conf",
        [
            {"uuid": "GPU-a", "name": "NVIDIA A100", "memory": 42949672960, "numa_node": 0},
            {
                "uuid": "GPU-b",
                "name": "NVIDIA A100",
                "mig_mode": 1,
                "migs": [
                    {"slot": 0, "uuid": "MIG-b0", "memory": 10737418240, "gi": 1, "ci": 0},
                    {"slot": 1, "uuid": "MIG-b1", "memory": 10737418240, "gi": 2, "ci": 0},
                ],
            },
        ],
        driver_version="550.54.15",
    )
    env = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(fake_nvml_dir)}
    env["FAKE_NVML_CONFIG"] = str(config)
    for form in FORMATS:
        done = cli("--mig", "--slots-per-gpu", "2", "--format", form, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""  # NVML answered: nothing to say
        pool = parse_text(done.stdout, format=form)
        gpus = pool.local.resources["gpus"]
        assert [(g.id, g.slots) for g in gpus] == [("0", 2), ("1_0", 2), ("1_1", 2)]
        if form == "canary-nodes":  # canary exports CUDA_VISIBLE_DEVICES from these
            assert gpus[1].properties["uuid"] == "MIG-b0"
            assert gpus[1].properties["vendor"] == "NVIDIA"


# --- the live machine -------------------------------------------------------------------------


def test_live_usable_cpus_are_the_affinity() -> None:
    affinity = os.sched_getaffinity(0)
    pool = detect_pool("/", gpu_report=NO_GPUS)
    threads = [c for i in pool.local.resources["cpus"] for c in i.properties["threads"]]
    assert sorted(threads) == sorted(affinity)
    per_thread = detect_pool("/", hyperthreads=True, gpu_report=NO_GPUS)
    assert {int(i.id) for i in per_thread.local.resources["cpus"]} == affinity
    report = topology_report("/", gpu_report=NO_GPUS)
    assert report["allowed_pus"] == len(affinity)


def test_live_affinity_narrowed_in_a_child(tmp_path: Path) -> None:
    """A process pinned to one CPU (by the kernel, not a mock) offers just that CPU."""
    cpu = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
        "from rpool_agent.detect import topology_report as t; "
        "from rpool_agent.probes.nvidia import GpuReport as G; "
        "print(t('/', gpu_report=G((), None, None, 'none', None))['allowed_cpulist'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(cpu)
