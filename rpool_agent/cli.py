"""The `rpool-agent` command line: typer commands that call into the library.

Every command imports what it needs inside its body, so `rpool-agent detect` never pays
for the server, and `rpool-agent run` never imports asyncio. Errors from the library
(`RpoolAgentError`) become one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ._version import __version__

app = typer.Typer(
    name="rpool-agent",
    help="Detect this node's CPUs and GPUs, and lease them to concurrent test harnesses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rpool-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """rpool-agent: the node-local authority over CPUs and GPUs."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise (`raise fail(...)`)."""
    typer.echo(f"rpool-agent: {message}", err=True)
    return typer.Exit(code)


# --- commands (one section each; keep bodies thin, logic lives in the library) ---------


def main() -> None:
    """Console-script entry point: the library's errors become one line, not a traceback."""
    from .errors import RpoolAgentError

    try:
        app()
    except RpoolAgentError as exc:
        typer.echo(f"rpool-agent: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
