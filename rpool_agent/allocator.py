"""The lease state machine: who holds which slots, who waits, and who is served next.

Pure and synchronous, like h11: the server feeds it inputs (a request, a release, a
closed connection, the clock) and writes out the events it returns. No I/O, no clock
(`now` is a parameter), no randomness (lease ids come from a callable the server passes).
An input the machine refuses raises a typed error and changes nothing.

Allocation is CTest's plan-then-commit: `place` is a pure planner that reads free
capacity and returns a placement or None (all or nothing); `Allocator._commit` applies a
placement and cannot fail. Placement rules (docs/allocation.md):

- one NUMA node when any node can hold every NUMA-bound unit; when GPUs are asked for,
  nodes are ranked by their free GPUs first (the GPUs' node decides where the CPUs go);
- otherwise as few nodes as possible: the GPUs spread first (a node that holds all that
  is left, best fit, else the node with the most free), then the other types fill the
  nodes already chosen before opening new ones;
- inside a node, canary's best fit: each unit (largest first) takes the instance with
  the fewest free slots that fit, pool order on ties.

The search is greedy and bounded: O(nodes * (nodes + units)) per request, never
CTest's backtracking (whose worst case is n!). When every unit is one slot greedy is
exact; with larger units on multi-slot instances a request that fits only by backtracking
is treated as not fitting. The satisfiability check runs the same planner on the whole
(empty) pool, so whatever is accepted into the queue is placed once its types are free.

Speed: what a grant needs that free slots do not change (the normalized request, its
units per type sorted for best fit, the NUMA nodes to try, how slices are summed) is a
`_Shape`, kept per request value until the pool changes; each waiter holds its own. A
grant is then best fit on per-node totals and free-slot buckets plus a commit.

Queue: first come, first served with safe backfill. The walk over waiters keeps a set of
blocked types (types of earlier waiters still waiting); a waiter touching a blocked type
is skipped and its types join the set, so nothing later ever takes what an earlier
waiter needs, and the head of the queue is granted as soon as its types are free.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import count
from types import MappingProxyType
from typing import Any, Union

from .errors import (
    ConfigError,
    NotOwner,
    PoolFormatError,
    RequestError,
    ResourceUnavailable,
    RpoolAgentError,
    Timeout,
    UnknownLease,
    UnknownResourceType,
    Unsatisfiable,
)
from .pool import Pool
from .requests import Request, Unit, parse_request

#: Who holds a lease: ("conn", n) for a connection, ("pid", pid, starttime) for a process.
OwnerKey = Hashable
#: A NUMA node number, or None for "no numa_node property" (one group of its own).
NodeKey = Union[int, None]  # noqa: UP007 - a runtime alias; `int | None` needs 3.10+ at runtime

#: Cached satisfiability answers and request shapes, cleared when the pool changes;
#: bounded against clients that send endless distinct requests. Requests of more than
#: _CACHE_UNITS units are planned afresh each time rather than kept (memory).
_SAT_CACHE_MAX = 4096
_SHAPE_CACHE_MAX = 4096
_CACHE_UNITS = 1024


# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Slots of one instance given out by a lease."""

    type: str
    id: str
    slots: int


@dataclass(frozen=True)
class Lease:
    """A grant: per request group, per unit (request order), the slice serving it.

    `held` is the same slots summed per instance, in pool order within each type; the
    allocator fills it in, and it defaults to first-appearance order when built by hand.
    """

    id: str
    owner: OwnerKey
    request: Request
    groups: tuple[tuple[Slice, ...], ...]
    label: str | None = None
    holder: Mapping[str, Any] = field(default_factory=dict, hash=False)
    granted_at: float = 0.0
    held: tuple[Slice, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "holder", dict(self.holder or {}))
        if not self.held and any(self.groups):
            summed: dict[tuple[str, str], int] = {}
            for g in self.groups:
                for s in g:
                    summed[s.type, s.id] = summed.get((s.type, s.id), 0) + s.slots
            held = tuple(Slice(t, i, n) for (t, i), n in summed.items())
            object.__setattr__(self, "held", held)

    @classmethod
    def _granted(
        cls,
        id: str,
        owner: OwnerKey,
        request: Request,
        groups: tuple[tuple[Slice, ...], ...],
        label: str | None,
        holder: Mapping[str, Any] | None,
        granted_at: float,
        held: tuple[Slice, ...],
    ) -> Lease:
        """The allocator's constructor: its values are consistent already, so skip the
        frozen dataclass's per-field setattr and `__post_init__` (the grant's hot path)."""
        lease = object.__new__(cls)
        lease.__dict__.update(
            id=id,
            owner=owner,
            request=request,
            groups=groups,
            label=label,
            holder=dict(holder) if holder else {},
            granted_at=granted_at,
            held=held,
        )
        return lease

    def resources(self) -> dict[str, list[dict[str, Any]]]:
        """The seed shape `{type: [{"id", "slots"}]}`: slots summed per id, pool order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for s in self.held:
            out.setdefault(s.type, []).append({"id": s.id, "slots": s.slots})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the durable state file (`from_dict` reads it back)."""
        return {
            "id": self.id,
            "owner": _jsonable(self.owner),
            "request": self.request.to_wire(),
            "groups": [[[s.type, s.id, s.slots] for s in g] for g in self.groups],
            "resources": self.resources(),
            "label": self.label,
            "holder": dict(self.holder),
            "granted_at": self.granted_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Lease:
        """Read a `to_dict` record; raise ConfigError (a ValueError) if it is malformed."""
        try:
            return cls._from_dict(d)
        except ConfigError:
            raise
        except (RpoolAgentError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad lease record: {exc}") from None

    @classmethod
    def _from_dict(cls, d: Any) -> Lease:
        if not isinstance(d, Mapping):
            raise ConfigError(f"bad lease record: expected an object, not {type(d).__name__}")
        lid = d["id"]
        if not isinstance(lid, str) or not lid:
            raise ConfigError("bad lease record: 'id' must be a non-empty string")
        request = parse_request(d["request"])
        groups = tuple(tuple(_slice(x) for x in g) for g in d["groups"])
        if [len(g) for g in groups] != [len(g) for g in request.groups] or any(
            s.type != u.type or s.slots != u.slots
            for g, rg in zip(groups, request.groups, strict=False)
            for s, u in zip(g, rg, strict=False)
        ):
            raise ConfigError(f"bad lease record {lid!r}: groups do not match the request")
        held = tuple(
            _slice([t, e["id"], e["slots"]]) for t, lst in d["resources"].items() for e in lst
        )
        label = d.get("label")
        holder = d.get("holder") or {}
        granted_at = d.get("granted_at", 0.0)
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"bad lease record {lid!r}: 'label' must be a string")
        if not isinstance(holder, Mapping):
            raise ConfigError(f"bad lease record {lid!r}: 'holder' must be an object")
        if not isinstance(granted_at, (int, float)) or isinstance(granted_at, bool):
            raise ConfigError(f"bad lease record {lid!r}: 'granted_at' must be a number")
        return cls(
            id=lid,
            owner=_hashable(d["owner"]),
            request=request,
            groups=groups,
            label=label,
            holder=holder,
            granted_at=float(granted_at),
            held=held,
        )


def _slice(x: Any) -> Slice:
    t, i, n = x
    if not isinstance(t, str) or not isinstance(i, str):
        raise ConfigError("bad lease record: slice type and id must be strings")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError("bad lease record: slice slots must be a whole number >= 0")
    return Slice(t, i, n)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    owner: OwnerKey
    req_id: Any
    lease: Lease


@dataclass(frozen=True)
class Queued:
    owner: OwnerKey
    req_id: Any
    position: int  # 1 = next in line


@dataclass(frozen=True)
class Denied:
    owner: OwnerKey
    req_id: Any
    error: RpoolAgentError


@dataclass(frozen=True)
class Released:
    owner: OwnerKey
    lease_id: str


@dataclass(frozen=True)
class Reaped:
    owner: OwnerKey
    lease_ids: tuple[str, ...]


Event = Union[Granted, Queued, Denied, Released, Reaped]  # noqa: UP007 - runtime alias


# --- free-slot bookkeeping ---------------------------------------------------------------


def _node_rank(node: NodeKey) -> tuple[int, int]:
    return (1, 0) if node is None else (0, node)


class FreeIndex:
    """Free slots of one resource type, bucketed per NUMA node and per free amount.

    Best fit asks for "the instance with the fewest free slots >= k, first in pool
    order"; with buckets that is a walk up from bucket k, not a scan of every instance,
    and per-node totals answer "can this node hold it" in O(1). Positions are pool order.
    """

    __slots__ = ("_buckets", "_keys", "free", "node_of", "nodes", "topological", "total", "totals")

    def __init__(self, nodes: Iterable[NodeKey]) -> None:
        self.nodes: list[NodeKey] = sorted(set(nodes), key=_node_rank)
        self.topological = any(n is not None for n in self.nodes)
        self.totals: dict[NodeKey, int] = dict.fromkeys(self.nodes, 0)
        self.total = 0  # over all nodes
        self._buckets: dict[NodeKey, dict[int, list[int]]] = {n: {} for n in self.nodes}
        self._keys: dict[NodeKey, list[int]] = {n: [] for n in self.nodes}
        self.free: dict[int, int] = {}
        self.node_of: dict[int, NodeKey] = {}

    def add(self, pos: int, node: NodeKey, free: int) -> None:
        self._file(node, free, pos)
        self.free[pos] = free
        self.node_of[pos] = node
        self.totals[node] += free
        self.total += free

    def discard(self, pos: int) -> None:
        free = self.free.pop(pos, None)
        if free is None:
            return
        node = self.node_of.pop(pos)
        self._unfile(node, free, pos)
        self.totals[node] -= free
        self.total -= free

    def set(self, pos: int, free: int) -> None:
        """Move a member to another bucket (the hot path of every grant and release).

        Not a member (drained, vanished): nothing to do."""
        old = self.free.get(pos)
        if old is None or old == free:
            return
        node = self.node_of[pos]
        bucket = self._buckets[node]
        members = bucket[old]
        if len(members) == 1:
            del bucket[old]
            keys = self._keys[node]
            del keys[bisect_left(keys, old)]
        else:
            del members[bisect_left(members, pos)]
        members = bucket.get(free)
        if members is None:
            bucket[free] = [pos]
            insort(self._keys[node], free)
        else:
            insort(members, pos)
        self.free[pos] = free
        self.totals[node] += free - old
        self.total += free - old

    def _file(self, node: NodeKey, free: int, pos: int) -> None:
        bucket = self._buckets[node]
        members = bucket.get(free)
        if members is None:
            bucket[free] = [pos]
            insort(self._keys[node], free)
        else:
            insort(members, pos)

    def _unfile(self, node: NodeKey, free: int, pos: int) -> None:
        bucket = self._buckets[node]
        members = bucket[free]
        del members[bisect_left(members, pos)]
        if not members:
            del bucket[free]
            keys = self._keys[node]
            del keys[bisect_left(keys, free)]

    def first(self, node: NodeKey, k: int) -> int | None:
        """The first of `scan(node, k)`: the best fit for one unit of k slots."""
        keys = self._keys.get(node)
        if keys:
            x = bisect_left(keys, k)
            if x < len(keys):
                return self._buckets[node][keys[x]][0]
        return None

    def best(self, node: NodeKey, k: int, count: int) -> list[tuple[int, int]]:
        """The first `count` of `scan(node, k)`, as a list (no generator on the hot path)."""
        out: list[tuple[int, int]] = []
        keys = self._keys.get(node)
        if keys:
            bucket = self._buckets[node]
            for x in range(bisect_left(keys, k), len(keys)):
                f = keys[x]
                for pos in bucket[f]:
                    out.append((f, pos))
                    if len(out) >= count:
                        return out
        return out

    def scan(self, node: NodeKey, k: int) -> Iterator[tuple[int, int]]:
        """(free, pos) of a node's instances with free >= k: fewest free, then pool order."""
        keys = self._keys.get(node)
        if not keys:
            return
        bucket = self._buckets[node]
        for f in keys[bisect_left(keys, k) :]:
            for pos in bucket[f]:
                yield f, pos


# --- the planner -------------------------------------------------------------------------

#: Per type: (slots, unit index), largest first, request order among equals (stable sort).
_Units = list[tuple[int, int]]


class _Plan:
    """What the planner reads from a request's units before it looks at any free slot.

    It depends only on the units and on the pool's shape (which types carry NUMA nodes,
    and which nodes), not on free slots: the allocator keeps one per request shape and pool
    and plans every later grant of that shape from it.
    """

    __slots__ = ("aligned", "by_type", "flat", "need", "nodes", "numa")

    def __init__(self, units: Sequence[Unit], views: Mapping[str, FreeIndex]) -> None:
        by_type: dict[str, _Units] = {}
        for i, u in enumerate(units):
            by_type.setdefault(u.type, []).append((u.slots, i))
        for lst in by_type.values():
            lst.sort(key=_minus_slots)
        self.by_type = by_type
        self.need = {t: sum(s for s, _ in lst) for t, lst in by_type.items()}
        self.flat = [t for t in by_type if not views[t].topological]
        numa = [t for t in by_type if views[t].topological]
        if "gpus" in numa:  # the GPUs' node decides
            numa = ["gpus"] + [t for t in numa if t != "gpus"]
        self.numa = numa
        self.nodes: list[NodeKey] = sorted(
            {n for t in numa for n in views[t].nodes}, key=_node_rank
        )
        # every NUMA type has the same nodes (the usual case): their `totals` line up
        self.aligned = all(views[t].nodes == self.nodes for t in numa)


def _minus_slots(unit: tuple[int, int]) -> int:
    return -unit[0]


def place(
    units: Sequence[Unit], views: Mapping[str, FreeIndex], distinct: bool = False
) -> list[int] | None:
    """Where each unit goes (a pool-order position per unit, request order), or None.

    Pure: reads `views` (one FreeIndex per type, which must hold every unit's type) and
    changes nothing. All or nothing: None unless every unit has a place.
    """
    return _place(_Plan(units, views), len(units), views, distinct)


def _place(
    plan: _Plan, n_units: int, views: Mapping[str, FreeIndex], distinct: bool
) -> list[int] | None:
    """`place` for a request whose plan is known."""
    for rtype, need in plan.need.items():
        if need > views[rtype].total:  # cheap "no" for a busy pool
            return None
    out = [-1] * n_units
    for rtype in plan.flat:
        got, left = _fill(views[rtype], None, plan.by_type[rtype], {}, distinct)
        if left:
            return None
        for i, pos in got:
            out[i] = pos
    if plan.numa:
        placed = _place_numa(plan, views, distinct)
        if placed is None:
            return None
        for i, pos in placed:
            out[i] = pos
    return out


def _place_numa(
    plan: _Plan, views: Mapping[str, FreeIndex], distinct: bool
) -> list[tuple[int, int]] | None:
    types, by_type, need = plan.numa, plan.by_type, plan.need

    # 1. one node holds everything: best fit (fewest free anchor slots, then the others'
    # free slots, then node order). The first in that order almost always takes it, so
    # find it with one pass and sort the rest only when it does not.
    nodes = plan.nodes
    anchor = views[types[0]].totals
    fits: list[tuple[int, int, int]]  # (anchor free, others' free, node index)
    if len(types) == 1:  # a type's totals are in its node order
        want = need[types[0]]
        fits = [(f, 0, x) for f, x in zip(anchor.values(), count()) if f >= want]
    elif len(types) == 2 and plan.aligned:  # GPUs and CPUs on the same nodes
        other = views[types[1]].totals
        wa, wo = need[types[0]], need[types[1]]
        both = zip(anchor.values(), other.values(), count())
        fits = [(f, g, x) for f, g, x in both if f >= wa and g >= wo]
    else:
        others = [views[t].totals for t in types[1:]]
        cand: Iterable[int] = range(len(nodes))
        for t in types:
            totals, want = views[t].totals, need[t]
            cand = [x for x in cand if totals.get(nodes[x], 0) >= want]
        fits = [(anchor.get(nodes[x], 0), sum(o.get(nodes[x], 0) for o in others), x) for x in cand]
    if fits:
        first = min(fits)
        got = _fill_node(plan, views, plan.nodes[first[2]], distinct)
        if got is not None:
            return got
        for key in sorted(fits):
            if key != first:
                got = _fill_node(plan, views, plan.nodes[key[2]], distinct)
                if got is not None:
                    return got

    # 2. spread over as few nodes as possible; later types fill the chosen nodes first
    chosen: list[NodeKey] = []
    placed: list[tuple[int, int]] = []
    for t in types:
        view, taken, rest_units = views[t], {}, by_type[t]
        for n in chosen:
            if not rest_units:
                break
            g, rest_units = _fill(view, n, rest_units, taken, distinct)
            placed.extend(g)
        tried = set(chosen)
        while rest_units:
            options = [n for n in view.nodes if n not in tried]
            if not options:
                return None
            want = sum(s for s, _ in rest_units)
            pick: NodeKey | str = "none"
            whole = sorted(
                (n for n in options if view.totals[n] >= want),
                key=lambda n: (view.totals[n], _node_rank(n)),
            )
            for n in whole:
                trial = dict(taken)
                g, left = _fill(view, n, rest_units, trial, distinct)
                if not left:
                    pick, taken, rest_units = n, trial, left
                    placed.extend(g)
                    break
            if pick == "none":
                pick = min(options, key=lambda n: (-view.totals[n], _node_rank(n)))
                g, rest_units = _fill(view, pick, rest_units, taken, distinct)
                placed.extend(g)
            tried.add(pick)
            if pick not in chosen:
                chosen.append(pick)
    return placed


def _fill_node(
    plan: _Plan, views: Mapping[str, FreeIndex], node: NodeKey, distinct: bool
) -> list[tuple[int, int]] | None:
    """Every NUMA-bound unit on one node, or None."""
    got: list[tuple[int, int]] = []
    for t in plan.numa:
        g, left = _fill(views[t], node, plan.by_type[t], {}, distinct)
        if left:
            return None
        got.extend(g)
    return got


def _fill(
    view: FreeIndex, node: NodeKey, units: _Units, taken: dict[int, int], distinct: bool
) -> tuple[list[tuple[int, int]], _Units]:
    """Best-fit `units` (largest first) into one node; returns (placed, left over).

    `taken` (pos -> slots this request already put there) is updated. Units of equal
    size are handed out in one walk up the buckets: after an instance takes a unit its
    free count is below every instance not yet visited, so best fit would pick it again
    until it is too small; taking `free // k` at once is the same choice, in fewer steps.
    """
    n = len(units)
    if n == 1 and not taken:  # one unit: the first candidate, if any
        k, i = units[0]
        pos = view.first(node, k)
        if pos is None:
            return [], units[:]
        taken[pos] = k
        return [(i, pos)], []
    if distinct and not taken:  # 1-slot units, one instance each: the first n candidates
        cands = view.best(node, 1, n)
        for _, pos in cands:
            taken[pos] = 1
        return [(u[1], c[1]) for u, c in zip(units, cands, strict=False)], units[len(cands) :]
    placed: list[tuple[int, int]] = []
    left: _Units = []
    i = 0
    while i < n:
        k = units[i][0]
        j = i + 1
        while j < n and units[j][0] == k:
            j += 1
        got = i
        # each instance takes one unit at least, so j - i candidates are enough
        cands = (
            view.best(node, k, j - i) if not taken else _candidates(view, node, k, taken, distinct)
        )
        for free, pos in cands:
            if distinct:
                m = 1
            elif k == 0:
                m = j - got
            else:
                m = min(free // k, j - got)
            for x in range(got, got + m):
                placed.append((units[x][1], pos))
            got += m
            taken[pos] = taken.get(pos, 0) + k * m
            if got == j:
                break
        left.extend(units[got:j])
        i = j
    return placed, left


def _candidates(
    view: FreeIndex, node: NodeKey, k: int, taken: dict[int, int], distinct: bool
) -> Iterable[tuple[int, int]]:
    if not taken:
        return view.scan(node, k)
    base = ((f, p) for f, p in view.scan(node, k) if p not in taken)
    if distinct:  # an instance this request already uses is out
        return base
    adjusted = sorted(
        (view.free[p] - t, p)
        for p, t in taken.items()
        if view.node_of.get(p, "x") == node and view.free[p] - t >= k
    )
    return heapq.merge(base, adjusted) if adjusted else base


# --- the state machine -------------------------------------------------------------------


@dataclass(eq=False)
class _Inst:
    type: str
    id: str
    pos: int
    slots: int
    node: NodeKey
    used: int = 0
    live: bool = True


class _Table:
    """One resource type: its instances in pool order, free and whole-pool indexes."""

    def __init__(self, rtype: str, insts: list[_Inst]) -> None:
        self.type = rtype
        self.insts = insts  # live, pool order
        self.by_id: dict[str, _Inst] = {i.id: i for i in insts}  # live and vanished
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

    def vanished(self, rid: str, used: int) -> _Inst:
        inst = _Inst(self.type, rid, len(self.insts) + len(self.by_id), 0, None, used, False)
        self.by_id[rid] = inst
        return inst


class _Shape:
    """A normalized request and all that granting it needs which free slots do not change.

    Built once per request value and pool (the allocator keeps them in a bounded cache,
    and each waiter holds its own), so a grant is `_place` from `plan` plus a commit that
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

    def __init__(self, request: Request, tables: Mapping[str, _Table]) -> None:
        units = request.units()
        self.request = request
        self.types = request.types()
        self.distinct = request.distinct
        self.n = len(units)
        self.free = {t: tables[t].free for t in self.types}
        self.cap = {t: tables[t].cap for t in self.types}  # "could it ever fit?"
        self.plan = _Plan(units, self.free)
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


@dataclass(eq=False)
class _Waiter:
    seq: int
    owner: OwnerKey
    req_id: Any
    request: Request
    types: frozenset[str]
    shape: _Shape
    since: float
    deadline: float | None
    label: str | None
    holder: dict[str, Any]


class Allocator:
    """Leases, waiters and free slots of one pool; see the module docstring for the rules.

    Every method that may grant returns the events to deliver, in order. Methods that
    have no `now` in the lead's API accept it as an optional keyword; without it the
    latest `now` seen stands in (it only stamps `granted_at`).
    """

    def __init__(self, pool: Pool, *, new_lease_id: Callable[[], str]) -> None:
        self._new_lease_id = new_lease_id
        self._pool = pool
        self._tables = _build_tables(pool)
        self._known: tuple[str, ...] = tuple(self._tables)
        self._leases: dict[str, Lease] = {}
        self._leases_view = MappingProxyType(self._leases)  # made once: read on every call
        self._owner_leases: dict[OwnerKey, dict[str, None]] = {}
        self._queue: dict[int, _Waiter] = {}
        self._waiter_seq: dict[tuple[OwnerKey, Any], int] = {}
        self._owner_waiters: dict[OwnerKey, dict[int, None]] = {}
        self._waiting_types: dict[str, int] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._drained: dict[tuple[str, str], str] = {}
        self._sat: dict[Request, Unsatisfiable | None] = {}
        self._shapes: dict[Request, _Shape] = {}  # as submitted (not normalized) -> shape
        self._seq = 0
        self._now = 0.0
        for table in self._tables.values():
            self._rebuild_free(table)

    # --- read-only views ------------------------------------------------------------------

    @property
    def leases(self) -> Mapping[str, Lease]:
        return self._leases_view

    @property
    def pool(self) -> Pool:
        return self._pool

    @property
    def drained(self) -> Mapping[tuple[str, str], str]:
        """(type, id) -> reason, for every drained instance."""
        return MappingProxyType(self._drained)

    def waiting(self) -> list[tuple[OwnerKey, Any]]:
        """(owner, req_id) of every waiter, first in line first."""
        return [(w.owner, w.req_id) for w in self._queue.values()]

    def plan(self, request: Request) -> tuple[tuple[Slice, ...], ...] | None:
        """Where `request` would go right now, ignoring the queue (None: not free now).

        Raises UnknownResourceType for a type the pool does not have."""
        shape = self._shape(request)
        positions = _place(shape.plan, shape.n, shape.free, shape.distinct)
        return None if positions is None else self._slices(shape, positions)

    # --- inputs ---------------------------------------------------------------------------

    def submit(
        self,
        owner: OwnerKey,
        req_id: Any,
        request: Request,
        *,
        now: float,
        timeout: float | None,
        label: str | None = None,
        holder: Mapping[str, Any] | None = None,
    ) -> list[Event]:
        """Grant now, queue, or deny. `timeout` None waits forever, 0 never waits.

        Raises RequestError (state unchanged) for a bad timeout or a `req_id` the same
        owner already has waiting.
        """
        try:
            waiting = (owner, req_id) in self._waiter_seq
        except TypeError:
            _check_hashable(req_id, "request id")
            raise
        if waiting:
            raise RequestError(f"request id {req_id!r} is already waiting")
        deadline = None if timeout is None else _deadline(now, timeout)
        self._now = now
        shape = self._shapes.get(request)
        if shape is None:
            try:
                shape = self._shape(request)
            except UnknownResourceType as exc:
                return [Denied(owner, req_id, exc)]
        request, types = shape.request, shape.types
        if self._waiting_types.keys().isdisjoint(types):  # nobody earlier needs these
            positions = _place(shape.plan, shape.n, shape.free, shape.distinct)
            if positions is not None:
                lease = self._commit(owner, shape, positions, now, label, holder)
                return [Granted(owner, req_id, lease)]
        never = self._unsatisfiable(shape)
        if never is not None:
            return [Denied(owner, req_id, never)]
        if deadline is not None and deadline <= now:
            why = f"{request} is not available now"
            if any(t in self._waiting_types for t in types):
                why += " (earlier requests wait for it)"
            return [Denied(owner, req_id, ResourceUnavailable(why))]
        self._seq += 1
        w = _Waiter(
            self._seq,
            owner,
            req_id,
            request,
            types,
            shape,
            now,
            deadline,
            label,
            dict(holder or {}),
        )
        self._queue[w.seq] = w
        self._waiter_seq[owner, req_id] = w.seq
        self._owner_waiters.setdefault(owner, {})[w.seq] = None
        for t in types:
            self._waiting_types[t] = self._waiting_types.get(t, 0) + 1
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, w.seq))
        return [Queued(owner, req_id, len(self._queue))]

    def release(self, owner: OwnerKey, lease_id: str, *, now: float | None = None) -> list[Event]:
        """End a lease: [Released, Granted...]. UnknownLease / NotOwner change nothing."""
        lease = self._leases.get(lease_id) if isinstance(lease_id, str) else None
        if lease is None:
            raise UnknownLease(f"no lease {lease_id!r}")
        if lease.owner != owner:
            raise NotOwner(f"lease {lease_id!r} belongs to another client")
        self._remove_lease(lease)
        if not self._queue:
            return [Released(owner, lease_id)]
        return [Released(owner, lease_id), *self._retry(now)]

    def cancel(self, owner: OwnerKey, req_id: Any, *, now: float | None = None) -> list[Event]:
        """Drop a waiter (no event for it; [] if it is not waiting), then grant others."""
        try:
            seq = self._waiter_seq.get((owner, req_id))
        except TypeError:  # unhashable req_id: nothing can be waiting under it
            return []
        if seq is None:
            return []
        self._drop_waiter(self._queue[seq])
        return self._retry(now)

    def disconnect(self, owner: OwnerKey, *, now: float | None = None) -> list[Event]:
        """The owner is gone (EOF, process exit): drop its waiters, reap its leases."""
        events: list[Event] = []
        seqs = list(self._owner_waiters.get(owner, ()))
        for seq in seqs:
            self._drop_waiter(self._queue[seq])
        lease_ids = tuple(self._owner_leases.get(owner, ()))
        for lid in lease_ids:
            self._remove_lease(self._leases[lid])
        if lease_ids:
            events.append(Reaped(owner, lease_ids))
        if seqs or lease_ids:
            events.extend(self._retry(now))
        return events

    def expire(self, now: float) -> list[Event]:
        """Deny every waiter whose deadline is <= now (Timeout), then grant others."""
        self._now = now
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, seq = heapq.heappop(self._deadlines)
            w = self._queue.get(seq)
            if w is None or w.deadline != deadline:
                continue
            self._drop_waiter(w)
            waited = deadline - w.since
            err = Timeout(f"{w.request} was not granted within {waited:g} s")
            events.append(Denied(w.owner, w.req_id, err))
        if events:
            events.extend(self._retry(now))
        return events

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do (None: no waiter has a deadline)."""
        heap = self._deadlines
        while heap and heap[0][1] not in self._queue:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def rebind(self, lease_id: str, new_owner: OwnerKey) -> None:
        """Give a lease to a new owner (a reconnecting client, a pidfd binding)."""
        lease = self._leases.get(lease_id) if isinstance(lease_id, str) else None
        if lease is None:
            raise UnknownLease(f"no lease {lease_id!r}")
        old = self._owner_leases[lease.owner]
        del old[lease_id]
        if not old:
            del self._owner_leases[lease.owner]
        self._leases[lease_id] = replace(lease, owner=new_owner)
        self._owner_leases.setdefault(new_owner, {})[lease_id] = None

    def adopt(self, lease: Lease) -> None:
        """Hold a lease restored from the state file, as it was granted.

        Instances the pool no longer has are kept as vanished (held, never granted
        again); an instance whose slots shrank may end up over-committed until released.
        Raises RequestError (state unchanged) if the id is already held.
        """
        if lease.id in self._leases:
            raise RequestError(f"lease {lease.id!r} is already held")
        for s in lease.held:
            table = self._tables.get(s.type)
            if table is None:
                table = self._tables[s.type] = _Table(s.type, [])
            inst = table.by_id.get(s.id) or table.vanished(s.id, 0)
            inst.used += s.slots
            self._refresh(table, inst)
        self._leases[lease.id] = lease
        self._owner_leases.setdefault(lease.owner, {})[lease.id] = None

    def set_pool(self, pool: Pool, *, now: float | None = None) -> list[Event]:
        """Switch to a new pool (reload): leases stay; waiters re-checked, then served.

        Leases on instances that vanished stay held (`stale` in the snapshot) until
        released, but nothing new is granted from them. Waiters whose request the new
        pool can never satisfy are Denied. A malformed pool raises PoolFormatError and
        changes nothing.
        """
        tables = _build_tables(pool)
        for old in self._tables.values():
            for inst in old.by_id.values():
                if inst.used:
                    table = tables.get(old.type)
                    if table is None:
                        table = tables[old.type] = _Table(old.type, [])
                    new = table.by_id.get(inst.id)
                    if new is None:
                        table.vanished(inst.id, inst.used)
                    else:
                        new.used = inst.used
        self._pool, self._tables, self._known = pool, tables, tuple(_build_order(pool))
        self._sat.clear()
        self._shapes.clear()
        for table in tables.values():
            self._rebuild_free(table)
        events: list[Event] = []
        for w in list(self._queue.values()):
            err: RpoolAgentError | None
            try:
                self._check_types(w.request)
                w.shape = _Shape(w.request, tables)
                err = self._unsatisfiable(w.shape)
            except UnknownResourceType as exc:
                err = exc
            if err is not None:
                self._drop_waiter(w)
                events.append(Denied(w.owner, w.req_id, err))
        events.extend(self._retry(now))
        return events

    def drain(self, rtype: str, rid: str, reason: str = "") -> None:
        """Grant nothing new from one instance; its current leases run on."""
        table, inst = self._instance(rtype, rid)
        self._drained[table.type, inst.id] = reason
        table.free.discard(inst.pos)

    def undrain(self, rtype: str, rid: str, *, now: float | None = None) -> list[Event]:
        """Grant from a drained instance again; [] if it was not drained."""
        if not isinstance(rtype, str) or not isinstance(rid, str):
            raise UnknownResourceType(f"the pool has no instance {rtype}:{rid}")
        key = (self._type_name(rtype), rid)
        if key not in self._drained:
            self._instance(rtype, rid)  # raises if there is no such instance
            return []
        del self._drained[key]
        table = self._tables.get(key[0])
        inst = table.by_id.get(rid) if table else None
        if table is None or inst is None or not inst.live:
            return []
        table.free.add(inst.pos, inst.node, max(0, inst.slots - inst.used))
        return self._retry(now)

    # --- status ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able status.

        Per type: `total` (slots of live instances), `used` (held on live instances),
        `free` (grantable now), `drained` (free slots withheld by drains), `stale` (held
        on vanished instances). Without over-commitment total == used + free + drained.
        """
        types: dict[str, dict[str, int]] = {}
        vanished: list[dict[str, Any]] = []
        for rtype, table in self._tables.items():
            drained = sum(
                max(0, i.slots - i.used) for i in table.insts if (rtype, i.id) in self._drained
            )
            stale = 0
            for inst in table.by_id.values():
                if not inst.live:
                    stale += inst.used
                    vanished.append({"type": rtype, "id": inst.id, "held": inst.used})
            if rtype not in self._known and not stale:
                continue
            types[rtype] = {
                "total": sum(i.slots for i in table.insts),
                "free": sum(table.free.totals.values()),
                "used": sum(i.used for i in table.insts),
                "drained": drained,
                "stale": stale,
            }
        leases = []
        for lease in self._leases.values():
            stale_lease = any(not self._held(s).live for s in lease.held)
            leases.append(
                {
                    "id": lease.id,
                    "owner": repr(lease.owner),
                    "label": lease.label,
                    "holder": dict(lease.holder),
                    "granted_at": lease.granted_at,
                    "resources": lease.resources(),
                    "stale": stale_lease,
                }
            )
        waiters = [
            {
                "owner": repr(w.owner),
                "req_id": w.req_id,
                "request": w.request.to_wire(),
                "since": w.since,
                "deadline": w.deadline,
                "label": w.label,
                "position": n,
            }
            for n, w in enumerate(self._queue.values(), 1)
        ]
        drained_list = [{"type": t, "id": i, "reason": r} for (t, i), r in self._drained.items()]
        return {
            "types": types,
            "leases": leases,
            "waiters": waiters,
            "drained": drained_list,
            "vanished": vanished,
        }

    # --- internals: requests -------------------------------------------------------------

    def _type_name(self, rtype: str) -> str:
        """canary's singular names: "gpu" means "gpus" when the pool has only "gpus"."""
        if rtype in self._known or rtype + "s" not in self._known:
            return rtype
        return rtype + "s"

    def _normalize(self, request: Request) -> Request:
        names = {t: self._type_name(t) for t in request.types()}
        self._check_types(request, names)
        if all(k == v for k, v in names.items()):
            return request
        groups = tuple(tuple(Unit(names[u.type], u.slots) for u in g) for g in request.groups)
        return Request(groups, distinct=request.distinct)

    def _check_types(self, request: Request, names: Mapping[str, str] | None = None) -> None:
        unknown = sorted(
            t for t in request.types() if (names[t] if names else t) not in self._known
        )
        if unknown:
            have = ", ".join(self._known) or "nothing"
            raise UnknownResourceType(
                f"unknown resource type {unknown[0]!r} (the pool has: {have})"
            )

    def _shape(self, request: Request) -> _Shape:
        """The shape of `request` as submitted; raises UnknownResourceType."""
        shape = self._shapes.get(request)
        if shape is None:
            shape = _Shape(self._normalize(request), self._tables)
            if shape.n <= _CACHE_UNITS:
                if len(self._shapes) >= _SHAPE_CACHE_MAX:
                    self._shapes.clear()
                self._shapes[request] = shape
        return shape

    def _unsatisfiable(self, shape: _Shape) -> Unsatisfiable | None:
        """Unsatisfiable if the planner cannot place the request even in the empty pool."""
        request = shape.request
        if request in self._sat:
            return self._sat[request]
        err = None
        if _place(shape.plan, shape.n, shape.cap, shape.distinct) is None:
            err = Unsatisfiable(f"{request} can never be granted: {self._why(request)}")
        if shape.n <= _CACHE_UNITS:
            if len(self._sat) >= _SAT_CACHE_MAX:
                self._sat.clear()
            self._sat[request] = err
        return err

    def _why(self, request: Request) -> str:
        for rtype, need in request.totals().items():
            insts = self._tables[rtype].insts
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

    @staticmethod
    def _slices(shape: _Shape, positions: list[int]) -> tuple[tuple[Slice, ...], ...]:
        """The lease's groups: per request group, per unit, its slice."""
        slices = [t.slice(positions[i], n) for i, (t, n) in enumerate(shape.units)]
        return Allocator._grouped(shape, slices)

    @staticmethod
    def _grouped(shape: _Shape, slices: list[Slice]) -> tuple[tuple[Slice, ...], ...]:
        if len(shape.bounds) == 1:
            return (tuple(slices),)
        return tuple([tuple(slices[a:b]) for a, b in shape.bounds])

    # --- internals: commit and release (cannot fail) -------------------------------------

    def _commit(
        self,
        owner: OwnerKey,
        shape: _Shape,
        positions: list[int],
        now: float,
        label: str | None,
        holder: Mapping[str, Any] | None,
    ) -> Lease:
        # the only step that may raise: before any change
        lease_id = self._new_lease_id()
        if type(lease_id) is not str or not lease_id or lease_id in self._leases:
            lease_id = self._fresh_id(lease_id)
        slices = [t.slice(positions[i], n) for i, (t, n) in enumerate(shape.units)]
        held = []
        # `held`: slots summed per instance; types in request order, instances in pool order
        for table, units in shape.per_type:
            insts, free = table.insts, table.free
            if len(units) == 1:
                i, slots = units[0]
                pos = positions[i]
                held.append(slices[i])
                inst = insts[pos]
                inst.used += slots
                left = inst.slots - inst.used
                free.set(pos, left if left > 0 else 0)
                continue
            per_pos: dict[int, int] = {}
            for i, slots in units:
                pos = positions[i]
                per_pos[pos] = per_pos.get(pos, 0) + slots
            for pos, slots in sorted(per_pos.items()):
                held.append(table.slice(pos, slots))
                inst = insts[pos]
                inst.used += slots
                left = inst.slots - inst.used
                free.set(pos, left if left > 0 else 0)
        lease = Lease._granted(
            lease_id,
            owner,
            shape.request,
            self._grouped(shape, slices),
            label,
            holder,
            now,
            tuple(held),
        )
        self._leases[lease_id] = lease
        mine = self._owner_leases.get(owner)
        if mine is None:
            self._owner_leases[owner] = {lease_id: None}
        else:
            mine[lease_id] = None
        return lease

    def _fresh_id(self, lid: Any) -> str:
        """`lid` (just drawn) if usable, else the next usable id of up to 100 draws."""
        for attempt in range(100):
            if attempt:
                lid = self._new_lease_id()
            if not isinstance(lid, str) or not lid:
                raise TypeError("new_lease_id must return a non-empty str")
            if lid not in self._leases:
                return lid
        raise RuntimeError("new_lease_id keeps returning ids already in use")

    def _remove_lease(self, lease: Lease) -> None:
        del self._leases[lease.id]
        mine = self._owner_leases[lease.owner]
        del mine[lease.id]
        if not mine:
            del self._owner_leases[lease.owner]
        for s in lease.held:
            table = self._tables.get(s.type)
            inst = table.by_id.get(s.id) if table is not None else None
            if inst is None:  # 0 slots of an instance a reload removed: nothing to free
                continue
            inst.used -= s.slots
            if inst.live:
                left = inst.slots - inst.used
                table.free.set(inst.pos, left if left > 0 else 0)
            elif inst.used <= 0:
                del table.by_id[s.id]

    def _refresh(self, table: _Table, inst: _Inst) -> None:
        """Re-file an instance's free slots; only live, undrained ones are in the index."""
        table.free.set(inst.pos, max(0, inst.slots - inst.used))

    def _rebuild_free(self, table: _Table) -> None:
        for inst in table.insts:
            if (table.type, inst.id) not in self._drained:
                table.free.add(inst.pos, inst.node, max(0, inst.slots - inst.used))

    # --- internals: the queue ------------------------------------------------------------

    def _drop_waiter(self, w: _Waiter) -> None:
        del self._queue[w.seq]
        del self._waiter_seq[w.owner, w.req_id]
        mine = self._owner_waiters[w.owner]
        del mine[w.seq]
        if not mine:
            del self._owner_waiters[w.owner]
        for t in w.types:
            n = self._waiting_types[t] - 1
            if n:
                self._waiting_types[t] = n
            else:
                del self._waiting_types[t]
        # stale deadline entries are skipped lazily; rebuild if they pile up
        if len(self._deadlines) > 2 * len(self._queue) + 64:
            self._deadlines = [(d, s) for d, s in self._deadlines if s in self._queue]
            heapq.heapify(self._deadlines)

    def _retry(self, now: float | None) -> list[Event]:
        """Walk the queue in order and grant what may be granted (safe backfill)."""
        if not self._queue:
            return []
        if now is not None:
            self._now = now
        events: list[Event] = []
        granted: list[_Waiter] = []
        blocked: set[str] = set()
        waiting = dict(self._waiting_types)  # type -> waiters not granted (yet) in this walk
        open_types = len(waiting)  # types still waited for and not blocked: 0 ends the walk
        for w in self._queue.values():
            types = w.types
            if blocked.isdisjoint(types):
                shape = w.shape
                positions = _place(shape.plan, shape.n, shape.free, shape.distinct)
                if positions is not None:
                    lease = self._commit(w.owner, shape, positions, self._now, w.label, w.holder)
                    events.append(Granted(w.owner, w.req_id, lease))
                    granted.append(w)
                    for t in types:
                        waiting[t] -= 1
                        if not waiting[t]:
                            open_types -= 1
                    if not open_types:
                        break
                    continue
            elif types <= blocked:  # skipped, and nothing new is blocked
                continue
            new = types - blocked  # each is waited for (by w at least) and now blocked
            blocked |= new
            open_types -= len(new)
            if not open_types:
                break
        for w in granted:
            self._drop_waiter(w)
        return events

    # --- internals: instances -------------------------------------------------------------

    def _held(self, s: Slice) -> _Inst:
        """The instance a lease's slice is on; a reload may have dropped a 0-slot one."""
        table = self._tables.get(s.type)
        inst = table.by_id.get(s.id) if table is not None else None
        return inst if inst is not None else _Inst(s.type, s.id, -1, 0, None, 0, False)

    def _instance(self, rtype: str, rid: str) -> tuple[_Table, _Inst]:
        name = self._type_name(rtype) if isinstance(rtype, str) else rtype
        table = self._tables.get(name) if isinstance(name, str) else None
        inst = table.by_id.get(rid) if table is not None and isinstance(rid, str) else None
        if table is None or inst is None or not inst.live:
            raise UnknownResourceType(f"the pool has no instance {rtype}:{rid}")
        return table, inst


def _build_order(pool: Pool) -> list[str]:
    return list(dict.fromkeys(t for n in pool.nodes for t in n.resources))


def _build_tables(pool: Pool) -> dict[str, _Table]:
    """Instance tables per type, in pool order; PoolFormatError on what cannot be served."""
    tables: dict[str, _Table] = {}
    for rtype in _build_order(pool):
        insts: list[_Inst] = []
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
            insts.append(_Inst(rtype, inst.id, len(insts), inst.slots, node))
        tables[rtype] = _Table(rtype, insts)
    return tables


def _deadline(now: float, timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or math.isnan(timeout):
        raise RequestError(f"timeout must be a number of seconds or null, not {timeout!r}")
    if timeout < 0:
        raise RequestError(f"timeout must be >= 0, not {timeout:g}")
    if math.isinf(timeout):
        return None
    return now + timeout


def _check_hashable(value: Any, what: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise RequestError(f"{what} must be a string or a number") from None
