"""What the commands share: how a command is declared, the help layout, value types, and
the options more than one command takes, each declared once here.

A command module's `register(commands)` calls `add_command` once per command and adds its
options; nothing is parsed twice and nothing is declared twice.
"""

from __future__ import annotations

import argparse
import os
import sys

TYPE_CHECKING = False  # not typing's: `detect` and `run` do not import typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..client import Client

    Handler = Callable[[argparse.Namespace], int]
    Commands = Any  # what `add_subparsers()` returns: it has `add_parser`

PROG = "rpool-agent"
#: The pool file forms (`formats.FORMATS`, spelled out so that `run` does not import the
#: formats package; tests/test_cli.py checks the two agree).
POOL_FORMATS = ("canary", "canary-nodes", "ctest")
FORMS_HELP = "canary (flat, canary-wm <= 26.4), canary-nodes (canary-wm >= 26.9) or ctest"


class UsageError(Exception):
    """A command line the parser took but the command cannot use: usage and exit 2."""


class Command:
    """One command: `doc`'s first line is its entry in the command list and the whole of
    it the description in its own --help; `declare(parser)` adds its options;
    `handler(args)` runs it and returns the exit status."""

    __slots__ = ("declare", "doc", "handler", "name", "usage")

    def __init__(
        self,
        name: str,
        doc: str,
        declare: Callable[[argparse.ArgumentParser], None] | None,
        handler: Handler,
        *,
        usage: str | None = None,
    ) -> None:
        self.name, self.doc, self.declare, self.handler = name, doc, declare, handler
        self.usage = usage

    @property
    def summary(self) -> str:
        return self.doc.split("\n", 1)[0]


_width: list[int] = []  # help_width()'s answer, found once


def help_width() -> int:
    """The width argparse would pick ($COLUMNS, else the terminal's, else 80), found
    without `shutil`, which argparse imports for every formatter it makes."""
    if not _width:
        try:
            columns = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        _width.append(max(40, columns - 2))
    return _width[0]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their paragraphs and lists; option names get a wide column. Names
    are never cut (argparse wraps only the help text), whatever the width."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=help_width())


def new_parser(**kwargs: object) -> argparse.ArgumentParser:
    """A parser with our conventions: no abbreviated options (`--hyper` would silently
    become `--hyperthreads`, and change meaning when an option is added)."""
    return argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        allow_abbrev=False,
        **kwargs,  # type: ignore[arg-type]
    )


def add_command(commands: Commands, command: Command) -> argparse.ArgumentParser:
    """`command`'s parser, in the subcommands `commands`."""
    parser = commands.add_parser(
        command.name,
        help=command.summary,
        description=command.doc,
        usage=command.usage,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    if command.declare is not None:
        command.declare(parser)
    parser.set_defaults(handler=command.handler, command_parser=parser)
    return parser


# --- value types: argparse names the option in front of the message ----------------------


def number(kind: type, minimum: float, what: str) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, refused below `minimum` as "expected `what`"."""

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:  # NaN passes, as it did: the library says what is wrong with it
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


count = number(int, 0, "a whole number >= 0")
positive = number(int, 1, "a whole number >= 1")
seconds = number(float, 0, "a number of seconds >= 0")


# --- options more than one command takes ---------------------------------------------------


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE (replaced atomically: readers never see half), not stdout",
    )


def add_pool_shape(parser: argparse.ArgumentParser) -> None:
    """How detected hardware becomes a pool (detect, serve). Unset stays None, so that
    `serve` lets its config file decide."""
    parser.add_argument(
        "--hyperthreads",
        action=argparse.BooleanOptionalAction,
        help="one cpu per hardware thread, not per core (default: per core)",
    )
    parser.add_argument(
        "--slots-per-gpu",
        type=positive,
        metavar="N",
        help="slots per GPU, so that N tests can share one (default: 1)",
    )
    parser.add_argument(
        "--mig",
        action=argparse.BooleanOptionalAction,
        help="a MIG-mode GPU: offer its MIG devices (the default), or leave it out",
    )


def add_request(parser: argparse.ArgumentParser) -> None:
    """What to lease and how long to wait for it (run, acquire)."""
    parser.add_argument(
        "--gpus", type=count, default=0, metavar="N", help="number of distinct GPUs"
    )
    parser.add_argument(
        "--cpus", type=count, default=0, metavar="N", help="number of distinct cpus (cores)"
    )
    parser.add_argument(
        "--request",
        metavar="REQUEST",
        help="instead of --gpus/--cpus: a CTest RESOURCE_GROUPS string ('2,gpus:1;cpus:4')"
        " or JSON (a list of items, or a mapping of type to count)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        help="give up (exit 125) if not granted within SECONDS (default: wait)",
    )
    parser.add_argument(
        "--label", metavar="TEXT", help="shown in `status` next to the lease or waiter"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="say nothing while waiting (else stderr says what is awaited, the queue"
        " position and who holds it; docs/status.md)",
    )


def request_args(args: argparse.Namespace) -> dict[str, object]:
    """`add_request`'s values, as `run_in_lease`/`acquire_for_script` take them."""
    return {
        "gpus": args.gpus,
        "cpus": args.cpus,
        "request": args.request,
        "timeout": args.timeout,
        "label": args.label,
        "quiet": args.quiet,
    }


def echo(text: str, *, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout)


def tell_agent(call: Callable[[Client], object], done: str) -> int:
    """One request to the local agent, then `done` on stdout (drain, undrain, release).
    A refusal raises, for `main` to print as one line."""
    from ..client import Client

    with Client() as c:
        call(c)
    echo(done)
    return 0
