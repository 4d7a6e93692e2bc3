"""`rpool-agent job -- CMD`: a private agent for one Slurm or Flux job, for CMD's lifetime.

The scheduler hands the job its CPUs (affinity, cgroup cpuset) and GPUs
(`CUDA_VISIBLE_DEVICES`); a child inherits both, and detect reads both, so an agent
started inside the allocation offers exactly what the job was given and nothing else.
It is the pytest plugin's private agent (private_agent.py): its socket in a fresh 0700
directory under the job's `TMPDIR` (Slurm's job_container/tmpfs and Flux's job shell make
that per job), and it stops itself when this process goes, SIGKILL included.
`RPOOL_AGENT_SOCKET` points CMD's harnesses at it (`rpool-agent run`, the pytest plugin,
`Client()`), so concurrent ctest, pytest and canary runs inside one job share the
allocation without stepping on each other's GPUs. SIGTERM, SIGINT and SIGHUP reach CMD
(Slurm's time limit); when CMD ends the agent is stopped and its directory removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from .errors import AgentUnavailable, RpoolAgentError

SOCKET_ENV = "RPOOL_AGENT_SOCKET"
#: The CUDA_VISIBLE_DEVICES the job's agent was started with. A harness that sees the same
#: value knows RPOOL_AGENT_SOCKET already serves exactly its GPUs, and shares that agent
#: instead of starting its own on them (the pytest plugin's rule: docs/pytest.md).
JOB_DEVICES_ENV = "RPOOL_JOB_CUDA_VISIBLE_DEVICES"


class JobAgentError(RpoolAgentError):
    """The job's private agent could not be started: CMD was not run."""

    exit_code = 125  # as `run`: the wrapper failed, not the command


def run_job(command: Sequence[str], *, slots_per_gpu: int | None = None) -> int:
    """Start a private agent, run `command` with `RPOOL_AGENT_SOCKET` set, stop the agent.

    Returns the command's exit status (128 + N when signal N ended it). Raises
    JobAgentError when the agent does not come up.
    """
    from . import private_agent

    if not command:
        raise JobAgentError("no command to run: rpool-agent job -- CMD [ARGS...]")
    try:
        agent = private_agent.start(slots_per_gpu=slots_per_gpu)
    except AgentUnavailable as exc:
        raise JobAgentError(f"the job's agent: {exc}") from None
    env = {**os.environ, SOCKET_ENV: agent.socket}
    if "CUDA_VISIBLE_DEVICES" in env:
        env[JOB_DEVICES_ENV] = env["CUDA_VISIBLE_DEVICES"]
    try:
        return _run(command, env)
    finally:
        agent.stop()


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
