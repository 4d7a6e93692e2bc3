"""`rpool-agent run`, `acquire` and `status` output: the client side of the CLI.

`run` execs the command in place of itself, and the command inherits the lease's
connection. The lease then lasts exactly as long as the command (and anything it leaves
holding the inherited fd): there is no wrapper process whose death (SIGKILL included)
could free the resources while the command still runs on them. Imports no asyncio.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from .errors import ConfigError, RequestError

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

#: `run`'s own failure (no agent, refused, timed out), told apart from the command's
#: statuses as env(1) and timeout(1) do: 126 cannot execute, 127 not found.
RUN_FAILED = 125


def parse_cli_request(request: str | None, gpus: int, cpus: int) -> Any:
    """`--request` (RESOURCE_GROUPS string, or JSON items/mapping) or `--gpus/--cpus`."""
    if request is not None:
        if gpus or cpus:
            raise RequestError("give either --request or --gpus/--cpus, not both")
        text = request.strip()
        if text[:1] in "[{":
            try:
                return json.loads(text)
            except ValueError as exc:
                raise RequestError(f"--request is not valid JSON: {exc}") from None
        return text
    wanted = {k: v for k, v in (("gpus", gpus), ("cpus", cpus)) if v}
    if not wanted:
        raise RequestError("nothing requested: give --gpus, --cpus or --request")
    return wanted


def run_in_lease(
    cmd: list[str],
    *,
    gpus: int = 0,
    cpus: int = 0,
    request: str | None = None,
    timeout: float | None = None,
    label: str | None = None,
    quiet: bool = False,
) -> int:
    """Acquire, then exec `cmd` inside the lease. Returns only if the exec fails.

    While the acquire waits, stderr says so (waiting.py) unless `quiet`."""
    from .client import Client
    from .handoff_env import lease_env, leased_cpus, substitute_args

    if not cmd:
        raise RequestError("no command given (put it after --)")
    wanted = parse_cli_request(request, gpus, cpus)
    client = Client().connect()
    with _wait_report(client, wanted, quiet) as report:
        doc = client.acquire_document(  # no `Lease`: the environment is built from the grant
            wanted,
            timeout=timeout,
            label=label or shlex.join(cmd)[:200],
            files=True,
            on_event=report and report.event,
        )
    _check_pool_placeholders(cmd, doc["resources"])
    env = lease_env(doc, os.environ)
    files = doc.get("files")
    argv = substitute_args(cmd, files) if files else list(cmd)
    fd = client.fileno()
    os.set_inheritable(fd, True)
    env["RPOOL_LEASE_FD"] = str(fd)
    set_affinity(leased_cpus(doc))
    sys.stdout.flush()
    sys.stderr.flush()
    _restore_signals()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"rpool-agent: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 0  # pragma: no cover - execvpe does not return


def _check_pool_placeholders(cmd: list[str], resources: dict[str, Any]) -> None:
    """Refuse `{pool}`/`{pool_nodes}` for a lease without cpus: canary gives every test at
    least one cpu, so a pool with none runs nothing ("no jobs to run", exit 7), and the
    command would seem to fail for reasons of its own."""
    if resources.get("cpus"):
        return
    for token in ("{pool_nodes}", "{pool}"):
        if any(token in arg for arg in cmd):
            raise RequestError(
                f"{token}: this lease holds no cpus, and canary runs no test on a pool"
                " without them: lease some too (--cpus N, or cpus in --request)"
            )


def set_affinity(cpus: list[int]) -> None:
    """Confine this process (and so the command) to the leased hardware CPUs.

    A lease without CPUs leaves the affinity as inherited. If none of the leased CPUs is
    one this process may run on (the agent serves a pool from another machine, or a
    cpuset excludes them), running anyway would put the command on CPUs the lease does
    not hold: refuse, in one line.
    """
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        from .probes.sysfs import format_cpulist

        allowed = format_cpulist(os.sched_getaffinity(0))
        raise ConfigError(
            f"cannot bind to the leased CPUs {format_cpulist(cpus)} ({exc.strerror}); "
            f"this process may run on {allowed} only: is the agent's pool from this machine?"
        ) from None


def _restore_signals() -> None:
    """Undo the SIG_IGN Python sets for SIGPIPE and SIGXFSZ, which exec would keep.

    Without this `rpool-agent run -- yes | head -1` has `yes` complain about a broken pipe
    instead of dying quietly; `subprocess` does the same reset (restore_signals=True).
    """
    import signal

    for name in ("SIGPIPE", "SIGXFSZ"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)


def acquire_for_script(
    *,
    gpus: int = 0,
    cpus: int = 0,
    request: str | None = None,
    timeout: float | None = None,
    label: str | None = None,
    holder: int | None = None,
    quiet: bool = False,
) -> str:
    """Lease bound to `holder`'s lifetime (default: our parent); `export` lines to eval."""
    from .client import Client

    wanted = parse_cli_request(request, gpus, cpus)
    pid = holder if holder is not None else os.getppid()
    with Client() as client, _wait_report(client, wanted, quiet, pid) as report:
        lease = client.acquire(
            wanted,
            timeout=timeout,
            label=label,
            holder_pid=pid,
            files=True,
            on_event=report and report.event,
        )
        env = lease.env(base={})
    env["RPOOL_LEASE_TOKEN"] = lease.token or ""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def _wait_report(client: Any, wanted: Any, quiet: bool, holder_pid: int | None = None) -> Any:
    """A WaitReport for this acquire (a context that erases its line), or a null context.
    contextlib only for `--quiet`: `run` imports nothing it does not use (test_run_cli.py)."""
    if quiet:
        import contextlib

        return contextlib.nullcontext(None)
    from .waiting import WaitReport

    return WaitReport(client.socket_path, wanted, holder_pid=holder_pid)


def format_status(snap: dict[str, Any]) -> str:
    """The human view of a status reply: one table per type (status_text.py)."""
    from .status_text import render_status

    return render_status(snap)
