"""Commands of the agent's clients: `run` and `acquire` lease, `release` ends a lease,
`status` shows the pool.

`run` sits in front of every command a harness leases for: its path imports neither
asyncio nor dataclasses (tests/test_run_cli.py).
"""

from __future__ import annotations

import argparse

from .options import Command, UsageError, add_request, echo, request_args, tell_agent

RUN_DOC = """\
Lease resources, then exec CMD inside the lease.

CMD comes after `--`; options after CMD are CMD's own. In CMD's arguments,
{ctest_spec}, {pool} and {pool_nodes} become the paths of the lease as a CTest
resource spec and as canary pool files (see docs/run.md). The lease lasts
exactly as long as CMD.

exit status:
  CMD's own when CMD ran
  125       run itself failed: no agent, request refused or not granted in time
  126, 127  CMD cannot be executed / was not found (as env(1) and timeout(1))
  2         usage error"""


def declare_run(p: argparse.ArgumentParser) -> None:
    add_request(p)
    p.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]", help="the command to run"
    )


def declare_acquire(p: argparse.ArgumentParser) -> None:
    add_request(p)
    p.add_argument(
        "--holder",
        type=int,
        metavar="PID",
        help="the process whose lifetime the lease follows (default: the parent, i.e. the"
        " shell that evals the output)",
    )


def declare_release(p: argparse.ArgumentParser) -> None:
    p.add_argument("lease", metavar="LEASE", help="lease id ($RPOOL_LEASE_ID)")


def declare_status(p: argparse.ArgumentParser) -> None:
    from .options import number

    p.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="the agent's status reply as JSON (schema: docs/status.md)",
    )
    p.add_argument(
        "--all",
        dest="everything",
        action="store_true",
        help="every lease, waiter and instance (default: the first 100 of each, all GPUs)",
    )
    p.add_argument(
        "--watch", action="store_true", help="redraw the view as it changes, until Ctrl-C"
    )
    p.add_argument(
        "--interval",
        type=number(float, 0.1, "a number of seconds >= 0.1"),
        default=0.5,
        metavar="SECONDS",
        help="with --watch: how often to ask the agent (default 0.5)",
    )


def quiet_ctrl_c() -> None:
    """Ctrl-C while a lease is awaited exits 130 at once, wherever the interpreter is: a
    KeyboardInterrupt that lands mid-import (the wait report imports as it first draws)
    could end the process by SIGINT instead, and nothing needs undoing: the request goes
    with the connection. exec gives the command the default SIGINT back."""
    import os
    import signal

    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def run(args: argparse.Namespace) -> int:
    from ..errors import RpoolAgentError
    from ..runner import RUN_FAILED, run_in_lease

    cmd = command_of(args)
    quiet_ctrl_c()
    try:
        return run_in_lease(cmd, **request_args(args))  # type: ignore[arg-type]
    except RpoolAgentError as exc:
        echo(f"rpool-agent: {exc}", err=True)
        return RUN_FAILED


def command_of(args: argparse.Namespace) -> list[str]:
    """`run`'s CMD: what follows the options, less the `--` that argparse keeps."""
    cmd: list[str] = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("no command given (put it after --)")
    return cmd


def acquire(args: argparse.Namespace) -> int:
    from ..runner import acquire_for_script

    quiet_ctrl_c()
    echo(acquire_for_script(holder=args.holder, **request_args(args)))  # type: ignore[arg-type]
    return 0


def release(args: argparse.Namespace) -> int:
    return tell_agent(lambda c: c.release(args.lease), f"released {args.lease}")


def status(args: argparse.Namespace) -> int:
    from ..client import Client
    from ..runner import format_status

    if args.watch:
        if args.as_json:
            raise UsageError("--watch shows the human view; --json is for one reply")
        if not args.interval < float("inf"):  # NaN and inf pass the type's minimum
            raise UsageError(f"--interval: expected a number of seconds, got {args.interval}")
        from ..status_watch import watch

        with Client() as c:
            watch(c, interval=args.interval)
        return 0
    with Client() as c:
        snap = c.status(all=args.everything)
    if args.as_json:
        import json

        echo(json.dumps(snap, indent=2))
    else:
        echo(format_status(snap))
    return 0


COMMANDS = (
    Command("run", RUN_DOC, declare_run, run, usage="%(prog)s [OPTIONS] -- CMD [ARG ...]"),
    Command(
        "acquire",
        "Lease for a script: print `export` lines to eval.\n\n"
        '  eval "$(rpool-agent acquire --gpus 1)"\n\n'
        "The lease lasts as long as the holder process (the caller, a shell) lives, or\n"
        "until `rpool-agent release $RPOOL_LEASE_ID`.",
        declare_acquire,
        acquire,
    ),
    Command("release", "Release a lease now (yours, or any as root).", declare_release, release),
    Command("status", "Free and used slots per type, leases and waiters.", declare_status, status),
)
