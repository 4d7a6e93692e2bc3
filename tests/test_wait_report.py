"""`run` and `acquire` say that they wait: on a terminal a line redrawn in place, off a
terminal one line, with `--quiet` nothing. A real agent, real processes; the terminal is
a real pseudo-terminal (os.openpty) given to the waiting `run` as its stderr."""

from __future__ import annotations

import fcntl
import os
import pwd
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from agent_fixture import Agent, answer_within, running_agent, wait_until

RPOOL = [sys.executable, "-m", "rpool_agent.cli"]
ME = pwd.getpwuid(os.getuid()).pw_name


@contextmanager
def all_gpus_held(tmp_path: Path) -> Iterator[tuple[Agent, subprocess.Popen[bytes]]]:
    with running_agent(tmp_path) as agent:
        holder = subprocess.Popen(
            [*RPOOL, "run", "--gpus", "4", "--", "sleep", "60"], env=agent.env
        )
        try:
            wait_until(lambda: len(agent.status()["leases"]) == 1)
            yield agent, holder
        finally:
            holder.kill()
            holder.wait()


def test_off_a_terminal_run_says_once_what_it_waits_for(tmp_path: Path) -> None:
    with all_gpus_held(tmp_path) as (agent, holder):
        waiter = subprocess.Popen(
            [*RPOOL, "run", "--gpus", "1", "--", "true"],
            env=agent.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert waiter.stderr is not None
        with answer_within(30):
            line = waiter.stderr.readline()  # said while it waits, not after
        holder.kill()  # the lease is reaped, the waiter granted
        _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and err == ""  # and said once
    line = line.rstrip("\n")
    assert line.startswith("rpool-agent: waiting ")
    assert line.endswith(
        f"for gpus=1: position 1 in the queue; held by pid {holder.pid} ({ME}, sleep) "
        "on gpus 0,1,2,3"
    )


def read_until(fd: int, wanted: bytes, seen: bytearray, timeout: float = 20) -> None:
    """Read the terminal's output into `seen` until it holds `wanted` (or fail)."""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{wanted!r} not shown; got {bytes(seen)!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed: every writer has gone
                chunk = b""
            if not chunk:
                raise AssertionError(f"{wanted!r} not shown; got {bytes(seen)!r}")
            seen += chunk


def test_on_a_terminal_the_line_is_redrawn_then_erased(tmp_path: Path) -> None:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))  # 200 columns
    try:
        with all_gpus_held(tmp_path) as (agent, holder):
            waiter = subprocess.Popen(
                [*RPOOL, "run", "--gpus", "1", "--", "true"], env=agent.env, stderr=slave
            )
            seen = bytearray()
            read_until(master, b"position 1 in the queue", seen)
            read_until(master, f"({ME}, sleep) on gpus 0,1,2,3".encode(), seen)
            first = seen.count(b"\r\x1b[K")
            read_until(master, b"waiting 1s", seen)  # redrawn in place, a second later
            assert seen.count(b"\r\x1b[K") > first and b"\n" not in seen
            holder.kill()
            assert waiter.wait(30) == 0
        os.close(slave)
        slave = -1
        try:
            while chunk := os.read(master, 4096):
                seen += chunk
        except OSError:  # EIO: the terminal has no writer left
            pass
        assert seen.endswith(b"\r\x1b[K")  # the line is erased at the grant
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("command", ["run", "acquire"])
def test_quiet_says_nothing(tmp_path: Path, command: str) -> None:
    with all_gpus_held(tmp_path) as (agent, holder):
        args = ["--gpus", "1", "--quiet"]
        argv = (
            [*RPOOL, "run", *args, "--", "true"] if command == "run" else [*RPOOL, "acquire", *args]
        )
        quiet = subprocess.Popen(
            argv, env=agent.env, stderr=subprocess.PIPE, text=True, stdout=subprocess.DEVNULL
        )
        wait_until(lambda: len(agent.status()["waiters"]) == 1)
        # a second waiter, queued after it, speaks: by then the quiet one would have too
        loud = subprocess.Popen(
            [*RPOOL, "run", "--gpus", "1", "--", "true"],
            env=agent.env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: len(agent.status()["waiters"]) == 2)
            assert loud.stderr is not None
            with answer_within(30):
                assert "position 2 in the queue" in loud.stderr.readline()
            holder.kill()
            _, err = quiet.communicate(timeout=30)
            loud.communicate(timeout=30)
        finally:
            quiet.kill()
            loud.kill()
    assert quiet.returncode == 0 and err == ""


def test_acquire_for_a_shell_says_it_waits(tmp_path: Path) -> None:
    with all_gpus_held(tmp_path) as (agent, holder):
        shell = subprocess.Popen(["sleep", "60"])
        try:
            waiter = subprocess.Popen(
                [*RPOOL, "acquire", "--holder", str(shell.pid), "--gpus", "1"],
                env=agent.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            (w,) = agent.status()["waiters"]
            assert w["holder"]["pid"] == shell.pid  # the lease's holder-to-be, not the CLI
            holder.kill()
            out, err = waiter.communicate(timeout=30)
        finally:
            shell.kill()
            shell.wait()
    assert waiter.returncode == 0 and "export RPOOL_LEASE_ID=" in out
    (line,) = err.splitlines()
    assert "for gpus=1: position 1 in the queue; held by pid" in line


def test_a_run_granted_at_once_loads_none_of_it(tmp_path: Path) -> None:
    """No thread, no psutil, no second connection's rendering for the common case."""
    with running_agent(tmp_path) as agent:
        argv = [sys.executable, "-X", "importtime", *RPOOL[1:], "run", "--gpus", "1", "--", "true"]
        done = subprocess.run(argv, env=agent.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = {ln.rsplit("|", 1)[-1].strip() for ln in done.stderr.splitlines() if "|" in ln}
    assert "rpool_agent.runner" in loaded
    for heavy in ("threading", "psutil", "prometheus_client", "rich", "rpool_agent.status_text"):
        assert heavy not in loaded, heavy
