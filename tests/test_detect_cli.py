"""The typer-free fast path of `detect` behaves exactly like the typer command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpool_agent.detect_cmd import fast_parser

TREE = Path(__file__).resolve().parent / "trees" / "two_socket_ht"


def test_fast_parser_knows_exactly_the_typer_options() -> None:
    import typer.main

    from rpool_agent.cli import app

    command = typer.main.get_command(app).commands["detect"]  # type: ignore[attr-defined]
    typer_opts = {o for p in command.params for o in p.opts if o != "--help"}
    fast_opts = {o for a in fast_parser()._actions for o in a.option_strings}
    assert fast_opts == typer_opts


def run(args: list[str], *, fast: bool) -> subprocess.CompletedProcess[str]:
    if fast:
        code = "import sys; from rpool_agent.entry import main; sys.argv[0]='rpool-agent'; main()"
        cmd = [sys.executable, "-c", code, "detect", *args]
    else:
        cmd = [sys.executable, "-m", "rpool_agent.cli", "detect", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["--sysroot", str(TREE)],
        ["--sysroot", str(TREE), "--format", "ctest", "--hyperthreads"],
        ["--sysroot", str(TREE), "-f", "canary-nodes", "--slots-per-gpu", "2"],
        ["--sysroot", str(TREE), "--format", "xml"],
        ["--sysroot", "/nonexistent"],
    ],
)
def test_fast_path_matches_typer(args: list[str]) -> None:
    fast, slow = run(args, fast=True), run(args, fast=False)
    assert (fast.returncode, fast.stdout, fast.stderr) == (
        slow.returncode,
        slow.stdout,
        slow.stderr,
    )
    assert "Traceback" not in fast.stderr
    ok = "xml" not in args and "/nonexistent" not in args
    assert (fast.returncode == 0) == ok
    assert ("cpus" in fast.stdout) == ok


def test_fast_path_does_not_import_typer() -> None:
    code = (
        "import sys; from rpool_agent.entry import main; sys.argv=['rpool-agent','detect',"
        f"'--sysroot',{str(TREE)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('typer' in sys.modules, file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stderr.strip().splitlines()[-1] == "False"
