"""Lease server throughput, latency and reaping, against stdlib echo servers in the same run.

    python bench/lease.py [--seconds 1] [--rounds 5] [--clients 1,8,64] [--busy N]
                          [--json FILE]

For 1, 8 and 64 concurrent client PROCESSES it measures:
- the agent: acquire+release cycles/s and p50/p99 acquire latency (raw socket clients
  sending prebuilt frames, so the client library's cost does not hide the server's);
- echo servers answering a frame of the same size: the fastest stdlib one we could write
  (a bare epoll loop), an asyncio BufferedProtocol one (built like the agent), the same
  decoding and re-encoding each line as JSON (the agent's kind of server: "a plain asyncio
  JSON-lines echo") and an asyncio streams one; each as round trips/s and p50/p99.
Ratios: a cycle is two round trips, so `cycle cost / (2 x echo round trip)` says what the
agent adds on top of moving the bytes (epoll) or moving and parsing them (json). Targets
(2-core VM, issue 14): <= 3x the same-kind (JSON-lines) echo, p99 acquire at 64 clients <= 2x that
echo's p99, with a journal compaction inside the measured window: each agent slot notes
whether the journal's header changed (each compaction writes a new one), and the
table says in how many rounds it did (`--compact-slack N` compacts more often).

Interleaved, because this VM is noisy: one set of client processes per level stays
connected to every server, and each round runs every server for `--seconds`, in an order
rotated from round to round. Each ratio is taken within a round (agent and echo measured
seconds apart) and the table shows the median over rounds, with the range.

A busy machine (`--busy N`): N CPU-burning processes (`python -c 'while True: pass'`, at
the default nice level, as a neighbour's build would be) run from before the first round
to after the reaping, so the agent and the echo servers meet the same load, still
interleaved. The table's header and the JSON (`busy`, load averages before and after)
say how the machine was loaded; on this 2-core VM `--busy 2` keeps both cores busy.

Reaping: a holder process with a GPU is SIGKILLed while another client waits for that GPU;
we time kill -> grant (median of many), next to the floor: kill -> EOF seen by a plain
epoll server for a process of the same kind. Target: median <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PY = sys.executable

ACQUIRE = b'{"id":1,"op":"acquire","request":{"cpus":1},"timeout":null,"label":"bench"}\n'
HELLO = b'{"id":0,"op":"hello","version":1}\n'
ECHO_MSG = b'{"id":1,"op":"echo","pad":"' + b"x" * 170 + b'"}\n'  # ~200 bytes, like a grant

# --- servers ----------------------------------------------------------------------------

EPOLL_ECHO = r"""
import os, select, socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); srv.bind(path); srv.listen(512)
srv.setblocking(False)
ep = select.epoll(); ep.register(srv.fileno(), select.EPOLLIN)
conns, bufs = {}, {}
print("ready", flush=True)
while True:
    for fd, ev in ep.poll():
        if fd == srv.fileno():
            c, _ = srv.accept(); c.setblocking(False)
            conns[c.fileno()] = c; bufs[c.fileno()] = b""
            ep.register(c.fileno(), select.EPOLLIN)
            continue
        c = conns[fd]
        try:
            data = c.recv(65536)
        except BlockingIOError:
            continue
        if not data:
            ep.unregister(fd); c.close(); del conns[fd], bufs[fd]
            sys.stderr.write("eof %r\n" % (__import__("time").monotonic(),)); sys.stderr.flush()
            continue
        buf = bufs[fd] + data
        *lines, bufs[fd] = buf.split(b"\n")
        if lines:
            c.send(b"".join(l + b"\n" for l in lines))
"""

PROTOCOL_ECHO = r"""
import asyncio, sys
class Echo(asyncio.BufferedProtocol):
    def connection_made(self, t): self.t = t; self.buf = bytearray(65536); self.rest = b""
    def get_buffer(self, n): return memoryview(self.buf)
    def buffer_updated(self, n):
        data = self.rest + bytes(self.buf[:n])
        *lines, self.rest = data.split(b"\n")
        if lines: self.t.write(b"".join(l + b"\n" for l in lines))
async def main():
    srv = await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1], backlog=512)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

JSON_ECHO = r"""
import asyncio, json, sys
dumps = json.JSONEncoder(separators=(",", ":")).encode
class Echo(asyncio.BufferedProtocol):
    def connection_made(self, t): self.t = t; self.buf = bytearray(65536); self.rest = b""
    def get_buffer(self, n): return memoryview(self.buf)
    def buffer_updated(self, n):
        data = self.rest + bytes(self.buf[:n])
        *lines, self.rest = data.split(b"\n")
        for l in lines:
            self.t.write((dumps(json.loads(l)) + "\n").encode())
async def main():
    srv = await asyncio.get_running_loop().create_unix_server(Echo, sys.argv[1], backlog=512)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

STREAMS_ECHO = r"""
import asyncio, sys
async def handle(r, w):
    while line := await r.readline():
        w.write(line); await w.drain()
async def main():
    srv = await asyncio.start_unix_server(handle, sys.argv[1], backlog=512)
    print("ready", flush=True)
    await srv.serve_forever()
asyncio.run(main())
"""

# --- clients ----------------------------------------------------------------------------

CLIENT = r"""
import json, socket, sys, time
ACQ, HELLO, ECHO = (x.encode().decode("unicode_escape").encode() for x in sys.argv[1:4])
conns = {}
for spec in sys.argv[4:]:  # NAME=PATH; the agent's connection says hello once
    name, path = spec.split("=", 1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(path)
    f = s.makefile("rb")
    if name == "agent":
        s.sendall(HELLO); f.readline()
    conns[name] = (s, f)
print("ready", flush=True)
for cmd in sys.stdin:  # "NAME START SECONDS": one slot of one round
    name, start_at, seconds = cmd.split()
    s, f = conns[name]
    start_at = float(start_at); end = start_at + float(seconds)
    while time.monotonic() < start_at: time.sleep(0.0005)
    lat, n = [], 0
    while True:
        t0 = time.monotonic()
        if t0 >= end: break
        if name == "agent":
            s.sendall(ACQ); reply = f.readline(); t1 = time.monotonic()
            # The lease id by a byte search, not json.loads: the echo clients parse nothing,
            # so neither may these, or the client's JSON cost would be billed to the agent.
            at = reply.index(b'"result":{"id":"') + 16
            lid = reply[at:reply.index(b'"', at)]
            s.sendall(b'{"id":2,"op":"release","lease":"%s"}\n' % lid); f.readline()
        else:
            s.sendall(ECHO); f.readline(); t1 = time.monotonic()
        lat.append(t1 - t0); n += 1
    print(json.dumps({"n": n, "lat": lat}), flush=True)
"""


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return p


def wait_listening(path: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(path)


def start_agent(
    tmp: str, n_cpus: int = 256, n_gpus: int = 1, compact_slack: int | None = None
) -> tuple[subprocess.Popen[str], str]:
    pool = {
        "resource_pool": {
            "additional_properties": {},
            "resources": {
                "cpus": [{"id": str(i), "slots": 1} for i in range(n_cpus)],
                "gpus": [{"id": str(i), "slots": 1} for i in range(n_gpus)],
            },
        }
    }
    pf = os.path.join(tmp, "pool.json")
    Path(pf).write_text(json.dumps(pool))
    sock = os.path.join(tmp, "agent.sock")
    cmd = [PY, "-m", "rpool_agent.cli", "serve", "--pool", pf, "--socket", sock]
    cmd += ["--state-dir", os.path.join(tmp, "state")]
    env = dict(os.environ)
    if compact_slack is not None:
        env["RPOOL_AGENT_COMPACT_SLACK"] = str(compact_slack)
    p = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=env
    )
    wait_listening(sock)
    return p, sock


def journal_header(tmp: str) -> bytes:
    """The agent journal's first line: each compaction writes a new header (its time)."""
    with open(os.path.join(tmp, "state", "leases.jsonl"), "rb") as f:
        return f.readline()


def start_echo(kind: str, tmp: str) -> tuple[subprocess.Popen[str], str]:
    src = {
        "epoll": EPOLL_ECHO,
        "protocol": PROTOCOL_ECHO,
        "json": JSON_ECHO,
        "streams": STREAMS_ECHO,
    }[kind]
    sock = os.path.join(tmp, f"{kind}.sock")
    p = start([PY, "-c", src, sock])
    assert p.stdout is not None
    p.stdout.readline()
    return p, sock


class Clients:
    """`n` client processes, each connected to every server, run one slot at a time."""

    def __init__(self, n: int, servers: dict[str, str]) -> None:
        args = [x.decode().encode("unicode_escape").decode() for x in (ACQUIRE, HELLO, ECHO_MSG)]
        specs = [f"{name}={path}" for name, path in servers.items()]
        self.procs = [
            subprocess.Popen(
                [PY, "-c", CLIENT, *args, *specs],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]
        for p in self.procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark client did not start")

    def run(self, name: str, seconds: float) -> dict[str, float]:
        start_at = time.monotonic() + 0.05 + 0.002 * len(self.procs)
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"{name} {start_at} {seconds}\n")
            p.stdin.flush()
        total, lats = 0, []
        for p in self.procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a benchmark client died (exit {p.wait()})")
            r = json.loads(line)
            total += r["n"]
            lats += r["lat"]
        lats.sort()
        return {
            "per_s": total / seconds,
            "p50_ms": 1000 * lats[len(lats) // 2],
            "p99_ms": 1000 * lats[min(len(lats) - 1, int(len(lats) * 0.99))],
            "n": total,
        }

    def close(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            p.wait()


def measure_level(
    n: int, servers: dict[str, str], rounds: int, seconds: float, tmp: str
) -> list[dict[str, dict[str, float]]]:
    """Per round, each server's slot; the order rotates so no server always goes first.
    The agent's slot notes whether its journal was compacted inside it."""
    clients = Clients(n, servers)
    names = list(servers)
    out = []
    try:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            row = {}
            for name in order:
                before = journal_header(tmp) if name == "agent" else b""
                row[name] = clients.run(name, seconds)
                if name == "agent":
                    row[name]["compacted"] = float(journal_header(tmp) != before)
            out.append(row)
    finally:
        clients.close()
    return out


def summarize(per_round: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per server the median over rounds of each measure; for the agent, each ratio taken
    within a round, as median and range over rounds."""
    row: dict[str, Any] = {}
    for name in per_round[0]:
        row[name] = {
            k: statistics.median(r[name][k] for r in per_round)
            for k in ("per_s", "p50_ms", "p99_ms")
        }
    ratios: dict[str, list[float]] = {}
    for r in per_round:
        cycle_us = 1e6 / r["agent"]["per_s"]
        for echo in ("echo-epoll", "echo-json"):
            rt_us = 1e6 / r[echo]["per_s"]
            ratios.setdefault(f"cycle_vs_2_{echo}_rt", []).append(cycle_us / (2 * rt_us))
        for echo in ("echo-json", "echo-protocol"):
            ratios.setdefault(f"p99_vs_{echo}_p99", []).append(
                r["agent"]["p99_ms"] / r[echo]["p99_ms"]
            )
    row["agent"]["ratios"] = {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v), "rounds": v}
        for k, v in ratios.items()
    }
    row["agent"]["rounds_with_compaction"] = sum(r["agent"]["compacted"] for r in per_round)
    return row


# --- reaping ----------------------------------------------------------------------------

HOLDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(sys.argv[1])
f = s.makefile("rb")
if sys.argv[2] == "lease":
    s.sendall(b'{"id":0,"op":"hello","version":1}\n'); f.readline()
    s.sendall(b'{"id":1,"op":"acquire","request":{"gpus":1},"timeout":0}\n'); f.readline()
print("held", flush=True)
time.sleep(600)
"""


def reap_latency(agent_sock: str, echo_proc: subprocess.Popen[str], echo_sock: str, rounds: int):
    """Median kill->grant through the agent, and kill->EOF at a bare epoll server (floor)."""
    waiter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiter.connect(agent_sock)
    wf = waiter.makefile("rb")
    waiter.sendall(HELLO)
    wf.readline()
    grants, floors = [], []
    assert echo_proc.stderr is not None
    for i in range(rounds):
        holder = start([PY, "-c", HOLDER, agent_sock, "lease"])
        assert holder.stdout is not None
        holder.stdout.readline()
        waiter.sendall(b'{"id":%d,"op":"acquire","request":{"gpus":1},"timeout":null}\n' % (i + 10))
        line = wf.readline()  # "queued" event
        assert b"queued" in line, line
        time.sleep(0.02)
        t0 = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        reply = json.loads(wf.readline())
        grants.append(time.monotonic() - t0)
        holder.wait()
        lid = reply["result"]["id"]
        waiter.sendall(b'{"id":2,"op":"release","lease":"%s"}\n' % lid.encode())
        wf.readline()

        plain = start([PY, "-c", HOLDER, echo_sock, "plain"])
        assert plain.stdout is not None
        plain.stdout.readline()
        time.sleep(0.02)
        t0 = time.monotonic()
        os.kill(plain.pid, signal.SIGKILL)
        while True:  # skip EOFs of earlier benchmark clients
            eof_at = float(echo_proc.stderr.readline().split()[1])
            if eof_at >= t0:
                break
        floors.append(eof_at - t0)
        plain.wait()
    waiter.close()
    return statistics.median(grants) * 1000, statistics.median(floors) * 1000


BURN = "while True: pass"


def start_burners(n: int) -> list[subprocess.Popen[bytes]]:
    """`n` processes that keep a core busy each until killed (`--busy`)."""
    return [subprocess.Popen([PY, "-c", BURN], stdin=subprocess.DEVNULL) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0, help="per server, per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--reap-rounds", type=int, default=15)
    ap.add_argument("--json", default=str(HERE / "results" / "lease.json"))
    ap.add_argument(
        "--compact-slack",
        type=int,
        default=None,
        help="the agent's RPOOL_AGENT_COMPACT_SLACK (default: its own, 2048 records)",
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="run N CPU-burning processes (python busy loops, default nice) throughout",
    )
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    results: dict[str, Any] = {
        "seconds": a.seconds,
        "rounds": a.rounds,
        "compact_slack": a.compact_slack,
        "busy": {"burners": a.busy, "how": f"python -c {BURN!r}, default nice"},
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "levels": {},
        "per_round": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"agent": start_agent(tmp, compact_slack=a.compact_slack)}
        for kind in ("epoll", "protocol", "json", "streams"):
            servers[f"echo-{kind}"] = start_echo(kind, tmp)
        burners = start_burners(a.busy)
        try:
            paths = {name: sock for name, (_, sock) in servers.items()}
            for n in levels:
                per_round = measure_level(n, paths, a.rounds, a.seconds, tmp)
                results["per_round"][n] = per_round
                results["levels"][n] = summarize(per_round)
            if a.reap_rounds:
                grant_ms, floor_ms = reap_latency(
                    servers["agent"][1],
                    servers["echo-epoll"][0],
                    servers["echo-epoll"][1],
                    a.reap_rounds,
                )
                results["reap"] = {
                    "kill_to_grant_median_ms": grant_ms,
                    "kill_to_eof_floor_ms": floor_ms,
                }
            results["load_after"] = os.getloadavg()
        finally:
            for p in [*burners, *(p for p, _ in servers.values())]:
                p.kill()
                p.wait()
    print_table(results)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {a.json}")


def print_table(r: dict[str, Any]) -> None:
    """One row per server and level (medians over rounds); the agent's row carries the
    ratios, each the median over rounds of the ratio within a round, with its range
    (targets: cycle <= 3x two JSON-echo round trips, p99 acquire at 64 clients <= 2x the
    JSON echo's p99)."""
    load = ", ".join(f"{x:.1f}" for x in r["load_before"])
    after = ", ".join(f"{x:.1f}" for x in r.get("load_after", ()))
    print(f"{r['rounds']} rounds of {r['seconds']:g} s per server; medians over rounds")
    busy = r["busy"]["burners"]
    if busy:
        print(f"busy: {busy} CPU-burning processes ({r['busy']['how']}) on {r['cpus']} cpus")
    else:
        print(f"busy: no added load ({r['cpus']} cpus)")
    print(f"load average before the run: {load}; after: {after}\n")
    print(f"{'clients':>7} {'server':<15} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8}   notes")
    for n, row in r["levels"].items():
        for name, m in row.items():
            note = ""
            if name == "agent":
                labels = {
                    "cycle_vs_2_echo-epoll_rt": "cycle = {} 2 echo-epoll RTs",
                    "cycle_vs_2_echo-json_rt": "cycle = {} 2 echo-json RTs",
                    "p99_vs_echo-json_p99": "p99 = {} echo-json p99",
                    "p99_vs_echo-protocol_p99": "p99 = {} echo-protocol p99",
                }
                note = "; ".join(
                    fmt.format(
                        f"{m['ratios'][k]['median']:.2f}x "
                        f"({m['ratios'][k]['min']:.2f}-{m['ratios'][k]['max']:.2f})"
                    )
                    for k, fmt in labels.items()
                )
                note += f"; compacted in {m['rounds_with_compaction']:.0f} of {r['rounds']} rounds"
            cols = f"{m['per_s']:>9.0f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f}"
            print(f"{n:>7} {name:<15} {cols}   {note}")
    rp = r.get("reap")
    if rp:
        print(
            f"\nreap: kill -> grant median {rp['kill_to_grant_median_ms']:.2f} ms; "
            f"kill -> EOF floor {rp['kill_to_eof_floor_ms']:.2f} ms; "
            f"agent adds {rp['kill_to_grant_median_ms'] - rp['kill_to_eof_floor_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
