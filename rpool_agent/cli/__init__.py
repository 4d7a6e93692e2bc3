"""The `rpool-agent` command line: one argparse parser for every command.

argparse, not typer/click: `detect` runs in every job's prologue and `run` in front of
every leased command, and their start-up budgets (docs/detect.md, docs/run.md) leave no
room for typer's import, which once made us parse those two a second time by hand.
argparse is in the standard library and loads in a fraction of that; its help wraps text
but never cuts an option name.

Each command module (`pools`, `leases`, `agent`, `cluster`, `units`) lists its commands in
COMMANDS: a `Command` names a function that declares its options and one that runs it.
A new command is an entry there, or a new module whose COMMANDS join the list below.
Command bodies import what they need when they run, so `detect` never pays for the
server and `run` never imports asyncio. Library errors (`RpoolAgentError`) become one
line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import sys

from . import agent, audit, cluster, leases, pools, units
from .options import PROG, UsageError, add_command, new_parser

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

#: Every command, in the order `--help` lists them.
COMMANDS = (
    *pools.COMMANDS,
    *leases.COMMANDS,
    *audit.COMMANDS,
    *agent.COMMANDS,
    *cluster.COMMANDS,
    *units.COMMANDS,
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, just that command's part (the one being run:
    making a parser per command is most of argparse's start-up)."""
    from .._version import __version__

    parser = new_parser(
        prog=PROG,
        description="Detect this node's CPUs and GPUs, and lease them to concurrent test"
        " harnesses.\n\nRun `rpool-agent COMMAND --help` for a command's options.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        if only is None or command.name == only:
            add_command(commands, command)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: parse, run the command, exit with its status."""
    argv = sys.argv[1:] if argv is None else argv
    named = argv[0] if argv and any(c.name == argv[0] for c in COMMANDS) else None
    parser = build_parser(only=named)
    args, unknown = parser.parse_known_args(argv)
    if not hasattr(args, "handler"):  # no command: say what there is
        parser.print_help(sys.stderr)
        sys.exit(2)
    if unknown:  # with the command's usage, not the top level's
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from ..errors import RpoolAgentError

    try:
        code = args.handler(args)
    except UsageError as exc:
        args.command_parser.error(str(exc))  # usage and the message, exit 2
    except RpoolAgentError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C while waiting for a lease: quiet, as the shell's
        code = 130
    sys.exit(code)
