"""The `rpool-agent` console script: a plain `detect` or `run` skips typer, the rest goes
to cli.

Importing typer costs several times what `detect` itself does, and `detect` runs in every
job's prologue, `run` around every command a harness leases for; see fastargs.py.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["detect"]:
        from .detect_cmd import fast_main

        code = fast_main(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    elif sys.argv[1:2] == ["run"]:
        from .run_cmd import fast_main as run_fast_main

        code = run_fast_main(sys.argv[2:])
        if code is not None:
            sys.exit(code)
    from .cli import main as cli_main

    cli_main()
