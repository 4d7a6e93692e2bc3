"""Benchmark: does the agent's cost stay steady as what it holds grows? (issue 14)

    python bench/growth.py [--leases 10000] [--cycles 2000] [--conns 1000] [--only NAME,...]

Each row of issue 14's "Steady as it grows" table, against a baseline measured in the
same run (a real `rpool-agent serve` child on a real socket, raw JSON-lines clients):

- `cycle`: agent CPU per acquire+release cycle (/proc/PID/task/*/schedstat, batches) with
  `--leases` held vs 10 held on the same pool, and vs 10 held on a 64-cpu pool.
  Target: <= 1.2x. Client-side latency p50/p99 too.
- `status`: wall time of a `status` call (the default page) with `--leases` held vs 10,
  and of `all: true` (the full listing) with `--leases` held. Target: <= 20 ms.
- `restart`: SIGKILL an agent holding `--leases` leases of one holder (this process), start
  it again on the same state dir: time to the first `hello` reply vs a cold start on an
  empty state dir, and the fds the restarted agent keeps open (target: <= 3x cold; one
  pidfd per holder process). Then the cost of releasing restored leases vs releasing as
  many fresh ones on the same agent before the kill, with as many held (median and p99
  per release, agent CPU per release; target: O(1), a ratio near 1).
- `idle`: resident memory per idle connection (`--conns` connections that said hello),
  from VmRSS before and after. Target: <= 8 KB.
- `decision`: the allocator alone (no server): a release that grants the one waiter it
  can serve, with `--leases` waiters that cannot be served in front of it vs 10.
  Medians and p99 in microseconds.

Prints a table and writes JSON to bench/results/growth.json. A benchmark, run by hand:
nothing here fails a build. Quote medians and the same-run ratios, with date and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable
HELLO = {"op": "hello", "version": 1, "client": "bench/growth"}


# --- a raw client --------------------------------------------------------------------------


class Wire:
    """A JSON-lines client on a plain socket: frames out, replies in, nothing hidden."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.n = 0
        self.call(**HELLO)

    def send(self, frames: list[dict[str, Any]]) -> None:
        self.sock.sendall(b"".join(json.dumps(f).encode() + b"\n" for f in frames))

    def reply(self) -> dict[str, Any]:
        """The next reply (events are skipped)."""
        while True:
            while b"\n" not in self.buf:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ConnectionError("the agent closed the connection")
                self.buf += data
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def call(self, **frame: Any) -> Any:
        self.n += 1
        self.send([{"id": self.n, **frame}])
        msg = self.reply()
        if not msg.get("ok"):
            raise RuntimeError(f"{frame['op']}: {msg.get('error')}")
        return msg["result"]

    def acquire_many(self, n: int, chunk: int = 500) -> list[str]:
        """`n` one-cpu leases, pipelined `chunk` at a time."""
        ids: list[str] = []
        while len(ids) < n:
            k = min(chunk, n - len(ids))
            self.send([acquire_frame(self.n + i + 1) for i in range(k)])
            self.n += k
            for _ in range(k):
                msg = self.reply()
                if not msg.get("ok"):
                    raise RuntimeError(f"acquire: {msg.get('error')}")
                ids.append(msg["result"]["id"])
        return ids

    def close(self) -> None:
        self.sock.close()


def acquire_frame(i: int) -> dict[str, Any]:
    return {"id": i, "op": "acquire", "request": {"cpus": 1}, "timeout": 0}


# --- the agent -----------------------------------------------------------------------------


def write_pool(path: Path, n_cpus: int) -> None:
    cpus = [{"id": str(i), "slots": 1} for i in range(n_cpus)]
    doc = {"resource_pool": {"additional_properties": {}, "resources": {"cpus": cpus}}}
    path.write_text(json.dumps(doc))


class Agent:
    """`rpool-agent serve` as a child process, with its state dir and socket in `tmp`."""

    def __init__(self, tmp: Path, n_cpus: int, state: str = "state", conns: int = 64) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "agent.sock")
        pool = tmp / f"pool-{n_cpus}.json"
        if not pool.exists():
            write_pool(pool, n_cpus)
        self.cmd = [PY, "-m", "rpool_agent.cli", "serve", "--pool", str(pool)]
        self.cmd += ["--socket", self.sock, "--state-dir", str(tmp / state)]
        self.cmd += ["--max-connections-per-uid", str(conns)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.first_reply_s = 0.0

    def start(self) -> Agent:
        """Start, and time spawn -> first `hello` reply."""
        t0 = time.perf_counter()
        with open(self.tmp / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 120
        while True:
            try:
                Wire(self.sock).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    msg = f"the agent did not start: see {self.tmp}/agent.log"
                    raise RuntimeError(msg) from None
                time.sleep(0.002)
        self.first_reply_s = time.perf_counter() - t0
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        """CPU time of all the agent's threads, in ns steps (schedstat), not 10 ms ticks."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                total += int(Path(f"/proc/{self.pid}/task/{task}/schedstat").read_text().split()[0])
        return total / 1e9

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        if os.path.exists(self.sock):
            os.unlink(self.sock)


# --- statistics ----------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "p99": pct(xs, 0.99), "n": len(xs)}


# --- the rows ------------------------------------------------------------------------------


def cycles(agent: Agent, w: Wire, n: int, batch: int = 200) -> dict[str, Any]:
    """Agent CPU per acquire+release cycle (median over batches) and client latency."""
    cpu: list[float] = []
    lat: list[float] = []
    for _ in range(max(1, n // batch)):
        c0 = agent.cpu_s()
        for _ in range(batch):
            t0 = time.perf_counter()
            lid = w.call(op="acquire", request={"cpus": 1}, timeout=0)["id"]
            w.call(op="release", lease=lid)
            lat.append(time.perf_counter() - t0)
        cpu.append((agent.cpu_s() - c0) / batch)
    return {"cpu_us": statistics.median(cpu) * 1e6, "lat_us": scale(summary(lat))}


def scale(s: dict[str, float], k: float = 1e6) -> dict[str, float]:
    return {key: (v * k if key != "n" else v) for key, v in s.items()}


def timed_calls(fn: Callable[[], Any], n: int) -> dict[str, float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return scale(summary(out), 1e3)  # ms


def row_cycle_status(tmp: Path, leases: int, n_cycles: int, only: set[str]) -> dict[str, Any]:
    pool = leases + 256
    res: dict[str, Any] = {}
    for name, n_cpus, held in (("small", 64, 10), ("few", pool, 10), ("many", pool, leases)):
        d = tmp / f"cycle-{name}"
        d.mkdir()
        agent = Agent(d, n_cpus).start()
        try:
            holder, w = Wire(agent.sock), Wire(agent.sock)
            holder.acquire_many(held)
            if "cycle" in only:
                cycles(agent, w, n_cycles // 4)  # warm up
                res[f"cycle_{name}"] = cycles(agent, w, n_cycles)
            if "status" in only and name != "small":
                res[f"status_{name}"] = timed_calls(lambda w=w: w.call(op="status"), 30)
            if "status" in only and name == "many":  # the full listing, on request
                res["status_all_many"] = timed_calls(lambda w=w: w.call(op="status", all=True), 10)
            holder.close()
            w.close()
        finally:
            agent.stop()
    return res


def row_restart(tmp: Path, leases: int) -> dict[str, Any]:
    n_cpus = leases + 1256
    res: dict[str, Any] = {}
    cold_times, warm_times = [], []
    for _ in range(3):  # cold start: the same pool, an empty state dir
        d = Path(tempfile.mkdtemp(dir=tmp, prefix="cold-"))
        agent = Agent(d, n_cpus).start()
        cold_times.append(agent.first_reply_s)
        res["fds_cold"] = agent.fds()
        agent.stop()
    d = tmp / "restart"
    d.mkdir()
    agent = Agent(d, n_cpus).start()
    w = Wire(agent.sock)
    k = min(1000, leases // 2)  # releases timed, of the same agent's leases before and after
    ids = w.acquire_many(leases + k)
    res["release_fresh"] = releases(agent, w, ids[leases:])
    for attempt in range(3):
        agent.stop(signal.SIGKILL)
        w.close()
        agent.start()
        warm_times.append(agent.first_reply_s)
        w = Wire(agent.sock)
        if attempt == 0:
            res["fds_restarted"] = agent.fds()
            doc = w.call(op="status")
            res["restored"] = len(doc["leases"]) + doc["more"]["leases"]
    res["first_reply_cold_ms"] = statistics.median(cold_times) * 1e3
    res["first_reply_restarted_ms"] = statistics.median(warm_times) * 1e3
    res["release_restored"] = releases(agent, w, ids[:k])
    w.close()
    agent.stop()
    return res


def releases(agent: Agent, w: Wire, ids: list[str]) -> dict[str, Any]:
    lat = []
    c0 = agent.cpu_s()
    for lid in ids:
        t0 = time.perf_counter()
        w.call(op="release", lease=lid)
        lat.append(time.perf_counter() - t0)
    return {"cpu_us": (agent.cpu_s() - c0) / len(ids) * 1e6, "lat_us": scale(summary(lat))}


def row_idle(tmp: Path, conns: int) -> dict[str, Any]:
    d = tmp / "idle"
    d.mkdir()
    agent = Agent(d, 64, conns=conns + 8).start()
    try:
        warm = [Wire(agent.sock) for _ in range(20)]  # let the loop's own structures settle
        for x in warm:
            x.close()
        Wire(agent.sock).call(op="status")
        before = agent.rss_kb()
        held = [Wire(agent.sock) for _ in range(conns)]
        Wire(agent.sock).call(op="status")  # the agent has seen them all
        after = agent.rss_kb()
        for x in held:
            x.close()
    finally:
        agent.stop()
    return {"rss_before_kb": before, "rss_after_kb": after, "per_conn_kb": (after - before) / conns}


def row_decision(waiting: int, rounds: int) -> dict[str, Any]:
    """The allocator alone: release -> grant of the one waiter it can serve."""
    from rpool_agent.allocator import Allocator
    from rpool_agent.lease import Granted
    from rpool_agent.pool import Instance, Pool
    from rpool_agent.requests import parse_request

    res: dict[str, Any] = {}
    for name, n in (("few", 10), ("many", waiting)):
        ids = (f"L{i}" for i in range(10**9))
        pool = Pool.single({"gpus": [Instance("0")], "cpus": [Instance(str(i)) for i in range(8)]})
        a = Allocator(pool, new_lease_id=lambda ids=ids: next(ids))
        gpu, cpu = parse_request({"gpus": 1}), parse_request({"cpus": 1})
        a.submit("g", 0, gpu, now=0, timeout=None)
        held = [a.submit("c", i, cpu, now=0, timeout=None)[0].lease.id for i in range(8)]
        for i in range(n):  # cannot be served: the one GPU is held
            a.submit(("w", i), 0, gpu, now=0, timeout=None)
        a.submit("next", 0, cpu, now=0, timeout=None)
        out = []
        for r in range(rounds):
            t0 = time.perf_counter_ns()
            events = a.release("c" if r < 8 else "next", held[r % 8])
            out.append((time.perf_counter_ns() - t0) / 1e3)
            (lease,) = [e.lease for e in events if isinstance(e, Granted)]
            held[r % 8] = lease.id
            a.submit("next", r + 1, cpu, now=0, timeout=None)
        res[f"decision_{name}"] = summary(out)
    return res


# --- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leases", type=int, default=10000, help="held leases / waiters")
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=1000, help="idle connections")
    ap.add_argument("--only", default="cycle,status,restart,idle,decision")
    ap.add_argument("--json", default=str(HERE / "results" / "growth.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.python_version()}",
        "load": os.getloadavg()[0],
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory(prefix="rpool-growth-") as t:
        tmp = Path(t)
        if only & {"cycle", "status"}:
            res.update(row_cycle_status(tmp, args.leases, args.cycles, only))
        if "restart" in only:
            res.update(row_restart(tmp, args.leases))
        if "idle" in only:
            res.update(row_idle(tmp, args.conns))
    if "decision" in only:
        res.update(row_decision(args.leases, 2000))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print_table(res, args.leases)
    print(f"\nwritten to {args.json}")


def print_table(r: dict[str, Any], n: int) -> None:
    print(f"{r['date']}, {r['machine']}, load {r['load']:.2f}")
    rows: list[tuple[str, str, str, str]] = []
    if "cycle_many" in r:
        many, few, small = r["cycle_many"], r["cycle_few"], r["cycle_small"]
        rows.append(
            (
                f"agent CPU per cycle, {n} held vs 10",
                f"{many['cpu_us']:.0f} vs {few['cpu_us']:.0f} us "
                f"(64-cpu pool: {small['cpu_us']:.0f})",
                f"{many['cpu_us'] / few['cpu_us']:.2f}x (vs 64-cpu: "
                f"{many['cpu_us'] / small['cpu_us']:.2f}x)",
                "<= 1.2x",
            )
        )
        rows.append(
            (
                "cycle latency p50 / p99",
                f"{many['lat_us']['median']:.0f} / {many['lat_us']['p99']:.0f} us",
                f"10 held: {few['lat_us']['median']:.0f} / {few['lat_us']['p99']:.0f} us",
                "",
            )
        )
    if "release_restored" in r:
        rr, rf = r["release_restored"], r["release_fresh"]
        rows.append(
            (
                f"release after restart ({r['restored']} restored)",
                f"{rr['lat_us']['median']:.0f} us p50, {rr['lat_us']['p99']:.0f} p99, "
                f"CPU {rr['cpu_us']:.0f}",
                f"before restart: {rf['lat_us']['median']:.0f} p50, CPU {rf['cpu_us']:.0f}; "
                f"{rr['lat_us']['median'] / rf['lat_us']['median']:.2f}x",
                "O(1)",
            )
        )
        cold, warm = r["first_reply_cold_ms"], r["first_reply_restarted_ms"]
        rows.append(
            (
                f"restart with {n} leases to first reply",
                f"{warm:.0f} ms vs {cold:.0f} ms cold",
                f"{warm / cold:.2f}x",
                "<= 3x",
            )
        )
        rows.append(
            (
                "fds after restart",
                f"{r['fds_restarted']} (cold: {r['fds_cold']})",
                f"+{r['fds_restarted'] - r['fds_cold']}",
                "1 pidfd/holder",
            )
        )
    if "per_conn_kb" in r:
        rows.append(
            (
                "resident memory per idle connection",
                f"{r['per_conn_kb']:.1f} KB",
                f"{r['rss_before_kb']} -> {r['rss_after_kb']} KB",
                "<= 8 KB",
            )
        )
    if "status_many" in r:
        sm, sf = r["status_many"], r["status_few"]
        rows.append(
            (
                f"status with {n} leases",
                f"{sm['median']:.1f} ms p50, {sm['p99']:.1f} p99",
                f"10 leases: {sf['median']:.2f} ms",
                "<= 20 ms",
            )
        )
    if "status_all_many" in r:
        sa = r["status_all_many"]
        rows.append(
            (
                f"status --all with {n} leases",
                f"{sa['median']:.1f} ms p50, {sa['p99']:.1f} p99",
                "(the full listing, on request)",
                "-",
            )
        )
    if "decision_many" in r:
        dm, df = r["decision_many"], r["decision_few"]
        rows.append(
            (
                f"allocator decision, {n} waiting",
                f"{dm['median']:.1f} us p50, {dm['p99']:.1f} p99",
                f"10 waiting: {df['median']:.1f} us; {dm['median'] / df['median']:.2f}x",
                "flat",
            )
        )
    widths = [
        max(len(x[i]) for x in [("what", "measured", "baseline", "target"), *rows])
        for i in range(4)
    ]
    for row in [("what", "measured", "baseline / ratio", "target"), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
