"""Start a real `rpool-agent serve` process on a real Unix socket, for tests.

Nothing is mocked: the agent is the installed console script's code run as a child
process, and clients talk to it over the socket exactly as users' programs do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def gpu_pool(n_gpus: int = 4, n_cpus: int = 4, *, slots_per_gpu: int = 1) -> dict[str, Any]:
    """A flat canary pool with GPU properties (uuid, index) like `detect` writes."""
    return {
        "resource_pool": {
            "additional_properties": {
                "instances": {
                    "gpus": {
                        str(i): {
                            "index": i,
                            "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000",
                            "vendor": "NVIDIA",
                            "name": "Fake GPU",
                        }
                        for i in range(n_gpus)
                    },
                }
            },
            "resources": {
                "gpus": [{"id": str(i), "slots": slots_per_gpu} for i in range(n_gpus)],
                "cpus": [{"id": str(i), "slots": 1} for i in range(n_cpus)],
            },
        }
    }


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    cmd: list[str] = field(default_factory=list)
    pool_file: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RPOOL_AGENT_SOCKET": self.socket}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> Any:
        from rpool_agent.client import Client

        return Client(self.socket)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a crash."""
        self.proc.kill()
        self.proc.wait()

    def restart(self, pool: dict[str, Any] | None = None) -> None:
        """Start the same agent again (same socket, state dir, log), with `pool` if given."""
        if self.proc.poll() is None:
            self.kill()
        if pool is not None and self.pool_file is not None:
            self.pool_file.write_text(json.dumps(pool))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_for_socket(self.socket, self.proc)


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited early with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise TimeoutError(f"agent did not listen on {path}")


def keys_anywhere(value: Any) -> set[str]:
    """Every key of every object inside a reply: what a document must never leak."""
    if isinstance(value, dict):
        return set(value).union(*(keys_anywhere(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_anywhere(v) for v in value))
    return set()


def wait_until(predicate: Any, timeout: float = 10.0) -> float:
    """Poll `predicate` (a test's view of the agent) until true; AssertionError on timeout.

    Returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
    return time.monotonic() - start


@contextmanager
def running_agent(
    tmp_path: Path, pool: dict[str, Any] | None = None, *args: str, name: str = "agent"
) -> Iterator[Agent]:
    """An agent serving `pool` (default: 4 GPUs, 4 cpus) until the block ends."""
    pool_file = tmp_path / f"{name}-pool.yaml"
    pool_file.write_text(json.dumps(pool or gpu_pool()))
    sock = str(tmp_path / f"{name}.sock")
    log_path = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "rpool_agent.cli", "serve", "--pool", str(pool_file)]
    cmd += ["--socket", sock, "--state-dir", str(tmp_path / f"{name}-state"), *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    agent = Agent(proc, sock, log_path, cmd, pool_file)
    try:
        wait_for_socket(sock, proc)
        yield agent
    finally:
        agent.stop()


class NoAnswer(Exception):
    """Not a TimeoutError: that is an OSError, which the client takes for a lost
    connection (and then reconnects, and waits again)."""


@contextlib.contextmanager
def answer_within(seconds: int) -> Iterator[None]:
    """Fail (not hang) when a blocking call inside takes longer: for tests whose failure
    mode is a client waiting forever for a reply that never comes."""

    def expired(*_: object) -> None:
        raise NoAnswer(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Conn:
    """A raw protocol connection: frames out, frames in (events and replies alike)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.file = self.sock.makefile("rb")
        assert self.call({"id": 0, "op": "hello", "version": 1})["ok"]

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def next(self) -> dict[str, Any]:
        return json.loads(self.file.readline())

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.next()

    def close(self) -> None:
        self.file.close()
        self.sock.close()
