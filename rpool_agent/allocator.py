"""The lease state machine: who holds which slots, who waits, and who is served next.

Pure and synchronous, like h11: the server feeds it inputs (a request, a release, a
closed connection, the clock) and writes out the events it returns. No I/O, no clock
(`now` is a parameter), no randomness (lease ids come from a callable the server passes).
An input the machine refuses raises a typed error and changes nothing.

Allocation is CTest's plan-then-commit: `placement.place_plan` is a pure planner that
reads free capacity and returns a placement or None (all or nothing);
`Allocator._commit` applies a placement and cannot fail. The satisfiability check runs
the same planner on the whole (empty) pool, so whatever is accepted into the queue is
placed once its types are free.

What a grant needs that free slots do not change is a `tables.Shape`, kept per request
value until the pool changes; each waiter holds its own. A grant is then best fit on
per-node totals and free-slot buckets plus a commit.

Queue: first come, first served with safe backfill. A waiter is offered the free slots
only when no earlier waiter still waiting needs any of its types, so nothing later ever
takes what an earlier waiter needs, and the head of the queue is granted as soon as its
types are free. `waiters.WaitQueue` keeps a line per type so that a release looks only at
the waiters whose turn it is, not at every waiter.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from itertools import islice
from types import MappingProxyType
from typing import Any

from .errors import (
    NotOwner,
    RequestError,
    ResourceUnavailable,
    RpoolAgentError,
    Timeout,
    UnknownLease,
    UnknownResourceType,
    Unsatisfiable,
)
from .lease import Denied, Event, Granted, Lease, OwnerKey, Queued, Reaped, Released, Slice
from .placement import place_plan
from .pool import Pool
from .requests import Request, Unit
from .tables import Inst, Shape, Table, build_tables, type_order, why_unsatisfiable
from .waiters import Waiter, WaitQueue, check_hashable
from .waiters import deadline as until

#: Cached satisfiability answers and request shapes, cleared when the pool changes;
#: bounded against clients that send endless distinct requests. Requests of more than
#: _CACHE_UNITS units are planned afresh each time rather than kept (memory).
_SAT_CACHE_MAX = 4096
_SHAPE_CACHE_MAX = 4096
_CACHE_UNITS = 1024


class Allocator:
    """Leases, waiters and free slots of one pool; see the module docstring for the rules.

    Every method that may grant returns the events to deliver, in order. Methods that
    have no `now` in the lead's API accept it as an optional keyword; without it the
    latest `now` seen stands in (it only stamps `granted_at`).
    """

    def __init__(self, pool: Pool, *, new_lease_id: Callable[[], str]) -> None:
        self._new_lease_id = new_lease_id
        self._pool = pool
        self._tables = build_tables(pool)
        self._known: tuple[str, ...] = tuple(self._tables)
        self._leases: dict[str, Lease] = {}
        self._leases_view = MappingProxyType(self._leases)  # made once: read on every call
        self._owner_leases: dict[OwnerKey, dict[str, None]] = {}
        self._on: dict[tuple[str, str], dict[str, None]] = {}  # instance -> its lease ids
        self._queue = WaitQueue()
        self._drained: dict[tuple[str, str], str] = {}
        self._sat: dict[Request, Unsatisfiable | None] = {}
        self._shapes: dict[Request, Shape] = {}  # as submitted (not normalized) -> shape
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
        return [(w.owner, w.req_id) for w in self._queue]

    def plan(self, request: Request) -> tuple[tuple[Slice, ...], ...] | None:
        """Where `request` would go right now, ignoring the queue (None: not free now).

        Raises UnknownResourceType for a type the pool does not have."""
        shape = self._shape(request)
        positions = place_plan(shape.plan, shape.n, shape.free, shape.distinct)
        return None if positions is None else shape.slices(positions)

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
            waiting = self._queue.get(owner, req_id) is not None
        except TypeError:
            check_hashable(req_id, "request id")
            raise
        if waiting:
            raise RequestError(f"request id {req_id!r} is already waiting")
        deadline = None if timeout is None else until(now, timeout)
        self._now = now
        shape = self._shapes.get(request)
        if shape is None:
            try:
                shape = self._shape(request)
            except UnknownResourceType as exc:
                return [Denied(owner, req_id, exc)]
        request, types = shape.request, shape.types
        if self._queue.types.keys().isdisjoint(types):  # nobody earlier needs these
            positions = place_plan(shape.plan, shape.n, shape.free, shape.distinct)
            if positions is not None:
                lease = self._commit(owner, shape, positions, now, label, holder)
                return [Granted(owner, req_id, lease)]
        never = self._unsatisfiable(shape)
        if never is not None:
            return [Denied(owner, req_id, never)]
        if deadline is not None and deadline <= now:
            why = f"{request} is not available now"
            if any(t in self._queue.types for t in types):
                why += " (earlier requests wait for it)"
            return [Denied(owner, req_id, ResourceUnavailable(why))]
        self._queue.add(owner, req_id, shape, now, deadline, label, dict(holder or {}))
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
            w = self._queue.get(owner, req_id)
        except TypeError:  # unhashable req_id: nothing can be waiting under it
            return []
        if w is None:
            return []
        self._queue.drop(w)
        return self._retry(now)

    def disconnect(self, owner: OwnerKey, *, now: float | None = None) -> list[Event]:
        """The owner is gone (EOF, process exit): drop its waiters, reap its leases."""
        events: list[Event] = []
        waiters = self._queue.owned(owner)
        for w in waiters:
            self._queue.drop(w)
        lease_ids = tuple(self._owner_leases.get(owner, ()))
        for lid in lease_ids:
            self._remove_lease(self._leases[lid])
        if lease_ids:
            events.append(Reaped(owner, lease_ids))
        if waiters or lease_ids:
            events.extend(self._retry(now))
        return events

    def expire(self, now: float) -> list[Event]:
        """Deny every waiter whose deadline is <= now (Timeout), then grant others."""
        self._now = now
        events: list[Event] = []
        for w in self._queue.pop_due(now):
            waited = w.deadline - w.since
            err = Timeout(f"{w.request} was not granted within {waited:g} s")
            events.append(Denied(w.owner, w.req_id, err))
        if events:
            events.extend(self._retry(now))
        return events

    def next_deadline(self) -> float | None:
        """When `expire` next has something to do (None: no waiter has a deadline)."""
        return self._queue.next_deadline()

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
                table = self._tables[s.type] = Table(s.type, [])
            inst = table.by_id.get(s.id) or table.vanished(s.id, 0)
            inst.used += s.slots
            self._refresh(table, inst)
        self._leases[lease.id] = lease
        self._owner_leases.setdefault(lease.owner, {})[lease.id] = None
        self._index(lease)

    def set_pool(self, pool: Pool, *, now: float | None = None) -> list[Event]:
        """Switch to a new pool (reload): leases stay; waiters re-checked, then served.

        Leases on instances that vanished stay held (`stale` in the snapshot) until
        released, but nothing new is granted from them. Waiters whose request the new
        pool can never satisfy are Denied. A malformed pool raises PoolFormatError and
        changes nothing.
        """
        tables = build_tables(pool)
        for old in self._tables.values():
            for inst in old.by_id.values():
                if inst.used:
                    table = tables.get(old.type)
                    if table is None:
                        table = tables[old.type] = Table(old.type, [])
                    new = table.by_id.get(inst.id)
                    if new is None:
                        table.vanished(inst.id, inst.used)
                    else:
                        new.used = inst.used
        self._pool, self._tables, self._known = pool, tables, tuple(type_order(pool))
        self._sat.clear()
        self._shapes.clear()
        for table in tables.values():
            self._rebuild_free(table)
        events: list[Event] = []
        for w in list(self._queue):
            err: RpoolAgentError | None
            try:
                self._check_types(w.request)
                w.shape = Shape(w.request, tables)
                err = self._unsatisfiable(w.shape)
            except UnknownResourceType as exc:
                err = exc
            if err is not None:
                self._queue.drop(w)
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

    def free_of_total(self) -> dict[str, tuple[int, int]]:
        """Per type of the pool: (free slots, slots of live instances). O(types): what a
        status line needs, without `snapshot`'s walk over every lease and instance."""
        return {t: (self._tables[t].free.total, self._tables[t].cap.total) for t in self._known}

    def snapshot(self, limit: int | None = None, whole: Collection[str] = ()) -> dict[str, Any]:
        """JSON-able status; `limit`: list at most that many leases and waiters (None: all).

        Per type: `total` (slots of live instances), `used` (held on live instances),
        `free` (grantable now), `drained` (free slots withheld by drains), `stale` (held
        on vanished instances). Without over-commitment total == used + free + drained.
        With a `limit`, every lease on an instance of a type in `whole` is listed too
        (found by instance, not by a walk over the leases), and `counts` says how many
        there are in all, so the cost is the page's and the instances', not the leases'.
        """
        types: dict[str, dict[str, int]] = {}
        vanished: list[dict[str, Any]] = []
        drained_by: dict[str, int] = {}
        for (rtype, rid), _ in self._drained.items():
            inst = self._tables[rtype].by_id.get(rid) if rtype in self._tables else None
            if inst is not None and inst.live:
                drained_by[rtype] = drained_by.get(rtype, 0) + max(0, inst.slots - inst.used)
        for rtype, table in self._tables.items():
            stale = 0
            if len(table.by_id) != len(table.insts):
                for inst in table.by_id.values():
                    if not inst.live:
                        stale += inst.used
                        vanished.append({"type": rtype, "id": inst.id, "held": inst.used})
            if rtype not in self._known and not stale:
                continue
            types[rtype] = {
                "total": table.cap.total,
                "free": table.free.total,
                "used": sum(i.used for i in table.insts),
                "drained": drained_by.get(rtype, 0),
                "stale": stale,
            }
        chosen: Iterable[Lease] = self._leases.values()
        if limit is not None:
            page = dict.fromkeys(islice(self._leases, limit))
            for rtype in whole:
                for inst in self._tables[rtype].by_id.values() if rtype in self._tables else ():
                    page.update(self._on.get((rtype, inst.id), {}))
            chosen = [self._leases[lid] for lid in page]
        leases = [self._lease_status(lease) for lease in chosen]
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
            for n, w in enumerate(islice(self._queue, limit), 1)
        ]
        drained_list = [{"type": t, "id": i, "reason": r} for (t, i), r in self._drained.items()]
        return {
            "types": types,
            "leases": leases,
            "waiters": waiters,
            "drained": drained_list,
            "vanished": vanished,
            "counts": {"leases": len(self._leases), "waiters": len(self._queue)},
        }

    def idle(self, rtype: str) -> list[str]:
        """Ids of the live, undrained instances of `rtype` that nothing holds, pool order."""
        table = self._tables.get(rtype)
        drained = self._drained
        return [
            i.id
            for i in (table.insts if table is not None else ())
            if not i.used and (rtype, i.id) not in drained
        ]

    def _lease_status(self, lease: Lease) -> dict[str, Any]:
        return {
            "id": lease.id,
            "owner": repr(lease.owner),
            "label": lease.label,
            "holder": dict(lease.holder),
            "granted_at": lease.granted_at,
            "resources": lease.resources(),
            "stale": any(not self._held(s).live for s in lease.held),
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

    def _shape(self, request: Request) -> Shape:
        """The shape of `request` as submitted; raises UnknownResourceType."""
        shape = self._shapes.get(request)
        if shape is None:
            shape = Shape(self._normalize(request), self._tables)
            if shape.n <= _CACHE_UNITS:
                if len(self._shapes) >= _SHAPE_CACHE_MAX:
                    self._shapes.clear()
                self._shapes[request] = shape
        return shape

    def _unsatisfiable(self, shape: Shape) -> Unsatisfiable | None:
        """Unsatisfiable if the planner cannot place the request even in the empty pool."""
        request = shape.request
        if request in self._sat:
            return self._sat[request]
        err = None
        if place_plan(shape.plan, shape.n, shape.cap, shape.distinct) is None:
            why = why_unsatisfiable(request, self._tables)
            err = Unsatisfiable(f"{request} can never be granted: {why}")
        if shape.n <= _CACHE_UNITS:
            if len(self._sat) >= _SAT_CACHE_MAX:
                self._sat.clear()
            self._sat[request] = err
        return err

    # --- internals: commit and release (cannot fail) -------------------------------------

    def _commit(
        self,
        owner: OwnerKey,
        shape: Shape,
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
        lease = Lease(
            id=lease_id,
            owner=owner,
            request=shape.request,
            groups=shape.grouped(slices),
            label=label,
            holder=holder or {},
            granted_at=now,
            held=tuple(held),
        )
        self._leases[lease_id] = lease
        mine = self._owner_leases.get(owner)
        if mine is None:
            self._owner_leases[owner] = {lease_id: None}
        else:
            mine[lease_id] = None
        self._index(lease)
        return lease

    def _index(self, lease: Lease) -> None:
        on = self._on
        for s in lease.held:
            got = on.get((s.type, s.id))
            if got is None:
                on[s.type, s.id] = {lease.id: None}
            else:
                got[lease.id] = None

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
        on = self._on
        for s in lease.held:
            ids = on.get((s.type, s.id))
            if ids is not None:
                ids.pop(lease.id, None)
                if not ids:
                    del on[s.type, s.id]
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

    def _refresh(self, table: Table, inst: Inst) -> None:
        """Re-file an instance's free slots; only live, undrained ones are in the index."""
        table.free.set(inst.pos, max(0, inst.slots - inst.used))

    def _rebuild_free(self, table: Table) -> None:
        for inst in table.insts:
            if (table.type, inst.id) not in self._drained:
                table.free.add(inst.pos, inst.node, max(0, inst.slots - inst.used))

    # --- internals: the queue ------------------------------------------------------------

    def _retry(self, now: float | None) -> list[Event]:
        """Grant what the queue rules allow, first come first served (`WaitQueue.walk`)."""
        if not self._queue:
            return []
        if now is not None:
            self._now = now
        events: list[Event] = []

        def serve(w: Waiter) -> bool:
            shape = w.shape
            positions = place_plan(shape.plan, shape.n, shape.free, shape.distinct)
            if positions is None:
                return False
            lease = self._commit(w.owner, shape, positions, self._now, w.label, w.holder)
            events.append(Granted(w.owner, w.req_id, lease))
            return True

        self._queue.walk(serve)
        return events

    # --- internals: instances -------------------------------------------------------------

    def _held(self, s: Slice) -> Inst:
        """The instance a lease's slice is on; a reload may have dropped a 0-slot one."""
        table = self._tables.get(s.type)
        inst = table.by_id.get(s.id) if table is not None else None
        return inst if inst is not None else Inst(s.type, s.id, -1, 0, None, 0, False)

    def _instance(self, rtype: str, rid: str) -> tuple[Table, Inst]:
        name = self._type_name(rtype) if isinstance(rtype, str) else rtype
        table = self._tables.get(name) if isinstance(name, str) else None
        inst = table.by_id.get(rid) if table is not None and isinstance(rid, str) else None
        if table is None or inst is None or not inst.live:
            raise UnknownResourceType(f"the pool has no instance {rtype}:{rid}")
        return table, inst
