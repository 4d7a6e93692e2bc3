"""Write the recorded /sys + /proc trees under tests/trees/<machine>/ (committed; tests read
the files, not this script). Run `python tests/trees/make_trees.py` after changing it.

Each tree mirrors a real kind of machine, with only the files the probes read. Shapes:
- two_socket_ht: 2 sockets x 2 NUMA nodes (Intel SNC2 / AMD NPS2), 4 cores x 2 threads
  per socket, Linux numbering (first threads 0-7, siblings 8-15), cgroup v2 root.
- offline_cpus: 1 socket, 4 cores x 2 threads, CPUs 3, 5, 7 offline (one whole core),
  `possible` 0-15 as on a VM; cgroup v1 cpuset (hybrid hierarchy, like this CI VM);
  a 4.x kernel: thread_siblings_list / core_siblings_list but no core_cpus_list.
- cgroup_v2_cpuset: 8 cores x 2 threads; the process sits in ci.slice/runner.service/job42
  whose cpuset comes from runner.service (2-6,10-13: core 6 only half).
- memory_only_node: arm64 (no SMT), nodes 0 and 1 with CPUs, node 4 memory only (CXL),
  sparse numbering.
- no_node_dir: kernel without NUMA: no sys/devices/system/node, no cgroup files.
- old_kernel_hex: no cpu/online|present|possible, no *_list files (hex masks only, two
  32-bit words), per-CPU `online` flags (cpu7 off), node cpumap only, /proc/mounts only.
- core_id_repeat: 2 packages x 2 dies x 2 cores x 2 threads; core_id is 0/1 in every die
  and physical_package_id is -1 (as on POWER and s390).
- cpuset_legacy: an old kernel's cpuset file system on /dev/cpuset, named only by
  /proc/self/cpuset; arm64 cpuinfo (no physical id), 2 packages of 4.
- cgroupns: a container in a cgroup namespace whose /sys/fs/cgroup is the host's
  hierarchy (mountinfo root `/../..`); /proc/self/status says what it may use.
Every tree with `*_list` files also has the hex masks (real kernels write both; hwloc
reads only the masks), and the cpuset files say `mems` too.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from rpool_agent.probes.sysfs import format_cpulist as cpulist

HERE = Path(__file__).resolve().parent
CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"

X86_CPUINFO = """processor\t: {n}
vendor_id\t: {vendor}
cpu family\t: 6
model\t\t: 143
model name\t: {model}
physical id\t: {package}
siblings\t: {siblings}
core id\t\t: {core}
cpu cores\t: {cores}
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep ht

"""

ARM_CPUINFO = """processor\t: {n}
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 0

"""


def cpumask(cpus: list[int], words: int = 2) -> str:
    value = sum(1 << c for c in cpus)
    return ",".join(f"{(value >> (32 * w)) & 0xFFFFFFFF:08x}" for w in reversed(range(words)))


class Tree:
    def __init__(self, name: str) -> None:
        self.base = HERE / name
        shutil.rmtree(self.base, ignore_errors=True)

    def write(self, rel: str, text: str) -> None:
        path = self.base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")

    def cpus(
        self,
        cores: list[list[int]],
        package_of: Callable[[int], int],
        *,
        online: list[int] | None = None,
        possible: int | None = None,
        lists: bool = True,
        package_id: Callable[[int], int] | None = None,
        core_id: Callable[[int], int] | None = None,
        die_of: Callable[[int], int] | None = None,
        old_names_only: bool = False,
    ) -> None:
        """`cores`: each core's threads (core index k); `package_of(k)` its package."""
        every = sorted(c for core in cores for c in core)
        on = set(every if online is None else online)
        if lists:
            self.write(f"{CPU}/online", cpulist(sorted(on)))
            self.write(f"{CPU}/present", cpulist(every))
            self.write(f"{CPU}/possible", f"0-{(possible or len(every)) - 1}")
            absent = set(range(possible or len(every))) - on
            self.write(f"{CPU}/offline", cpulist(sorted(absent)))
        for k, threads in enumerate(cores):
            package = [c for j, t in enumerate(cores) if package_of(j) == package_of(k) for c in t]
            die = [c for j, t in enumerate(cores) if die_of and die_of(j) == die_of(k) for c in t]
            for cpu in threads:
                if not lists and cpu != 0:  # old kernels: a per-CPU flag, cpu0 has none
                    self.write(f"{CPU}/cpu{cpu}/online", "1" if cpu in on else "0")
                if cpu not in on:
                    self.write(f"{CPU}/cpu{cpu}/uevent", "")  # folder stays, topology goes
                    continue
                topo = f"{CPU}/cpu{cpu}/topology"
                sib = [c for c in threads if c in on]
                pkg = [c for c in package if c in on]
                # Every kernel writes the hex masks (hwloc reads only these); 2.6.2x+ adds the
                # lists; Linux 5.3+ writes core_cpus*/package_cpus* too, kernel 4.x does not
                self.write(f"{topo}/thread_siblings", cpumask(sib))
                if lists:
                    self.write(f"{topo}/thread_siblings_list", cpulist(sib))
                self.write(f"{topo}/core_siblings", cpumask(pkg))
                if lists:
                    self.write(f"{topo}/core_siblings_list", cpulist(pkg))
                    if not old_names_only:
                        self.write(f"{topo}/package_cpus", cpumask(pkg))
                        self.write(f"{topo}/package_cpus_list", cpulist(pkg))
                        self.write(f"{topo}/core_cpus", cpumask(sib))
                        self.write(f"{topo}/core_cpus_list", cpulist(sib))
                if die_of:
                    self.write(f"{topo}/die_id", str(die_of(k) % 2))
                    self.write(f"{topo}/die_cpus_list", cpulist([c for c in die if c in on]))
                self.write(f"{topo}/core_id", str(core_id(k) if core_id else k))
                pid = package_id(k) if package_id else package_of(k)
                self.write(f"{topo}/physical_package_id", str(pid))

    def nodes(
        self,
        nodes: dict[int, list[int]],
        memory_kib: dict[int, int],
        distance: Callable[[int, int], int],
        *,
        lists: bool = True,
    ) -> None:
        ids = sorted(nodes)
        if lists:
            self.write(f"{NODE}/online", cpulist(ids))
            self.write(f"{NODE}/possible", cpulist(ids))
            self.write(f"{NODE}/has_cpu", cpulist([n for n in ids if nodes[n]]))
            self.write(f"{NODE}/has_memory", cpulist([n for n in ids if memory_kib[n]]))
        for n in ids:
            base = f"{NODE}/node{n}"
            if lists:
                self.write(f"{base}/cpulist", cpulist(nodes[n]))
            self.write(f"{base}/cpumap", cpumask(nodes[n]))
            self.write(f"{base}/distance", " ".join(str(distance(n, m)) for m in ids))
            kib = memory_kib[n]
            self.write(
                f"{base}/meminfo",
                f"Node {n} MemTotal:       {kib} kB\nNode {n} MemFree:        {kib // 2} kB\n",
            )

    def proc(
        self,
        host: str,
        cpuinfo: str,
        memory_kib: int,
        cgroup: str | None = None,
        mountinfo: str | None = None,
        mounts: str | None = None,
        mounts_at: str = "proc/self/mounts",
    ) -> None:
        self.write("proc/sys/kernel/hostname", host)
        self.write("proc/cpuinfo", cpuinfo)
        self.write("proc/meminfo", f"MemTotal:       {memory_kib} kB\nMemFree: 1024 kB\n")
        if cgroup is not None:
            self.write("proc/self/cgroup", cgroup)
        if mountinfo is not None:
            self.write("proc/self/mountinfo", mountinfo)
            if mounts is None:  # the kernel has both; hwloc reads only /proc/mounts
                mounts, mounts_at = _mounts_of(mountinfo), "proc/mounts"
        if mounts is not None:
            self.write(mounts_at, mounts)

    def cpuset(self, folder: str, cpus: str, mems: str, prefix: str = "", suffix: str = "") -> None:
        """A cpuset folder's cpus and mems files: `cpus` (the legacy cpuset file system),
        `cpuset.cpus` (v1), `cpuset.cpus.effective` (v2)."""
        self.write(f"{folder}/{prefix}cpus{suffix}", cpus)
        self.write(f"{folder}/{prefix}mems{suffix}", mems)

    def cgroup_v2_root(self, effective: str, mems: str = "0") -> None:
        """The process in the root cgroup of a pure v2 hierarchy at /sys/fs/cgroup."""
        self.write("proc/self/cgroup", "0::/")
        self.write("proc/self/mountinfo", V2_MOUNTINFO)
        self.write("proc/mounts", _mounts_of(V2_MOUNTINFO))
        self.write("sys/fs/cgroup/cgroup.controllers", V2_CONTROLLERS)
        self.cpuset("sys/fs/cgroup", effective, mems, prefix="cpuset.", suffix=".effective")


def x86_cpuinfo(
    cores: list[list[int]],
    package_of: Callable[[int], int],
    model: str,
    online: list[int] | None = None,
) -> str:
    """One record per online CPU, as the kernel prints them."""
    by_cpu = {c: k for k, t in enumerate(cores) for c in t if online is None or c in online}
    per_pkg = sum(1 for k in range(len(cores)) if package_of(k) == 0)
    return "".join(
        X86_CPUINFO.format(
            n=c,
            vendor="GenuineIntel",
            model=model,
            package=package_of(by_cpu[c]),
            siblings=per_pkg * len(cores[0]),
            core=by_cpu[c] % per_pkg,
            cores=per_pkg,
        )
        for c in sorted(by_cpu)
    )


V2_CONTROLLERS = "cpuset cpu io memory hugetlb pids rdma misc"


def _mounts_of(mountinfo: str) -> str:
    """/proc/mounts lines for mountinfo lines (the same mounts, without the root field)."""
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        opts = fields[5] + ("," + tail[2] if len(tail) > 2 else "")
        out.append(f"{tail[1]} {fields[4]} {tail[0]} {opts} 0 0")
    return "\n".join(out) + "\n"


V2_MOUNTINFO = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"  # noqa: E501
GIB_KIB = 1024 * 1024


def two_socket_ht() -> None:
    t = Tree("two_socket_ht")
    cores = [[k, k + 8] for k in range(8)]
    t.cpus(cores, lambda k: k // 4, core_id=lambda k: k % 4)
    nodes = {n: [2 * n, 2 * n + 1, 2 * n + 8, 2 * n + 9] for n in range(4)}
    dist = lambda a, b: 10 if a == b else (11 if a // 2 == b // 2 else 21)  # noqa: E731
    t.nodes(nodes, dict.fromkeys(range(4), 64 * GIB_KIB), dist)
    t.proc(
        "sapphire",
        x86_cpuinfo(cores, lambda k: k // 4, "Intel(R) Xeon(R) Platinum 8480+"),
        256 * GIB_KIB,
    )
    t.cgroup_v2_root("0-15", "0-3")


def offline_cpus() -> None:
    t = Tree("offline_cpus")
    cores = [[k, k + 4] for k in range(4)]
    online = [0, 1, 2, 4, 6]
    t.cpus(cores, lambda k: 0, online=online, possible=16, old_names_only=True)
    t.nodes({0: online}, {0: 16 * GIB_KIB}, lambda a, b: 10)
    t.proc(
        "hotplug",
        x86_cpuinfo(cores, lambda k: 0, "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", online),
        16 * GIB_KIB,
        cgroup="4:memory:/user.slice\n3:cpuset:/\n0::/user.slice/session-1.scope\n",
        mounts=(
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"
            "cgroup /sys/fs/cgroup/cpuset cgroup rw,nosuid,nodev,noexec,relatime,cpuset 0 0\n"
        ),
    )
    # hybrid hierarchy: the v2 mount has no cpuset controller, so no cpuset files there
    t.write("sys/fs/cgroup/unified/user.slice/cgroup.controllers", "")
    t.write("sys/fs/cgroup/cpuset/cpuset.cpus", "0-7")
    t.write("sys/fs/cgroup/cpuset/cpuset.effective_cpus", cpulist(online))
    t.write("sys/fs/cgroup/cpuset/cpuset.mems", "0")


def cgroup_v2_cpuset() -> None:
    t = Tree("cgroup_v2_cpuset")
    cores = [[k, k + 8] for k in range(8)]
    t.cpus(cores, lambda k: 0)
    t.nodes({0: list(range(16))}, {0: 128 * GIB_KIB}, lambda a, b: 10)
    t.proc(
        "runner07",
        x86_cpuinfo(cores, lambda k: 0, "AMD EPYC 7313P 16-Core Processor").replace(
            "GenuineIntel", "AuthenticAMD"
        ),
        128 * GIB_KIB,
        cgroup="0::/ci.slice/runner.service/job42\n",
        mountinfo=V2_MOUNTINFO,
    )
    cg = "sys/fs/cgroup"
    t.write(f"{cg}/cgroup.controllers", V2_CONTROLLERS)
    for where in ("", "/ci.slice", "/ci.slice/runner.service"):
        t.write(f"{cg}{where}/cpuset.mems.effective", "0")
    t.write(f"{cg}/cpuset.cpus.effective", "0-15")
    t.write(f"{cg}/ci.slice/cpuset.cpus.effective", "0-15")
    t.write(f"{cg}/ci.slice/runner.service/cpuset.cpus", "2-6,10-13")
    t.write(f"{cg}/ci.slice/runner.service/cpuset.cpus.effective", "2-6,10-13")
    # job42 has no cpuset controller enabled: no cpuset files, it follows runner.service
    t.write(f"{cg}/ci.slice/runner.service/job42/cgroup.procs", "4242")


def memory_only_node() -> None:
    t = Tree("memory_only_node")
    cores = [[k] for k in range(8)]
    t.cpus(cores, lambda k: 0)
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 4: []}
    dist = lambda a, b: 10 if a == b else (40 if 4 in (a, b) else 20)  # noqa: E731
    t.nodes(nodes, {0: 32 * GIB_KIB, 1: 32 * GIB_KIB, 4: 128 * GIB_KIB}, dist)
    t.proc(
        "armada",
        "".join(ARM_CPUINFO.format(n=n) for n in range(8)),
        192 * GIB_KIB,
    )
    # In hbm.slice: every CPU, but memory from node 0 and the CXL node 4 only (not 1)
    t.cgroup_v2_root("0-7", "0-1,4")
    t.write("proc/self/cgroup", "0::/hbm.slice")
    t.cpuset("sys/fs/cgroup/hbm.slice", "0-7", "0,4", prefix="cpuset.", suffix=".effective")


def no_node_dir() -> None:
    t = Tree("no_node_dir")
    cores = [[0, 2], [1, 3]]
    t.cpus(cores, lambda k: 0)
    t.proc(
        "tiny",
        x86_cpuinfo(cores, lambda k: 0, "Intel(R) Celeron(R) N4020 CPU @ 1.10GHz"),
        4 * GIB_KIB,
    )


def old_kernel_hex() -> None:
    t = Tree("old_kernel_hex")
    cores = [[0, 4], [1, 5], [2, 6], [3, 7]]
    online = [0, 1, 2, 3, 4, 5, 6]
    t.cpus(cores, lambda k: k // 2, online=online, lists=False)
    t.nodes(
        {0: [0, 1, 4, 5], 1: [2, 3, 6]},
        {0: 8 * GIB_KIB, 1: 8 * GIB_KIB},
        lambda a, b: 10 if a == b else 20,
        lists=False,
    )
    t.proc(
        "vintage",
        x86_cpuinfo(cores, lambda k: k // 2, "Intel(R) Xeon(R) CPU E5520 @ 2.27GHz", online),
        16 * GIB_KIB,
        cgroup="2:cpuset:/batch\n1:cpu,cpuacct:/\n",
        mounts="cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0\n",
        mounts_at="proc/mounts",
    )
    for folder in ("sys/fs/cgroup/cpuset", "sys/fs/cgroup/cpuset/batch"):
        t.cpuset(folder, "0-7", "0-1", prefix="cpuset.")


def core_id_repeat() -> None:
    t = Tree("core_id_repeat")
    cores = [[k, k + 8] for k in range(8)]
    t.cpus(
        cores,
        lambda k: k // 4,
        package_id=lambda k: -1,
        core_id=lambda k: k % 2,
        die_of=lambda k: k // 2,
    )
    t.nodes(
        {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]},
        {0: 64 * GIB_KIB, 1: 64 * GIB_KIB},
        lambda a, b: 10 if a == b else 32,
    )
    t.proc(
        "dies",
        x86_cpuinfo(cores, lambda k: k // 4, "Intel(R) Xeon(R) CPU Max 9480"),
        128 * GIB_KIB,
    )
    t.cgroup_v2_root("0-15", "0-1")


def cpuset_legacy() -> None:
    """An old kernel's cpuset file system on /dev/cpuset, named only by /proc/self/cpuset
    (/proc/self/cgroup has no cpuset line)."""
    t = Tree("cpuset_legacy")
    cores = [[k] for k in range(8)]
    t.cpus(cores, lambda k: k // 4, old_names_only=True)
    t.nodes({0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, {0: 8 * GIB_KIB, 1: 8 * GIB_KIB},
            lambda a, b: 10 if a == b else 20)  # fmt: skip
    t.proc(
        "legacy",
        "".join(ARM_CPUINFO.format(n=n) for n in range(8)),  # no physical id lines
        16 * GIB_KIB,
        cgroup="1:name=systemd:/user.slice/session-3.scope\n",
        mounts="none /dev/cpuset cpuset rw,relatime 0 0\n",
        mounts_at="proc/mounts",
    )
    t.write("proc/self/cpuset", "/batch/job7")
    t.cpuset("dev/cpuset", "0-7", "0-1")
    t.cpuset("dev/cpuset/batch", "2-7", "0-1")
    t.cpuset("dev/cpuset/batch/job7", "2-5", "1")


def cgroupns() -> None:
    """A container in its own cgroup namespace, whose /sys/fs/cgroup is the host's
    hierarchy mounted from outside it: mountinfo says its root is `/../..`, above the
    namespace's root, and /proc/self/cgroup says `0::/`. The folder of the container's
    cgroup cannot be named from there; /proc/self/status still says what the kernel
    allows this process."""
    t = Tree("cgroupns")
    cores = [[k, k + 4] for k in range(4)]
    t.cpus(cores, lambda k: 0)
    t.nodes({0: list(range(8))}, {0: 32 * GIB_KIB}, lambda a, b: 10)
    t.proc(
        "pod-7f3a",
        x86_cpuinfo(cores, lambda k: 0, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"),
        32 * GIB_KIB,
        cgroup="0::/\n",
        mountinfo=V2_MOUNTINFO.replace(" / /sys/fs/cgroup ", " /../.. /sys/fs/cgroup "),
    )
    cg = "sys/fs/cgroup"
    t.write(f"{cg}/cgroup.controllers", V2_CONTROLLERS)
    t.write(f"{cg}/cpuset.cpus.effective", "0-5")  # the host's root: 6-7 isolated
    t.write(f"{cg}/cpuset.mems.effective", "0")
    t.cpuset(f"{cg}/kubepods.slice/pod-7f3a", "1-2,5-6", "0", prefix="cpuset.", suffix=".effective")
    t.write(
        "proc/self/status",
        "Name:\tcat\nCpus_allowed:\t66\nCpus_allowed_list:\t1-2,5-6\n"
        "Mems_allowed:\t00000001\nMems_allowed_list:\t0\n",
    )


MACHINES = [
    two_socket_ht,
    offline_cpus,
    cgroup_v2_cpuset,
    memory_only_node,
    no_node_dir,
    old_kernel_hex,
    core_id_repeat,
    cpuset_legacy,
    cgroupns,
]

if __name__ == "__main__":
    for make in MACHINES:
        make()
        print(f"wrote {HERE / make.__name__}")
