"""Benchmark: the allocator's grant decision on a big node with a long queue.

    python bench/allocator.py [--rounds 400] [--queue 1000] [--only cycle] [--against REV]

Pool: 1024 CPUs and 16 GPUs on 8 NUMA nodes (128 CPUs and 2 GPUs per node). Measured in
one run, medians and p99 in microseconds:

- baseline: submit on an empty queue and a free pool (the grant decision alone), and the
  release after it;
- with the pool fully leased and `--queue` (1000) mixed requests waiting: a release that
  hands the freed slots to the waiters it can (the walk plus the grants; also per grant),
  a submit that has to queue, a disconnect that reaps and re-grants, an expire with
  nothing due;
- the planner alone in the worst shapes: a request spread over all nodes, and the
  satisfiability check of a request never seen before (an uncached planner run on the
  whole pool).

- the server's hot path, one acquire+release cycle without the socket: `parse_request`
  of a freshly decoded wire value + `submit` (granted at once) + `release`, for
  `{"cpus": 1}` and `{"gpus": 1, "cpus": 2}`, on a flat pool (256 cpus, 8 gpus, no NUMA
  properties) and on the big pool. Each step is also timed alone (wall clock only: the
  CPU clock is a system call, too slow to wrap a microsecond step); the cycle row is
  timed in batches, wall and CPU.

`--against REV` runs the same sections on the `rpool_agent` package of git revision REV
(exported to a temporary directory, run in a child process) in the same run, and prints
before/after CPU medians side by side. Issue 4's speed target puts a whole cycle through
the server at about 50 us, so parsing plus allocation should be a few us.

Target (issue 4): the grant decision stays under 1 ms with this pool and queue. Writes
the numbers as JSON to bench/results/. A benchmark, not a test: nothing here fails a
build.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rpool_agent.allocator import Allocator
from rpool_agent.lease import Granted, Queued
from rpool_agent.placement import place
from rpool_agent.pool import Instance, Pool
from rpool_agent.requests import Request, Unit, parse_request

HERE = Path(__file__).resolve().parent
TARGET_US = 1000.0
NODES, CPUS_PER_NODE, GPUS_PER_NODE = 8, 128, 2
FLAT_CPUS, FLAT_GPUS = 256, 8
SECTIONS = ("cycle", "baseline", "loaded", "walk", "planner")

#: The cycle rows' requests, as JSON text: each cycle decodes a fresh value, as the server does
CYCLE_REQUESTS = {"cpus=1": '{"cpus": 1}', "gpus=1,cpus=2": '{"gpus": 1, "cpus": 2}'}
#: What the server passes as `holder` (peer credentials)
HOLDER = {"pid": 4242, "uid": 1000, "gid": 1000}

# What the waiters ask for: mixed shapes, every form
SHAPES = [
    {"gpus": 1, "cpus": 8},
    {"gpus": 2, "cpus": 16},
    {"cpus": 4},
    {"cpus": 32},
    "2,gpus:1,cpus:2",
    [{"type": "cpus", "slots": 1}] * 8,
    {"gpu": 1},
    {"gpus": 4, "cpus": 64},
]


def big_pool() -> Pool:
    cpus = [
        Instance(str(n * CPUS_PER_NODE + i), 1, {"numa_node": n})
        for n in range(NODES)
        for i in range(CPUS_PER_NODE)
    ]
    gpus = [
        Instance(str(n * GPUS_PER_NODE + i), 1, {"numa_node": n})
        for n in range(NODES)
        for i in range(GPUS_PER_NODE)
    ]
    return Pool.single({"cpus": cpus, "gpus": gpus})


def flat_pool() -> Pool:
    """No numa_node properties: every type is one group (a VM, a laptop, a hand-written pool)."""
    cpus = [Instance(str(i), 1) for i in range(FLAT_CPUS)]
    gpus = [Instance(str(i), 1) for i in range(FLAT_GPUS)]
    return Pool.single({"cpus": cpus, "gpus": gpus})


def new_allocator(pool: Pool | None = None) -> Allocator:
    counter = itertools.count(1)
    return Allocator(pool or big_pool(), new_lease_id=lambda: f"L{next(counter)}")


#: Samples of one operation: wall-clock and this thread's CPU time, in microseconds. On a
#: shared 2-core VM the wall clock's tail is other processes' time slices (4 ms ticks); the
#: CPU time is what the decision itself costs. Both are reported.
Samples = tuple[list[float], list[float]]


def us(fn: Callable[[], Any], into: Samples, per: int = 1) -> Any:
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn()
    wall, cpu = (time.perf_counter() - t0) * 1e6, (time.thread_time() - c0) * 1e6
    into[0].append(wall / per)
    into[1].append(cpu / per)
    return out


def new_samples() -> Samples:
    return ([], [])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def stats(samples: Samples) -> dict[str, float]:
    wall, cpu = samples
    return {
        "wall_median_us": statistics.median(wall),
        "wall_p99_us": pct(wall, 0.99),
        "cpu_median_us": statistics.median(cpu),
        "cpu_p99_us": pct(cpu, 0.99),
        "n": len(wall),
    }


def bench_cycle(rounds: int, batch: int = 50) -> dict[str, dict[str, float]]:
    """parse_request + submit + release, the allocator's share of one acquire+release."""
    out: dict[str, dict[str, float]] = {}
    clock = time.perf_counter
    for pool_name, make in (("flat 256", flat_pool), ("numa 1024", big_pool)):
        a = new_allocator(make())
        for req_name, wire in CYCLE_REQUESTS.items():
            parse, submit, release, cycle = (new_samples() for _ in range(4))
            n = itertools.count()
            for _ in range(rounds):
                values = [json.loads(wire) for _ in range(batch)]
                for v in values:  # each step alone
                    i = next(n)
                    t0 = clock()
                    req = parse_request(v)
                    t1 = clock()
                    (ev,) = a.submit(i, i, req, now=1.0, timeout=None, holder=HOLDER)
                    t2 = clock()
                    a.release(i, ev.lease.id)
                    t3 = clock()
                    parse[0].append((t1 - t0) * 1e6)
                    submit[0].append((t2 - t1) * 1e6)
                    release[0].append((t3 - t2) * 1e6)
                values = [json.loads(wire) for _ in range(batch)]

                def cycles(values: list[Any] = values, a: Allocator = a, n: Any = n) -> None:
                    for v in values:
                        i = next(n)
                        (ev,) = a.submit(
                            i, i, parse_request(v), now=1.0, timeout=None, holder=HOLDER
                        )
                        a.release(i, ev.lease.id)

                us(cycles, cycle, per=batch)
            assert not a.leases
            prefix = f"cycle {pool_name} {req_name}:"
            for step, samples in (("parse", parse), ("submit", submit), ("release", release)):
                samples[1].extend(samples[0])  # wall only (see the module docstring)
                out[f"{prefix} {step}"] = stats(samples)
            out[f"{prefix} whole cycle"] = stats(cycle)
    return out


def bench_baseline(rounds: int) -> dict[str, dict[str, float]]:
    a = new_allocator()
    req = parse_request({"gpus": 1, "cpus": 8})
    grant, release = new_samples(), new_samples()
    for i in range(rounds):
        events = us(lambda i=i: a.submit(("c", i), i, req, now=float(i), timeout=None), grant)
        lease = events[0].lease
        us(lambda lease=lease, i=i: a.release(lease.owner, lease.id, now=float(i)), release)
    return {"empty queue: submit -> Granted": stats(grant), "empty queue: release": stats(release)}


def bench_loaded(rounds: int, queue: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    a = new_allocator()
    requests = [parse_request(s) for s in SHAPES]
    owners = itertools.count(1)
    req_ids = itertools.count(1)
    # fill the pool: 16 leases of one GPU and 64 CPUs each
    holding: list[tuple[Any, str]] = []
    for _ in range(16):
        owner = ("conn", next(owners))
        (ev,) = a.submit(owner, 0, parse_request({"gpus": 1, "cpus": 64}), now=0, timeout=None)
        assert isinstance(ev, Granted)
        holding.append((owner, ev.lease.id))

    def refill(now: float) -> None:
        while len(a.waiting()) < queue:
            owner = ("conn", next(owners))
            req = rng.choice(requests)
            events = a.submit(owner, next(req_ids), req, now=now, timeout=3600.0)
            for ev in events:
                if isinstance(ev, Granted):
                    holding.append((ev.owner, ev.lease.id))

    refill(0.0)
    assert len(a.waiting()) == queue
    release, per_grant, submit = new_samples(), new_samples(), new_samples()
    disconnect, expire = new_samples(), new_samples()
    grants = 0
    for i in range(rounds):
        now = 1.0 + i
        # a release frees slots; the walk hands them out (the grant decision)
        owner, lid = holding.pop(rng.randrange(len(holding)))
        events = us(lambda o=owner, lid=lid, now=now: a.release(o, lid, now=now), release)
        got = [e for e in events if isinstance(e, Granted)]
        holding.extend((e.owner, e.lease.id) for e in got)
        grants += len(got)
        if got:
            per_grant[0].append(release[0][-1] / len(got))
            per_grant[1].append(release[1][-1] / len(got))
        refill(now)
        # a submit that must queue (its types are waited for), then cancelled again
        owner = ("conn", next(owners))
        req = rng.choice(requests)
        events = us(
            lambda o=owner, r=req, now=now: a.submit(o, -1, r, now=now, timeout=None), submit
        )
        if isinstance(events[0], Queued):
            a.cancel(owner, -1, now=now)
        elif isinstance(events[0], Granted):
            holding.append((owner, events[0].lease.id))
        # nothing is due: the server calls this on every timer tick
        us(lambda now=now: a.expire(now), expire)
        # a holder dies: reap and re-grant
        if i % 4 == 0 and holding:
            owner, _ = holding[rng.randrange(len(holding))]
            events = us(lambda o=owner, now=now: a.disconnect(o, now=now), disconnect)
            holding[:] = [(o, x) for o, x in holding if o != owner]
            holding.extend((e.owner, e.lease.id) for e in events if isinstance(e, Granted))
            refill(now)
    assert len(a.waiting()) >= queue - 1
    return {
        f"{queue} waiting: release -> grants": stats(release),
        f"{queue} waiting: per grant": stats(per_grant),
        f"{queue} waiting: submit -> Queued": stats(submit),
        f"{queue} waiting: disconnect -> grants": stats(disconnect),
        f"{queue} waiting: expire, none due": stats(expire),
        "_grants_per_release": grants / rounds,
    }


def bench_long_walk(rounds: int, queue: int) -> dict[str, dict[str, float]]:
    """The walk's worst case: the one grantable waiter sits behind queue-1 skipped ones.

    The head wants every GPU, everyone after it one GPU (skipped: gpus are blocked), and the
    last one a license; releasing the license lease makes only that last waiter grantable.
    """
    pool = big_pool()
    pool.local.resources["lic"] = [Instance("0", 1)]
    counter = itertools.count(1)
    a = Allocator(pool, new_lease_id=lambda: f"L{next(counter)}")
    a.submit("gpu-holder", 0, parse_request({"gpus": 1}), now=0, timeout=None)
    a.submit("head", 0, parse_request({"gpus": 16}), now=0, timeout=None)
    for i in range(queue - 2):
        a.submit(("w", i), 0, parse_request({"gpus": 1}), now=0, timeout=None)
    lic = parse_request({"lic": 1})
    samples = new_samples()
    (ev,) = a.submit("lic-holder", 0, lic, now=0, timeout=None)
    for i in range(rounds):
        a.submit("last", i, lic, now=0, timeout=None)
        assert len(a.waiting()) == queue
        events = us(lambda o=ev.owner, lid=ev.lease.id: a.release(o, lid), samples)
        assert [e.owner for e in events[1:]] == ["last"]
        ev = events[1]
    return {f"{queue} waiting: release -> grant to the last": stats(samples)}


def bench_planner(rounds: int) -> dict[str, dict[str, float]]:
    a = new_allocator()
    views = {t: a._tables[t].free for t in ("cpus", "gpus")}  # the planner's input
    out = {}
    for name, req in (
        ("plan: whole pool (16 gpus, 1024 cpus)", parse_request({"gpus": 16, "cpus": 1024})),
        ("plan: 3 gpus, 200 cpus, spread", parse_request({"gpus": 3, "cpus": 200})),
    ):
        samples = new_samples()
        for _ in range(rounds):
            us(lambda r=req: place(r.units(), views, r.distinct), samples)
        out[name] = stats(samples)
    # the satisfiability check of a shape never seen: one planner run on the whole pool
    fresh = [
        Request(((Unit("gpus", 1),) * (1 + n % 4) + (Unit("cpus", 1),) * (1 + n % 97),))
        for n in range(rounds)
    ]
    samples = new_samples()
    shape = getattr(a, "_shape", None)  # since the request shape cache; before: the Request
    for req in fresh:
        a._sat.clear()
        if shape is None:
            us(lambda r=req: a._unsatisfiable(r), samples)
        else:
            a._shapes.clear()
            us(lambda r=req: a._unsatisfiable(shape(r)), samples)
    out["satisfiability check, uncached"] = stats(samples)
    return out


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only or SECTIONS)
    results: dict[str, Any] = {}
    if "cycle" in only:
        results.update(bench_cycle(max(10, args.rounds // 10)))
    if "baseline" in only:
        results.update(bench_baseline(args.rounds))
    if "loaded" in only:
        results.update(bench_loaded(args.rounds, args.queue))
    if "walk" in only:
        results.update(bench_long_walk(args.rounds, args.queue))
    if "planner" in only:
        results.update(bench_planner(max(50, args.rounds // 4)))
    return results


def run_against(rev: str, argv: list[str]) -> dict[str, Any]:
    """The same sections on the rpool_agent package of git revision `rev`, in a child."""
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        tar = subprocess.run(
            ["git", "archive", rev, "rpool_agent"], cwd=root, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv, "--child"],
            env={"PYTHONPATH": tmp, "PATH": "/usr/bin:/bin"},
            check=True,
            capture_output=True,
            text=True,
        )
    got: dict[str, Any] = json.loads(child.stdout)
    if not got.pop("_package").startswith(tmp):
        raise SystemExit(f"the child did not import rpool_agent from {rev}")
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--queue", type=int, default=1000)
    ap.add_argument("--only", action="append", choices=SECTIONS, help="repeatable")
    ap.add_argument("--against", metavar="REV", help="also run on git revision REV, compare")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    passed = [f"--rounds={args.rounds}", f"--queue={args.queue}"]
    passed += [f"--only={o}" for o in args.only or ()]
    before = run_against(args.against, passed) if args.against else None
    results = run_sections(args)
    if args.child:
        import rpool_agent

        results["_package"] = rpool_agent.__file__
        print(json.dumps(results))
        return 0
    grants_per_release = results.pop("_grants_per_release", None)
    if before is not None:
        before.pop("_grants_per_release", None)

    print(f"pool: {NODES * CPUS_PER_NODE} cpus, {NODES * GPUS_PER_NODE} gpus, {NODES} NUMA nodes")
    print(f"{'':44} {'wall clock (us)':>21} {'CPU time (us)':>21}")
    print(f"{'operation':44} {'median':>10} {'p99':>10} {'median':>10} {'p99':>10}")
    for name, row in results.items():
        print(
            f"{name:44} {row['wall_median_us']:10.1f} {row['wall_p99_us']:10.1f}"
            f" {row['cpu_median_us']:10.1f} {row['cpu_p99_us']:10.1f}"
        )
    if before is not None:
        print(f"\nCPU median (us; wall for single steps), {args.against} -> working tree")
        print(f"{'operation':44} {'before':>10} {'after':>10} {'speedup':>10}")
        for name, row in results.items():
            old = before.get(name)
            if old is not None:
                b, n = old["cpu_median_us"], row["cpu_median_us"]
                print(f"{name:44} {b:10.1f} {n:10.1f} {b / n if n else math.inf:9.1f}x")
    decision = results.get(f"{args.queue} waiting: release -> grants")
    ok = None
    if decision is not None:
        ok = decision["wall_median_us"] < TARGET_US and decision["cpu_p99_us"] < TARGET_US
        print(
            f"grant decision with {args.queue} waiting ({grants_per_release:.2f} grants per "
            f"release): wall median {decision['wall_median_us']:.0f} us, CPU p99 "
            f"{decision['cpu_p99_us']:.0f} us; target < {TARGET_US:.0f} us: "
            f"{'met' if ok else 'MISSED'}"
        )
    out = {
        "bench": "allocator",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pool": {"cpus": NODES * CPUS_PER_NODE, "gpus": NODES * GPUS_PER_NODE, "numa": NODES},
        "flat_pool": {"cpus": FLAT_CPUS, "gpus": FLAT_GPUS},
        "queue": args.queue,
        "rounds": args.rounds,
        "grants_per_release": grants_per_release,
        "target_us": TARGET_US,
        "target_met": ok,
        "results": results,
        "against": {"rev": args.against, "results": before} if before is not None else None,
    }
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"allocator-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
