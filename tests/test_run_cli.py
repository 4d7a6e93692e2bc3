"""`rpool-agent run`'s command line: where the options end and the command begins, usage
errors, what its start-up imports, and a quiet Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, running_agent, wait_until

from rpool_agent.cli import build_parser
from rpool_agent.cli.leases import command_of
from rpool_agent.cli.options import UsageError

RUN = [sys.executable, "-m", "rpool_agent.cli", "run"]


@pytest.mark.parametrize(
    ("argv", "options", "cmd"),
    [
        (["--", "true"], {}, ["true"]),
        (["--gpus", "2", "--gpus=1", "--", "ctest", "-j8"], {"gpus": 1}, ["ctest", "-j8"]),
        (["--label", "a b", "--", "x", "--", "--gpus"], {"label": "a b"}, ["x", "--", "--gpus"]),
        (["--gpus", "1", "sh", "--gpus", "3"], {"gpus": 1}, ["sh", "--gpus", "3"]),  # CMD's own
        (["--cpus", "2", "--", "--help"], {"cpus": 2}, ["--help"]),  # a command named --help
        (["--timeout", "nan", "--", "true"], {}, ["true"]),  # the library refuses NaN (125)
    ],
)
def test_options_end_where_the_command_begins(
    argv: list[str], options: dict[str, Any], cmd: list[str]
) -> None:
    args = build_parser().parse_args(["run", *argv])
    assert command_of(args) == cmd
    for name, value in options.items():
        assert getattr(args, name) == value


def test_no_command_is_a_usage_error() -> None:
    for argv in (["--gpus", "1"], ["--gpus", "1", "--"]):
        with pytest.raises(UsageError, match="no command given"):
            command_of(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--gpus", "-1", "--", "true"], "argument --gpus: expected a whole number >= 0"),
        (["--gpus", "x", "--", "true"], "argument --gpus: expected a whole number >= 0"),
        (["--timeout", "-1", "--", "true"], "argument --timeout: expected a number of seconds"),
        (["--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["--gpu", "1", "--", "true"], "unrecognized arguments: --gpu"),  # no abbreviations
        (["--label", "--", "true"], "argument --label: expected one argument"),
        (["--gpus", "1", "--"], "no command given (put it after --)"),
    ],
)
def test_usage_errors_exit_2_before_any_agent_is_asked(
    tmp_path: Path, argv: list[str], says: str
) -> None:
    env = {"RPOOL_AGENT_SOCKET": str(tmp_path / "none.sock"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*RUN, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: rpool-agent run [OPTIONS] -- CMD [ARG ...]\n")
    assert done.stderr.splitlines()[-1].startswith(f"rpool-agent run: error: {says}")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running_agent(tmp_path_factory.mktemp("run-cli"), gpu_pool(2)) as agent:
        yield agent


# `run` as its console script starts it, logging each module it imports (an `import`
# statement run, of a module loaded already too: an editable install's finder loads some
# at start-up) and each module that gets loaded, until it execs the command.
_SPY = """
import builtins, sys
log, real = open(sys.argv.pop(1), "w", buffering=1), builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        log.write(name + "\\n")
    before = set(sys.modules)
    module = real(name, globals, locals, fromlist, level)
    log.writelines(m + "\\n" for m in set(sys.modules) - before)
    return module
builtins.__import__ = spy
sys.argv[0] = "rpool-agent"
from rpool_agent.cli import main
main()
"""


def run_imports(agent: Agent, tmp_path: Path, *argv: str) -> set[str]:
    log = tmp_path / "imports"
    cmd = [sys.executable, "-c", _SPY, str(log), "run", *argv, "--", "true"]
    r = subprocess.run(cmd, env=agent.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(log.read_text().split())


def test_run_imports_nothing_it_does_not_use(agent: Agent, tmp_path: Path) -> None:
    """Each costs `run` milliseconds against a 3x `python -c pass` budget (bench/run.py)."""
    imported = run_imports(agent, tmp_path, "--gpus", "1")
    assert "rpool_agent.runner" in imported
    # msgspec (the agent's codec) imports typing and more: the client decodes with json;
    # contextlib is for --quiet only
    heavy = ("typer", "click", "asyncio", "shutil", "typing", "dataclasses", "inspect")
    heavy += ("msgspec", "contextlib")
    assert not {m for m in imported if m.split(".")[0] in heavy}
    # the lease's value types, the pool model and the formats are for the lease files the
    # agent writes: run builds the environment from the grant document (handoff_env)
    ours = ("rpool_agent.pool", "rpool_agent.formats", "rpool_agent.handoff")
    assert not {m for m in imported if m in ours or m.startswith("rpool_agent.formats.")}
    assert "contextlib" in run_imports(agent, tmp_path, "--gpus", "1", "--quiet")  # the spy sees


def test_ctrl_c_while_waiting_is_a_quiet_130(agent: Agent) -> None:
    with agent.client() as c, c.acquire(gpus=2):  # so that run waits in the queue
        proc = subprocess.Popen(
            [*RUN, "--gpus", "1", "--", "true"],
            env=agent.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: len(agent.status()["waiters"]) == 1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out) == (130, "")  # no traceback, just what it waited for
        # the one line saying it waits, if it came before the signal (test_wait_report.py)
        assert all(ln.startswith("rpool-agent: waiting ") for ln in err.splitlines())
        assert len(err.splitlines()) <= 1
        wait_until(lambda: not agent.status()["waiters"])  # its request went with it
