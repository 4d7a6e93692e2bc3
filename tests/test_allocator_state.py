"""Hypothesis drives the allocator with random inputs on random pools.

After every step: no instance is given out beyond its slots, no slot is lost (free +
used + drained == capacity, used == what the leases hold), every lease matches its
request, and no waiter is left waiting that the queue rules would grant now. At the end
every lease is released: then every waiter must have been granted (none skipped forever).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rpool_agent.allocator import Allocator
from rpool_agent.errors import NotOwner, Timeout
from rpool_agent.lease import Denied, Granted, Queued, Reaped, Released
from rpool_agent.placement import place_plan
from rpool_agent.pool import Instance, Pool
from rpool_agent.requests import Request, Unit, parse_request

TYPES = ["gpus", "cpus", "lic"]
OWNERS = st.integers(0, 3)


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    resources = {}
    for rtype in draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True)):
        n = draw(st.integers(1, 5))
        insts = []
        for i in range(n):
            numa = draw(st.sampled_from([None, 0, 1, 2]))
            props = {} if numa is None else {"numa_node": numa}
            insts.append(Instance(str(i), draw(st.integers(1, 3)), props))
        resources[rtype] = insts
    return Pool.single(resources)


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(pool=pools())
    def start(self, pool: Pool) -> None:
        self.pool = pool
        self.a = self.allocator(pool)
        self.slots = {
            (t, i.id): i.slots for t, insts in pool.local.resources.items() for i in insts
        }
        self.now = 0.0
        self.req_ids = itertools.count(1)
        self.leases: dict[str, Any] = {}  # id -> owner, as the events told us
        self.waiting: dict[tuple[int, int], float | None] = {}  # (owner, req) -> deadline
        self.drains: set[tuple[str, str]] = set()

    def allocator(self, pool: Pool) -> Any:
        counter = itertools.count(1)
        return Allocator(pool, new_lease_id=lambda: f"L{next(counter)}")

    # --- applying what the allocator says ----------------------------------------------

    def absorb(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Granted):
                self.waiting.pop((ev.owner, ev.req_id), None)
                assert ev.lease.id not in self.leases
                self.leases[ev.lease.id] = ev.owner
            elif isinstance(ev, Denied):
                self.waiting.pop((ev.owner, ev.req_id), None)
            elif isinstance(ev, Queued):
                raise AssertionError(f"Queued outside submit: {ev}")
            elif isinstance(ev, Released):
                assert self.leases.pop(ev.lease_id) == ev.owner
            elif isinstance(ev, Reaped):
                for lid in ev.lease_ids:
                    assert self.leases.pop(lid) == ev.owner

    # --- rules ------------------------------------------------------------------------

    @rule(owner=OWNERS, data=st.data(), timeout=st.sampled_from([None, None, 0, 1, 3]))
    def submit(self, owner: int, data: st.DataObject, timeout: float | None) -> None:
        types = list(self.pool.local.resources)
        if data.draw(st.booleans()):
            counts = data.draw(st.dictionaries(st.sampled_from(types), st.integers(0, 3)))
            request = Request(
                (tuple(Unit(t, 1) for t, n in counts.items() for _ in range(n)),), True
            )
        else:
            unit = st.builds(Unit, st.sampled_from(types), st.integers(0, 3))
            groups = data.draw(st.lists(st.lists(unit, min_size=1, max_size=3), max_size=3))
            request = Request(tuple(tuple(g) for g in groups))
        req_id = next(self.req_ids)
        events = self.a.submit(owner, req_id, request, now=self.now, timeout=timeout)
        assert len(events) == 1 and (events[0].owner, events[0].req_id) == (owner, req_id)
        if isinstance(events[0], Queued):
            assert timeout != 0
            self.waiting[owner, req_id] = None if timeout is None else self.now + timeout
        else:
            self.absorb(events)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lid = data.draw(st.sampled_from(sorted(self.leases)))
        events = self.a.release(self.leases[lid], lid, now=self.now)
        assert events[0] == Released(self.leases[lid], lid)
        self.absorb(events)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release_foreign(self, data: st.DataObject) -> None:
        lid = data.draw(st.sampled_from(sorted(self.leases)))
        before = (self.a.snapshot(), dict(self.a.leases))
        try:
            self.a.release(self.leases[lid] + 10, lid)
        except NotOwner:
            pass
        else:
            raise AssertionError("a foreign release went through")
        assert (self.a.snapshot(), dict(self.a.leases)) == before

    @rule(owner=OWNERS)
    def disconnect(self, owner: int) -> None:
        for key in [k for k in self.waiting if k[0] == owner]:
            del self.waiting[key]
        events = self.a.disconnect(owner, now=self.now)
        held = {lid for lid, o in self.leases.items() if o == owner}
        if held:
            assert isinstance(events[0], Reaped) and set(events[0].lease_ids) == held
        self.absorb(events)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        owner, req_id = data.draw(st.sampled_from(sorted(self.waiting)))
        del self.waiting[owner, req_id]
        self.absorb(self.a.cancel(owner, req_id, now=self.now))

    @rule(dt=st.sampled_from([0.5, 1.0, 2.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        due = {k for k, d in self.waiting.items() if d is not None and d <= self.now}
        events = self.a.expire(self.now)
        timed_out = {(e.owner, e.req_id) for e in events if isinstance(e, Denied)}
        assert timed_out == due
        assert all(isinstance(e.error, Timeout) for e in events if isinstance(e, Denied))
        self.absorb(events)

    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.slots)))
        self.a.drain(*key, "test")
        self.drains.add(key)

    @precondition(lambda self: self.drains)
    @rule(data=st.data())
    def undrain(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.drains)))
        self.drains.discard(key)
        self.absorb(self.a.undrain(*key, now=self.now))

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def no_slot_given_twice_or_lost(self) -> None:
        held: dict[tuple[str, str], int] = {}
        for lease in self.a.leases.values():
            for s in lease.held:
                held[s.type, s.id] = held.get((s.type, s.id), 0) + s.slots
        for key, n in held.items():
            assert n <= self.slots[key], f"{key} over-allocated: {n} > {self.slots[key]}"
        snap = self.a.snapshot()
        for rtype, row in snap["types"].items():
            mine = {k: v for k, v in self.slots.items() if k[0] == rtype}
            used = sum(held.get(k, 0) for k in mine)
            free = sum(v - held.get(k, 0) for k, v in mine.items() if k not in self.drains)
            drained = sum(v - held.get(k, 0) for k, v in mine.items() if k in self.drains)
            assert row == {
                "total": sum(mine.values()),
                "free": free,
                "used": used,
                "drained": drained,
                "stale": 0,
            }

    @invariant()
    def a_page_lists_its_leases_and_every_lease_of_a_whole_type(self) -> None:
        """`snapshot(limit, whole)`, which status pages with: the first `limit` leases in
        grant order, then every other lease on a type in `whole` (found through the
        allocator's instance index, which every grant, release and reap must keep)."""
        ids = list(self.a.leases)
        for limit in (0, 1, 3):
            for whole in ((), (TYPES[0],)):
                snap = self.a.snapshot(limit, whole)
                got = [le["id"] for le in snap["leases"]]
                assert got[:limit] == ids[:limit]
                on_whole = {
                    lid
                    for lid, lease in self.a.leases.items()
                    if any(s.type in whole for s in lease.held)
                }
                assert set(got) == set(ids[:limit]) | on_whole and len(got) == len(set(got))
                assert snap["counts"] == {"leases": len(ids), "waiters": len(self.waiting)}
                assert len(snap["waiters"]) == min(limit, len(self.waiting))

    @invariant()
    def model_agrees(self) -> None:
        assert {lid: lease.owner for lid, lease in self.a.leases.items()} == self.leases
        assert self.a.waiting() == list(self.waiting)  # dicts keep submission order

    @invariant()
    def leases_match_requests(self) -> None:
        for lease in self.a.leases.values():
            groups = lease.request.groups
            assert [len(g) for g in lease.groups] == [len(g) for g in groups]
            for g, rg in zip(lease.groups, groups, strict=True):
                for s, u in zip(g, rg, strict=True):
                    assert (s.type, s.slots) == (u.type, u.slots)
            if lease.request.distinct:
                placed = [(s.type, s.id) for s in lease.groups[0]]
                assert len(placed) == len(set(placed))

    @invariant()
    def nobody_waits_who_could_be_served(self) -> None:
        blocked: set[str] = set()
        for key in self.a.waiting():
            w = next(x for x in self.a.snapshot()["waiters"] if x["req_id"] == key[1])
            request = parse_request(w["request"])
            if not blocked & request.types():
                assert self.a.plan(request) is None, f"{key} could be granted now"
            blocked |= request.types()
        if not self.a.leases and not self.drains:
            assert not self.a.waiting()

    def teardown(self) -> None:
        if not hasattr(self, "a"):
            return
        for key in sorted(self.drains):
            self.absorb(self.a.undrain(*key))
        self.drains.clear()
        for _ in range(1000):
            if not self.leases:
                break
            lid, owner = next(iter(self.leases.items()))
            self.absorb(self.a.release(owner, lid))
        assert not self.leases
        assert not self.a.waiting(), "a waiter was never served"


# --- the indexed queue against the linear walk it replaced ---------------------------------


class LinearWalk(Allocator):
    """The queue rule as first written: walk every waiter in order, keeping the blocked
    types. The twin machine checks that the indexed walk decides exactly as this does."""

    def _retry(self, now: float | None) -> list[Any]:
        if not self._queue:
            return []
        if now is not None:
            self._now = now
        events: list[Any] = []
        blocked: set[str] = set()
        for w in list(self._queue):
            if blocked.isdisjoint(w.types):
                shape = w.shape
                positions = place_plan(shape.plan, shape.n, shape.free, shape.distinct)
                if positions is not None:
                    lease = self._commit(w.owner, shape, positions, self._now, w.label, w.holder)
                    events.append(Granted(w.owner, w.req_id, lease))
                    self._queue.drop(w)
                    continue
            blocked |= w.types
        return events


def same(event: Any) -> Any:
    """An event as comparable data (errors compare by type and message)."""
    if isinstance(event, Denied):
        return ("denied", event.owner, event.req_id, type(event.error), str(event.error))
    return event


class Twin:
    """Feeds every input to the allocator and to `LinearWalk`; their events must agree."""

    def __init__(self, a: Allocator, ref: LinearWalk) -> None:
        self.a, self.ref = a, ref

    def __getattr__(self, name: str) -> Any:
        mine, theirs = getattr(self.a, name), getattr(self.ref, name)
        if name not in ("submit", "release", "cancel", "disconnect", "expire", "undrain", "drain"):
            return mine

        def both(*args: Any, **kwargs: Any) -> Any:
            try:
                want = theirs(*args, **kwargs)
            except Exception as exc:
                with pytest.raises(type(exc)):
                    mine(*args, **kwargs)
                raise
            got = mine(*args, **kwargs)
            assert [same(e) for e in got or []] == [same(e) for e in want or []]
            return got

        return both


class TwinMachine(AllocatorMachine):
    def allocator(self, pool: Pool) -> Any:
        c1, c2 = itertools.count(1), itertools.count(1)
        return Twin(
            Allocator(pool, new_lease_id=lambda: f"L{next(c1)}"),
            LinearWalk(pool, new_lease_id=lambda: f"L{next(c2)}"),
        )


# The twin runs every rule and invariant above on the allocator, and compares each
# decision with the linear walk's: one run checks both.
TestAllocatorMachine = TwinMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
