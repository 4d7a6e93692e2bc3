"""sd_notify, the watchdog interval and socket activation, against real sockets.

The notify tests own a real AF_UNIX datagram socket (what systemd listens on) and read
what arrives; the socket-activation test runs the real `systemd-socket-activate`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from rpool_agent import systemd


@pytest.fixture
def manager(tmp_path: Path):
    """A datagram socket standing in for systemd's notify socket: (env, receive)."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)

    def receive() -> str:
        return sock.recv(4096).decode()

    yield {"NOTIFY_SOCKET": str(path)}, receive
    sock.close()


def test_notify_sends_one_datagram(manager) -> None:
    env, receive = manager
    assert systemd.notify("READY=1\nSTATUS=x", env=env) is True
    assert receive() == "READY=1\nSTATUS=x"


def test_helpers_send_the_protocol_lines(manager) -> None:
    env, receive = manager
    assert systemd.ready("8 cpus free\nof 8", env=env)
    assert receive() == "READY=1\nSTATUS=8 cpus free of 8"  # a newline would start a new key
    assert systemd.ready(env=env)
    assert receive() == "READY=1"
    assert systemd.status("0 leases", env=env)
    assert receive() == "STATUS=0 leases"
    assert systemd.watchdog_ping(env=env)
    assert receive() == "WATCHDOG=1"
    assert systemd.stopping(env=env)
    assert receive() == "STOPPING=1"
    assert systemd.reloading(env=env)
    first, second = receive().split("\n")
    assert first == "RELOADING=1"
    assert second.startswith("MONOTONIC_USEC=") and int(second.split("=")[1]) > 0


def test_notify_abstract_namespace() -> None:
    name = f"rpool-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(100) == b"WATCHDOG=1"


def test_notify_without_a_manager_is_a_quiet_no(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    # A path with nobody listening: the agent must not die because systemd went away.
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    stream = tmp_path / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # wrong socket type
        s.bind(str(stream))
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(stream)}) is False


def test_watchdog_interval() -> None:
    me = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": me}) == 0.5
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    other = str(os.getpid() + 1)  # meant for another process (inherited variables)
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": other}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}) is None


def test_listen_fds_ignores_variables_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert systemd.listen_fds(env) == []
    assert env == {}  # unset in every case, as sd_listen_fds(3) does
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(env, unset=False) == []
    assert env["LISTEN_FDS"] == "0"
    assert systemd.listen_fds({"LISTEN_PID": "me", "LISTEN_FDS": "1"}) == []


def test_listen_fds_in_process(tmp_path: Path) -> None:
    """Fds 3.. as systemd leaves them: two listening sockets put there with dup2."""
    # pytest's own files may sit at 3 and 4: move them aside and put them back.
    saved = {fd: (os.dup(fd), os.get_inheritable(fd)) for fd in (3, 4) if _is_open(fd)}
    a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.bind(str(tmp_path / "a"))
    a.listen()
    b.bind(str(tmp_path / "b"))
    try:
        os.dup2(a.fileno(), 3, inheritable=True)
        os.dup2(b.fileno(), 4, inheritable=True)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "main:"}
        got = systemd.listen_fds_with_names(env)
        assert [(name, s.fileno(), s.type) for name, s in got] == [
            ("main", 3, socket.SOCK_STREAM),
            ("unknown", 4, socket.SOCK_DGRAM),
        ]
        assert [s.getsockname() for _, s in got] == [str(tmp_path / "a"), str(tmp_path / "b")]
        assert not os.get_inheritable(3) and not os.get_inheritable(4)
        for _, s in got:
            s.detach()  # fds 3 and 4 are restored below, not closed by the socket objects
    finally:
        a.close()
        b.close()
        for fd in (3, 4):
            if fd in saved:
                copy, inheritable = saved[fd]
                os.dup2(copy, fd, inheritable=inheritable)
                os.close(copy)
            else:
                os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_CHILD = """
import json, os, sys
from rpool_agent import systemd
got = systemd.listen_fds_with_names()
print(json.dumps({
    "socks": [[n, s.fileno(), s.getsockname(), os.get_inheritable(s.fileno())] for n, s in got],
    "left": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
}), flush=True)
conn, _ = got[0][1].accept()
conn.sendall(b"served on the inherited socket")
conn.close()
"""


def test_listen_fds_under_systemd_socket_activate(tmp_path: Path, system_tool) -> None:
    """The real tool binds, waits for the first client, then execs us with LISTEN_FDS."""
    tool = system_tool("systemd-socket-activate")
    path = tmp_path / "agent.sock"
    child = subprocess.Popen(
        [tool, "-l", str(path), "--fdname=agent", sys.executable, "-c", _CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        for _ in range(200):  # the tool binds within milliseconds of starting
            try:
                client.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                child.poll()
                assert child.returncode is None, child.stderr.read()
                time.sleep(0.02)
        reply = b""
        while chunk := client.recv(100):
            reply += chunk
        client.close()
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    report = json.loads(out)
    assert report["socks"] == [["agent", 3, str(path), False]]
    assert report["left"] == []  # unset, so a command the agent runs inherits nothing
    assert reply == b"served on the inherited socket"


def test_systemd_module_imports_no_asyncio() -> None:
    code = "import sys, rpool_agent.systemd; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
