"""`rpool-agent detect` through the real script: each option reaches the probes, and bad
options are usage errors (exit 2) before anything is probed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpool_agent.detect import detect_pool
from rpool_agent.formats import dumps

TREE = Path(__file__).resolve().parent / "trees" / "two_socket_ht"
SCRIPT = Path(sys.executable).with_name("rpool-agent")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rpool_agent.cli"]


def detect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "detect", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "form", "shape"),
    [
        ([], "canary", {}),
        (["--format", "ctest", "--hyperthreads"], "ctest", {"hyperthreads": True}),
        (["-f", "canary-nodes", "--slots-per-gpu", "2"], "canary-nodes", {"slots_per_gpu": 2}),
        (["--format=ctest", "-fcanary", "--mig"], "canary", {"mig": True}),  # the last wins
        (["--hyperthreads", "--no-hyperthreads"], "canary", {}),
        (["-o-", "--slots-per-gpu=3"], "canary", {"slots_per_gpu": 3}),
    ],
)
def test_options_reach_the_probes(args: list[str], form: str, shape: dict[str, object]) -> None:
    done = detect("--sysroot", str(TREE), *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == dumps(detect_pool(str(TREE), **shape), form)  # type: ignore[arg-type]


def test_json_and_output_file(tmp_path: Path) -> None:
    out = tmp_path / "topology.json"
    done = detect(f"--sysroot={TREE}", "-fjson", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and '"numa"' in out.read_text()


def test_output_to_a_fifo_writes_into_it_and_leaves_it_a_fifo(tmp_path: Path) -> None:
    """`-o /dev/null` (or any device or FIFO) is written into, never renamed over: as root
    the old atomic rename replaced /dev/null itself with a regular file. A FIFO stands in
    for the device here so that a regression cannot break the machine running the test."""
    import os
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    done = detect(f"--sysroot={TREE}", "-fjson", "-o", str(fifo))
    reader.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and b'"numa"' in got[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temp file left


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "xml"], "argument -f/--format: invalid choice: 'xml'"),
        (["--format="], "argument -f/--format: invalid choice: ''"),
        (["--slots-per-gpu", "0"], "argument --slots-per-gpu: expected a whole number >= 1"),
        (["--slots-per-gpu", "two"], "argument --slots-per-gpu: expected a whole number >= 1"),
        (["--mig=yes"], "argument --mig/--no-mig: ignored explicit argument 'yes'"),
        (["--hyper"], "unrecognized arguments: --hyper"),  # no abbreviations
        (["--sysroot"], "argument --sysroot: expected one argument"),
        (["extra"], "unrecognized arguments: extra"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], says: str) -> None:
    done = detect("--sysroot", str(TREE), *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: rpool-agent detect ")
    assert done.stderr.splitlines()[-1].startswith(f"rpool-agent detect: error: {says}")


def test_a_missing_sysroot_is_one_line() -> None:
    done = detect("--sysroot", "/nonexistent")
    assert done.returncode != 0
    assert done.stderr == "rpool-agent: system root '/nonexistent' is not a directory\n"
