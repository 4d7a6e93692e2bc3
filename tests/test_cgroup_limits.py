"""What this process may use beyond the cpuset's CPUs (issue 12, items 6-9): CPU quotas,
memory nodes, old and namespaced cgroup layouts, and a GPU whose NUMA node has no CPUs.

All against recorded trees (tests/trees, made by make_trees.py) or copies of them with
one file changed, so each case says which file makes the difference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rpool_agent.probes import cpu
from rpool_agent.probes.gpu import Gpu
from rpool_agent.probes.nvidia import GpuReport
from rpool_agent.probes.sysfs import parse_cpulist

from rpool_agent.detect import detect_pool, topology_report

NO_GPUS = GpuReport((), None, None, "none", None)


def copy(trees: Path, name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(trees / name, root)
    return root


def cpu_ids(root: Path, **kw: object) -> list[str]:
    pool = detect_pool(root, gpu_report=NO_GPUS, **kw)  # type: ignore[arg-type]
    return [i.id for i in pool.local.resources["cpus"]]


# --- 7: CPU quota ---------------------------------------------------------------------------


def test_v2_cpu_max_limits_the_pool_and_the_tightest_ancestor_wins(
    trees: Path, tmp_path: Path
) -> None:
    """`docker --cpus 2.5` on a host without a cpuset: every CPU was offered."""
    root = copy(trees, "cgroup_v2_cpuset", tmp_path)
    cg = root / "sys/fs/cgroup/ci.slice"
    (cg / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs for the whole slice
    (cg / "runner.service/cpu.max").write_text("max 100000\n")  # no limit of its own
    (cg / "runner.service/job42/cpu.max").write_text("400000 100000\n")  # looser: moot
    assert cpu_ids(root) == ["2", "3"]  # floor(2.5) cores, the lowest-numbered
    assert cpu_ids(root, hyperthreads=True) == ["2", "3"]
    report = topology_report(root, gpu_report=NO_GPUS)
    assert report["cpu_quota"] == {
        "quota_us": 250000,
        "period_us": 100000,
        "cpus": 2.5,
        "pool_cpus": 2,
        "file": "/sys/fs/cgroup/ci.slice/cpu.max",
        "version": 2,
    }
    assert report["allowed_pus"] == 9  # the cpuset is still what it was
    pool = detect_pool(root, gpu_report=NO_GPUS)
    assert pool.additional_properties["cpu_quota"] == 2.5


def test_a_quota_under_one_cpu_still_offers_one(trees: Path, tmp_path: Path) -> None:
    root = copy(trees, "two_socket_ht", tmp_path)
    (root / "sys/fs/cgroup/cpu.max").write_text("50000 100000\n")  # docker --cpus 0.5
    assert cpu_ids(root) == ["0"]
    done = subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "detect", "--sysroot", str(root), "-f", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cpu_quota"]["cpus"] == 0.5


def test_v1_cfs_quota(trees: Path, tmp_path: Path) -> None:
    root = copy(trees, "old_kernel_hex", tmp_path)  # cgroup line "1:cpu,cpuacct:/"
    (root / "proc/mounts").write_text(
        (root / "proc/mounts").read_text()
        + "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n"
    )
    cg = root / "sys/fs/cgroup/cpu,cpuacct"
    cg.mkdir(parents=True)
    (cg / "cpu.cfs_quota_us").write_text("300000\n")
    (cg / "cpu.cfs_period_us").write_text("100000\n")
    quota = cpu.probe_cpus(root).quota
    assert quota is not None and (quota.cpus, quota.limit, quota.version) == (3.0, 3, 1)
    assert cpu_ids(root) == ["0", "1", "2"]
    (cg / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no limit"
    assert cpu.probe_cpus(root).quota is None and len(cpu_ids(root)) == 4


# --- 8: memory nodes ------------------------------------------------------------------------


def test_memory_nodes_and_cpu_nodes_are_reported_apart(trees: Path) -> None:
    """The CXL node 4 has no CPU but its memory is allowed; node 1's memory is not."""
    report = topology_report(trees / "memory_only_node", gpu_report=NO_GPUS)
    assert report["allowed_nodelist"] == "0,4"
    assert report["allowed_cpu_nodelist"] == "0-1"
    cpuset = report["cpu"]["cpuset"]
    assert cpuset["mems"] == [0, 4]
    assert cpuset["mems_file"] == "/sys/fs/cgroup/hbm.slice/cpuset.mems.effective"


# --- 9: recorded and namespaced cgroups ------------------------------------------------------


def test_legacy_cpuset_fs_named_by_proc_self_cpuset(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "cpuset_legacy")
    assert t.cpuset is not None
    assert (t.cpuset.file, t.cpuset.version) == ("/dev/cpuset/batch/job7/cpus", 1)
    assert t.usable == (2, 3, 4, 5) and t.cpuset.mems == (1,)


def test_missing_sibling_files_keep_physical_packages(trees: Path, tmp_path: Path) -> None:
    """A tree recorded with only some topology files (arm64: cpuinfo has no physical id
    either): every CPU once landed in one package although physical_package_id says 2."""
    root = copy(trees, "cpuset_legacy", tmp_path)
    for f in root.glob("sys/devices/system/cpu/cpu*/topology/*sibling*"):
        f.unlink()
    t = cpu.probe_cpus(root)
    assert [p.cpus for p in t.packages] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [p.physical_id for p in t.packages] == [0, 1]
    assert len(t.cores) == 8 and t.core_source == "physical_package_id"


def test_cgroup_namespace_mount_from_outside_is_not_read_as_ours(trees: Path) -> None:
    """mountinfo says /sys/fs/cgroup's root is /../.. (the host's hierarchy, above our
    namespace): its top folder is the host's root cpuset (0-5), not ours."""
    t = cpu.probe_cpus(trees / "cgroupns")
    assert t.cpuset is not None and t.cpuset.file == "/proc/self/status"
    assert t.usable == (1, 2, 5, 6) and t.cpuset.mems == (0,)


def test_v1_noprefix_mount(trees: Path, tmp_path: Path) -> None:
    root = copy(trees, "old_kernel_hex", tmp_path)
    (root / "proc/mounts").write_text(
        "cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset,noprefix 0 0\n"
    )
    batch = root / "sys/fs/cgroup/cpuset/batch"
    for name in ("cpuset.cpus", "cpuset.mems"):
        (batch / name).unlink()
    (batch / "cpus").write_text("4-6\n")
    assert cpu.probe_cpus(root).usable == (4, 5, 6)


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-15:2/8", [0, 1, 8, 9]),  # the kernel's grouped range: 2 of every 8
        ("100-130:2/25", [100, 101, 125, 126]),
        ("0-3,8", [0, 1, 2, 3, 8]),
    ],
)
def test_cpulist_grouped_ranges(text: str, cpus: list[int]) -> None:
    assert parse_cpulist(text) == cpus


# --- 6: a GPU whose NUMA node has no CPU (Grace Hopper) ----------------------------------------


def grace(index: int, node: int, affinity: tuple[int, ...] | None) -> Gpu:
    return Gpu(
        index, f"GPU-{index:08x}-0000-0000-0000-000000000000", "NVIDIA GH200 480GB",
        None, None, None, node, affinity, "9.0", False, (),
    )  # fmt: skip


def test_gpu_memory_node_without_cpus_places_by_the_nearest_cpu_node(
    trees: Path, tmp_path: Path
) -> None:
    """NVML gives a GH200's NUMA node as its own memory's, which has no CPU: GPU+CPU
    placement packed it with nothing. The CPU node comes from the GPU's CPU affinity, else
    from the NUMA distances."""
    root = copy(trees, "memory_only_node", tmp_path)  # nodes 0, 1 with CPUs; 4 without
    node = root / "sys/devices/system/node"
    (node / "node0/distance").write_text("10 20 120\n")
    (node / "node1/distance").write_text("20 10 80\n")
    (node / "node4/distance").write_text("120 80 10\n")  # node 4 sits by node 1
    gpus = (grace(0, 4, (0, 1, 2, 3)), grace(1, 4, None), grace(2, 1, None))
    report = GpuReport(gpus, None, None, "nvml", None)
    pool = detect_pool(root, gpu_report=report)
    got = {g.id: g.properties for g in pool.local.resources["gpus"]}
    assert (got["0"]["numa_node"], got["0"]["memory_numa_node"]) == (0, 4)  # by affinity
    assert (got["1"]["numa_node"], got["1"]["memory_numa_node"]) == (1, 4)  # by distance
    assert got["2"]["numa_node"] == 1 and "memory_numa_node" not in got["2"]
    numa = pool.additional_properties["numa"]
    assert numa["0"]["gpus"] == ["0"] and numa["1"]["gpus"] == ["1", "2"]
    assert numa["4"]["gpus"] == []
