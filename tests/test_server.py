"""The lease daemon, end to end: a real agent process, real sockets, real SIGKILLed clients."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Conn, gpu_pool, running_agent, wait_until

from rpool_agent.errors import (
    RequestError,
    ResourceUnavailable,
    Timeout,
    UnknownLease,
    UnknownResourceType,
    Unsatisfiable,
)

PY = sys.executable

HOLD = """
import sys, time
from rpool_agent.client import Client
c = Client(sys.argv[1]).connect()
lease = c.acquire({"gpus": int(sys.argv[2])}, label="holder")
print(lease.id, ",".join(g["id"] for g in lease.resources["gpus"]), flush=True)
time.sleep(120)
"""


def spawn_holder(agent: Any, n: int = 1) -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen(
        [PY, "-c", HOLD, agent.socket, str(n)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, line[0], line[1].split(",")


def test_sigkilled_holder_is_reaped_and_waiter_granted_at_once(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1)) as agent:
        holder, lease_id, gpus = spawn_holder(agent)
        assert gpus == ["0"]
        granted: dict[str, Any] = {}

        def wait_for_gpu() -> None:
            with agent.client() as c:
                lease = c.acquire(gpus=1, timeout=60, label="waiter")
                granted["at"] = time.monotonic()
                granted["gpus"] = [g["id"] for g in lease.resources["gpus"]]

        waiter = threading.Thread(target=wait_for_gpu)
        waiter.start()
        wait_until(lambda: len(agent.status()["waiters"]) == 1)
        killed_at = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        waiter.join(10)
        assert granted["gpus"] == ["0"]
        # Far below the 60 s timeout: reaping is driven by EOF, not by a timer.
        assert granted["at"] - killed_at < 2.0
        status = agent.status()
        assert lease_id not in [le["id"] for le in status["leases"]]
        assert "reap " + lease_id in agent.log()


def test_status_records_peer_credentials(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent, agent.client() as c:
        lease = c.acquire(gpus=2, cpus=1, label="creds")
        [entry] = agent.status()["leases"]
        assert entry["id"] == lease.id
        assert entry["holder"]["pid"] == os.getpid()
        assert entry["holder"]["uid"] == os.getuid()
        assert entry["holder"]["gid"] == os.getgid()
        assert entry["label"] == "creds"
        assert len(lease.resources["gpus"]) == 2
        assert len({g["id"] for g in lease.resources["gpus"]}) == 2
        lease.release()
        assert agent.status()["leases"] == []


WORKER = """
import json, random, sys, time
from rpool_agent.client import Client
sock, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
out = []
with Client(sock) as c:
    for _ in range(rounds):
        lease = c.acquire(gpus=rng.choice([1, 2]), timeout=60)
        start = time.monotonic()
        time.sleep(rng.uniform(0, 0.004))
        end = time.monotonic()
        out.append([[g["id"] for g in lease.resources["gpus"]], start, end])
        lease.release()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_twenty_processes_never_share_a_gpu(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(4)) as agent:
        procs = [
            subprocess.Popen(
                [PY, "-c", WORKER, agent.socket, str(seed), "15"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for seed in range(20)
        ]
        intervals: list[tuple[str, float, float]] = []
        for p in procs:
            out, _ = p.communicate(60)
            assert p.returncode == 0
            for ids, start, end in json.loads(out):
                intervals += [(gpu, start, end) for gpu in ids]
        assert len(intervals) >= 20 * 15
        by_gpu: dict[str, list[tuple[float, float]]] = {}
        for gpu, start, end in intervals:
            by_gpu.setdefault(gpu, []).append((start, end))
        assert set(by_gpu) <= {"0", "1", "2", "3"}
        for spans in by_gpu.values():
            spans.sort()
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end <= start, "two holders had the same GPU at once"
        assert agent.status()["leases"] == []


def test_fifo_big_request_is_not_starved(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(4)) as agent:
        holders = [spawn_holder(agent, 1) for _ in range(3)]  # 3 of 4 GPUs held
        big: dict[str, Any] = {}

        def want_all() -> None:
            with agent.client() as c:
                big["lease"] = c.acquire(gpus=4, timeout=60, label="big")
                big["at"] = time.monotonic()

        t = threading.Thread(target=want_all)
        t.start()
        wait_until(lambda: len(agent.status()["waiters"]) == 1)
        # A later 1-GPU request would fit in the free GPU, but it needs what the big
        # waiter needs: it must queue behind it rather than starve it.
        with agent.client() as c:
            with pytest.raises(ResourceUnavailable):
                c.acquire(gpus=1, timeout=0)
            for proc, _, _ in holders:
                proc.kill()
                proc.wait()
        t.join(10)
        assert sorted(g["id"] for g in big["lease"].resources["gpus"]) == ["0", "1", "2", "3"]


def test_unsatisfiable_unknown_and_timeout(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(2)) as agent, agent.client() as c:
        t0 = time.monotonic()
        with pytest.raises(Unsatisfiable):
            c.acquire(gpus=3, timeout=None)  # would wait forever if it were queued
        with pytest.raises(UnknownResourceType):
            c.acquire({"fpgas": 1}, timeout=None)
        assert time.monotonic() - t0 < 2
        held = c.acquire(gpus=2)
        with agent.client() as other:
            t0 = time.monotonic()
            with pytest.raises(Timeout):
                other.acquire(gpus=1, timeout=0.3)
            assert 0.25 < time.monotonic() - t0 < 3
        held.release()


def test_infinite_timeout_waits_and_nan_is_refused_in_words(tmp_path: Path) -> None:
    """JSON has neither: inf once reached the agent as a malformed message, NaN too."""
    with running_agent(tmp_path, gpu_pool(2)) as agent, agent.client() as c:
        held = c.acquire(gpus=1)
        with pytest.raises(RequestError, match="timeout must be a number"):
            c.acquire(gpus=1, timeout=float("nan"))
        with agent.client() as other:
            got: list[Any] = []
            waiter = threading.Thread(
                target=lambda: got.append(other.acquire(gpus=2, timeout=float("inf")))
            )
            waiter.start()
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            held.release()  # the waiter (no deadline) gets both GPUs
            waiter.join(10)
            assert [g.index for g in got[0].gpus] == [0, 1]
            got[0].release()


def test_release_by_lease_id_from_another_connection_of_the_same_user(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent, agent.client() as a, agent.client() as b:
        lease = a.acquire(gpus=1)
        with pytest.raises(UnknownLease):
            b.release("nope")
        assert [le["id"] for le in agent.status()["leases"]] == [lease.id]
        b.release(lease.id)  # `rpool-agent release ID` from a shell of the same user
        assert agent.status()["leases"] == []


def raw_exchange(path: str, payload: bytes, *, read: bool = True) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(5)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while read:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


HELLO = b'{"id":0,"op":"hello","version":1}\n'


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"this is not json\n", "malformed"),
        (b"[1,2,3]\n", "malformed"),
        (b'{"id":1,"op":"frobnicate"}\n', "unknown_op"),
        (b'{"id":1,"op":"acquire","request":{"gpus":-1}}\n', "bad_request"),
        (b'{"id":1,"op":"acquire","request":{"gpus":true}}\n', "bad_request"),
        (b'{"id":1,"op":"acquire","request":"gpus:1","timeout":"soon"}\n', "malformed"),
        (b'{"id":1,"op":"acquire","request":{"gpus":1},"evil":1}\n', "malformed"),
        (b'{"id":1,"op":"release","lease":["x"]}\n', "malformed"),
        (b"[" * 50000 + b"\n", "malformed"),
        (b'{"id":1,"op":"acquire","request":{"gpus":' + b"9" * 5000 + b"}}\n", "malformed"),
    ],
)
def test_hostile_messages_get_errors_and_the_server_keeps_serving(
    tmp_path: Path, payload: bytes, code: str
) -> None:
    with running_agent(tmp_path) as agent:
        replies = raw_exchange(agent.socket, HELLO + payload)
        assert replies[0]["ok"] is True
        assert replies[1]["ok"] is False
        assert replies[1]["error"]["code"] == code
        with agent.client() as c:
            assert c.acquire(gpus=4).resources["gpus"]
        assert agent.proc.poll() is None


def test_a_lone_surrogate_is_malformed_and_a_surrogate_pair_is_text(tmp_path: Path) -> None:
    """JSON can escape a lone surrogate ("\\ud800"), which is no text: the agent's codec
    refuses the call as malformed (once it was taken, and a token holding one could never
    be compared). An escaped pair is one character and works end to end."""
    odd = "t" * 15 + "\ud800"  # json.dumps sends it as the escape "\\ud800"
    emoji = "t" * 15 + "\U0001f600"  # json.dumps sends "\\ud83d\\ude00"
    with running_agent(tmp_path) as agent:
        a, b = Conn(agent.socket), Conn(agent.socket)
        refused = a.call({"id": 1, "op": "acquire", "request": {"gpus": 1}, "token": odd})
        assert refused["ok"] is False
        assert refused["error"]["code"] == "malformed"
        got = a.call({"id": 2, "op": "acquire", "request": {"gpus": 1}, "token": emoji})
        lid = got["result"]["id"]
        moved = b.call({"id": 3, "op": "reclaim", "lease": lid, "token": emoji})
        assert moved["ok"], moved
        assert moved["result"]["id"] == lid
        a.close()
        b.close()
        assert "Traceback" not in agent.log()


def test_a_waiter_for_a_holder_process_gets_its_reply_when_that_process_exits(
    tmp_path: Path,
) -> None:
    """Waiters filed with holder_pid=P belong to P, and the allocator drops them when P
    exits; the connection that filed them is still there and once got no reply at all."""
    with running_agent(tmp_path, gpu_pool(2)) as agent:
        gone = "exited before the grant"
        # A: P holds a lease (so its exit is watched) and has a second request waiting
        p = subprocess.Popen(["sleep", "300"])
        c, other = Conn(agent.socket), Conn(agent.socket)
        assert c.call({"id": 1, "op": "acquire", "request": {"gpus": 1}, "holder_pid": p.pid})["ok"]
        assert other.call({"id": 1, "op": "acquire", "request": {"gpus": 1}})["ok"]
        c.send({"id": 2, "op": "acquire", "request": {"gpus": 1}, "holder_pid": p.pid})
        assert c.next()["event"] == "queued"
        p.kill()
        p.wait()
        reply = c.next()  # the lease is reaped, and the waiter answered
        assert (reply["id"], reply["ok"], reply["error"]["code"]) == (2, False, "unknown_lease")
        assert gone in reply["error"]["message"]
        # B: Q holds nothing (nothing watches it); two requests wait; Q exits; a GPU frees
        q = subprocess.Popen(["sleep", "300"])
        assert c.call({"id": 3, "op": "acquire", "request": {"gpus": 1}})["ok"]  # pool full
        for rid in (4, 5):
            c.send({"id": rid, "op": "acquire", "request": {"gpus": 1}, "holder_pid": q.pid})
            assert c.next()["event"] == "queued"
        q.kill()
        q.wait()
        other.close()  # frees a GPU: the grant to Q finds it gone; both get their reply
        replies = {r["id"]: r for r in (c.next(), c.next())}
        assert sorted(replies) == [4, 5]
        assert all(gone in r["error"]["message"] for r in replies.values())
        assert agent.status()["waiters"] == []
        c.close()


def test_a_cancelled_request_leaves_no_wish_for_files_behind(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1)) as agent, agent.client() as holder:
        held = holder.acquire(gpus=1)
        c = Conn(agent.socket)
        c.send({"id": 7, "op": "acquire", "request": {"gpus": 1}, "files": True})
        assert c.next()["event"] == "queued"
        assert c.call({"id": 8, "op": "cancel", "request_id": 7})["result"] == {"cancelled": True}
        c.send({"id": 7, "op": "acquire", "request": {"gpus": 1}})  # the same id, no files
        assert c.next()["event"] == "queued"
        held.release()
        grant = c.next()
        assert grant["ok"] and "files" not in grant["result"]
        c.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_replies_a_client_does_not_read_stay_bounded_and_all_arrive_in_order(
    tmp_path: Path,
) -> None:
    """64 KiB of pipelined `status` calls, each answered with ~30 KB, once queued every
    reply of the read at once (~120 MB per connection, 64 connections per uid allowed).
    Now the rest of a read waits while a connection's replies exceed 256 KiB."""
    calls = b"".join(b'{"id":%d,"op":"status"}\n' % i for i in range(1, 3001))
    with running_agent(tmp_path, gpu_pool(2, n_cpus=64)) as agent, agent.client() as c:
        for _ in range(60):  # status lists every lease: make its reply large
            c.acquire(cpus=1, label="L" * 250)
        before = _rss_kib(agent.proc.pid)
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
        for s in silent:
            s.connect(agent.socket)
            s.sendall(HELLO + calls)  # and never read
        time.sleep(1.0)
        assert agent.status()["connections"] >= 5  # the others are served meanwhile
        grew = _rss_kib(agent.proc.pid) - before
        assert grew < 40_000, f"{grew} KiB for 4 connections that do not read"
        reader = Conn(agent.socket)  # the same calls, read slowly: every reply, in order
        reader.sock.sendall(calls)
        time.sleep(0.5)
        ids = [reader.next()["id"] for _ in range(3000)]
        assert ids == list(range(1, 3001))
        reader.close()
        for s in silent:
            s.close()


def test_oversized_message_closes_the_connection_only(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        replies = raw_exchange(agent.socket, HELLO + b"x" * (70 * 1024))
        assert replies[-1]["error"]["code"] == "too_large"
        with agent.client() as c:
            assert c.status()["types"]["gpus"]["free"] == 4


def test_handshake_is_required_first(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        replies = raw_exchange(agent.socket, b'{"id":1,"op":"status"}\n')
        assert replies[0]["ok"] is False
        assert "hello" in replies[0]["error"]["message"]
        replies = raw_exchange(agent.socket, b'{"id":1,"op":"hello","version":99}\n')
        assert replies[0]["error"]["code"] == "version"


def test_sigterm_stops_cleanly_and_removes_the_socket(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        assert Path(agent.socket).exists()
        assert agent.stop() == 0
        assert not Path(agent.socket).exists()
        assert "stopped" in agent.log()
        assert "Traceback" not in agent.log()


def test_second_agent_on_the_same_socket_refuses_to_start(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        pool = tmp_path / "agent-pool.yaml"
        r = subprocess.run(
            [PY, "-m", "rpool_agent.cli", "serve", "--pool", str(pool), "--socket", agent.socket],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode != 0
        assert "already listens" in r.stderr
        assert "Traceback" not in r.stderr
        assert agent.status()["types"]["gpus"]["total"] == 4


def test_a_node_without_gpus_says_so_once_in_the_log_not_on_each_reload(tmp_path: Path) -> None:
    import ctypes

    from agent_fixture import wait_for_socket

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        pytest.skip("NVIDIA's NVML library is here: this test needs a node without GPUs")
    except OSError:
        pass
    sock, log_path = str(tmp_path / "a.sock"), tmp_path / "agent.log"
    cmd = [PY, "-m", "rpool_agent.cli", "serve", "--socket", sock]  # no --pool: detect
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--state-dir", str(tmp_path / "state")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_socket(sock, proc)
        for n in (1, 2):
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda n=n: log_path.read_text().count("reload: ") == n)
    finally:
        proc.terminate()
        proc.wait(30)
    said = log_path.read_text()
    assert said.count("no NVIDIA GPUs") == 1, said
    assert said.index("no NVIDIA GPUs") < said.index("reload: ")


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.sock"))
    stale.close()  # the file stays, nobody listens
    with running_agent(tmp_path) as agent:
        assert agent.status()["types"]["gpus"]["total"] == 4


def test_client_without_agent_gets_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "RPOOL_AGENT_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run(
        [PY, "-m", "rpool_agent.cli", "status"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "no agent at" in r.stderr
    assert "Traceback" not in r.stderr


def test_log_level_warning_drops_event_lines(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("log_level: warning\n")
    with running_agent(tmp_path, None, "--config", str(config)) as agent, agent.client() as c:
        c.acquire(gpus=1).release()
        assert agent.status()["leases"] == []
        assert agent.stop() == 0
        log = agent.log()
        assert "grant " not in log and "release " not in log
        assert "serving" in log  # start-up and shutdown lines are always written


def test_replies_larger_than_a_request_frame_reach_the_client(tmp_path: Path) -> None:
    big = gpu_pool(4, n_cpus=3000)  # the node-form pool document is well over 64 KiB
    with running_agent(tmp_path, big) as agent, agent.client() as c:
        doc = c.pool()
        assert len(json.dumps(doc)) > 64 * 1024
        cpus = doc["resource_pool"]["nodes"][0]["resources"]["cpus"]
        assert len(cpus) == 3000


def test_new_client_waits_for_an_agent_restarting_on_a_stale_socket(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "agent.sock"))
    stale.close()  # what a SIGKILLed agent leaves: the file, refusing connections
    result: dict[str, Any] = {}

    def connect_early() -> None:
        from rpool_agent.client import Client

        with Client(str(tmp_path / "agent.sock"), connect_timeout=20) as c:
            result["status"] = c.status()

    t = threading.Thread(target=connect_early)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # still trying, not failed
    with running_agent(tmp_path):
        t.join(20)
    assert result["status"]["types"]["gpus"]["total"] == 4


RECLAIMABLE = """
import sys, time
from rpool_agent.client import Client
c = Client(sys.argv[1]).connect()
lease = c.acquire({"gpus": 1})
print(lease.id, lease.token, flush=True)
time.sleep(120)
"""


def test_status_shows_the_holder_a_reclaim_moved_the_lease_to(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        other = subprocess.Popen(
            [PY, "-c", RECLAIMABLE, agent.socket], stdout=subprocess.PIPE, text=True
        )
        assert other.stdout is not None
        lease_id, token = other.stdout.readline().split()
        try:
            [entry] = agent.status()["leases"]
            assert entry["holder"]["pid"] == other.pid
            with agent.client() as c:
                c.call("reclaim", lease=lease_id, token=token)
                [entry] = c.status()["leases"]
                assert entry["holder"]["pid"] == os.getpid()
        finally:
            other.kill()
            other.wait()


def test_a_waiting_request_id_reused_is_refused_without_internal_names(tmp_path: Path) -> None:
    """Each waiting acquire is one record keyed by its id on its connection: a second
    acquire with the same id is refused (the first still waits), the error names only the
    id, and `status` shows the waiter's holder, not an internal key (an error once named
    the allocator's key for a waiter, `('pid', 24104, 54646)`)."""
    p = subprocess.Popen(["sleep", "300"])
    try:
        with running_agent(tmp_path, gpu_pool(1)) as agent:
            c = Conn(agent.socket)
            assert c.call({"id": 1, "op": "acquire", "request": {"gpus": 1}})["ok"]
            ask = {"id": 7, "op": "acquire", "request": {"gpus": 1}, "holder_pid": p.pid}
            assert c.call(ask)["event"] == "queued"
            again = c.call({**ask, "request": {"gpus": 1}})
            assert (again["id"], again["ok"], again["error"]["code"]) == (7, False, "bad_request")
            assert again["error"]["message"] == "request id 7 is already waiting"
            assert "(" not in again["error"]["message"] and "pid" not in again["error"]["message"]
            [waiter] = agent.status()["waiters"]
            assert "req_id" not in waiter and waiter["holder"]["pid"] == p.pid  # docs/status.md
            assert c.call({"id": 8, "op": "cancel", "request_id": 7})["result"] == {
                "cancelled": True
            }
            assert agent.status()["waiters"] == []
            c.close()
    finally:
        p.kill()
        p.wait()
