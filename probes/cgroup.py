"""This process's cgroup limits: its cpuset (CPUs and memory nodes) and its CPU quota.

Where the files are: `/proc/self/cgroup` names the process's cgroup per hierarchy (v2:
`0::<path>`; v1: `N:cpuset:<path>`, `N:cpu,cpuacct:<path>`); when it has no cpuset line
(older kernels, many recorded machines) `/proc/self/cpuset` names the cpuset, as hwloc
reads it. The mount tables say where each hierarchy is mounted and which part of it
(mountinfo's root field): inside a container that is not `/`, and inside a cgroup
namespace whose mount came from outside, it is `/..` (above the namespace's root). A path
that cannot be expressed under the mount is not guessed: that mount says nothing about us
(the old reading took the mount's root, the host's whole cpuset).

Kinds of mount: cgroup2; cgroup v1 with the `cpuset` (or `cpu`) option, files prefixed
`cpuset.` unless mounted `noprefix`; and the legacy `cpuset` file system (`mount -t
cpuset`, often on /dev/cpuset), whose files have no prefix. A tree recorded without mount
tables is read at the usual places, as hwloc does: /sys/fs/cgroup (v2), then
/sys/fs/cgroup/cpuset, then /dev/cpuset.

Nearest ancestor wins for the cpuset (v2: a cgroup without the cpuset controller enabled
has no `cpuset.*.effective` files and follows its parent); the smallest quota on the way
up to the mount's root wins for the CPU quota (each level limits everything below it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .sysfs import Mount, Root, mounts

_Reader = Callable[[Root, str], "tuple[int, int, str] | None"]

V2 = "/sys/fs/cgroup"


@dataclass(slots=True)
class Cpuset:
    """A cgroup cpuset that restricts this process, and the files it was read from."""

    cpus: tuple[int, ...]
    file: str  # path under the root, e.g. "/sys/fs/cgroup/ci.slice/cpuset.cpus.effective"
    version: int  # cgroup version: 1 (the legacy cpuset file system too) or 2
    mems: tuple[int, ...] | None = None  # memory nodes it may allocate on; None: not said
    mems_file: str | None = None


@dataclass(slots=True)
class CpuQuota:
    """A CFS bandwidth limit: `quota_us` of CPU time every `period_us`, for the cgroup."""

    quota_us: int
    period_us: int
    file: str
    version: int

    @property
    def cpus(self) -> float:
        """The limit in CPUs (0.5 under `docker --cpus 0.5`)."""
        return self.quota_us / self.period_us

    @property
    def limit(self) -> int:
        """Whole CPUs the pool may offer: floor(quota / period), at least one."""
        return max(1, self.quota_us // self.period_us)


# Per mount kind: the cpus files, then the mems files, nearest-first within a folder.
_V2_CPUS, _V2_MEMS = ("cpuset.cpus.effective",), ("cpuset.mems.effective",)
_V1_CPUS = ("cpuset.effective_cpus", "cpuset.cpus")
_V1_MEMS = ("cpuset.effective_mems", "cpuset.mems")
_BARE_CPUS, _BARE_MEMS = ("effective_cpus", "cpus"), ("effective_mems", "mems")


def cgroup_limits(r: Root) -> tuple[Cpuset | None, CpuQuota | None]:
    """The cpuset and the CPU quota, from one reading of `/proc/self/cgroup` and the mounts."""
    paths, table = _cgroup_paths(r), mounts(r)
    return _cpuset(r, paths, table), _quota(r, paths, table)


def cgroup_cpuset(r: Root) -> Cpuset | None:
    """The cpuset of this process's cgroup: v2 first, then v1 / the legacy cpuset fs."""
    return _cpuset(r, _cgroup_paths(r), mounts(r))


def _cpuset(r: Root, paths: dict[str, str], table: list[Mount]) -> Cpuset | None:
    places = _cpuset_places(r, paths, table)
    for version, base, rel, cpus_names, mems_names in places:
        hit = _walk_up(r, base, rel, cpus_names)
        if hit is None:
            continue
        mems = _walk_up(r, base, rel, mems_names)
        return Cpuset(hit[0], hit[1], version, *(mems or (None, None)))
    if not places and ("" in paths or "cpuset" in paths):
        return _from_status(r, 2 if "" in paths else 1)
    return None


def _from_status(r: Root, version: int) -> Cpuset | None:
    """Our cgroup is there but no mount shows its folder (a cgroup namespace whose mount
    came from outside it): `/proc/self/status` still says what the kernel allows us."""
    rel = "proc/self/status"
    cpus = mems = None
    for line in r.lines(rel):
        key, _, value = line.partition(":")
        if key == "Cpus_allowed_list":
            cpus = _list(value)
        elif key == "Mems_allowed_list":
            mems = _list(value)
    if not cpus:
        return None
    return Cpuset(cpus, f"/{rel}", version, mems, f"/{rel}" if mems else None)


def _list(text: str) -> tuple[int, ...] | None:
    from .sysfs import parse_cpulist

    try:
        return tuple(parse_cpulist(text)) or None
    except ValueError:
        return None


def _quota(r: Root, paths: dict[str, str], table: list[Mount]) -> CpuQuota | None:
    """The tightest CFS quota over this process's cgroup and its ancestors, or None."""
    if "" in paths:
        for m in [m for m in table if m.fstype == "cgroup2"] or _default_v2(table):
            rel = _relative(paths[""], m.root)
            if rel is not None:
                found = _tightest(r, m.mountpoint, rel, _read_cpu_max, 2)
                if found is not None:
                    return found
    if "cpu" in paths:
        for m in table:
            if m.fstype == "cgroup" and "cpu" in m.options:
                rel = _relative(paths["cpu"], m.root)
                if rel is not None:
                    found = _tightest(r, m.mountpoint, rel, _read_cfs, 1)
                    if found is not None:
                        return found
    return None


# --- where to look --------------------------------------------------------------------------


def _cgroup_paths(r: Root) -> dict[str, str]:
    """Controller -> cgroup path from `/proc/self/cgroup`; the v2 entry is under "". The
    cpuset's comes from `/proc/self/cpuset` when `cgroup` has no cpuset line."""
    out: dict[str, str] = {}
    for line in r.lines("proc/self/cgroup"):
        parts = line.rstrip("\n").split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            out[""] = parts[2]
        for controller in parts[1].split(","):
            if controller:
                out.setdefault(controller, parts[2])
    if "cpuset" not in out:
        legacy = r.read("proc/self/cpuset", default=None)
        if legacy and legacy.startswith("/"):
            out["cpuset"] = legacy
    return out


def _default_v2(table: list[Mount]) -> list[Mount]:
    """A tree recorded without mount tables: the usual v2 mount point."""
    return [] if table else [Mount(V2, "cgroup2", frozenset())]


def _cpuset_places(
    r: Root, paths: dict[str, str], table: list[Mount]
) -> list[tuple[int, str, str, tuple[str, ...], tuple[str, ...]]]:
    """(version, mount point, path under it, cpus files, mems files), in the order tried."""
    out: list[tuple[int, str, str, tuple[str, ...], tuple[str, ...]]] = []
    if "" in paths:
        for m in [m for m in table if m.fstype == "cgroup2"] or _default_v2(table):
            rel = _relative(paths[""], m.root)
            if rel is not None:
                out.append((2, m.mountpoint, rel, _V2_CPUS, _V2_MEMS))
    if "cpuset" in paths:
        v1 = [m for m in table if _is_v1_cpuset(m)]
        if not table:  # no mount tables recorded: hwloc's usual places
            v1 = [Mount(f"{V2}/cpuset", "cgroup", frozenset({"cpuset"})), _LEGACY]
        for m in v1:
            rel = _relative(paths["cpuset"], m.root)
            if rel is None:
                continue
            bare = m.fstype == "cpuset" or "noprefix" in m.options
            cpus, mems = (_BARE_CPUS, _BARE_MEMS) if bare else (_V1_CPUS, _V1_MEMS)
            out.append((1, m.mountpoint, rel, cpus, mems))
    return out


_LEGACY = Mount("/dev/cpuset", "cpuset", frozenset())


def _is_v1_cpuset(m: Mount) -> bool:
    return (m.fstype == "cgroup" and "cpuset" in m.options) or m.fstype == "cpuset"


def _relative(path: str, mount_root: str) -> str | None:
    """`path` (from /proc/self/cgroup) as a path under a mount of `mount_root`, or None
    when it is not under it: a mount of another part of the hierarchy, or (a root or path
    starting `/..`) one made outside our cgroup namespace, whose folder names we cannot
    know from here."""
    if ".." in path.split("/") or ".." in mount_root.split("/"):
        return None
    if mount_root in ("/", ""):
        return path
    if path == mount_root or path.startswith(mount_root.rstrip("/") + "/"):
        return path[len(mount_root.rstrip("/")) :] or "/"
    return None


# --- reading --------------------------------------------------------------------------------


def _folders(mountpoint: str, path: str) -> list[str]:
    """The cgroup's folder and each ancestor's, nearest first, up to the mount point."""
    parts = [p for p in path.split("/") if p and p != "."]
    base = mountpoint.rstrip("/")
    return ["/".join([base, *parts[:n]]) for n in range(len(parts), -1, -1)]


def _walk_up(
    r: Root, mountpoint: str, path: str, names: tuple[str, ...]
) -> tuple[tuple[int, ...], str] | None:
    for here in _folders(mountpoint, path):
        for name in names:
            cpus = r.read_cpulist(f"{here}/{name}")
            if cpus:  # an empty effective set means "not configured here", as the kernel does
                return tuple(cpus), f"{here}/{name}"
    return None


def _tightest(r: Root, mountpoint: str, path: str, read: _Reader, version: int) -> CpuQuota | None:
    best: CpuQuota | None = None
    for here in _folders(mountpoint, path):
        got = read(r, here)
        if got is not None and (best is None or got[0] * best.period_us < best.quota_us * got[1]):
            best = CpuQuota(got[0], got[1], got[2], version)
    return best


def _read_cpu_max(r: Root, here: str) -> tuple[int, int, str] | None:
    """v2 `cpu.max`: "max 100000" (no limit) or "50000 100000"."""
    rel = f"{here}/cpu.max"
    words = (r.read(rel, default="") or "").split()
    if len(words) != 2 or not words[0].isdigit() or not words[1].isdigit():
        return None
    quota, period = int(words[0]), int(words[1])
    return (quota, period, rel) if quota > 0 and period > 0 else None


def _read_cfs(r: Root, here: str) -> tuple[int, int, str] | None:
    """v1 `cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    quota, period = r.read_int(f"{here}/cpu.cfs_quota_us"), r.read_int(f"{here}/cpu.cfs_period_us")
    if quota is None or period is None or quota <= 0 or period <= 0:
        return None
    return quota, period, f"{here}/cpu.cfs_quota_us"
