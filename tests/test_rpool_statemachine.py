"""Random checkout/checkin sequences on random pools: slots are conserved, capacity never moves.

A small model (a list of free slots per instance, best fit by hand) says what each checkout
must return; the pool must agree with it, refuse exactly when it refuses, and never lose,
invent, or overfill a slot.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from rpool_agent.rpool import ResourcePool, ResourceUnavailable

TYPES = ("cpus", "gpus", "fpgas")
UNKNOWN = "tpus"

pools = st.dictionaries(
    st.sampled_from(TYPES), st.lists(st.integers(0, 3), max_size=4), min_size=1
).map(
    lambda spec: {
        "resources": {
            t: [{"id": str(i), "slots": s} for i, s in enumerate(slots)]
            for t, slots in spec.items()
        }
    }
)
requests = st.lists(
    st.tuples(st.sampled_from((*TYPES, UNKNOWN)), st.integers(0, 3)), max_size=5
).map(lambda pairs: [{"type": t, "slots": s} for t, s in pairs])


def best_fit(free: dict[str, list[list[Any]]], request: list[dict[str, Any]]) -> Any:
    """The expected checkout, computed on a copy: None when some item cannot be served."""
    free = {t: [list(inst) for inst in insts] for t, insts in free.items()}
    got: dict[str, list[dict[str, Any]]] = {}
    for item in request:
        rtype, slots = item["type"], item["slots"]
        for inst in sorted(free[rtype], key=lambda inst: inst[1]):  # stable: file order on ties
            if slots <= inst[1]:
                inst[1] -= slots
                got.setdefault(rtype, []).append({"id": inst[0], "slots": slots})
                break
        else:
            return None
    return got


class RpoolMachine(RuleBasedStateMachine):
    @initialize(doc=pools)
    def setup(self, doc: dict[str, Any]) -> None:
        self.pool = ResourcePool(doc)
        self.reference = ResourcePool(doc)  # never checked out: capacity answers only
        self.capacity = {
            (t, inst["id"]): inst["slots"]
            for t, insts in self.pool.resources.items()
            for inst in insts
        }
        self.configured = Counter(self.pool.slots_per_resource_type)
        self.held: list[dict[str, list[dict[str, Any]]]] = []

    def free(self) -> dict[str, list[list[Any]]]:
        return {
            t: [[i["id"], i["slots"]] for i in insts] for t, insts in self.pool.resources.items()
        }

    @rule(request=requests)
    def checkout(self, request: list[dict[str, Any]]) -> None:
        fresh = not self.held
        fits = self.pool.accommodates(request)
        # accommodates looks at capacity only, so what is checked out does not change it
        assert bool(fits) == bool(self.reference.accommodates(request))
        before = self.pool.getstate()
        unknown = {item["type"] for item in request} - set(self.pool.resources)
        if unknown:
            assert not fits and all(t in str(fits.reason) for t in unknown)
            try:
                self.pool.checkout(request)
                raise AssertionError("checkout of an unknown type succeeded")
            except TypeError:
                assert self.pool.getstate() == before
            return
        expected = best_fit(self.free(), request)
        try:
            got = self.pool.checkout(request)
        except ResourceUnavailable:
            assert expected is None
            assert self.pool.getstate() == before  # all or nothing
            return
        assert got == expected
        if fresh:
            assert fits, f"checkout succeeded on a fresh pool, but accommodates said {fits!r}"
        self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def checkin(self, data: st.DataObject) -> None:
        got = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.pool.checkin(got)

    @rule(data=st.data())
    def overfill_is_refused(self, data: st.DataObject) -> None:
        if not self.capacity:
            return
        rtype, rid = data.draw(st.sampled_from(sorted(self.capacity)))
        current = next(i for i in self.pool.resources[rtype] if i["id"] == rid)["slots"]
        extra = self.capacity[rtype, rid] - current + data.draw(st.integers(1, 2))
        before = self.pool.getstate()
        try:
            self.pool.checkin({rtype: [{"id": rid, "slots": extra}]})
            raise AssertionError("overfilling checkin succeeded")
        except ValueError:
            assert self.pool.getstate() == before

    @invariant()
    def slots_are_conserved(self) -> None:
        if not hasattr(self, "pool"):
            return
        held: Counter[tuple[str, str]] = Counter()
        for got in self.held:
            for rtype, rspecs in got.items():
                for rspec in rspecs:
                    held[rtype, rspec["id"]] += rspec["slots"]
        for rtype, insts in self.pool.resources.items():
            for inst in insts:
                cap = self.capacity[rtype, inst["id"]]
                assert 0 <= inst["slots"] <= cap
                assert inst["slots"] + held[rtype, inst["id"]] == cap

    @invariant()
    def capacity_never_moves(self) -> None:
        if hasattr(self, "pool"):
            assert self.pool.slots_per_resource_type == self.configured


RpoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRpoolStateMachine = RpoolMachine.TestCase
