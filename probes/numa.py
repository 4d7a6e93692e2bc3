"""NUMA nodes: their CPUs, memory and distances, read through a `Root`.

Node numbers can be sparse (0, 2, 4), a node can have memory and no CPU (CXL memory, GPU
memory on Grace/POWER) or CPUs and no memory. A kernel without NUMA support has no
`node/` folder: that machine is one node 0 holding every CPU and all the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sysfs import Root, as_root

NODE = "sys/devices/system/node"


@dataclass(slots=True)
class NumaNode:
    """One NUMA node: its CPUs, its memory and its distance to every node."""

    id: int
    cpus: tuple[int, ...]  # may be empty (memory-only node)
    memory_bytes: int | None  # MemTotal; 0 for a CPU-only node, None if unreadable
    distances: tuple[int, ...] | None  # to each node of NumaTopology.nodes, in that order


@dataclass(slots=True)
class NumaTopology:
    """What `probe_numa` found: every node, and whether sysfs said or it was made up."""

    nodes: tuple[NumaNode, ...]  # by node id
    source: str  # "sysfs", or "none" when the single node 0 was made up

    def node_of(self, cpu: int) -> int | None:
        """The node holding `cpu` (the lowest, if a buggy firmware lists it twice)."""
        return next((n.id for n in self.nodes if cpu in n.cpus), None)

    def distance(self, a: int, b: int) -> int | None:
        ids = [n.id for n in self.nodes]
        if a not in ids or b not in ids:
            return None
        row = self.nodes[ids.index(a)].distances
        return row[ids.index(b)] if row is not None else None


def node_ids(root: Root | str = "/") -> tuple[int, ...] | None:
    """Online node numbers, or None when there is no `node/` folder at all."""
    r = as_root(root)
    if not r.exists(NODE):
        return None
    online = r.read_cpulist(f"{NODE}/online")  # same list syntax as CPUs
    dirs = [int(n[4:]) for n in r.listdir(NODE) if n.startswith("node") and n[4:].isdigit()]
    # `online` is missing on old kernels; a node listed online but without its folder
    # cannot be read, so only folders count.
    return tuple(sorted(d for d in dirs if online is None or d in online))


def node_cpus(root: Root | str, node: int) -> tuple[int, ...]:
    r = as_root(root)
    base = f"{NODE}/node{node}"
    cpus = r.read_cpulist(f"{base}/cpulist")
    if cpus is None:  # before 2.6.2x only the hex `cpumap`
        cpus = r.read_cpumask(f"{base}/cpumap")
    if cpus is None:  # last resort: the cpuN links in the node folder
        cpus = [int(n[3:]) for n in r.listdir(base) if n.startswith("cpu") and n[3:].isdigit()]
    return tuple(sorted(cpus))


def node_memory(root: Root | str, node: int) -> int | None:
    """`Node N MemTotal: X kB` from `nodeN/meminfo`, in bytes."""
    return _memtotal(as_root(root), f"{NODE}/node{node}/meminfo")


def node_distances(root: Root | str, node: int) -> tuple[int, ...] | None:
    """The node's row of the distance matrix: one number per ONLINE node, by node id
    (the kernel prints `for_each_online_node`)."""
    text = as_root(root).read(f"{NODE}/node{node}/distance", default=None)
    try:
        return tuple(int(v) for v in text.split()) if text else None
    except ValueError:
        return None


def _memtotal(r: Root, rel: str) -> int | None:
    for line in r.lines(rel):
        if "MemTotal:" in line:
            words = line.split("MemTotal:", 1)[1].split()
            try:
                factor = 1024 if words[1:2] == ["kB"] else 1
                return int(words[0]) * factor
            except (ValueError, IndexError):
                return None
    return None


def probe_numa(root: Root | str = "/", cpus: tuple[int, ...] | None = None) -> NumaTopology:
    """Every online node. `cpus` (default: the online CPUs) fills node 0 when the kernel
    has no `node/` folder."""
    r = as_root(root)
    ids = node_ids(r)
    if ids is None or not ids:
        if cpus is None:
            from .cpu import online_cpus

            cpus = online_cpus(r)
        node = NumaNode(0, tuple(cpus), _memtotal(r, "proc/meminfo"), (10,))
        return NumaTopology((node,), "none")
    nodes = []
    for n in ids:
        row = node_distances(r, n)
        nodes.append(
            NumaNode(
                id=n,
                cpus=node_cpus(r, n),
                memory_bytes=node_memory(r, n),
                distances=row if row is not None and len(row) == len(ids) else None,
            )
        )
    return NumaTopology(tuple(nodes), "sysfs")
