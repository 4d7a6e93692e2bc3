"""Options read as click reads them, without importing click: for the commands a node
runs most (`detect` in every job's prologue, `run` around every wrapped command), where
typer's import costs more than the command itself. Anything not read exactly as click
would read it is left to typer (the caller gets None), which then runs the command or
prints the proper usage error; tests/test_detect_cli.py and tests/test_run_cli.py check
that both paths know the same options and answer alike.
"""

from __future__ import annotations

#: option -> (parameter name, takes a value)
Options = dict[str, tuple[str, bool]]


def parse_options(argv: list[str], options: Options) -> dict[str, str | bool] | None:
    """`argv` as {parameter: value}: `--opt value`, `--opt=value`, `-o value`, `-ovalue`,
    flags without a value, the last of a repeated option wins. None for anything else
    (help, a positional, `--`, an unknown option, a missing value, a value that looks
    like an option)."""
    got: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in options and arg[:2] in options and not arg.startswith("--"):
            name, eq, value = arg[:2], "=", arg[2:]  # -fjson
        if name not in options:
            return None
        param, takes_value = options[name]
        if not takes_value:
            if eq:
                return None  # --mig=yes: click refuses, typer says so
            got[param] = True
            continue
        if not eq:
            if i == len(argv) or (argv[i].startswith("-") and argv[i] != "-"):
                return None
            value = argv[i]
            i += 1
        got[param] = value
    return got
