"""A hostile member of the socket group, or a starved agent, can never break a lease.

Each test here is one way a live agent was broken (issue 11), tried again the way it was
found: a real second user, a real symlink race, a real descriptor limit on the agent
process (prlimit), real hostile frames over the real socket.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from agent_fixture import Conn, answer_within, gpu_pool, running_agent, wait_until
from other_user import as_user, second_user  # noqa: F401 (a fixture)

import rpool_agent.handoff  # noqa: F401  (loaded before a child drops privileges)
from rpool_agent.client import Client
from rpool_agent.errors import LimitExceeded


def config(tmp: Path, **keys: Any) -> str:
    path = tmp / "agent-config.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(keys))
    return str(path)


# --- 1. per-lease files ----------------------------------------------------------------------

RACE_ROUNDS = 200


def _predicted_next(leases_dir: Path, lease_id: str) -> str | None:
    """Where the next lease's node file would be if ids were `prefix-counter` (they were)."""
    prefix, _, n = lease_id.rpartition("-")
    if not prefix or not all(ch in "0123456789abcdef" for ch in n):
        return None
    return str(leases_dir / f"{prefix}-{int(n, 16) + 1:x}" / "pool-nodes.yaml")


def test_a_holder_cannot_race_its_lease_files_into_a_root_file_takeover(
    public_dir: Path,
    second_user: Any,  # noqa: F811
) -> None:
    """The attack that worked: predict the next lease directory, and once the agent has
    handed it to the holder, rename a symlink over `pool-nodes.yaml` so that the agent's
    chown by path gives a root file to the holder. Bounded: RACE_ROUNDS leases."""
    victim = public_dir / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    attic = public_dir / "attic"  # the attacker's own directory, on the same file system
    attic.mkdir()
    os.chown(attic, second_user.pw_uid, second_user.pw_gid)
    group = ("--socket-group", str(second_user.pw_gid))
    with running_agent(public_dir, gpu_pool(1), *group) as agent:
        leases_dir = Path(agent.socket).parent / "leases"

        def attack(report: Any) -> None:
            # The spinner is a process of its own (no GIL shared with the client), told
            # where to aim through shared memory: the next lease's predicted node file.
            aim = mmap.mmap(-1, 4096)
            spinner = os.fork()
            if spinner == 0:
                link = str(attic / "link")
                while True:
                    path = aim[: aim.find(b"\0")]
                    if not path:  # nothing to aim at (ids that cannot be predicted)
                        time.sleep(0.001)
                        continue
                    with contextlib.suppress(OSError):
                        os.symlink(victim, link)
                    with contextlib.suppress(OSError):
                        os.rename(link, path)
            c = Client(agent.socket, reconnect_timeout=0).connect()
            planted, rounds = [], 0
            try:
                for rounds in range(1, RACE_ROUNDS + 1):  # noqa: B007
                    lease = c.acquire(gpus=1, files=True)
                    target = _predicted_next(leases_dir, lease.id) or ""
                    aim[:] = target.encode().ljust(4096, b"\0")
                    try:  # the holder's own lease directory: may it put anything there?
                        os.symlink(victim, os.path.join(lease.files.directory, "planted"))
                        planted.append(lease.files.directory)
                    except OSError:
                        pass
                    readable = Path(lease.files.pool).read_text().startswith("resource_pool")
                    lease.release()
                    if os.stat(victim).st_uid == os.getuid():
                        break
            finally:
                os.kill(spinner, signal.SIGKILL)
                os.waitpid(spinner, 0)
            try:
                listing: Any = os.listdir(leases_dir)
            except OSError as exc:
                listing = exc.strerror
            report({"rounds": rounds, "planted": planted, "listing": listing, "read": readable})

        got = as_user(second_user, attack)
        st = os.stat(victim)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o600), got
        assert got["rounds"] == RACE_ROUNDS
        assert got["planted"] == []  # nothing of the holder's in an agent-made directory
        assert got["listing"] == "Permission denied"  # no lease directory names to read
        assert got["read"]  # and the holder still reads its own files
        assert agent.status()["leases"] == []
        assert os.listdir(leases_dir) == []  # every lease directory is gone again


def test_tampered_lease_files_still_end_the_lease_and_the_waiter_is_served(
    tmp_path: Path,
) -> None:
    """A non-empty directory where a lease file was (an older agent's holder could put
    one there; a damaged tree can) once made the release raise half-way: the waiter that
    was booked the GPU never heard, and the journal lost an end and a grant."""
    with running_agent(tmp_path, gpu_pool(1)) as agent:
        a, b = Conn(agent.socket), Conn(agent.socket)
        got = a.call({"id": 1, "op": "acquire", "request": {"gpus": 1}, "files": True})
        lease_id, files = got["result"]["id"], got["result"]["files"]
        b.send({"id": 2, "op": "acquire", "request": {"gpus": 1}, "timeout": 30})
        assert b.next()["event"] == "queued"
        os.unlink(files["ctest_spec"])
        os.mkdir(files["ctest_spec"])
        Path(files["ctest_spec"], "results.txt").write_text("not the agent's\n")
        with answer_within(10):
            assert a.call({"id": 3, "op": "release", "lease": lease_id})["ok"]
            granted = b.next()
        assert granted["id"] == 2 and granted["ok"], granted
        wait_until(lambda: "not removed" in agent.log())  # log lines follow the replies
        assert "Traceback" not in agent.log()
        assert Path(files["ctest_spec"], "results.txt").exists()  # not the agent's to delete
        # The journal has the end and the new grant: a restarted agent holds b's lease alone.
        agent.kill()
        agent.restart()
        assert [le["id"] for le in agent.status()["leases"]] == [granted["result"]["id"]]
        a.close()
        b.close()


# --- 2. descriptor exhaustion ----------------------------------------------------------------


def _open_fds(pid: int) -> list[int]:
    return sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))


def _leave_free(pid: int, n: int) -> None:
    """Lower the agent's RLIMIT_NOFILE so exactly `n` descriptor numbers are free."""
    used = set(_open_fds(pid))
    free = [fd for fd in range(max(used) + n + 2) if fd not in used]
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[n], hard))


def test_out_of_descriptors_refuses_new_requests_and_never_drops_a_live_holder(
    tmp_path: Path,
) -> None:
    """With one descriptor left, a holder's second lease once counted its live process as
    exited (the pidfd took the last descriptor, reading its start time failed) and reaped
    its first lease: the GPU went to someone else. Only ESRCH or a start-time mismatch
    means exited; one pidfd per holder process; at the limit accept() waits, quietly."""
    p = subprocess.Popen(["sleep", "300"])
    q = subprocess.Popen(["sleep", "300"])
    try:
        with running_agent(tmp_path, gpu_pool(3)) as agent:
            c = Conn(agent.socket)
            first = c.call({"id": 1, "op": "acquire", "request": {"gpus": 1}, "holder_pid": p.pid})
            assert first["ok"]
            # The agent's first GPU audit runs in a worker thread at start; under load it
            # could still hold a descriptor when the limit drops. Wait for it to finish.
            wait_until(lambda: c.call({"id": 0, "op": "status"})["result"]["audit"] is not None)
            _leave_free(agent.proc.pid, 1)
            second = c.call({"id": 2, "op": "acquire", "request": {"gpus": 1}, "holder_pid": p.pid})
            assert second["ok"], second  # P's pidfd is shared: no new descriptor needed
            third = c.call({"id": 3, "op": "acquire", "request": {"gpus": 1}, "holder_pid": q.pid})
            assert (third["ok"], third["error"]["code"]) == (False, "limit"), third
            assert "Too many open files" in third["error"]["message"]
            status = c.call({"id": 4, "op": "status"})
            assert status["ok"], status
            held = {le["id"] for le in status["result"]["leases"]}
            assert held == {first["result"]["id"], second["result"]["id"]}
            # No descriptor at all: a new connection waits in the backlog, without a
            # traceback in the log, and is served once descriptors are back.
            _leave_free(agent.proc.pid, 0)
            ask = {"id": 5, "op": "acquire", "request": {"gpus": 1}, "holder_pid": q.pid}
            fourth = c.call(ask)  # no descriptor to read /proc with: not "no process"
            assert (fourth["ok"], fourth["error"]["code"]) == (False, "limit"), fourth
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.connect(agent.socket)
            wait_until(lambda: "cannot accept connections" in agent.log())
            resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (4096, 4096))
            late.settimeout(10)
            late.sendall(b'{"id":0,"op":"hello","version":1}\n')
            assert json.loads(late.makefile("rb").readline())["ok"]
            late.close()
            assert "Traceback" not in agent.log()
            # Both of P's leases end when P does; the one pidfd goes with the last.
            fds = len(_open_fds(agent.proc.pid))
            p.kill()
            p.wait()
            wait_until(lambda: agent.status()["leases"] == [])
            wait_until(lambda: len(_open_fds(agent.proc.pid)) == fds - 1)
            c.close()
    finally:
        for proc in (p, q):
            proc.kill()
            proc.wait()


# --- 2 and 4. per-uid caps, empty requests included ------------------------------------------


def test_every_acquire_counts_under_the_uid_caps_empty_ones_too(
    public_dir: Path,
    second_user: Any,  # noqa: F811
) -> None:
    """`{"request": {}}` and `{"gpus": 0}` were granted without end (50,000 leases took
    the agent from 29 to 83 MB). They are leases like any other, counted per uid together
    with waiting ones; root's connections are bounded too."""
    caps = config(public_dir, max_leases_per_uid=4, max_waiting_per_uid=1, max_connections_root=3)
    args = ("--socket-group", str(second_user.pw_gid), "--config", caps)
    with running_agent(public_dir, gpu_pool(1), *args) as agent:

        def crowd(report: Any) -> None:
            out = []
            with Client(agent.socket, reconnect_timeout=0) as c:
                for request in ({}, {"gpus": 0}, "0,gpus:1", {"gpus": 1}):
                    out.append(c.acquire(request).id)
                with Client(agent.socket, reconnect_timeout=0) as other:  # per uid, not per conn
                    for request in ({}, {"gpus": 1}):
                        try:
                            other.acquire(request, timeout=0)
                            out.append("granted")
                        except LimitExceeded as exc:
                            out.append(str(exc))
                c.release(out[0])
                with Client(agent.socket, reconnect_timeout=0) as other:
                    out.append(other.acquire({}).id)  # room again
            report(out)

        got = as_user(second_user, crowd)
        assert len(got) == 7 and got[4] == got[5] == "too many leases for this uid " + (
            f"({second_user.pw_uid})"
        ), got
        assert agent.status()["leases"] == []  # each connection's leases ended with it
        conns = [Conn(agent.socket) for _ in range(3)]  # root's cap: the next is refused
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(agent.socket)
        extra.settimeout(10)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            extra.sendall(b'{"id":0,"op":"hello","version":1}\n')
        refused = json.loads(extra.makefile("rb").readline())
        assert refused["error"]["code"] == "limit"
        extra.close()
        for conn in conns:
            conn.close()
        wait_until(lambda: _answers(agent.socket))


def test_leases_restored_after_a_restart_count_under_the_uid_caps(
    public_dir: Path,
    second_user: Any,  # noqa: F811
) -> None:
    caps = config(public_dir, max_leases_per_uid=2)
    args = ("--socket-group", str(second_user.pw_gid), "--config", caps)
    with running_agent(public_dir, gpu_pool(1), *args) as agent:

        def hold_two(report: Any) -> None:
            holder = subprocess.Popen(["sleep", "300"], start_new_session=True)
            with Client(agent.socket, reconnect_timeout=0) as c:
                for _ in range(2):
                    c.acquire({}, holder_pid=holder.pid)
            report(holder.pid)

        def one_more(report: Any) -> None:
            with Client(agent.socket, reconnect_timeout=0) as c:
                try:
                    report(c.acquire({}).id)
                except LimitExceeded as exc:
                    report(str(exc))

        holder = as_user(second_user, hold_two)
        try:
            agent.kill()
            agent.restart()
            assert len(agent.status()["leases"]) == 2  # both re-adopted
            assert as_user(second_user, one_more).startswith("too many leases")
        finally:
            os.kill(holder, signal.SIGKILL)


def _answers(path: str) -> bool:
    try:
        with Client(path, reconnect_timeout=0) as c:
            return bool(c.status())
    except Exception:
        return False


# --- 6. small ones -----------------------------------------------------------------------


WRONG_TYPES = [
    {"op": "acquire", "request": {"gpus": 1}, "timeout": 10**400},  # OverflowError once
    {"op": "acquire", "request": {"gpus": 1}, "timeout": -(10**400)},
    {"op": "acquire", "request": {"gpus": 1}, "files": "no"},  # counted as true once
    {"op": "acquire", "request": {"gpus": 1}, "files": 0},
    {"op": "cancel", "request_id": [1]},
]


def test_wrong_types_are_malformed_not_internal_errors(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1)) as agent:
        c = Conn(agent.socket)
        for n, frame in enumerate(WRONG_TYPES, 1):
            reply = c.call({"id": n, **frame})
            assert (reply["id"], reply["ok"], reply["error"]["code"]) == (n, False, "malformed")
        assert c.call({"id": 0, "op": "acquire", "request": {"gpus": 1}})["ok"]
        c.close()
        # `version: true` and `1.0` equal 1 in Python, and once passed
        for version in (True, 1.0, "1", None):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(agent.socket)
            s.settimeout(10)
            s.sendall(json.dumps({"id": 0, "op": "hello", "version": version}).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"]["code"] in ("malformed", "version")
            s.close()
        assert "Traceback" not in agent.log()
        assert agent.status()["leases"] == []
