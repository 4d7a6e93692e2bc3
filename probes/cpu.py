"""Logical CPUs, physical cores, packages, and the CPUs this process may use.

Everything is read through a `Root`, so a recorded `/sys` + `/proc` tree is probed exactly
like the live machine. Each fact has its own small function with its fallbacks in place
(newest kernel interface first, the reason for each older one beside it).

Cores and packages are *sets of sibling CPUs*, never `core_id` / `physical_package_id`
numbers: `core_id` repeats across dies and NUMA nodes on real machines, and
`physical_package_id` is -1 on s390 and POWER.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .cgroup import CpuQuota, Cpuset, cgroup_limits
from .cgroup import cgroup_cpuset as _cgroup_cpuset
from .sysfs import Root, as_root

__all__ = ["CpuQuota", "CpuTopology", "Cpuset", "probe_cpus"]

CPU = "sys/devices/system/cpu"


@dataclass(slots=True)
class Core:
    """One physical core: its online hardware threads (hyperthread siblings), ascending."""

    cpus: tuple[int, ...]
    package: int  # index into CpuTopology.packages
    core_id: int | None  # topology/core_id as the kernel says; NOT unique across dies


@dataclass(slots=True)
class Package:
    """One socket: its online CPUs, ascending."""

    cpus: tuple[int, ...]
    physical_id: int | None  # physical_package_id; None where the kernel says -1


@dataclass(slots=True)
class CpuTopology:
    """What `probe_cpus` found. `usable` = affinity ∩ cpuset ∩ online."""

    online: tuple[int, ...]
    offline: tuple[int, ...]  # present but not online
    possible: tuple[int, ...]
    present: tuple[int, ...]
    cores: tuple[Core, ...]  # online cores, ordered by their lowest CPU
    packages: tuple[Package, ...]  # ordered by their lowest CPU
    usable: tuple[int, ...]
    affinity: tuple[int, ...] | None  # None: not the live root, or not supported
    cpuset: Cpuset | None  # None: no cgroup cpuset found
    model_name: str | None
    vendor: str | None
    core_source: str  # which file gave the sibling sets ("core_cpus_list", ... "cpuinfo")
    quota: CpuQuota | None = None  # a cgroup CPU quota (cpu.max, cfs_quota_us); None: none

    def usable_cores(self) -> list[tuple[int, ...]]:
        """Each core's usable threads, for cores with at least one, by lowest usable CPU."""
        allowed = set(self.usable)
        picked = [tuple(c for c in core.cpus if c in allowed) for core in self.cores]
        return sorted((p for p in picked if p), key=lambda p: p[0])


# --- which CPUs exist ---------------------------------------------------------------------


def online_cpus(root: Root | str = "/") -> tuple[int, ...]:
    r = as_root(root)
    cpus = r.read_cpulist(f"{CPU}/online")
    if cpus is None:
        # Kernels before 2.6.25ish have no `online` summary: each hot-pluggable cpuN has
        # its own `online` flag, and one without the flag (usually cpu0) cannot go offline.
        dirs = _cpu_dirs(r)
        cpus = [n for n in dirs if r.read(f"{CPU}/cpu{n}/online", default="1") != "0"] or None
    if cpus is None:
        # No /sys at all (some containers): /proc/stat has one `cpuN` line per online CPU.
        cpus = [
            int(line[3:].split()[0])
            for line in r.lines("proc/stat")
            if line.startswith("cpu") and line[3:4].isdigit()
        ]
    return tuple(cpus)


def present_cpus(root: Root | str = "/") -> tuple[int, ...]:
    r = as_root(root)
    cpus = r.read_cpulist(f"{CPU}/present")
    return tuple(cpus) if cpus is not None else tuple(_cpu_dirs(r)) or online_cpus(r)


def possible_cpus(root: Root | str = "/") -> tuple[int, ...]:
    r = as_root(root)
    cpus = r.read_cpulist(f"{CPU}/possible")
    return tuple(cpus) if cpus is not None else present_cpus(r)


def offline_cpus(root: Root | str = "/") -> tuple[int, ...]:
    """Present CPUs that are not online. Not the kernel's `offline` file: that one also
    lists possible-but-absent CPUs (a VM with `possible` 0-127 shows `offline` 2-127)."""
    r = as_root(root)
    online = set(online_cpus(r))
    return tuple(c for c in present_cpus(r) if c not in online)


def _cpu_dirs(r: Root) -> list[int]:
    return sorted(int(n[3:]) for n in r.listdir(CPU) if n.startswith("cpu") and n[3:].isdigit())


# --- cores and packages ---------------------------------------------------------------------

# Newest name first: `core_cpus*` and `package_cpus*` arrived in Linux 5.3; the older names
# (still present) mean the same. The hex masks are all that kernels before 2.6.2x have.
_CORE_FILES = ("core_cpus_list", "thread_siblings_list", "core_cpus", "thread_siblings")
_PACKAGE_FILES = ("package_cpus_list", "core_siblings_list", "package_cpus", "core_siblings")


def thread_siblings(root: Root | str, cpu: int) -> tuple[tuple[int, ...], str] | None:
    """The hardware threads sharing `cpu`'s core, and the file that said so."""
    return _sibling_file(as_root(root), cpu, _CORE_FILES)


def package_siblings(root: Root | str, cpu: int) -> tuple[tuple[int, ...], str] | None:
    """The CPUs sharing `cpu`'s package, and the file that said so."""
    return _sibling_file(as_root(root), cpu, _PACKAGE_FILES)


def core_id(root: Root | str, cpu: int) -> int | None:
    return as_root(root).read_int(f"{CPU}/cpu{cpu}/topology/core_id")


def package_id(root: Root | str, cpu: int) -> int | None:
    """`physical_package_id`, or None where the kernel says -1 (s390, POWER)."""
    value = as_root(root).read_int(f"{CPU}/cpu{cpu}/topology/physical_package_id")
    return None if value is None or value < 0 else value


def _sibling_file(r: Root, cpu: int, names: tuple[str, ...]) -> tuple[tuple[int, ...], str] | None:
    for name in names:
        rel = f"{CPU}/cpu{cpu}/topology/{name}"
        cpus = r.read_cpulist(rel) if name.endswith("_list") else r.read_cpumask(rel)
        if cpus:
            return tuple(cpus), name
    return None


def cores_and_packages(
    root: Root | str, online: tuple[int, ...]
) -> tuple[tuple[Core, ...], tuple[Package, ...], str]:
    """Group online CPUs into cores and packages by their sibling sets.

    One topology read per core, not per CPU: a CPU already placed in a sibling set needs no
    read of its own. Without any topology files, `/proc/cpuinfo`'s `physical id` and
    `core id` pairs group them (as psutil does); without those, each CPU is its own core in
    one package (we cannot pair what the kernel does not describe).
    """
    r = as_root(root)
    on = set(online)
    core_of: dict[int, tuple[int, ...]] = {}
    package_of: dict[int, tuple[int, ...]] = {}
    source = ""
    for cpu in online:
        if cpu in core_of:
            continue
        found = thread_siblings(r, cpu)
        if found is None:
            continue
        threads = tuple(c for c in found[0] if c in on) or (cpu,)
        source = source or found[1]
        for c in threads:
            core_of[c] = threads
        if cpu not in package_of:
            pkg = package_siblings(r, cpu)
            members = tuple(c for c in pkg[0] if c in on) if pkg else threads
            for c in members or threads:
                package_of[c] = members or threads
    missing = [c for c in online if c not in core_of]
    cpuinfo_ids: dict[int, int | None] = {}  # `physical id` of the CPUs cpuinfo grouped
    if missing:
        fallback = _fallback_groups(r, missing, core_of, package_of, cpuinfo_ids)
        source = source or fallback
    packages = sorted(set(package_of.values()), key=lambda p: p[0])
    index = {p: i for i, p in enumerate(packages)}
    cores = tuple(
        Core(threads, index[package_of[threads[0]]], core_id(r, threads[0]))
        for threads in sorted(set(core_of.values()), key=lambda t: t[0])
    )
    ids = [package_id(r, p[0]) for p in packages]
    ids = [cpuinfo_ids.get(p[0]) if i is None else i for i, p in zip(ids, packages, strict=True)]
    return cores, tuple(Package(p, i) for p, i in zip(packages, ids, strict=True)), source


def _fallback_groups(
    r: Root,
    cpus: list[int],
    core_of: dict[int, tuple[int, ...]],
    package_of: dict[int, tuple[int, ...]],
    physical_ids: dict[int, int | None],
) -> str:
    """Cores and packages for CPUs without sibling files. Packages: the package sibling
    files if those remain, else `physical_package_id`, else /proc/cpuinfo's `physical id`.
    Cores: (package, `die_id`, `core_id`) from sysfs, else cpuinfo's (`physical id`,
    `core id`); a CPU nothing describes is its own core. (Grouping every such CPU into one
    package would contradict `physical_package_id`.) Returns the source name:
    "physical_package_id", "cpuinfo", or "none" when nothing described them."""
    info = _cpuinfo_topology(r)
    core_groups: dict[object, list[int]] = {}
    package_groups: dict[object, list[int]] = {}
    source = "none"
    for c in cpus:
        phys, core = info.get(c, (None, None))
        sys_pkg, sys_core = package_id(r, c), core_id(r, c)
        siblings = package_siblings(r, c)
        if sys_pkg is not None or sys_core is not None:
            phys, core, source = sys_pkg, sys_core, "physical_package_id"
        elif c in info:
            source = "cpuinfo" if source == "none" else source
        physical_ids[c] = phys
        pkg_key = siblings[0] if siblings else ("id", phys)
        die = r.read_int(f"{CPU}/cpu{c}/topology/die_id")
        core_groups.setdefault((pkg_key, die, core) if core is not None else ("cpu", c), []).append(
            c
        )
        package_groups.setdefault(pkg_key, []).append(c)
    for groups, into in ((core_groups, core_of), (package_groups, package_of)):
        for members in groups.values():
            into.update(dict.fromkeys(members, tuple(members)))
    return source


def _cpuinfo_topology(r: Root) -> dict[int, tuple[int | None, int | None]]:
    """`processor` -> (`physical id`, `core id`) from /proc/cpuinfo; empty if it has none."""
    out: dict[int, tuple[int | None, int | None]] = {}
    cpu: int | None = None
    phys: int | None = None
    for line in [*r.lines("proc/cpuinfo"), ""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            cpu = int(value)
        elif key == "physical id" and value.isdigit():
            phys = int(value)
        elif key == "core id" and value.isdigit() and cpu is not None:
            out[cpu] = (phys, int(value))
        elif not key:
            cpu = phys = None
    return out


# --- what this process may use --------------------------------------------------------------


def affinity(root: Root | str = "/") -> tuple[int, ...] | None:
    """This process's CPU affinity, only when `root` is the live system: a recorded tree
    from another machine is not described by this process's mask."""
    r = as_root(root)
    if not r.is_live or not hasattr(os, "sched_getaffinity"):
        return None
    return tuple(sorted(os.sched_getaffinity(0)))


def cgroup_cpuset(root: Root | str = "/") -> Cpuset | None:
    """The cpuset of this process's cgroup (CPUs and memory nodes); see cgroup.py."""
    return _cgroup_cpuset(as_root(root))


def usable_cpus(root: Root | str = "/", online: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Online CPUs this process may run on: affinity (live root only) ∩ cgroup cpuset."""
    r = as_root(root)
    return _intersect(online_cpus(r) if online is None else online, affinity(r), cgroup_cpuset(r))


def _intersect(
    online: tuple[int, ...], aff: tuple[int, ...] | None, cpuset: Cpuset | None
) -> tuple[int, ...]:
    allowed = set(online)
    if aff is not None:
        allowed &= set(aff)
    if cpuset is not None:
        allowed &= set(cpuset.cpus)
    return tuple(sorted(allowed))


# --- what the CPU is ----------------------------------------------------------------------

# `CPU implementer` codes from the Arm ARM (and Linux's arch/arm64/include/asm/cputype.h).
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x46": "Fujitsu",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x50": "APM",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0x6d": "Microsoft",
    "0xc0": "Ampere",
}
_MODEL_KEYS = ("model name", "cpu model", "cpu", "Processor", "Hardware")
_VENDOR_KEYS = ("vendor_id", "vendor", "CPU implementer")


def model_and_vendor(root: Root | str = "/") -> tuple[str | None, str | None]:
    """CPU model name and vendor from `/proc/cpuinfo`, read only as far as needed.

    Not py-cpuinfo's `get_cpu_info()`: it re-runs Python, runs `lscpu` and others and takes
    about a second. x86 says `model name` and `vendor_id` in the first record; arm64 has a
    `CPU implementer` code; POWER says `cpu`; s390 `vendor_id`.
    """
    return _model_and_vendor(_cpuinfo_head(as_root(root)))


def _cpuinfo_head(r: Root) -> dict[str, str]:
    """The first record's fields that model, vendor and AMD family 21 need (the other
    records repeat them)."""
    fields: dict[str, str] = {}
    for line in r.lines("proc/cpuinfo"):
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if sep and key in (*_MODEL_KEYS, *_VENDOR_KEYS, "cpu family") and value:
            fields.setdefault(key, value)
        if not key and fields.get("model name") and fields.get("vendor_id"):
            break  # x86: the first record has both; the other records repeat them
    return fields


def _threads_are_cores(fields: dict[str, str]) -> bool:
    """True on AMD family 21 (Bulldozer, Piledriver...): the kernel shows each compute
    unit's two threads as siblings, but each is a core of its own (integer units, L1)."""
    return fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "21"


def _model_and_vendor(fields: dict[str, str]) -> tuple[str | None, str | None]:
    model = next((fields[k] for k in _MODEL_KEYS if k in fields), None)
    vendor = next((fields[k] for k in _VENDOR_KEYS if k in fields), None)
    if vendor is not None and vendor.lower() in _ARM_IMPLEMENTERS:
        vendor = _ARM_IMPLEMENTERS[vendor.lower()]
    return model, vendor


# --- all of it ------------------------------------------------------------------------------


def probe_cpus(root: Root | str = "/") -> CpuTopology:
    r = as_root(root)
    online = online_cpus(r)
    present = present_cpus(r)
    cores, packages, source = cores_and_packages(r, online)
    aff, (cpuset, quota) = affinity(r), cgroup_limits(r)
    head = _cpuinfo_head(r)
    model, vendor = _model_and_vendor(head)
    if _threads_are_cores(head):  # hardware.md: on AMD family 21 each thread is a core
        cores = tuple(Core((t,), c.package, c.core_id) for c in cores for t in c.cpus)
        source += " (AMD family 21: each thread a core)"
    on = set(online)
    return CpuTopology(
        online=online,
        offline=tuple(c for c in present if c not in on),
        possible=possible_cpus(r),
        present=present,
        cores=cores,
        packages=packages,
        usable=_intersect(online, aff, cpuset),
        affinity=aff,
        cpuset=cpuset,
        model_name=model,
        vendor=vendor,
        core_source=source,
        quota=quota,
    )
