"""`status` and `status --watch` as a person sees them: in a real terminal (tmux), read
back with `capture-pane`, which shows the screen as drawn (escapes applied, not printed).

Each test runs its own tmux server on a socket under tmp_path; every wait is for what the
screen shows, with a deadline.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_fixture import Agent, running_agent, wait_until

ME = pwd.getpwuid(os.getuid()).pw_name
RPOOL = f"{sys.executable} -m rpool_agent.cli"


@contextmanager
def terminal(
    tmux: str, tmp_path: Path, agent: Agent, command: str
) -> Iterator[tuple[Callable[[], str], Callable[..., None]]]:
    """A 160x40 tmux pane running `command` (then waiting, so the screen stays);
    yields (screen, keys): the pane's text now, and send-keys."""
    sock = str(tmp_path / "tmux.sock")
    base = [tmux, "-S", sock]
    env = {**agent.env, "TERM": "xterm-256color"}
    shell = f"{command}; echo exit=$?; read _"
    subprocess.run(
        [*base, "new-session", "-d", "-x", "160", "-y", "40", "-s", "t", shell],
        env=env,
        check=True,
        timeout=30,
    )

    def screen() -> str:
        done = subprocess.run(
            [*base, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True, timeout=30
        )
        return done.stdout

    def keys(*k: str) -> None:
        subprocess.run([*base, "send-keys", "-t", "t", *k], check=True, timeout=30)

    try:
        yield screen, keys
    finally:
        subprocess.run([*base, "kill-server"], capture_output=True, timeout=30)


def shows(screen: Callable[[], str], predicate: Callable[[list[str]], bool]) -> list[str]:
    """Wait until the screen's lines satisfy `predicate`; return them."""
    seen: list[list[str]] = []

    def check() -> bool:
        seen.append(screen().splitlines())
        return predicate(seen[-1])

    try:
        wait_until(check, timeout=20)
    except AssertionError:
        raise AssertionError("screen never matched:\n" + "\n".join(seen[-1])) from None
    return seen[-1]


def row(lines: list[str], first: str) -> list[str] | None:
    for ln in lines:
        if ln.split()[:1] == [first]:
            return ln.split()
    return None


def test_status_in_a_terminal(system_tool: Callable[[str], str], tmp_path: Path) -> None:
    tmux = system_tool("tmux")
    with running_agent(tmp_path) as agent, agent.client() as c:
        lease = c.acquire(gpus=1, label="nightly\x1b[31m")  # an escape: must not colour anything
        c.drain("gpus:3", "bad fan")
        with terminal(tmux, tmp_path, agent, f"{RPOOL} status") as (screen, _):
            lines = shows(screen, lambda ls: any(ln.startswith("exit=") for ln in ls))
        gpu = lease.gpus[0].index
    assert lines[0] == "gpus: 2 of 4 slots free (1 used, 1 drained)"
    assert lines[1].split() == ["ID", "UUID", "STATE", "PID", "USER", "COMMAND", "LABEL", "AGE"]
    held = row(lines, str(gpu))
    assert held is not None
    assert held[1:7] == [f"GPU-{gpu:08x}", "held", str(os.getpid()), ME, held[5], "nightly?[31m"]
    assert row(lines, "3") == ["3", "GPU-00000003", "drained:", "bad", "fan", "-", "-", "-"]
    # the columns line up as a person reads them: every row's STATE starts under STATE
    at = lines[1].index("STATE")
    assert all(ln[at - 2 : at] == "  " and ln[at] != " " for ln in lines[2:6])
    assert "exit=0" in lines


def test_status_watch_redraws_as_leases_come_and_go(
    system_tool: Callable[[str], str], tmp_path: Path
) -> None:
    tmux = system_tool("tmux")
    with running_agent(tmp_path) as agent, agent.client() as c:
        cmd = f"{RPOOL} status --watch --interval 0.1"
        with terminal(tmux, tmp_path, agent, cmd) as (screen, keys):
            first = shows(screen, lambda ls: "gpus: 4 of 4 slots free" in ls)
            assert first[0].startswith("Every 0.1s: rpool-agent status")
            lease = c.acquire(gpus=2, label="watch-me")
            ids = [str(g.index) for g in lease.gpus]

            def held(ls: list[str]) -> bool:
                return all((row(ls, i) or [])[2:3] == ["held"] for i in ids)

            lines = shows(screen, lambda ls: "gpus: 2 of 4 slots free (2 used)" in ls and held(ls))
            assert all("watch-me" in (row(lines, i) or []) for i in ids)
            lease.release()
            lines = shows(screen, lambda ls: "gpus: 4 of 4 slots free" in ls)
            assert "watch-me" not in "\n".join(lines)  # redrawn over, nothing left behind
            assert sum(ln.startswith("gpus:") for ln in lines) == 1  # in place, not scrolled
            keys("C-c")
            lines = shows(screen, lambda ls: any("exit=" in ln for ln in ls))
    text = "\n".join(lines)
    assert "exit=130" in text and "Traceback" not in text  # Ctrl-C: quiet, as the shell's


def test_watch_refuses_json_and_a_nan_interval(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        for args, says in (
            (["--watch", "--json"], "--json is for one reply"),
            (["--watch", "--interval", "nan"], "--interval"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "rpool_agent.cli", "status", *args],
                env=agent.env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr
