"""The typer-free fast path of `detect` behaves exactly like the typer command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpool_agent.detect_cmd import OPTIONS, parse_fast

TREE = Path(__file__).resolve().parent / "trees" / "two_socket_ht"


def test_fast_parser_knows_exactly_the_typer_options() -> None:
    import typer.main

    from rpool_agent.cli import app

    command = typer.main.get_command(app).commands["detect"]  # type: ignore[attr-defined]
    typer_opts = {
        o: (p.name, not p.is_flag) for p in command.params for o in p.opts if o != "--help"
    }
    assert typer_opts == OPTIONS  # same names, same parameters, same flags


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--format", "json", "--mig"], {"form": "json", "mig": True}),
        (["--format=ctest", "-fjson"], {"form": "json"}),  # the last one wins
        (["-o", "-", "--output=x.yaml"], {"output": "x.yaml"}),
        (["-o-", "--slots-per-gpu=2"], {"output": "-", "slots_per_gpu": "2"}),
        (["--format="], {"form": ""}),  # as click: an empty value, refused later
        (["--help"], None),
        (["-h"], None),
        (["--mig=yes"], None),
        (["--format"], None),
        (["--sysroot", "--mig"], None),
        (["--hyper"], None),  # click does not complete abbreviations (argparse did)
        (["--", "--mig"], None),
        (["extra"], None),
        ([""], None),
    ],
)
def test_parse_fast_reads_as_click_or_gives_up(
    argv: list[str], expected: dict[str, object] | None
) -> None:
    assert parse_fast(argv) == expected


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
        [f"--sysroot={TREE}", "-fjson", "--slots-per-gpu=3"],
        ["--sysroot", str(TREE), "--slots-per-gpu", "0"],
        ["--sysroot", str(TREE), "--mig=yes"],
        ["--sysroot", str(TREE), "--hyper"],
    ],
)
def test_fast_path_matches_typer(args: list[str]) -> None:
    fast, slow = run(args, fast=True), run(args, fast=False)
    slow_err = slow.stderr.replace("python -m rpool_agent.cli", "rpool-agent")  # usage lines
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow_err)
    assert "Traceback" not in fast.stderr
    ok = not {"xml", "/nonexistent", "0", "--mig=yes", "--hyper"} & set(args)
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
