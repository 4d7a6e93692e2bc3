"""Chaos: many client processes lease, release and get SIGKILLed while the agent itself is
SIGKILLed and restarted on the same socket and state directory.

    python bench/chaos.py [--clients 200] [--seconds 60] [--agent-kills 3] [--gpus 4]
                          [--kill-fraction 0.35] [--seed N] [--json PATH] [--fresh-state]

Each client process (the client library, as users' jobs use it) acquires a random request,
holds it a little, releases it, and again, until its time is up; it appends every grant
(lease id, what it got, monotonic time) and every release (time it started releasing) to
its own file. The parent starts the clients spread over the run, SIGKILLs a fraction of
them at random moments (noting the time just before the kill) and SIGKILLs the agent a
few times, restarting it at once.

Afterwards it checks, and prints in its summary:
- no over-commitment: from the clients' records, at no instant did the holders of any
  instance hold more than its slots. A holder's recorded interval lies inside the agent's
  (granted before the reply was read; freed only after the release started or the process
  died), so an overlap among recorded intervals is a real double grant;
- no leak: once every client is gone the agent lists no lease and no waiter, and every
  slot is free;
- the agent lives, and its log has no traceback.
Exit status 0 when every check holds, 1 otherwise. JSON goes to bench/results/.
`--fresh-state` is the control experiment: each restarted agent forgets the lease table,
so clients keep using GPUs the new agent hands out again, and the check must catch it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable

CLIENT = r"""
import json, random, sys, time
from rpool_agent.client import Client
from rpool_agent.errors import RpoolAgentError
sock, seed, until, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
out = open(path, "a", buffering=1)  # line-buffered: a SIGKILL loses no written line
def rec(**kw):
    out.write(json.dumps(kw) + "\n")
REQUESTS = [{"gpus": 1}, {"gpus": 1}, {"gpus": 2}, {"gpus": 1, "cpus": 2}, {"cpus": 1},
            "gpus:1", [{"type": "gpus", "slots": 1}, {"type": "cpus", "slots": 1}]]
c = Client(sock, reconnect_timeout=30)
while time.monotonic() < until:
    try:
        lease = c.acquire(rng.choice(REQUESTS), timeout=rng.choice([0, 1, 3]), label="chaos")
        res = {t: [[r["id"], r["slots"]] for r in rs] for t, rs in lease.resources.items()}
        rec(ev="grant", lease=lease.id, t=time.monotonic(), res=res)
        # mostly short holds; some long enough to span an agent restart
        time.sleep(rng.uniform(0.5, 3.0) if rng.random() < 0.15 else rng.expovariate(20))
        rec(ev="release", lease=lease.id, t=time.monotonic())
        lease.release()
    except RpoolAgentError as exc:
        rec(ev="error", code=exc.code, t=time.monotonic(), msg=str(exc)[:120])
        time.sleep(0.02)
rec(ev="done", t=time.monotonic())
"""


@dataclass
class ClientPlan:
    n: int
    start: float  # seconds after t0
    until: float  # seconds after t0
    kill_at: float | None  # seconds after t0, or None
    proc: subprocess.Popen[bytes] | None = None
    killed_t: float | None = None  # monotonic, just before SIGKILL
    exit_code: int | None = None
    record: Path = field(default_factory=Path)


def pool_document(gpus: int, cpus: int, slots_per_gpu: int) -> dict[str, Any]:
    return {
        "resource_pool": {
            "resources": {
                "gpus": [{"id": str(i), "slots": slots_per_gpu} for i in range(gpus)],
                "cpus": [{"id": str(i), "slots": 1} for i in range(cpus)],
            }
        }
    }


def wait_listening(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"chaos: the agent exited with {proc.returncode} at start")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return time.monotonic() - t0
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise SystemExit(f"chaos: the agent did not listen on {path} in {timeout} s")


def status(path: str) -> dict[str, Any]:
    from rpool_agent.client import Client

    with Client(path, reconnect_timeout=5) as c:
        return c.status()


def read_records(plan: ClientPlan) -> list[dict[str, Any]]:
    if not plan.record.exists():
        return []
    out = []
    for line in plan.record.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by SIGKILL mid-write
            out.append(json.loads(line))
    return out


def intervals(plans: list[ClientPlan]) -> tuple[list[tuple[str, str, int, float, float]], Counter]:
    """(type, id, slots, start, end) for every recorded grant; and event counts."""
    spans = []
    counts: Counter[str] = Counter()
    for plan in plans:
        recs = read_records(plan)
        grants: dict[str, dict[str, Any]] = {}
        ends: dict[str, float] = {}
        last_t = max((r["t"] for r in recs), default=None)
        for r in recs:
            counts[r["ev"]] += 1
            if r["ev"] == "grant":
                grants[r["lease"]] = r
            elif r["ev"] == "release":
                ends[r["lease"]] = r["t"]
            elif r["ev"] == "error":
                counts[f"error:{r['code']}"] += 1
        for lease_id, g in grants.items():
            end = ends.get(lease_id)
            if end is None:  # killed while holding (or an unfinished file)
                end = plan.killed_t if plan.killed_t is not None else last_t
            for rtype, items in g["res"].items():
                for rid, slots in items:
                    spans.append((rtype, rid, slots, g["t"], end))
    return spans, counts


def over_commitments(
    spans: list[tuple[str, str, int, float, float]], capacity: dict[tuple[str, str], int]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Sweep each instance's intervals; report every instant its holders exceed its slots."""
    by_inst: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for rtype, rid, slots, start, end in spans:
        by_inst[(rtype, rid)] += [(start, slots), (end, -slots)]
    bad: list[dict[str, Any]] = []
    peak: dict[str, int] = {}
    for inst, events in by_inst.items():
        events.sort(key=lambda e: (e[0], e[1]))  # at equal times, ends (negative) first
        used = 0
        for t, delta in events:
            used += delta
            peak[f"{inst[0]}:{inst[1]}"] = max(peak.get(f"{inst[0]}:{inst[1]}", 0), used)
            if used > capacity.get(inst, 0):
                bad.append({"instance": f"{inst[0]}:{inst[1]}", "t": t, "used": used})
    return bad, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--agent-kills", type=int, default=3)
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=8)
    ap.add_argument("--slots-per-gpu", type=int, default=1)
    ap.add_argument("--kill-fraction", type=float, default=0.35)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--fresh-state",
        action="store_true",
        help="control run: each restarted agent gets an empty state dir (expect FAILED)",
    )
    ap.add_argument("--json", default=None, help="default: bench/results/chaos-<time>.json")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)

    work = Path(tempfile.mkdtemp(prefix="rpool-chaos-"))
    sock, log_path = str(work / "agent.sock"), work / "agent.log"
    pool_file = work / "pool.json"
    pool_file.write_text(json.dumps(pool_document(a.gpus, a.cpus, a.slots_per_gpu)))
    capacity = {("gpus", str(i)): a.slots_per_gpu for i in range(a.gpus)}
    capacity |= {("cpus", str(i)): 1 for i in range(a.cpus)}
    cmd = [PY, "-m", "rpool_agent.cli", "serve", "--pool", str(pool_file), "--socket", sock]
    cmd += ["--state-dir", str(work / "state"), "--max-connections-per-uid", "100000"]
    cmd += ["--max-pending-per-connection", "4"]
    log = open(log_path, "ab")  # noqa: SIM115  (kept open across agent restarts)
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    wait_listening(sock, agent)

    # The plan: client starts spread over the run, some killed, a few agent kills.
    plans = []
    for n in range(a.clients):
        start = rng.uniform(0, a.seconds * 0.85)
        until = min(a.seconds, start + rng.uniform(2.0, max(2.5, a.seconds * 0.4)))
        kill_at = rng.uniform(start + 0.3, until) if rng.random() < a.kill_fraction else None
        plans.append(ClientPlan(n, start, until, kill_at, record=work / f"client-{n}.jsonl"))
    agent_kills = sorted(
        rng.uniform(a.seconds * 0.1, a.seconds * 0.9) for _ in range(a.agent_kills)
    )
    restarts: list[dict[str, float]] = []

    t0 = time.monotonic()
    pending = sorted(plans, key=lambda p: p.start)
    running: list[ClientPlan] = []
    while pending or running or agent_kills:
        now = time.monotonic() - t0
        while pending and pending[0].start <= now:
            p = pending.pop(0)
            p.proc = subprocess.Popen(
                [PY, "-c", CLIENT, sock, str(seed * 1000 + p.n), str(t0 + p.until), str(p.record)]
            )
            running.append(p)
        for p in list(running):
            assert p.proc is not None
            if p.kill_at is not None and p.kill_at <= now and p.proc.poll() is None:
                p.killed_t = time.monotonic()
                p.proc.send_signal(signal.SIGKILL)
                p.kill_at = None
            if p.proc.poll() is not None:
                p.exit_code = p.proc.returncode
                running.remove(p)
            elif now > p.until + 45:  # stuck: kill it, and count its holds until now
                p.killed_t = time.monotonic()
                p.proc.kill()
        if agent_kills and agent_kills[0] <= now:
            agent_kills.pop(0)
            killed = time.monotonic()
            agent.kill()
            agent.wait()
            time.sleep(rng.uniform(0, 0.5))
            if a.fresh_state:  # the control experiment: the lease table is lost
                cmd[cmd.index("--state-dir") + 1] = str(work / f"state-{len(restarts) + 1}")
            agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            wait_listening(sock, agent)
            restarts.append({"at_s": round(killed - t0, 2), "down_s": time.monotonic() - killed})
        time.sleep(0.005)
    run_s = time.monotonic() - t0

    # Every client is gone: the agent must hold nothing (reaping is event-driven, but a
    # restored lease of a holder that died while the agent was down is only dropped at
    # the next restore, or by its pidfd; give it a moment).
    deadline = time.monotonic() + 15
    while True:
        snap = status(sock)
        clean = not snap["leases"] and not snap["waiters"]
        clean = clean and all(v["free"] == v["total"] for v in snap["types"].values())
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    settle_s = time.monotonic() - t0 - run_s
    alive = agent.poll() is None
    agent.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        agent.wait(10)
    log.close()
    log_text = log_path.read_text(errors="replace")

    spans, counts = intervals(plans)
    bad, peak = over_commitments(spans, capacity)
    killed = sum(1 for p in plans if p.killed_t is not None)
    result = {
        "seed": seed,
        "clients": a.clients,
        "seconds": a.seconds,
        "fresh_state": a.fresh_state,
        "run_s": round(run_s, 2),
        "pool": {"gpus": a.gpus, "slots_per_gpu": a.slots_per_gpu, "cpus": a.cpus},
        "clients_killed": killed,
        "clients_exited": a.clients - killed,
        "client_exit_codes": dict(Counter(str(p.exit_code) for p in plans)),
        "agent_restarts": restarts,
        "grants_recorded": counts["grant"],
        "releases_recorded": counts["release"],
        "grants_per_s": round(counts["grant"] / run_s, 1),
        "errors": {k[6:]: v for k, v in sorted(counts.items()) if k.startswith("error:")},
        "over_commitments": len(bad),
        "over_commitment_examples": bad[:10],
        "peak_use": dict(sorted(peak.items())),
        "leaked_leases": len(snap["leases"]),
        "leaked_waiters": len(snap["waiters"]),
        "free_at_end": {t: f"{v['free']}/{v['total']}" for t, v in snap["types"].items()},
        "settle_s": round(settle_s, 2),
        "agent_alive_at_end": alive,
        "tracebacks_in_log": log_text.count("Traceback"),
        "work_dir": str(work),
    }
    ok = (
        not bad
        and clean
        and alive
        and result["tracebacks_in_log"] == 0
        and all(v <= capacity[tuple(k.split(":"))] for k, v in peak.items())  # type: ignore[index]
    )
    result["ok"] = ok
    print_summary(result)
    out = Path(a.json) if a.json else HERE / "results" / time.strftime("chaos-%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


def print_summary(r: dict[str, Any]) -> None:
    downs = ", ".join(f"{x['down_s']:.2f}s at {x['at_s']}s" for x in r["agent_restarts"])
    print(f"chaos: {r['clients']} clients over {r['seconds']:.0f}s, seed {r['seed']}")
    print(f"  ran {r['run_s']}s; clients SIGKILLed {r['clients_killed']}", end="")
    print(f", exited {r['clients_exited']}")
    print(f"  agent SIGKILLed+restarted {len(r['agent_restarts'])}x: down {downs or '-'}")
    print(f"  grants {r['grants_recorded']} ({r['grants_per_s']}/s)", end="")
    print(f", releases {r['releases_recorded']}")
    print(f"  client errors: {r['errors'] or 'none'}")
    print(f"  over-commitments: {r['over_commitments']}  peak use: {r['peak_use']}")
    print(
        f"  at the end: {r['leaked_leases']} leases, {r['leaked_waiters']} waiters, "
        f"free {r['free_at_end']} (settled in {r['settle_s']}s)"
    )
    print(f"  agent alive: {r['agent_alive_at_end']}, tracebacks in log: {r['tracebacks_in_log']}")
    print("  RESULT: " + ("OK" if r["ok"] else "FAILED"))


if __name__ == "__main__":
    main()
