"""Placement: free slots per type (`FreeIndex`) and the pure planner (`place`).

The counterpart of CTest's cmCTestBinPacker: the planner reads free capacity and returns a
pool-order position per unit, or None (all or nothing); it owns no state and changes
nothing. The allocator applies a placement afterwards (plan, then commit). Placement rules
(docs/allocation.md):

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
is treated as not fitting.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import count
from typing import Union

from .requests import Unit

#: A NUMA node number, or None for "no numa_node property" (one group of its own).
NodeKey = Union[int, None]  # noqa: UP007 - a runtime alias; `int | None` needs 3.10+ at runtime

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
        self._unfile(node, old, pos)
        self._file(node, free, pos)
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


class Plan:
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
    return place_plan(Plan(units, views), len(units), views, distinct)


def place_plan(
    plan: Plan, n_units: int, views: Mapping[str, FreeIndex], distinct: bool
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
    plan: Plan, views: Mapping[str, FreeIndex], distinct: bool
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
    plan: Plan, views: Mapping[str, FreeIndex], node: NodeKey, distinct: bool
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
