"""CPU probe against recorded /sys + /proc trees (tests/trees, made by make_trees.py) and
the live machine. Each test states the counts the machine it reads must give."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from rpool_agent.probes import cpu
from rpool_agent.probes.sysfs import Root, mounts


def test_two_sockets_with_hyperthreads(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "two_socket_ht")
    assert len(t.online) == 16 and t.offline == ()
    assert len(t.packages) == 2
    assert len(t.cores) == 8
    assert [c.cpus for c in t.cores[:2]] == [(0, 8), (1, 9)]
    assert [p.cpus for p in t.packages] == [
        (0, 1, 2, 3, 8, 9, 10, 11),
        (4, 5, 6, 7, 12, 13, 14, 15),
    ]
    assert [c.package for c in t.cores] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.model_name == "Intel(R) Xeon(R) Platinum 8480+"
    assert t.vendor == "GenuineIntel"
    assert t.core_source == "core_cpus_list"


def test_recorded_tree_ignores_live_affinity(trees: Path) -> None:
    # Another machine's tree is not described by this process's mask: only cgroup files count.
    t = cpu.probe_cpus(trees / "two_socket_ht")
    assert t.affinity is None
    assert t.usable == tuple(range(16))  # more CPUs than this 2-core VM has
    assert t.cpuset is not None and t.cpuset.version == 2


def test_offline_cpus(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "offline_cpus")
    assert t.online == (0, 1, 2, 4, 6)
    assert t.offline == (3, 5, 7)  # present but off; not the possible-but-absent 8-15
    assert t.possible == tuple(range(16)) and t.present == tuple(range(8))
    # core 3 (CPUs 3, 7) is wholly offline; core 1 keeps one thread
    assert [c.cpus for c in t.cores] == [(0, 4), (1,), (2, 6)]
    assert len(t.packages) == 1
    assert t.core_source == "thread_siblings_list"  # a 4.x kernel: no core_cpus_list


def test_cgroup_v1_cpuset_in_hybrid_hierarchy(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "offline_cpus")
    assert t.cpuset is not None
    assert t.cpuset.version == 1
    assert t.cpuset.file == "/sys/fs/cgroup/cpuset/cpuset.effective_cpus"
    assert t.usable == (0, 1, 2, 4, 6)


def test_cgroup_v2_cpuset_restriction(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "cgroup_v2_cpuset")
    assert len(t.online) == 16 and len(t.cores) == 8
    assert t.cpuset is not None and t.cpuset.version == 2
    # job42 has no cpuset files: the nearest ancestor with one decides
    assert t.cpuset.file == "/sys/fs/cgroup/ci.slice/runner.service/cpuset.cpus.effective"
    assert t.usable == (2, 3, 4, 5, 6, 10, 11, 12, 13)  # 9 usable CPUs
    assert t.usable_cores() == [(2, 10), (3, 11), (4, 12), (5, 13), (6,)]  # 5 usable cores
    assert t.vendor == "AuthenticAMD"


def test_cgroup_v2_inside_container_mount_root(trees: Path, tmp_path: Path) -> None:
    # Without a cgroup namespace, a container sees its full cgroup path in /proc/self/cgroup
    # while /sys/fs/cgroup is mounted from that cgroup: mountinfo's root field says so.
    root = tmp_path / "container"
    shutil.copytree(trees / "cgroup_v2_cpuset", root)
    scope = "/system.slice/docker-abc.scope"
    (root / "proc/self/cgroup").write_text(f"0::{scope}\n")
    (root / "proc/self/mountinfo").write_text(
        f"35 24 0:30 {scope} /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    )
    (root / "sys/fs/cgroup/cpuset.cpus.effective").write_text("1,9\n")
    t = cpu.probe_cpus(root)
    assert t.cpuset is not None and t.cpuset.file == "/sys/fs/cgroup/cpuset.cpus.effective"
    assert t.usable == (1, 9)
    assert t.usable_cores() == [(1, 9)]


def test_no_cgroup_files_means_no_restriction(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "no_node_dir")
    assert t.cpuset is None
    assert t.usable == (0, 1, 2, 3)
    assert [c.cpus for c in t.cores] == [(0, 2), (1, 3)]


def test_old_kernel_hex_masks_only(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "old_kernel_hex")
    # no cpu/online: per-CPU `online` flags (cpu0 has none, cpu7 says 0)
    assert t.online == (0, 1, 2, 3, 4, 5, 6)
    assert t.offline == (7,)
    assert t.core_source == "thread_siblings"  # the hex mask, two 32-bit words
    assert [c.cpus for c in t.cores] == [(0, 4), (1, 5), (2, 6), (3,)]  # 4 cores
    assert [p.cpus for p in t.packages] == [(0, 1, 4, 5), (2, 3, 6)]  # 2 packages
    # v1 cpuset found through /proc/mounts (no mountinfo, no self/mounts), no effective_cpus
    assert t.cpuset is not None and t.cpuset.file == "/sys/fs/cgroup/cpuset/batch/cpuset.cpus"
    assert t.usable == t.online  # the cpuset (0-7) includes offline 7; online wins


def test_core_id_repeating_across_dies(trees: Path) -> None:
    t = cpu.probe_cpus(trees / "core_id_repeat")
    assert {c.core_id for c in t.cores} == {0, 1}  # core_id alone would say 2 (or 4) cores
    assert len(t.cores) == 8
    assert len(t.packages) == 2
    assert all(p.physical_id is None for p in t.packages)  # physical_package_id is -1


def test_cpuinfo_fallback_without_topology_files(trees: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_topology"
    shutil.copytree(trees / "two_socket_ht", root)
    for d in root.glob("sys/devices/system/cpu/cpu*/topology"):
        shutil.rmtree(d)
    t = cpu.probe_cpus(root)
    assert t.core_source == "cpuinfo"
    assert len(t.cores) == 8 and len(t.packages) == 2
    assert t.cores[0].cpus == (0, 8)
    assert [p.physical_id for p in t.packages] == [0, 1]  # cpuinfo's `physical id`


def test_amd_family_21_threads_are_cores(trees: Path, tmp_path: Path) -> None:
    """Bulldozer's kernel shows a compute unit's two threads as siblings; hardware.md:
    each is a core of its own. The same tree as Intel keeps its 8 two-thread cores."""
    root = tmp_path / "bulldozer"
    shutil.copytree(trees / "two_socket_ht", root)
    info = root / "proc/cpuinfo"
    text = info.read_text().replace("GenuineIntel", "AuthenticAMD")
    info.write_text(text.replace("cpu family\t: 6", "cpu family\t: 21"))
    t = cpu.probe_cpus(root)
    assert len(t.cores) == 16 and all(len(c.cpus) == 1 for c in t.cores)
    assert len(t.packages) == 2 and [c.package for c in t.cores].count(0) == 8
    assert t.core_source == "core_cpus_list (AMD family 21: each thread a core)"
    assert len(cpu.probe_cpus(trees / "two_socket_ht").cores) == 8


def test_a_file_that_opens_but_cannot_be_read_is_a_missing_one(trees: Path, tmp_path: Path) -> None:
    """/proc/self/mem opens, and reading it at offset 0 fails with EIO: a real file of
    that kind (no mock). `lines()` once let the error through as a traceback."""
    root = tmp_path / "eio"
    shutil.copytree(trees / "two_socket_ht", root)
    (root / "proc/cpuinfo").unlink()
    (root / "proc/cpuinfo").symlink_to("/proc/self/mem")
    t = cpu.probe_cpus(root)
    assert (t.model_name, t.vendor) == (None, None) and len(t.cores) == 8


def test_empty_sysroot_is_the_live_root_for_cpus_as_for_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rpool_agent.detect import topology_report

    monkeypatch.chdir(tmp_path)  # "" once meant "." here, and "/" for the GPU probe
    assert topology_report("")["allowed_pus"] == topology_report("/")["allowed_pus"] > 0


def test_online_from_proc_stat_without_sys(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/stat").write_text("cpu  1 2 3\ncpu0 1 2 3\ncpu2 1 2 3\nintr 5\n")
    assert cpu.online_cpus(tmp_path) == (0, 2)
    t = cpu.probe_cpus(tmp_path)
    assert [c.cpus for c in t.cores] == [(0,), (2,)]  # nothing pairs them: one core each
    assert t.core_source == "none" and t.model_name is None


def test_sibling_fallback_order(trees: Path) -> None:
    r = Root(trees / "old_kernel_hex")
    assert cpu.thread_siblings(r, 3) == ((3,), "thread_siblings")
    assert cpu.package_siblings(r, 0) == ((0, 1, 4, 5), "core_siblings")
    assert cpu.thread_siblings(r, 7) is None  # offline: no topology folder


def test_arm_vendor_from_implementer(trees: Path) -> None:
    model, vendor = cpu.model_and_vendor(trees / "memory_only_node")
    assert vendor == "ARM" and model is None  # arm64 /proc/cpuinfo has no model name


def test_mount_table_unescapes_paths(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "1 0 0:1 /a\\040b /mnt/with\\040space rw - cgroup2 none rw\n"
    )
    (m,) = mounts(Root(tmp_path))
    assert (m.mountpoint, m.root, m.fstype) == ("/mnt/with space", "/a b", "cgroup2")


@pytest.mark.parametrize(
    "given", ["/", "//", "///x//", "/.", "/proc/..", ".", "", "./a/./b/", "a//b", "//a/."]
)
def test_root_joins_strings_as_pathlib_would(given: str, tmp_path: Path) -> None:
    """Root keeps strings (no pathlib on the detect path) but says what Path would."""
    r = Root(given)
    assert str(r) == str(r.path) == str(Path(given))
    assert repr(r) == f"Root({str(Path(given))!r})"
    assert r.is_live == (Path(given).resolve() == Path("/"))
    assert Path(r.file("sys/x")) == r.join("sys/x") == Path(given) / "sys/x"
    inside = Root(tmp_path / "tree/")
    (tmp_path / "tree/sys").mkdir(parents=True)
    (tmp_path / "tree/sys/online").write_text("0-1\n")
    assert inside.read("/sys/online") == "0-1" and inside.exists("sys/online")
    assert inside.listdir("sys") == ["online"] and inside.glob("sys/*") == ["/sys/online"]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_live_usable_is_affinity() -> None:
    t = cpu.probe_cpus("/")
    assert set(t.usable) == os.sched_getaffinity(0)
    assert t.affinity is not None
    assert len(t.cores) >= 1 and len(t.packages) >= 1
    assert set(t.usable) <= set(t.online)
    assert cpu.usable_cpus("/") == t.usable  # the one-fact function says the same
