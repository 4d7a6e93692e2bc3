"""The allocator's bookkeeping per resource type: instances, free slots, request shapes.

A `Table` holds one type's instances in pool order with two `FreeIndex`es (free now, and
"could it ever fit" on the empty pool); a `Shape` is what granting a request needs that
free slots do not change, built once per request value and pool.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import PoolFormatError
from .lease import Slice
from .placement import FreeIndex, NodeKey, Plan
from .pool import Pool
from .requests import Request


@dataclass(eq=False)
class Inst:
    type: str
    id: str
    pos: int
    slots: int
    node: NodeKey
    used: int = 0
    live: bool = True


class Table:
    """One resource type: its instances in pool order, free and whole-pool indexes."""

    def __init__(self, rtype: str, insts: list[Inst]) -> None:
        self.type = rtype
        self.insts = insts  # live, pool order
        self.by_id: dict[str, Inst] = {i.id: i for i in insts}  # live and vanished
        nodes = [i.node for i in insts]
        self.free = FreeIndex(nodes)
        self.cap = FreeIndex(nodes)  # every live instance empty: "could it ever fit?"
        for i in insts:
            self.cap.add(i.pos, i.node, i.slots)
        self._slices: dict[tuple[int, int], Slice] = {}

    def slice(self, pos: int, slots: int) -> Slice:
        """The (immutable, so shared) Slice for `slots` of a live instance."""
        got = self._slices.get((pos, slots))
        if got is None:
            got = self._slices[pos, slots] = Slice(self.type, self.insts[pos].id, slots)
        return got

    def vanished(self, rid: str, used: int) -> Inst:
        inst = Inst(self.type, rid, len(self.insts) + len(self.by_id), 0, None, used, False)
        self.by_id[rid] = inst
        return inst


class Shape:
    """A normalized request and all that granting it needs which free slots do not change.

    Built once per request value and pool (the allocator keeps them in a bounded cache,
    and each waiter holds its own), so a grant is `place_plan` from `plan` plus a commit that
    knows per type which units to sum: no re-reading of the request on the hot path.
    """

    __slots__ = (
        "bounds",
        "cap",
        "distinct",
        "free",
        "n",
        "per_type",
        "plan",
        "request",
        "types",
        "units",
    )

    def __init__(self, request: Request, tables: Mapping[str, Table]) -> None:
        units = request.units()
        self.request = request
        self.types = request.types()
        self.distinct = request.distinct
        self.n = len(units)
        self.free = {t: tables[t].free for t in self.types}
        self.cap = {t: tables[t].cap for t in self.types}  # "could it ever fit?"
        self.plan = Plan(units, self.free)
        # per type, first appearance order: its table and (unit index, slots) of its units
        per_type: dict[str, list[tuple[int, int]]] = {}
        for i, u in enumerate(units):
            per_type.setdefault(u.type, []).append((i, u.slots))
        self.per_type = [(tables[t], lst) for t, lst in per_type.items()]
        # per unit (request order) its table and slots, and where each group's units are
        self.units = [(tables[u.type], u.slots) for u in units]
        self.bounds: list[tuple[int, int]] = []
        for g in request.groups:
            start = self.bounds[-1][1] if self.bounds else 0
            self.bounds.append((start, start + len(g)))

    def slices(self, positions: list[int]) -> tuple[tuple[Slice, ...], ...]:
        """The lease's groups: per request group, per unit, its slice."""
        return self.grouped([t.slice(positions[i], n) for i, (t, n) in enumerate(self.units)])

    def grouped(self, slices: list[Slice]) -> tuple[tuple[Slice, ...], ...]:
        """Per-unit slices (request order) cut into the request's groups."""
        if len(self.bounds) == 1:
            return (tuple(slices),)
        return tuple([tuple(slices[a:b]) for a, b in self.bounds])


def type_order(pool: Pool) -> list[str]:
    return list(dict.fromkeys(t for n in pool.nodes for t in n.resources))


def build_tables(pool: Pool) -> dict[str, Table]:
    """Instance tables per type, in pool order; PoolFormatError on what cannot be served."""
    tables: dict[str, Table] = {}
    for rtype in type_order(pool):
        insts: list[Inst] = []
        seen: set[str] = set()
        for _, inst in pool.instances(rtype):
            if not isinstance(inst.id, str) or inst.id in seen:
                raise PoolFormatError(f"duplicate or bad {rtype} id {inst.id!r}")
            if not isinstance(inst.slots, int) or isinstance(inst.slots, bool) or inst.slots < 0:
                raise PoolFormatError(f"{rtype} {inst.id!r}: slots must be a whole number >= 0")
            seen.add(inst.id)
            numa = inst.properties.get("numa_node")
            node = numa if isinstance(numa, int) and not isinstance(numa, bool) else None
            if node is not None and node < 0:  # sysfs says -1 for "no NUMA information"
                node = None
            insts.append(Inst(rtype, inst.id, len(insts), inst.slots, node))
        tables[rtype] = Table(rtype, insts)
    return tables


def why_unsatisfiable(request: Request, tables: Mapping[str, Table]) -> str:
    """Why the empty pool cannot hold `request`, in words, for the Unsatisfiable error."""
    for rtype, need in request.totals().items():
        insts = tables[rtype].insts
        have = sum(i.slots for i in insts)
        if need > have:
            return f"{need} {rtype} slots asked for, the pool has {have}"
        count = sum(1 for u in request.units() if u.type == rtype)
        if request.distinct and count > len(insts):
            return f"{count} different {rtype} asked for, the pool has {len(insts)}"
        biggest = max((u.slots for u in request.units() if u.type == rtype), default=0)
        largest = max((i.slots for i in insts), default=0)
        if biggest > largest:
            return f"a unit of {biggest} {rtype} slots, the largest instance has {largest}"
    return "no placement of its units fits the pool"
