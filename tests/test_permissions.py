"""Who may do what: another uid, the admin group, the socket's place and mode, the limits.

Tests run as root. "Another user" is a forked child that drops to `nobody` (setgroups,
setgid, setuid) before it connects, so the agent learns who it is from SO_PEERCRED as it
would for a real user's job. A fork, not an exec: `nobody` may not read root's Python.
"""

from __future__ import annotations

import contextlib
import grp  # noqa: F401  (the client imports it; loaded before a child drops privileges)
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import gpu_pool, keys_anywhere, running_agent, wait_until
from other_user import AsUser, Report

import rpool_agent.handoff  # noqa: F401  (loaded before a child drops privileges)
from rpool_agent.client import Client
from rpool_agent.errors import AgentUnavailable, ResourceUnavailable, RpoolAgentError
from rpool_agent.pool import Pool
from rpool_agent.server import Server

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another uid")

NOBODY = pwd.getpwnam("nobody")
ADMIN_GID = 4242  # no /etc/group entry needed: --admin-group takes a number
SOCKET_GID = 4243
HELLO = b'{"id":0,"op":"hello","version":1}\n'
CLI = (sys.executable, "-m", "rpool_agent.cli")


def nobody(fn: Callable[[Report], None], groups: tuple[int, ...] = ()) -> AsUser:
    """`fn` running as nobody, with no descriptor of the parent's."""
    return AsUser(NOBODY, fn, groups, close_fds=True, timeout=10.0)


def as_nobody(fn: Callable[[Report], None], groups: tuple[int, ...] = ()) -> Any:
    """Run `fn` as nobody; its one report."""
    child = nobody(fn, groups)
    try:
        return child.read()
    finally:
        child.stop()


def attempt(c: Client, op: str, **args: Any) -> dict[str, Any]:
    """An operation's outcome as data: {"ok": result} or {"error": code, "message": ...}."""
    try:
        return {"ok": c.call(op, **args)}
    except RpoolAgentError as exc:
        return {"error": exc.code, "message": str(exc)}


# --- the socket -------------------------------------------------------------------------


def test_socket_is_0660_with_its_group_and_only_the_group_gets_in(public_dir: Path) -> None:
    with running_agent(public_dir, gpu_pool(1), "--socket-group", str(SOCKET_GID)) as agent:
        st = os.stat(agent.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, SOCKET_GID)

        def connect(report: Report) -> None:
            try:
                with Client(agent.socket, reconnect_timeout=0) as c:
                    report({"you": c.server_info["you"]})
            except AgentUnavailable as exc:
                report({"refused": str(exc)})

        outside = as_nobody(connect)
        assert outside["refused"].startswith(f"cannot connect to {agent.socket}: Permission")
        assert f"members of group {SOCKET_GID}: ask an admin to add you" in outside["refused"]
        assert f"(usermod -aG {SOCKET_GID} USER)" in outside["refused"]
        inside = as_nobody(connect, groups=(SOCKET_GID,))
        # Who we are comes from the kernel, not from anything the client said.
        assert inside["you"]["uid"] == NOBODY.pw_uid
        assert inside["you"]["gid"] == NOBODY.pw_gid


def make_server(path: Path) -> Server:
    return Server(Pool([]), socket_path=str(path))


def bind(path: Path) -> None:
    sock = make_server(path)._bind()
    sock.close()
    path.unlink()


@pytest.mark.parametrize(
    ("mode", "ok"),
    [(0o755, True), (0o700, True), (0o775, False), (0o777, False), (0o1777, False)],
)
def test_socket_directory_must_be_writable_by_its_owner_alone(
    public_dir: Path, mode: int, ok: bool
) -> None:
    d = public_dir / "run"
    d.mkdir()
    d.chmod(mode)
    if ok:
        bind(d / "agent.sock")
    else:
        # Sticky (1777) is refused too: in a /tmp-like directory anyone can create the
        # name before the agent starts or after it stops, and clients would trust it.
        with pytest.raises(AgentUnavailable, match="writable by group or others"):
            bind(d / "agent.sock")
        assert not (d / "agent.sock").exists()


def test_socket_directory_owned_by_another_user_or_under_an_open_one(public_dir: Path) -> None:
    theirs = public_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)  # they could rename our socket away
    with pytest.raises(AgentUnavailable, match=f"belongs to uid {NOBODY.pw_uid}"):
        bind(theirs / "agent.sock")
    open_parent = public_dir / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # not sticky: anyone may rename "ours" and put their own
    (open_parent / "ours").mkdir(mode=0o755)
    with pytest.raises(AgentUnavailable, match="not sticky"):
        bind(open_parent / "ours" / "agent.sock")
    sticky_parent = public_dir / "sticky"
    sticky_parent.mkdir()
    sticky_parent.chmod(0o1777)  # like /tmp: others cannot touch "ours"
    (sticky_parent / "ours").mkdir(mode=0o755)
    bind(sticky_parent / "ours" / "agent.sock")


def test_symlink_or_other_file_at_the_socket_path_is_refused_and_kept(public_dir: Path) -> None:
    target = public_dir / "elsewhere.sock"
    link = public_dir / "agent.sock"
    link.symlink_to(target)  # dangling: binding would create the socket at the target
    with pytest.raises(AgentUnavailable, match="symlink"):
        bind(link)
    assert link.is_symlink() and not target.exists()
    link.unlink()
    link.write_text("precious")
    with pytest.raises(AgentUnavailable, match="not a socket"):
        bind(link)
    assert link.read_text() == "precious"


def test_serve_refuses_an_open_directory_with_one_line(public_dir: Path, tmp_path: Path) -> None:
    d = public_dir / "open"
    d.mkdir()
    d.chmod(0o1777)
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(gpu_pool(1)))
    where = ("--socket", str(d / "agent.sock"), "--state-dir", str(tmp_path / "state"))
    r = subprocess.run(
        [*CLI, "serve", "--pool", str(pool), *where],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1
    assert "writable by group or others" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (d / "agent.sock").exists()


# --- another uid against root's lease -----------------------------------------------------


def test_another_uid_cannot_release_reclaim_read_or_administer(public_dir: Path) -> None:
    args = ("--socket-group", "nogroup", "--admin-group", str(ADMIN_GID))
    with running_agent(public_dir, gpu_pool(2), *args) as agent, agent.client() as root:
        lease = root.acquire(gpus=1, label="root-job", files=True)
        token, files = lease.token, lease.files
        assert token and files is not None
        state = public_dir / "agent-state"

        def intrude(report: Report) -> None:
            out: dict[str, Any] = {}
            with Client(agent.socket, reconnect_timeout=0) as c:
                out["status"] = attempt(c, "status")
                out["pool"] = attempt(c, "pool")
                out["release"] = attempt(c, "release", lease=lease.id)
                out["reclaim_right_token"] = attempt(c, "reclaim", lease=lease.id, token=token)
                out["reclaim_wrong_token"] = attempt(c, "reclaim", lease=lease.id, token="0" * 32)
                out["drain"] = attempt(c, "drain", resource="gpus:1", reason="mine now")
                out["undrain"] = attempt(c, "undrain", resource="gpus:1")
                out["reload"] = attempt(c, "reload")
                # Leasing for root's process would tie a lease to a process not ours.
                out["holder_pid"] = attempt(
                    c, "acquire", request={"gpus": 1}, holder_pid=os.getppid()
                )
            # Claiming an identity is not possible: the protocol has no field for it.
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(agent.socket)
            s.sendall(b'{"id":1,"op":"hello","version":1,"uid":0}\n')
            out["claim"] = json.loads(s.makefile().readline())
            s.close()
            for what, path in (("file", files.pool), ("dir", files.directory), ("state", state)):
                try:
                    if what == "file":
                        Path(path).read_text()
                    else:
                        os.listdir(path)
                    out[f"read_{what}"] = "read"
                except PermissionError:
                    out[f"read_{what}"] = "denied"
            report(out)

        out = as_nobody(intrude)
        assert out["status"]["ok"]["leases"][0]["id"] == lease.id  # visible ...
        for reply in (out["status"], out["pool"]):
            assert token not in json.dumps(reply)  # ... without its token
            assert "token" not in keys_anywhere(reply)
        assert out["release"]["error"] == "not_owner"
        assert out["reclaim_right_token"]["error"] == "not_owner"  # a token is not enough
        assert out["reclaim_wrong_token"]["error"] == "not_owner"
        for op in ("drain", "undrain", "reload"):
            assert out[op]["error"] == "permission_denied", op
            assert "admin group" in out[op]["message"]
        assert out["holder_pid"]["error"] == "permission_denied"
        assert out["claim"]["ok"] is False and out["claim"]["error"]["code"] == "malformed"
        assert (out["read_file"], out["read_dir"], out["read_state"]) == ("denied",) * 3

        # Nothing changed: root's lease still runs and nothing was drained.
        snap = root.status()
        assert [le["id"] for le in snap["leases"]] == [lease.id]
        assert snap["drained"] == []
        assert token not in json.dumps(snap)  # not even to root: the token travels once
        # Root's own lease files: the holder's alone.
        assert stat.S_IMODE(os.stat(files.directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(files.pool).st_mode) == 0o600
        # Root may do all of it.
        assert root.drain("gpus:1", "maintenance") == {"drained": "gpus:1"}
        assert root.undrain("gpus:1") == {"undrained": "gpus:1"}
        assert "reloaded" in root.reload()
        lease.release()
        assert root.status()["leases"] == []


# --- root and the same uid against nobody's lease -------------------------------------------


def hold_as_nobody(sock: str, gpus: int = 1) -> AsUser:
    def hold(report: Report) -> None:
        c = Client(sock, reconnect_timeout=0).connect()
        lease = c.acquire(gpus=gpus, files=True, label="nobody-job")
        report({"id": lease.id, "token": lease.token, "files": lease.document["files"]})
        report({"pool": Path(lease.files.pool).read_text()[:20]})  # the holder can read
        time.sleep(60)

    return nobody(hold)


def test_root_and_the_same_uid_may_release_a_users_lease(public_dir: Path) -> None:
    with running_agent(public_dir, gpu_pool(2), "--socket-group", str(NOBODY.pw_gid)) as agent:
        holder = hold_as_nobody(agent.socket)
        try:
            doc = holder.read()
            assert holder.read()["pool"]
            files = doc["files"]
            # The files are the holder's; the directory stays the agent's (0711): the
            # holder reads its files, but can put, rename or replace nothing in there.
            st = os.lstat(files["directory"])
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o711)
            for path in (files["pool"], files["ctest_spec"], files["pool_nodes"]):
                st = os.lstat(path)
                assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), path
                assert stat.S_IMODE(st.st_mode) == 0o600, path
            with agent.client() as root:
                [entry] = root.status()["leases"]
                assert entry["holder"]["uid"] == NOBODY.pw_uid
                root.release(doc["id"])
                assert root.status()["leases"] == []
            assert not os.path.exists(files["directory"])
        finally:
            holder.stop()

        holder = hold_as_nobody(agent.socket)
        try:
            doc = holder.read()

            def release_own(report: Report) -> None:
                with Client(agent.socket, reconnect_timeout=0) as c:
                    report(attempt(c, "release", lease=doc["id"]))

            assert as_nobody(release_own) == {"ok": {"released": doc["id"]}}
            assert agent.status()["leases"] == []
        finally:
            holder.stop()


# --- the admin group -----------------------------------------------------------------------


def test_admin_group_member_may_drain_undrain_and_reload(public_dir: Path) -> None:
    args = ("--socket-group", str(NOBODY.pw_gid), "--admin-group", str(ADMIN_GID))
    with running_agent(public_dir, gpu_pool(2), *args) as agent:

        def administer(report: Report) -> None:
            with Client(agent.socket, reconnect_timeout=0) as c:
                drained = attempt(c, "drain", resource="gpus:1", reason="bad fan")
                listed = c.status()["drained"]
                report(
                    {
                        "drain": drained,
                        "listed": listed,
                        "undrain": attempt(c, "undrain", resource="gpus:1"),
                        "reload": attempt(c, "reload"),
                    }
                )

        out = as_nobody(administer, groups=(ADMIN_GID,))
        assert out["drain"] == {"ok": {"drained": "gpus:1"}}
        assert out["listed"] == [{"type": "gpus", "id": "1", "reason": "bad fan"}]
        assert out["undrain"] == {"ok": {"undrained": "gpus:1"}}
        assert out["reload"]["ok"]["reloaded"] is True
        assert "drain gpus:1" in agent.log()
        # The same user without the group is refused.
        out = as_nobody(administer)
        assert out["drain"]["error"] == "permission_denied"
        assert agent.status()["drained"] == []


# --- drain, end to end ---------------------------------------------------------------------


def test_drain_stops_new_grants_while_existing_leases_run_on(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(2)) as agent, agent.client() as c:
        held = c.acquire(gpus=1, label="running")
        busy = held.resources["gpus"][0]["id"]
        other = "1" if busy == "0" else "0"
        r = subprocess.run(
            [*CLI, "drain", f"gpus:{busy}", "--reason", "ECC errors"],
            env=agent.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        assert f"drained gpus:{busy}" in r.stdout
        snap = c.status()
        assert [le["id"] for le in snap["leases"]] == [held.id]  # runs on
        assert snap["drained"] == [{"type": "gpus", "id": busy, "reason": "ECC errors"}]
        with pytest.raises(ResourceUnavailable):
            c.acquire(gpus=2, timeout=0)
        second = c.acquire(gpus=1, timeout=0)
        assert second.resources["gpus"][0]["id"] == other
        held.release()
        # Released, but still drained: nothing is granted from it.
        with pytest.raises(ResourceUnavailable):
            c.acquire(gpus=1, timeout=0)
        assert c.status()["types"]["gpus"]["free"] == 0
        with agent.client() as waiter_conn:
            waiter_conn._sock.sendall(  # type: ignore[union-attr]
                b'{"id":7,"op":"acquire","request":{"gpus":1},"timeout":30}\n'
            )
            wait_until(lambda: len(c.status()["waiters"]) == 1)
            c.undrain(f"gpus:{busy}")
            reply = waiter_conn._next_frame()
            while "event" in reply:
                reply = waiter_conn._next_frame()
            assert reply["ok"] and reply["result"]["resources"]["gpus"][0]["id"] == busy
        second.release()
        wait_until(lambda: c.status()["leases"] == [])


# --- limits --------------------------------------------------------------------------------


def read_frames(s: socket.socket, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Up to `n` frames, fewer if the agent closes the connection first."""
    s.settimeout(timeout)
    buf, frames = b"", []
    while len(frames) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        frames += [json.loads(line) for line in lines if line.strip()]
    return frames


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_pending_acquires_per_connection_are_limited(tmp_path: Path) -> None:
    limit = ("--max-pending-per-connection", "2")
    with running_agent(tmp_path, gpu_pool(1), *limit) as agent, agent.client() as c:
        c.acquire(gpus=1)  # every later acquire has to wait
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.socket)
        want = b'"op":"acquire","request":{"gpus":1},"timeout":60}\n'
        s.sendall(HELLO + b"".join(b'{"id":%d,' % i + want for i in (1, 2, 3)))
        frames = read_frames(s, 4)
        assert frames[0]["ok"] is True
        assert [f.get("event") for f in frames[1:3]] == ["queued", "queued"]
        assert frames[3]["id"] == 3 and frames[3]["error"]["code"] == "limit"
        assert len(c.status()["waiters"]) == 2
        s.close()
        wait_until(lambda: c.status()["waiters"] == [])


def test_connections_per_uid_are_limited_but_not_for_root(public_dir: Path) -> None:
    args = ("--socket-group", str(NOBODY.pw_gid), "--max-connections-per-uid", "3")
    with running_agent(public_dir, gpu_pool(1), *args) as agent:

        def hello(s: socket.socket) -> dict[str, Any]:
            s.connect(agent.socket)
            # A refused connection may be closed before our hello arrives: the refusal
            # is still there to read, the write fails with EPIPE.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(HELLO)
            return read_frames(s, 1)[0]

        def crowd(report: Report) -> None:
            socks = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(4)]
            answers = [hello(s) for s in socks]
            socks[0].close()
            deadline = time.monotonic() + 10
            while True:  # until the agent has seen the close: refused (limit) before that
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as again:
                    answer = hello(again)
                if answer["ok"] or time.monotonic() > deadline:
                    break
            answers.append(answer)
            report([a["error"]["code"] if not a["ok"] else "ok" for a in answers])

        assert as_nobody(crowd) == ["ok", "ok", "ok", "limit", "ok"]
        clients = [agent.client().connect() for _ in range(6)]  # root: the operator
        assert all(c.status()["connections"] >= 6 for c in clients)
        for c in clients:
            c.close()


def test_oversized_message_closes_only_that_connection(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1), "--max-message-bytes", "1024") as agent:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.socket)
        fits = b'{"id":1,"op":"acquire","request":{"gpus":1},"label":"' + b"x" * 900 + b'"}\n'
        s.sendall(HELLO + fits)
        frames = read_frames(s, 2)
        assert frames[1]["error"]["code"] == "malformed"  # read and answered: label > 256
        s.sendall(b'{"id":2,"op":"status","pad":"' + b"y" * 2000 + b'"}\n')
        [frame] = read_frames(s, 1)
        assert frame["error"]["code"] == "too_large"
        assert closed_by_peer(s)
        s.close()
        assert agent.status()["types"]["gpus"]["free"] == 1
        assert agent.proc.poll() is None


def test_silent_and_slow_clients_are_dropped_before_the_handshake(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1), "--handshake-timeout", "0.3") as agent:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.monotonic()
        silent.connect(agent.socket)
        slow.connect(agent.socket)
        slow.sendall(HELLO[:10])  # and never the rest
        with agent.client() as greeted:
            for s in (silent, slow):
                [frame] = read_frames(s, 1)
                assert "no handshake in time" in frame["error"]["message"]
                assert closed_by_peer(s)
                s.close()
            assert 0.25 < time.monotonic() - t0 < 3.0
            time.sleep(0.4)  # a client that said hello in time may stay as long as it likes
            assert greeted.status()["connections"] == 1
