"""The agent under systemd's protocols, end to end: a real `rpool-agent serve` process.

No systemd runs here (no PID 1 manager in a container), so the test plays its part with
real parts: it owns the AF_UNIX datagram socket that `NOTIFY_SOCKET` names and reads what
the agent sends, sets `WATCHDOG_USEC`/`WATCHDOG_PID` as the manager would, sends the
signals `systemctl stop/reload` send, and uses the real `systemd-socket-activate` for
socket activation. Clients are `rpool_agent.client.Client` over the real socket.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nvml_fixture as nf
import pytest
from agent_fixture import gpu_pool, wait_for_socket

from rpool_agent.client import Client
from rpool_agent.errors import RpoolAgentError
from rpool_agent.formats import parse_text

fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake NVML once

SERVE = [sys.executable, "-m", "rpool_agent.cli", "serve"]
# Whatever the environment running the tests says about systemd or the agent is not ours.
_FOREIGN = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS")
_FOREIGN += ("LISTEN_FDNAMES", "RPOOL_AGENT_SOCKET", "STATE_DIRECTORY")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    return {**env, **extra}


class Manager:
    """systemd's side of sd_notify: the datagram socket, and every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[tuple[float, str]] = []

    def next(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.seen.append((time.monotonic(), message))
        return message

    def wait_for(self, predicate, timeout: float = 10.0) -> str:  # type: ignore[no-untyped-def]
        """The first message `predicate` accepts; the others are kept in `seen`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.next(left)
            if message is not None and predicate(message):
                return message
        raise AssertionError(f"no such message in {timeout} s; got {self.messages()}")

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        start = len(self.seen)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.next(left)
        return self.seen[start:]

    def messages(self) -> list[str]:
        return [m for _, m in self.seen]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path / "notify")
    yield m
    m.sock.close()


def status_of(message: str) -> str:
    return dict(line.split("=", 1) for line in message.splitlines()).get("STATUS", "")


def is_status(message: str) -> bool:
    return message.startswith("STATUS=")


@contextmanager
def agent_process(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(10)


def write_pool(path: Path, n_gpus: int) -> Path:
    path.write_text(json.dumps(gpu_pool(n_gpus)))
    return path


# --- socket activation --------------------------------------------------------------------


def test_socket_activation_serves_on_the_inherited_socket(tmp_path: Path, system_tool) -> None:
    """systemd-socket-activate binds, execs the agent at the first client, which is served.

    No --socket, and no XDG_RUNTIME_DIR: the agent must take the inherited socket's path
    (per-lease files go beside it) rather than fail to resolve a default, and must leave
    the socket file alone on exit (systemd owns it, and keeps it across restarts).
    """
    tool = system_tool("systemd-socket-activate")
    path = tmp_path / "agent.sock"
    pool = write_pool(tmp_path / "pool.yaml", 4)
    env = clean_env()
    env.pop("XDG_RUNTIME_DIR", None)
    # The tool hands the agent only TERM, PATH, USER, HOME and what -E names.
    forward = [f"-E{k}" for k in ("PYTHONPATH", "VIRTUAL_ENV") if k in env]
    cmd = [tool, "-l", str(path), *forward, *SERVE, "--pool", str(pool)]
    cmd += ["--state-dir", str(tmp_path)]
    log = tmp_path / "agent.log"
    with agent_process(cmd, env, log) as proc:
        deadline = time.monotonic() + 10
        while not path.exists():  # the tool binds within milliseconds
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        made = path.stat()
        assert stat.S_ISSOCK(made.st_mode)
        # This connection is what makes the tool exec the agent; it waits in the backlog.
        with Client(str(path), connect_timeout=10) as client:
            assert client.server_info["pid"] == proc.pid  # the tool exec'd the agent
            lease = client.acquire(gpus=2, files=True)
            assert [g["id"] for g in lease.resources["gpus"]] == ["0", "1"]
            assert Path(lease.files.directory).parent == tmp_path / "leases"  # beside the socket
            assert Path(lease.files.ctest_spec).is_file()
            status = client.status()
            assert status["types"]["gpus"]["free"] == 2
            assert [x["id"] for x in status["leases"]] == [lease.id]
            lease.release()
            assert not Path(lease.files.directory).exists()
        assert stop(proc) == 0, log.read_text()
    text = log.read_text()
    assert f"on {path}" in text  # "serving ... on <the inherited socket's path>"
    left = path.stat()  # still there, and the very socket the tool made, not a new one
    assert stat.S_ISSOCK(left.st_mode) and (left.st_ino, left.st_dev) == (made.st_ino, made.st_dev)


# --- sd_notify ----------------------------------------------------------------------------


def test_notify_ready_status_watchdog_stopping(tmp_path: Path, manager: Manager) -> None:
    pool = write_pool(tmp_path / "pool.yaml", 4)
    sock = tmp_path / "agent.sock"
    env = clean_env(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC="200000")
    # systemd sets WATCHDOG_PID to the main process's pid, known only after the fork:
    # a shell that exports its own pid and then execs the agent gives it exactly that.
    wrapper = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"']
    cmd = [*wrapper, *SERVE, "--pool", str(pool), "--socket", str(sock)]
    cmd += ["--state-dir", str(tmp_path / "state")]
    log = tmp_path / "agent.log"
    with agent_process(cmd, env, log) as proc:
        ready = manager.wait_for(lambda m: "READY=1" in m.splitlines())
        # Strictly in this order: the moment READY=1 is here, a client gets through.
        with Client(str(sock), connect_timeout=0.5) as client:
            assert client.server_info["pid"] == proc.pid
            assert status_of(ready) == "4 gpus free of 4; 4 cpus free of 4; 0 leases"

            lease = client.acquire(gpus=3)
            granted_at = time.monotonic()
            line = manager.wait_for(is_status, timeout=1.0)
            assert time.monotonic() - granted_at < 1.0
            assert status_of(line) == "1 gpus free of 4; 4 cpus free of 4; 1 leases"
            lease.release()
            line = manager.wait_for(is_status, timeout=1.0)
            assert status_of(line) == "4 gpus free of 4; 4 cpus free of 4; 0 leases"

        # WATCHDOG_USEC=200000: a ping every 0.1 s (half), from the event loop.
        pings = [t for t, m in manager.collect(1.0) if m == "WATCHDOG=1"]
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        assert len(pings) >= 6, manager.messages()  # 10 due; 2 busy cores may delay a few
        assert 0.07 < gaps[len(gaps) // 2] < 0.15, gaps  # the median gap

        proc.send_signal(signal.SIGTERM)
        manager.wait_for(lambda m: m == "STOPPING=1", timeout=5)
        assert proc.wait(10) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def test_no_watchdog_pings_for_another_process(tmp_path: Path, manager: Manager) -> None:
    """WATCHDOG_PID names someone else (variables inherited from a parent): stay quiet."""
    pool = write_pool(tmp_path / "pool.yaml", 1)
    sock = tmp_path / "agent.sock"
    env = clean_env(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC="100000", WATCHDOG_PID="1")
    cmd = [*SERVE, "--pool", str(pool), "--socket", str(sock), "--state-dir", str(tmp_path)]
    with agent_process(cmd, env, tmp_path / "agent.log") as proc:
        manager.wait_for(lambda m: m.startswith("READY=1"))
        manager.collect(0.3)  # three pings' worth
        assert "WATCHDOG=1" not in manager.messages()
        assert stop(proc) == 0


# --- reload (ExecReload=/bin/kill -HUP $MAINPID) --------------------------------------------


def test_sighup_rereads_the_pool_file_and_keeps_leases(tmp_path: Path, manager: Manager) -> None:
    pool = write_pool(tmp_path / "pool.yaml", 2)
    sock = tmp_path / "agent.sock"
    cmd = [*SERVE, "--pool", str(pool), "--socket", str(sock), "--state-dir", str(tmp_path)]
    log = tmp_path / "agent.log"
    with agent_process(cmd, clean_env(NOTIFY_SOCKET=manager.path), log) as proc:
        manager.wait_for(lambda m: m.startswith("READY=1"))
        with Client(str(sock)) as holder, Client(str(sock)) as other:
            held = holder.acquire(gpus=2)
            with pytest.raises(RpoolAgentError):
                other.acquire(gpus=1, timeout=0)  # every GPU is taken

            write_pool(pool, 3)  # the admin adds a GPU to the pool file
            proc.send_signal(signal.SIGHUP)
            manager.wait_for(lambda m: m.startswith("RELOADING=1\nMONOTONIC_USEC="))
            done = manager.wait_for(lambda m: m.startswith("READY=1"))
            assert status_of(done) == "1 gpus free of 3; 4 cpus free of 4; 1 leases"

            status = other.status()
            assert status["types"]["gpus"]["total"] == 3
            assert [x["id"] for x in status["leases"]] == [held.id]  # kept over the reload
            extra = other.acquire(gpus=1, timeout=0)
            assert [g["id"] for g in extra.resources["gpus"]] == ["2"]
            held.release()  # the kept lease is still the holder's to release
            assert other.status()["types"]["gpus"]["free"] == 2
        assert stop(proc) == 0, log.read_text()
    assert "reload: " in log.read_text()


# --- config file + command line -------------------------------------------------------------

_AGENT_YAML = """\
socket: run/agent.sock   # relative: to this file's directory
state_dir: state
slots_per_gpu: 3         # the command line's --slots-per-gpu 2 wins
mig: {mig}
"""


def test_config_file_and_command_line_combine(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """Detection (fake NVML: this machine has no GPU) configured by file and command line;
    SIGHUP re-reads the file, and the command line keeps winning; a broken file at reload
    keeps the old pool and says why in one line."""
    migs = [{"slot": s, "uuid": f"MIG-b{s}", "gi": s + 1, "ci": 0} for s in (0, 1)]
    devices = [{"uuid": "GPU-a"}, {"uuid": "GPU-b", "mig_mode": 1, "migs": migs}]
    nvml = nf.write_config(tmp_path / "nvml.conf", devices)  # GPU 1 has two MIG devices
    etc = tmp_path / "etc"
    etc.mkdir()
    config = etc / "agent.yaml"
    config.write_text(_AGENT_YAML.format(mig="false"))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env = clean_env(LD_LIBRARY_PATH=str(fake_nvml_dir), FAKE_NVML_CONFIG=str(nvml))
    cmd = [*SERVE, "--config", "../etc/agent.yaml", "--slots-per-gpu", "2"]
    sock = etc / "run" / "agent.sock"
    log = tmp_path / "agent.log"

    def gpus(client: Client) -> list[tuple[str, int]]:
        text = client.pool(format="canary")["text"]
        return [(g.id, g.slots) for g in parse_text(text).local.resources["gpus"]]

    with agent_process(cmd, env, log, cwd=elsewhere) as proc:
        wait_for_socket(str(sock), proc)  # the file's socket, relative to the file
        with Client(str(sock)) as client:
            # slots: command line over file; `mig: false` leaves the MIG-mode GPU 1 out
            assert gpus(client) == [("0", 2)]
            assert client.status()["types"]["cpus"]["total"] >= 1  # this node's cpus

            config.write_text(_AGENT_YAML.format(mig="true"))
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (got := gpus(client)) == [("0", 2)] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got == [("0", 2), ("1_0", 2), ("1_1", 2)]  # the file's mig, still 2 slots

            config.write_text("slots_per_gpu: two\n")
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reload failed" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gpus(client) == [("0", 2), ("1_0", 2), ("1_1", 2)]  # the old pool stays
        assert stop(proc) == 0
    lines = log.read_text().splitlines()
    failed = [line for line in lines if "reload failed" in line]
    assert failed == [
        "reload failed, keeping the old pool: "
        f"{etc / 'agent.yaml'}: slots_per_gpu: expected an integer, got 'two'"
    ], lines
    assert not any("Traceback" in line for line in lines)
