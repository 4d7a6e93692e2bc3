"""`rpool-agent job -- CMD`: a private agent for one Slurm or Flux job, for CMD's lifetime.

The scheduler hands the job its CPUs (affinity, cgroup cpuset) and GPUs
(`CUDA_VISIBLE_DEVICES`); a child inherits both, and detect reads both, so an agent
started inside the allocation offers exactly what the job was given and nothing else.
Its socket lives in a fresh 0700 directory under the job's temporary directory, so only
the job's user reaches it, and `RPOOL_AGENT_SOCKET` points CMD's harnesses there
(`rpool-agent run`, the pytest plugin, `Client()`): concurrent ctest, pytest and canary
runs inside one job share the allocation without stepping on each other's GPUs.

The agent says it is ready the way it tells systemd (`READY=1` on `NOTIFY_SOCKET`), so
CMD starts only once leases can be granted. When CMD ends the agent is stopped and the
directory removed; SIGTERM, SIGINT and SIGHUP reach CMD first (Slurm's time limit).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from .errors import RpoolAgentError

#: The `rpool-agent` command line, whichever way this package was installed.
AGENT = [sys.executable, "-m", "rpool_agent.cli"]
SOCKET_ENV = "RPOOL_AGENT_SOCKET"


class JobAgentError(RpoolAgentError):
    """The job's private agent could not be started: CMD was not run."""

    exit_code = 125  # as `run`: the wrapper failed, not the command


def job_tmpdir(env: Mapping[str, str]) -> str:
    """Where the job may write privately: Flux's per-job directory, else `TMPDIR` (Slurm's
    job_container/tmpfs makes it per job), else /tmp."""
    for name in ("FLUX_JOB_TMPDIR", "TMPDIR"):
        path = env.get(name)
        if path and os.path.isdir(path):
            return path
    return tempfile.gettempdir()


def run_job(
    command: Sequence[str],
    *,
    serve_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60.0,
) -> int:
    """Start a private agent, run `command` with `RPOOL_AGENT_SOCKET` set, stop the agent.

    Returns the command's exit status (128 + N when signal N ended it). Raises
    JobAgentError when the agent does not come up (its own message is on stderr).
    """
    if not command:
        raise JobAgentError("no command to run: rpool-agent job -- CMD [ARGS...]")
    base = dict(os.environ if env is None else env)
    home = tempfile.mkdtemp(prefix="rpool-job.", dir=job_tmpdir(base))  # mode 0700
    agent: subprocess.Popen[bytes] | None = None
    try:
        sock = os.path.join(home, "agent.sock")
        agent = _start_agent(home, sock, serve_args, base, ready_timeout)
        return _run(command, {**base, SOCKET_ENV: sock})
    finally:
        if agent is not None:
            _stop(agent)
        shutil.rmtree(home, ignore_errors=True)


def _start_agent(
    home: str,
    sock: str,
    serve_args: Sequence[str],
    env: dict[str, str],
    ready_timeout: float,
) -> subprocess.Popen[bytes]:
    """`rpool-agent serve` on `sock`, returned once it has said READY=1."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind(os.path.join(home, "notify"))
        args = ["serve", "--socket", sock, "--state-dir", os.path.join(home, "state")]
        args += ["--socket-mode", "0600", *serve_args]
        agent_env = {**env, "NOTIFY_SOCKET": notify.getsockname(), SOCKET_ENV: sock}
        agent = subprocess.Popen([*AGENT, *args], env=agent_env, stdin=subprocess.DEVNULL)
        try:
            _wait_ready(notify, agent, ready_timeout)
        except BaseException:
            _stop(agent)
            raise
        return agent
    finally:
        notify.close()


def _wait_ready(notify: socket.socket, agent: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        # The agent exiting is the other answer; its message is already on stderr.
        readable, _, _ = select.select([notify], [], [], 0.05)
        if readable and b"READY=1" in notify.recv(4096).split(b"\n"):
            return
        code = agent.poll()
        if code is not None:
            raise JobAgentError(f"the job's agent exited with status {code} before it was ready")
        if time.monotonic() > deadline:
            raise JobAgentError(f"the job's agent was not ready after {timeout:g} s")


def _run(command: Sequence[str], env: dict[str, str]) -> int:
    """`command` as a child; the signals a scheduler sends the job are passed on to it."""
    try:
        child = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        print(f"rpool-agent: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda n, _f: child.send_signal(n)) for s in forwarded}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def _stop(agent: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the agent stops cleanly on it), then SIGKILL if it will not go."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
