"""The allocator with bare calls (no I/O): placement tables, queue rules, lifetimes.

Placement tests are tables `(pool, held, request) -> ids | None`, like CMake's
testCTestBinPacker. Pools are written compactly: "id[:slots][@numa] ..." per type.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from rpool_agent import allocator, placement, tables, waiters
from rpool_agent import lease as lease_module
from rpool_agent import requests as requests_module
from rpool_agent.allocator import Allocator
from rpool_agent.errors import (
    NotOwner,
    PoolFormatError,
    RequestError,
    ResourceUnavailable,
    Timeout,
    UnknownLease,
    UnknownResourceType,
    Unsatisfiable,
)
from rpool_agent.lease import Denied, Granted, Lease, Queued, Reaped, Released, Slice
from rpool_agent.pool import Instance, Node, Pool
from rpool_agent.requests import parse_request

# --- helpers -----------------------------------------------------------------------------


def mkpool(**types: str) -> Pool:
    """mkpool(gpus="0@0 1:2@1 2") -> ids 0,1,2; slots 1,2,1; NUMA nodes 0,1,none."""
    resources = {}
    for rtype, text in types.items():
        insts = []
        for tok in text.split():
            m = re.fullmatch(r"(\w+)(?::(\d+))?(?:@(\d+))?", tok)
            assert m, tok
            props = {"numa_node": int(m[3])} if m[3] else {}
            insts.append(Instance(m[1], int(m[2] or 1), props))
        resources[rtype] = insts
    return Pool.single(resources)


def mkalloc(pool: Pool) -> Allocator:
    counter = itertools.count(1)
    return Allocator(pool, new_lease_id=lambda: f"L{next(counter)}")


def hold(a: Allocator, held: str, owner: Any = "held") -> None:
    """Occupy slots: "gpus:0 cpus:3:2" (type:id[:slots]) via an adopted lease."""
    if not held:
        return
    slices = []
    for tok in held.split():
        rtype, rid, *n = tok.split(":")
        slices.append(Slice(rtype, rid, int(n[0]) if n else 1))
    req = parse_request([{"type": s.type, "slots": s.slots} for s in slices])
    a.adopt(Lease(f"held-{len(a.leases)}", owner, req, (tuple(slices),)))


def ids(groups: tuple[tuple[Slice, ...], ...] | None) -> str | None:
    return None if groups is None else " ".join(f"{s.type}:{s.id}" for g in groups for s in g)


def grant(a: Allocator, owner: Any, req_id: Any, request: Any, now: float = 0.0) -> Lease:
    (ev,) = a.submit(owner, req_id, parse_request(request), now=now, timeout=None)
    assert isinstance(ev, Granted), ev
    return ev.lease


def state(a: Allocator) -> tuple[Any, Any, Any]:
    return (a.snapshot(), dict(a.leases), a.next_deadline())


FLAT4 = {"gpus": "0 1 2 3"}
MIXED = {"gpus": "0:2 1:1 2:2"}
NUMA = {"cpus": "0@0 1@0 2@0 3@0 4@1 5@1 6@1 7@1", "gpus": "0@0 1@0 2@1 3@1"}
NUMA3 = {"gpus": "0@0 1@0 2@1 3@1 4@2"}

# (why, pool, held, request, expected ids per unit in request order | None)
PLACEMENT = [
    ("best fit: fewest free slots that fit", MIXED, "", "gpus:1", "gpus:1"),
    ("best fit counts what is held", {"gpus": "0:2 1:2"}, "gpus:1:1", "gpus:1", "gpus:1"),
    ("ties go to pool order", FLAT4, "", "gpus:1", "gpus:0"),
    ("held instances are skipped", FLAT4, "gpus:0", "gpus:1", "gpus:1"),
    ("units share an instance with slots", {"gpus": "0:2 1:2"}, "", "2,gpus:1", "gpus:0 gpus:0"),
    ("largest unit placed first", {"gpus": "a:3 b:2"}, "", "gpus:1,gpus:2", "gpus:a gpus:b"),
    ("all or nothing", FLAT4, "gpus:0 gpus:1", "3,gpus:1", None),
    ("mapping: different instances", {"gpus": "0:2 1:2"}, "", {"gpus": 2}, "gpus:0 gpus:1"),
    ("mapping: one instance is not two", {"gpus": "0:4"}, "", {"gpus": 2}, None),
    ("a unit is served by one instance", FLAT4, "", "gpus:2", None),
    ("zero slots: the fullest instance", {"gpus": "0 1"}, "gpus:1", "gpus:0", "gpus:1"),
    ("singular type name", FLAT4, "", "gpu:1", "gpus:0"),
    ("nothing asked, nothing given", FLAT4, "", "", ""),
    # NUMA
    ("one node for gpus and cpus", NUMA, "", {"gpus": 1, "cpus": 2}, "gpus:0 cpus:0 cpus:1"),
    (
        "the gpus' best-fit node decides",
        NUMA,
        "gpus:0",
        {"gpus": 1, "cpus": 2},
        "gpus:1 cpus:0 cpus:1",
    ),
    (
        "the node that holds all wins",
        NUMA,
        "cpus:0 cpus:1 cpus:2",
        {"gpus": 1, "cpus": 2},
        "gpus:2 cpus:4 cpus:5",
    ),
    ("cpu-only: best-fit node", NUMA, "cpus:0 cpus:1", {"cpus": 2}, "cpus:2 cpus:3"),
    (
        "CTest groups on one node",
        NUMA,
        "",
        "2,gpus:1,cpus:1",
        "gpus:0 cpus:0 gpus:1 cpus:1",
    ),
    (
        "spread: gpus first, cpus fill their nodes",
        NUMA,
        "",
        {"gpus": 3, "cpus": 6},
        "gpus:0 gpus:1 gpus:2 cpus:0 cpus:1 cpus:2 cpus:3 cpus:4 cpus:5",
    ),
    ("spread: the rest goes to a best-fit node", NUMA3, "", {"gpus": 3}, "gpus:0 gpus:1 gpus:4"),
    (
        "no numa_node: a group of its own",
        {"cpus": "0@0 1@0 2 3"},
        "cpus:0",
        {"cpus": 2},
        "cpus:2 cpus:3",
    ),
    (
        "types without NUMA are placed apart",
        {"cpus": "0@0 1@0 2@1 3@1", "lic": "x:2"},
        "cpus:0",
        {"cpus": 1, "lic": 1},
        "cpus:1 lic:x",
    ),
    ("not free now", NUMA, "gpus:0 gpus:1 gpus:2", {"gpus": 2}, None),
]


@pytest.mark.parametrize(
    ("pool", "held", "wanted", "expected"),
    [p[1:] for p in PLACEMENT],
    ids=[p[0] for p in PLACEMENT],
)
def test_placement(pool: dict[str, str], held: str, wanted: Any, expected: str | None) -> None:
    a = mkalloc(mkpool(**pool))
    hold(a, held)
    req = parse_request(wanted)
    assert ids(a.plan(req)) == expected
    # the commit applies exactly the plan, or (all or nothing) changes nothing
    before = state(a)
    events = a.submit("c", 1, req, now=0.0, timeout=0)
    if expected is None:
        assert isinstance(events[0], Denied)
        assert state(a) == before
    else:
        assert isinstance(events[0], Granted)
        assert ids(events[0].lease.groups) == expected


def test_lease_resources_sum_per_id_in_pool_order() -> None:
    a = mkalloc(mkpool(gpus="a:2 b:3"))
    lease = grant(a, "c", 1, "gpus:1,gpus:2;gpus:1")
    assert ids(lease.groups) == "gpus:b gpus:a gpus:b"  # per unit, in request order
    assert lease.resources() == {"gpus": [{"id": "a", "slots": 2}, {"id": "b", "slots": 2}]}


def test_lease_record_round_trips_through_json() -> None:
    a = mkalloc(mkpool(**NUMA))
    lease = grant(a, ("pid", 42, 1234), 7, {"gpus": 1, "cpus": 2})
    lease = Lease(**{**lease.__dict__, "label": "t", "holder": {"pid": 42, "uid": 0}})
    back = Lease.from_dict(json.loads(json.dumps(lease.to_dict())))
    assert back == lease
    assert back.owner == ("pid", 42, 1234)
    assert back.resources() == lease.resources()


@pytest.mark.parametrize(
    "record",
    [
        None,
        {},
        {"id": 3},
        {"id": "x", "owner": 1, "request": "gpus:1", "groups": [[]], "resources": {}},
        {"id": "x", "owner": 1, "request": "gpus:1", "groups": [[["gpus", "0", -1]]]},
        {"id": "x", "owner": 1, "request": "GPU:1", "groups": [], "resources": {}},
    ],
)
def test_bad_lease_records_are_refused(record: Any) -> None:
    with pytest.raises(ValueError, match="bad lease record"):
        Lease.from_dict(record)


# --- queue: FIFO with safe backfill --------------------------------------------------------


def test_fifo_backfill_only_with_disjoint_types() -> None:
    a = mkalloc(mkpool(gpus="0 1", cpus="0 1"))
    first = grant(a, "A", 1, {"gpus": 2})
    assert a.submit("B", 1, parse_request({"gpus": 1}), now=1, timeout=None) == [Queued("B", 1, 1)]
    # cpus: nobody waits for them, so this may pass the queue
    grant(a, "C", 1, {"cpus": 1})
    # gpus + cpus: an earlier waiter needs gpus, so it waits though a cpu is free
    (ev,) = a.submit("D", 1, parse_request({"gpus": 1, "cpus": 1}), now=2, timeout=None)
    assert ev == Queued("D", 1, 2)
    # cpus only, but D (waiting) needs cpus: queued too, FIFO among those who share types
    (ev,) = a.submit("E", 1, parse_request({"cpus": 1}), now=3, timeout=None)
    assert ev == Queued("E", 1, 3)
    events = a.release("A", first.id, now=4)
    assert [type(e).__name__ for e in events] == ["Released", "Granted", "Granted"]
    assert [(e.owner, ids(e.lease.groups)) for e in events[1:]] == [
        ("B", "gpus:0"),
        ("D", "gpus:1 cpus:1"),
    ]
    assert a.waiting() == [("E", 1)]
    assert events[1].lease.granted_at == 4


def test_big_request_is_not_starved_by_small_ones() -> None:
    a = mkalloc(mkpool(**FLAT4))
    small = [grant(a, f"s{i}", 1, {"gpus": 1}) for i in range(4)]
    assert isinstance(
        a.submit("big", 1, parse_request({"gpus": 4}), now=1, timeout=None)[0], Queued
    )
    # small requests keep coming; each free gpu would fit one, but big is first in line
    for i, lease in enumerate(small[:3]):
        (ev,) = a.submit(f"late{i}", 1, parse_request({"gpus": 1}), now=2, timeout=None)
        assert isinstance(ev, Queued)
        assert a.release(lease.owner, lease.id) == [Released(lease.owner, lease.id)]
    events = a.release(small[3].owner, small[3].id)
    assert isinstance(events[1], Granted) and events[1].owner == "big"
    assert ids(events[1].lease.groups) == "gpus:0 gpus:1 gpus:2 gpus:3"
    assert len(events) == 2  # the late ones wait for big to finish
    events = a.release("big", events[1].lease.id)
    assert [e.owner for e in events[1:]] == ["late0", "late1", "late2"]


def test_walk_stops_and_skips_blocked_types() -> None:
    a = mkalloc(mkpool(gpus="0", cpus="0 1"))
    g = grant(a, "A", 1, {"gpus": 1})
    a.submit("W1", 1, parse_request({"gpus": 1}), now=0, timeout=None)
    a.submit("W2", 1, parse_request({"gpus": 1, "cpus": 1}), now=0, timeout=None)
    a.submit("W3", 1, parse_request({"cpus": 1}), now=0, timeout=None)  # behind W2's cpus
    assert a.waiting() == [("W1", 1), ("W2", 1), ("W3", 1)]
    events = a.release("A", g.id)
    assert [e.owner for e in events if isinstance(e, Granted)] == ["W1"]
    # W1 now holds the gpu: W2 still blocked, so W3 still waits behind it (no overtaking)
    assert a.waiting() == [("W2", 1), ("W3", 1)]


def test_walk_goes_past_blocked_waiters_to_free_types() -> None:
    a = mkalloc(mkpool(gpus="0", cpus="0"))
    grant(a, "A", 1, {"gpus": 1})
    a.submit("W1", 1, parse_request({"gpus": 1}), now=0, timeout=None)
    a.submit("W2", 1, parse_request({"gpus": 1, "cpus": 1}), now=0, timeout=None)
    a.submit("W3", 1, parse_request({"cpus": 1}), now=0, timeout=None)
    # W2 leaves: W1 still blocks gpus, but nobody ahead of W3 needs cpus any more
    events = a.cancel("W2", 1)
    assert [(e.owner, ids(e.lease.groups)) for e in events] == [("W3", "cpus:0")]


def test_queued_positions_count_from_one() -> None:
    a = mkalloc(mkpool(gpus="0"))
    grant(a, "A", 1, {"gpus": 1})
    positions = [
        a.submit("B", i, parse_request("gpus:1"), now=0, timeout=None)[0].position for i in range(3)
    ]
    assert positions == [1, 2, 3]
    assert [w["position"] for w in a.snapshot()["waiters"]] == [1, 2, 3]


# --- lifetimes: disconnect, cancel, timeouts ----------------------------------------------


def test_disconnect_reaps_and_serves_the_next_waiter() -> None:
    a = mkalloc(mkpool(gpus="0 1"))
    l1 = grant(a, "A", 1, "gpus:1")
    l2 = grant(a, "A", 2, "gpus:1")
    a.submit("A", 3, parse_request("gpus:1"), now=0, timeout=None)  # A's own waiter goes too
    a.submit("B", 1, parse_request({"gpus": 2}), now=0, timeout=None)
    events = a.disconnect("A", now=5)
    assert events[0] == Reaped("A", (l1.id, l2.id))
    assert isinstance(events[1], Granted) and events[1].owner == "B"
    assert len(events) == 2
    assert a.waiting() == []
    assert a.disconnect("A") == []  # twice is harmless


def test_cancel_drops_a_waiter_and_unblocks_others() -> None:
    a = mkalloc(mkpool(gpus="0 1", cpus="0"))
    grant(a, "A", 1, {"gpus": 2})
    a.submit("B", 1, parse_request({"gpus": 1, "cpus": 1}), now=0, timeout=None)
    a.submit("C", 1, parse_request({"cpus": 1}), now=0, timeout=None)
    events = a.cancel("B", 1)
    assert [e.owner for e in events] == ["C"]
    assert a.cancel("B", 1) == []
    assert a.cancel("B", ["unhashable"]) == []


def test_timeouts_fire_through_expire() -> None:
    a = mkalloc(mkpool(gpus="0", cpus="0"))
    grant(a, "A", 1, "gpus:1")
    a.submit("B", 1, parse_request({"gpus": 1, "cpus": 1}), now=10, timeout=5)
    a.submit("C", 1, parse_request({"cpus": 1}), now=11, timeout=None)  # waits behind B
    a.submit("D", 1, parse_request({"gpus": 1}), now=12, timeout=1)
    assert a.next_deadline() == 13
    (ev,) = a.expire(13)
    assert isinstance(ev, Denied) and ev.owner == "D" and isinstance(ev.error, Timeout)
    assert a.next_deadline() == 15
    assert a.expire(14.9) == []
    events = a.expire(15)
    assert isinstance(events[0], Denied) and isinstance(events[0].error, Timeout)
    assert "within 5 s" in str(events[0].error)
    assert isinstance(events[1], Granted) and events[1].owner == "C"  # B no longer blocks it
    assert a.next_deadline() is None


def test_granted_waiters_leave_no_deadline_behind() -> None:
    a = mkalloc(mkpool(gpus="0"))
    lease = grant(a, "A", 1, "gpus:1")
    a.submit("B", 1, parse_request("gpus:1"), now=0, timeout=5)
    a.release("A", lease.id)
    assert a.next_deadline() is None
    assert a.expire(100) == []


def test_non_blocking_and_unsatisfiable_answers_come_at_once() -> None:
    a = mkalloc(mkpool(gpus="0:2 1:2", cpus="0 1"))
    grant(a, "A", 1, "gpus:2")
    cases = [
        ("gpus:4", Unsatisfiable, "can never be granted: a unit of 4 gpus slots"),
        ({"gpus": 3}, Unsatisfiable, "3 different gpus asked for, the pool has 2"),
        ("3,gpus:2", Unsatisfiable, "6 gpus slots asked for, the pool has 4"),
        ({"disks": 1}, UnknownResourceType, "unknown resource type 'disks'"),
    ]
    for i, (request, error, message) in enumerate(cases):
        (ev,) = a.submit("B", i, parse_request(request), now=0, timeout=None)
        assert isinstance(ev, Denied) and type(ev.error) is error, ev
        assert message in str(ev.error)
    (ev,) = a.submit("B", 9, parse_request("2,gpus:2"), now=0, timeout=0)
    assert type(ev.error) is ResourceUnavailable
    assert a.waiting() == []


# --- refused input changes nothing ---------------------------------------------------------


def test_refused_input_changes_nothing() -> None:
    a = mkalloc(mkpool(gpus="0 1", cpus="0"))
    lease = grant(a, "A", 1, "gpus:1")
    a.submit("B", 1, parse_request({"gpus": 2}), now=0, timeout=30)
    assert a.waiting() == [("B", 1)]
    a.drain("cpus", "0", "bad fan")
    refusals = [
        (lambda: a.release("A", "nope"), UnknownLease),
        (lambda: a.release("B", lease.id), NotOwner),
        (lambda: a.release("A", ["x"]), UnknownLease),
        (lambda: a.rebind("nope", "B"), UnknownLease),
        (lambda: a.submit("B", 1, parse_request("gpus:1"), now=1, timeout=None), RequestError),
        (lambda: a.submit("B", [1], parse_request("gpus:1"), now=1, timeout=None), RequestError),
        (lambda: a.submit("C", 1, parse_request("gpus:1"), now=1, timeout=-1), RequestError),
        (
            lambda: a.submit("C", 1, parse_request("gpus:1"), now=1, timeout=float("nan")),
            RequestError,
        ),
        (lambda: a.drain("gpus", "7", ""), UnknownResourceType),
        (lambda: a.undrain("disks", "0"), UnknownResourceType),
        (lambda: a.adopt(lease), RequestError),
        (lambda: a.set_pool(mkpool(gpus="0 0")), PoolFormatError),
    ]
    for call, error in refusals:
        before = state(a)
        with pytest.raises(error):
            call()
        assert state(a) == before, error


def test_release_by_owner_only() -> None:
    a = mkalloc(mkpool(gpus="0"))
    lease = grant(a, ("conn", 1), 1, "gpus:1")
    with pytest.raises(NotOwner, match="belongs to another client"):
        a.release(("conn", 2), lease.id)
    assert a.release(("conn", 1), lease.id) == [Released(("conn", 1), lease.id)]
    with pytest.raises(UnknownLease, match="no lease"):
        a.release(("conn", 1), lease.id)


# --- drain, reload, adopt, rebind --------------------------------------------------------


def test_drain_and_undrain() -> None:
    a = mkalloc(mkpool(gpus="0 1 2"))
    held = grant(a, "A", 1, "gpus:1")  # on gpu 0
    a.drain("gpu", "0", "ecc errors")  # a singular name works here too
    a.drain("gpus", "1", "maintenance")
    assert a.snapshot()["types"]["gpus"] == {
        "total": 3,
        "free": 1,
        "used": 1,
        "drained": 1,
        "stale": 0,
    }
    assert a.snapshot()["drained"][0] == {"type": "gpus", "id": "0", "reason": "ecc errors"}
    a.release("A", held.id)  # runs on, then gpu 0 is not given out again
    b = grant(a, "B", 1, "gpus:1")
    assert ids(b.groups) == "gpus:2"
    # the whole pool is still satisfiable: a drain is temporary, so this waits
    (ev,) = a.submit("C", 1, parse_request({"gpus": 2}), now=0, timeout=None)
    assert isinstance(ev, Queued)
    assert a.undrain("gpus", "2") == []  # not drained: nothing to do
    assert a.undrain("gpus", "0") == []  # C needs two: gpu 0 alone is not enough
    events = a.release("B", b.id)
    assert isinstance(events[1], Granted) and ids(events[1].lease.groups) == "gpus:0 gpus:2"
    assert a.drained == {("gpus", "1"): "maintenance"}


def test_set_pool_keeps_leases_on_vanished_instances() -> None:
    a = mkalloc(mkpool(gpus="0 1 2 3"))
    on3 = grant(a, "A", 1, {"gpus": 4})
    a.submit("B", 1, parse_request({"gpus": 4}), now=0, timeout=None)
    a.submit("C", 1, parse_request({"gpus": 2}), now=0, timeout=None)
    events = a.set_pool(mkpool(gpus="0 1 2"))  # gpu 3 is gone
    assert len(events) == 1 and isinstance(events[0], Denied) and events[0].owner == "B"
    assert isinstance(events[0].error, Unsatisfiable)
    snap = a.snapshot()
    assert snap["types"]["gpus"] == {"total": 3, "free": 0, "used": 3, "drained": 0, "stale": 1}
    assert snap["vanished"] == [{"type": "gpus", "id": "3", "held": 1}]
    assert snap["leases"][0]["stale"] is True
    events = a.release("A", on3.id)
    assert [e.owner for e in events[1:]] == ["C"]
    assert a.snapshot()["vanished"] == []
    assert a.leases[events[1].lease.id].resources() == {
        "gpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}]
    }


def test_set_pool_grants_from_new_instances_and_drops_unknown_types() -> None:
    a = mkalloc(mkpool(gpus="0", cpus="0"))
    grant(a, "A", 1, "gpus:1")
    a.submit("B", 1, parse_request("gpus:1"), now=0, timeout=None)
    a.submit("C", 1, parse_request({"gpus": 1, "cpus": 1}), now=0, timeout=None)
    events = a.set_pool(mkpool(gpus="0 1"))  # no cpus any more
    assert isinstance(events[0], Denied) and isinstance(events[0].error, UnknownResourceType)
    assert isinstance(events[1], Granted) and ids(events[1].lease.groups) == "gpus:1"


def test_zero_slot_leases_survive_a_reload_that_removes_their_instance() -> None:
    a = mkalloc(mkpool(gpus="0", cpus="0 1"))
    on_gpu = grant(a, "A", 1, "gpus:0,cpus:0")  # holds 0 slots of gpu 0 and of a cpu
    a.set_pool(mkpool(cpus="1"))  # gpus gone as a type, cpu 0 gone
    snap = a.snapshot()
    assert snap["leases"][0]["stale"] is True
    assert snap["vanished"] == []  # nothing held on them
    assert a.release("A", on_gpu.id) == [Released("A", on_gpu.id)]
    assert a.snapshot()["leases"] == []


def test_cached_request_shapes_follow_a_reload() -> None:
    # the same Request values before and after: names and NUMA nodes come from the new pool
    gpu, both = parse_request({"gpu": 1}), parse_request({"gpus": 1, "cpus": 2})
    a = mkalloc(mkpool(gpus="0 1", cpus="0 1 2"))
    assert ids(grant(a, "A", 1, gpu).groups) == "gpus:0"
    assert ids(a.plan(both)) == "gpus:1 cpus:0 cpus:1"
    a.set_pool(mkpool(gpu="9", gpus="0@0 1@1", cpus="0@0 1@1 2@1"))
    assert ids(grant(a, "B", 1, gpu).groups) == "gpu:9"  # "gpu" is a type of its own now
    assert ids(a.plan(both)) == "gpus:1 cpus:1 cpus:2"  # the free GPU's node
    # a waiter planned on the old pool is granted by the new one's rules
    w = mkalloc(mkpool(gpus="0", cpus="0 1 2 3"))
    holder = grant(w, "A", 1, {"gpus": 1})
    assert isinstance(w.submit("B", 1, both, now=0, timeout=None)[0], Queued)
    assert w.set_pool(mkpool(gpus="0@0", cpus="0@0 1@1 2@1 3@0")) == []
    events = w.release("A", holder.id)
    assert ids(events[1].lease.groups) == "gpus:0 cpus:0 cpus:3"


def test_slots_shrinking_under_a_lease_never_grants_more() -> None:
    a = mkalloc(mkpool(gpus="0:4"))
    lease = grant(a, "A", 1, "gpus:3")
    a.set_pool(mkpool(gpus="0:2"))
    assert a.snapshot()["types"]["gpus"]["free"] == 0
    (ev,) = a.submit("B", 1, parse_request("gpus:1"), now=0, timeout=0)
    assert isinstance(ev, Denied)
    a.release("A", lease.id)
    assert a.snapshot()["types"]["gpus"]["free"] == 2


def test_adopt_after_restart_and_rebind() -> None:
    a = mkalloc(mkpool(**NUMA))
    lease = grant(a, ("conn", 1), 1, {"gpus": 2, "cpus": 1})
    record = json.loads(json.dumps(lease.to_dict()))
    # restart: a fresh allocator, possibly on a changed pool (gpu 1 gone)
    b = mkalloc(mkpool(cpus=NUMA["cpus"], gpus="0@0 2@1 3@1"))
    b.adopt(Lease.from_dict(record))
    snap = b.snapshot()
    assert snap["types"]["gpus"]["used"] == 1 and snap["types"]["gpus"]["stale"] == 1
    assert snap["leases"][0]["stale"] is True
    assert ids(grant(b, "other", 1, {"gpus": 1}).groups) == "gpus:2"  # not gpu 0
    # the holder re-claims it from a new connection; the old owner's EOF no longer reaps it
    b.rebind(lease.id, ("conn", 2))
    assert b.disconnect(("conn", 1)) == []
    assert b.leases[lease.id].owner == ("conn", 2)
    assert b.disconnect(("conn", 2)) == [Reaped(("conn", 2), (lease.id,))]
    assert b.snapshot()["vanished"] == []


def test_new_lease_ids_never_collide_with_adopted_ones() -> None:
    ids_given = iter(["L1", "L1", "L2"])
    a = Allocator(mkpool(gpus="0 1"), new_lease_id=lambda: next(ids_given))
    first = grant(a, "A", 1, "gpus:1")
    assert (first.id, grant(a, "A", 2, "gpus:1").id) == ("L1", "L2")


def test_bad_new_lease_ids_refuse_the_grant_and_change_nothing() -> None:
    given = iter([7, "L1", "L1", "L1"])
    a = Allocator(mkpool(gpus="0 1"), new_lease_id=lambda: next(given))
    with pytest.raises(TypeError, match="non-empty str"):  # the first bad id, no redraw
        a.submit("A", 1, parse_request("gpus:1"), now=0, timeout=None)
    assert a.snapshot()["types"]["gpus"]["free"] == 2 and not a.leases
    grant(a, "A", 1, "gpus:1")
    a._new_lease_id = lambda: "L1"  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="already in use"):
        a.submit("A", 2, parse_request("gpus:1"), now=0, timeout=None)
    assert a.snapshot()["types"]["gpus"]["free"] == 1 and list(a.leases) == ["L1"]


def test_status_snapshot_is_json() -> None:
    a = mkalloc(mkpool(**NUMA))
    grant(a, ("conn", 1), 1, {"gpus": 1}, now=3.5)
    a.submit(("conn", 2), 2, parse_request({"gpus": 4}), now=4, timeout=10, label="big")
    snap = json.loads(json.dumps(a.snapshot()))
    assert snap["leases"][0]["owner"] == "('conn', 1)"
    assert snap["leases"][0]["granted_at"] == 3.5
    assert snap["waiters"][0]["request"] == {"gpus": 4}
    assert snap["waiters"][0]["label"] == "big" and snap["waiters"][0]["deadline"] == 14


def test_free_of_total_agrees_with_the_snapshot() -> None:
    a = mkalloc(mkpool(**NUMA))
    grant(a, ("conn", 1), 1, {"gpus": 1, "cpus": 2})
    a.drain("gpus", "3", "broken")
    a.set_pool(mkpool(gpus="0@0 1@0 3@1", cpus=NUMA["cpus"]))  # gpu 2 vanishes
    types = a.snapshot()["types"]
    assert a.free_of_total() == {
        t: (row["free"], row["total"]) for t, row in types.items() if row["total"]
    }


def test_multi_node_pool_ids_must_be_unique() -> None:
    pool = Pool(nodes=[Node("a", {"gpus": [Instance("0")]}), Node("b", {"gpus": [Instance("0")]})])
    with pytest.raises(PoolFormatError, match="duplicate"):
        mkalloc(pool)


# --- purity ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module", [allocator, lease_module, placement, tables, waiters, requests_module]
)
def test_core_modules_do_no_io(module: Any) -> None:
    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"asyncio", "socket", "os", "time", "random", "subprocess", "threading"}
