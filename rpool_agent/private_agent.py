"""A private agent: one `serve` on the detected pool, for one program run (a pytest run).

Started when no agent answers, stopped when the run ends. It must never outlive its run,
however that ends (SIGKILL included): the agent reads its stdin, a pipe only the starter
holds, and when the pipe hits EOF it stops itself (SIGTERM, the clean path) as soon as it
holds no lease, i.e. once the run's other processes (xdist workers, which outlive a
killed controller by up to 15 s) are gone too. Its socket, lease table and per-lease files
live in one fresh 0700 directory that `stop` removes, so nothing is shared with a user's
or the system's agent.

    python -m rpool_agent.private_agent DIR [--slots-per-gpu K] [--pool FILE]

With `--pool` it serves that pool instead of detecting: `lease_pool(doc)` makes one of a
lease, so that a run holding one lease can share it out among its own processes. The
starter then passes that lease's connection too (`hold_fd`): the agent only keeps it open,
so the outer lease ends when the starter AND this agent are gone, never while a process
still uses what this agent shared out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

from .errors import AgentUnavailable, RpoolAgentError

SOCKET_NAME = "agent.sock"
LOG_NAME = "agent.log"

#: What tells a process it is a systemd service or socket-activated: the run's manager, not
#: the private agent's. Inherited, they would make it notify (or listen on) someone else's.
_FOREIGN_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "STATE_DIRECTORY",
)


class PrivateAgent:
    """A running private agent: its process, socket and directory."""

    def __init__(self, proc: subprocess.Popen[bytes], directory: str) -> None:
        self.proc = proc
        self.directory = directory
        self.socket = os.path.join(directory, SOCKET_NAME)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            with open(os.path.join(self.directory, LOG_NAME), errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Close the pipe (the agent stops itself), wait, then remove the directory."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def lease_pool(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A flat canary pool of exactly what a lease holds: its instances with the leased
    slots, and their properties (GPU index and UUID, cpu threads, NUMA nodes)."""
    return {
        "resource_pool": {
            "additional_properties": {"instances": doc.get("properties") or {}},
            "resources": doc["resources"],
        }
    }


def start(
    *,
    slots_per_gpu: int | None = None,
    pool: Mapping[str, Any] | None = None,
    hold_fd: int | None = None,
    timeout: float = 30.0,
) -> PrivateAgent:
    """Start a private agent (on `pool`, else the detected one); return once it answers.

    Raises AgentUnavailable (with the agent's last log line) if it exits or stays silent.
    """
    directory = tempfile.mkdtemp(prefix="rpool-private-")  # mode 0700, ours
    cmd = [sys.executable, "-m", "rpool_agent.private_agent", directory]
    if slots_per_gpu is not None:
        cmd += ["--slots-per-gpu", str(slots_per_gpu)]
    if pool is not None:
        path = os.path.join(directory, "pool.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(pool, fh)
        cmd += ["--pool", path]
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    with open(os.path.join(directory, LOG_NAME), "wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=() if hold_fd is None else (hold_fd,),
        )
    agent = PrivateAgent(proc, directory)
    try:
        _wait_until_serving(agent, timeout)
    except BaseException:
        agent.stop()
        raise
    return agent


def _wait_until_serving(agent: PrivateAgent, timeout: float) -> None:
    from .client import Client

    deadline = time.monotonic() + timeout
    while True:
        if agent.proc.poll() is not None:
            lines = agent.log().strip().splitlines()
            why = lines[-1] if lines else f"exit status {agent.proc.returncode}"
            raise AgentUnavailable(f"the private agent did not start: {why}")
        if os.path.exists(agent.socket):
            with contextlib.suppress(AgentUnavailable), Client(agent.socket, connect_timeout=1):
                return
        if time.monotonic() > deadline:
            raise AgentUnavailable(f"the private agent did not listen within {timeout:g} s")
        time.sleep(0.02)


def _stop_at_eof(socket_path: str) -> None:
    """Block until stdin (the starter's pipe) ends; then, once no lease is held, stop
    this agent cleanly."""
    from .client import Client

    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    while True:
        try:
            with Client(socket_path, connect_timeout=1) as client:
                if not client.status()["leases"]:
                    break
        except (RpoolAgentError, OSError):
            break
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> int:
    from .serve import serve_main

    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    directory = argv[0]
    given: dict[str, Any] = {}
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    if "--slots-per-gpu" in options:
        given["slots_per_gpu"] = int(options["--slots-per-gpu"])
    if "--pool" in options:
        given["pool"] = options["--pool"]
    given["socket"] = os.path.join(directory, SOCKET_NAME)
    stopper = threading.Thread(target=_stop_at_eof, args=(given["socket"],), daemon=True)
    stopper.start()
    given["state_dir"] = os.path.join(directory, "state")
    try:
        serve_main(None, given)
    except RpoolAgentError as exc:
        print(f"rpool-agent: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
