"""`rpool-agent run`'s fast path: the same options, read without typer.

`run` wraps every command a harness leases for, and importing typer costs more than the
rest of `run` together (docs/run.md has the numbers; tests/test_run_cli.py checks that
typer, asyncio and dataclasses stay out). `entry.main` hands `run [OPTIONS] -- CMD...`
here; anything else (no `--`, `--help`, a value click would refuse or read differently)
goes to typer as before.
"""

from __future__ import annotations

import sys

from .errors import RpoolAgentError
from .fastargs import Options, parse_options

#: `run`'s options as cli.py declares them: option -> (parameter, takes a value).
OPTIONS: Options = {
    "--gpus": ("gpus", True),
    "--cpus": ("cpus", True),
    "--request": ("request", True),
    "--timeout": ("timeout", True),
    "--label": ("label", True),
}


def parse_fast(argv: list[str]) -> tuple[dict[str, str | bool], list[str]] | None:
    """(options, command) from `argv` (after the word run); None: typer decides."""
    if "--" not in argv:
        return None
    at = argv.index("--")
    opts, cmd = parse_options(argv[:at], OPTIONS), argv[at + 1 :]
    return None if opts is None or not cmd else (opts, cmd)


def fast_main(argv: list[str]) -> int | None:
    """Run `run` from `argv`; None: let typer handle it. Returns only if exec failed."""
    parsed = parse_fast(argv)
    if parsed is None:
        return None
    opts, cmd = parsed
    try:  # as click's INT and FLOAT: int() / float() of the text, then the range
        gpus, cpus = int(str(opts.get("gpus", 0))), int(str(opts.get("cpus", 0)))
        timeout = float(str(opts["timeout"])) if "timeout" in opts else None
    except ValueError:
        return None
    if gpus < 0 or cpus < 0 or (timeout is not None and timeout < 0):
        return None  # typer names the option and its range
    from .runner import RUN_FAILED, run_in_lease

    request, label = opts.get("request"), opts.get("label")
    try:
        return run_in_lease(
            cmd,
            gpus=gpus,
            cpus=cpus,
            request=None if request is None else str(request),
            timeout=timeout,
            label=None if label is None else str(label),
        )
    except RpoolAgentError as exc:
        sys.stderr.write(f"rpool-agent: {exc}\n")
        return RUN_FAILED
    except KeyboardInterrupt:  # Ctrl-C while waiting for the lease: quiet, as cli.main
        return 130
