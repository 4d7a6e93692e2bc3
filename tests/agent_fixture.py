"""Start a real `rpool-agent serve` process on a real Unix socket, for tests.

Nothing is mocked: the agent is the installed console script's code run as a child
process, and clients talk to it over the socket exactly as users' programs do.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    agent = Agent(proc, sock, log_path)
    try:
        wait_for_socket(sock, proc)
        yield agent
    finally:
        agent.stop()
