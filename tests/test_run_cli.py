"""The typer-free fast path of `run` behaves exactly like the typer command."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, running_agent, wait_until

from rpool_agent.run_cmd import OPTIONS, parse_fast

FAST = "import sys; from rpool_agent.entry import main; sys.argv[0]='rpool-agent'; main()"


def test_fast_parser_knows_exactly_the_typer_options() -> None:
    import typer.main

    from rpool_agent.cli import app

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    typer_opts = {
        o: (p.name, not p.is_flag)
        for p in command.params
        for o in p.opts
        if o != "--help" and p.name != "cmd"
    }
    assert typer_opts == OPTIONS


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--", "true"], ({}, ["true"])),
        (["--gpus", "2", "--gpus=1", "--", "ctest", "-j8"], ({"gpus": "1"}, ["ctest", "-j8"])),
        (["--label", "a b", "--", "x", "--", "--gpus"], ({"label": "a b"}, ["x", "--", "--gpus"])),
        (["--gpus", "1", "true"], None),  # no --: click decides what is the command
        (["--gpus", "1", "--"], None),  # no command
        (["--help", "--", "true"], None),
        (["--label", "--", "true"], None),  # a value that looks like an option
        (["--gpu", "1", "--", "true"], None),  # click completes no abbreviation
    ],
)
def test_parse_fast_reads_as_click_or_gives_up(argv: list[str], expected: Any) -> None:
    assert parse_fast(argv) == expected


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_agent(tmp_path_factory.mktemp("run-cli"), gpu_pool(2)) as agent:
        yield agent


def run(agent: Agent, args: list[str], *, fast: bool) -> subprocess.CompletedProcess[str]:
    head = [sys.executable, "-c", FAST] if fast else [sys.executable, "-m", "rpool_agent.cli"]
    return subprocess.run(
        [*head, "run", *args], env=agent.env, capture_output=True, text=True, timeout=60
    )


SHOW = ["sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES $OMP_NUM_THREADS $RPOOL_GPU_IDS"; exit 3']


@pytest.mark.parametrize(
    "args",
    [
        ["--gpus", "1", "--", *SHOW],
        ["--gpus=2", "--cpus", "2", "--label", "lbl", "--", *SHOW],
        ["--request", "gpus:1", "--timeout", "5", "--", *SHOW],
        ["--gpus", "9", "--", "true"],  # never grantable: 125, one line
        ["--gpus", "1", "--timeout", "nan", "--", "true"],
        ["--gpus", "1", "--", "/nonexistent/cmd"],  # 127
        ["--gpus", "-1", "--", "true"],  # usage errors: typer's own words, both ways
        ["--gpus", "x", "--", "true"],
        ["--bogus", "--", "true"],
        ["--gpus", "1", "--"],
        ["--gpus", "1", *SHOW[:1], "-c", "exit 4"],  # no --: typer decides, both ways
    ],
)
def test_fast_path_matches_typer(agent: Agent, args: list[str]) -> None:
    fast, slow = run(agent, args, fast=True), run(agent, args, fast=False)
    slow_err = slow.stderr.replace("python -m rpool_agent.cli", "rpool-agent")  # usage lines
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow_err)
    assert "Traceback" not in fast.stderr
    assert fast.returncode != 0  # each case fails in its own way (3 from SHOW's exit)


def test_fast_path_imports_no_typer_asyncio_or_dataclasses(agent: Agent, tmp_path: Path) -> None:
    # -X importtime lists every import the run process made before it exec'd the command
    cmd = [sys.executable, "-X", "importtime", "-c", FAST, "run", "--gpus", "1", "--", "true"]
    r = subprocess.run(cmd, env=agent.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()}
    assert "rpool_agent.runner" in imported
    heavy = ("typer", "click", "asyncio", "dataclasses")  # 40 / 10 / 8 ms on this VM
    assert not {m for m in imported if m.split(".")[0] in heavy}


def test_ctrl_c_while_waiting_is_a_quiet_130_both_ways(agent: Agent) -> None:
    with agent.client() as c, c.acquire(gpus=2):  # so that run waits in the queue
        for head in ([sys.executable, "-c", FAST], [sys.executable, "-m", "rpool_agent.cli"]):
            proc = subprocess.Popen(
                [*head, "run", "--gpus", "1", "--", "true"],
                env=agent.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            assert (proc.returncode, out, err) == (130, "", "")  # no traceback
            wait_until(lambda: not agent.status()["waiters"])  # its request went with it
