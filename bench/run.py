"""Benchmark: `rpool-agent run --gpus 1 -- true` against `python -c pass`.

    python bench/run.py [--runs 40] [--python PY | --script PATH] [--against SCRIPT ...]

`run` sits in front of every command a harness leases for, so its start-up counts; the
target (2-core CI VM) is <= 3x a bare interpreter's start. A private agent serves a
hand-written pool (8 GPUs, this process's CPUs) on a socket in a temporary directory;
each `run` leases, execs `true`, and the lease ends with it. `import argparse, json,
signal, socket` is the floor under it: what `run` must import before it does anything;
a stand-in that does only what `run` must (parse, `hello`, `acquire`, exec), written
flat, is what this stack costs with the work.
The commands run alternately in one loop, so load spikes hit all of them; medians and
ratios are printed and written as JSON to bench/results/. A benchmark, not a test:
nothing here fails a build.

As with bench/detect.py, point `--python` at a clean venv with a non-editable install
(`pip install .`): an editable install's finder adds start-up time that is not ours.
`--against` times another install's script (e.g. an older version) in the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detect import add_install_options, chosen_install, write_result  # bench/detect.py, beside this

HERE = Path(__file__).resolve().parent
RATIO_TARGET = 3.0
FLOOR = "python -c 'import argparse, json, signal, socket'"
STAND_IN = "stand-in: the same stack, nothing else (python -c)"
# What `run --gpus 1 -- true` must do, written flat: an argparse parser with a `run`
# subcommand, SIGINT handled, `hello` and `acquire` (with the lease files) as JSON lines,
# SIGPIPE restored, exec. What this stack costs before any code of ours, to compare with.
STAND_IN_CODE = """
import argparse, json, os, shlex, signal, socket
parser = argparse.ArgumentParser(prog="stand-in")
run = parser.add_subparsers().add_parser("run")
run.add_argument("--gpus", type=int, default=0)
run.add_argument("cmd", nargs=argparse.REMAINDER)
args = parser.parse_args(["run", "--gpus", "1", "--", "true"])
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["RPOOL_AGENT_SOCKET"])
replies = sock.makefile("rb")
for call in ({"op": "hello", "version": 1, "client": "stand-in"},
             {"op": "acquire", "request": {"gpus": args.gpus}, "files": True,
              "label": shlex.join(args.cmd[1:])}):
    sock.sendall(json.dumps({"id": 1, **call}).encode() + b"\\n")
    assert json.loads(replies.readline())["ok"]
os.set_inheritable(sock.fileno(), True)
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
os.execvp("true", ["true"])
"""
# As in bench/detect.py: children run from "/" with bytecode caches allowed.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wait_listening(path: str, deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise SystemExit(f"no agent listening at {path} after {deadline_s:g} s")


def start_agent(python: str, tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    cpus = sorted(os.sched_getaffinity(0))
    pool = {
        "resource_pool": {
            "resources": {
                "cpus": [{"id": str(i), "slots": 1} for i in cpus],
                "gpus": [{"id": str(i), "slots": 1} for i in range(8)],
            }
        }
    }
    pool_file = os.path.join(tmp, "pool.json")
    Path(pool_file).write_text(json.dumps(pool))
    sock = os.path.join(tmp, "agent.sock")
    cmd = [python, "-m", "rpool_agent.cli", "serve", "--pool", pool_file, "--socket", sock]
    cmd += ["--state-dir", os.path.join(tmp, "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    wait_listening(sock)
    return proc, sock


def wall_and_cpu_ms(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time, and the CPU time (user + system) the command used: on a loaded machine
    the wall time mostly measures the load, the CPU time much less so."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True, env=env, cwd="/")
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs per command (median)")
    add_install_options(parser)
    args = parser.parse_args()
    runs = max(3, args.runs)
    py, agent = chosen_install(args)

    with tempfile.TemporaryDirectory(prefix="rpool-bench-run-") as tmp:
        proc, sock = start_agent(py, tmp)
        env = {**CHILD_ENV, "RPOOL_AGENT_SOCKET": sock}
        commands = {
            "python -c pass": [py, "-c", "pass"],
            "rpool-agent run --gpus 1 -- true": [*agent, "run", "--gpus", "1", "--", "true"],
            "rpool-agent run --cpus 1 -- true": [*agent, "run", "--cpus", "1", "--", "true"],
            "python -c 'import rpool_agent.cli'": [py, "-c", "import rpool_agent.cli"],
            # the floor under any argparse CLI that speaks JSON lines on a Unix socket and
            # hands signals back before an exec, before it does any of it
            FLOOR: [py, "-c", "import argparse, json, signal, socket"],
            STAND_IN: [py, "-c", STAND_IN_CODE],
        }
        for script in args.against:
            commands[f"against: {script} run"] = [script, "run", "--gpus", "1", "--", "true"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        try:
            for cmd in commands.values():
                wall_and_cpu_ms(cmd, env)  # warm the page cache and the bytecode caches
            for _ in range(runs):  # alternate, so load spikes hit all
                for name, cmd in commands.items():
                    wall, used = wall_and_cpu_ms(cmd, env)
                    times[name].append(wall)
                    cpu[name].append(used)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    med = {name: statistics.median(ms) for name, ms in times.items()}
    cpu_med = {name: statistics.median(ms) for name, ms in cpu.items()}
    base, cpu_base = med["python -c pass"], cpu_med["python -c pass"]
    print(f"command: {' '.join(agent)} run ...")
    print(f"python:  {py}")
    print(f"{'what':<52} {'wall ms':>8} {'x pass':>7} {'CPU ms':>8} {'x pass':>7}")
    for name, ms in med.items():
        c = cpu_med[name]
        print(f"{name:<52} {ms:8.1f} {ms / base:6.1f}x {c:8.1f} {c / cpu_base:6.1f}x")
    print(f"({runs} runs each, alternating; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f})")
    ratio = med["rpool-agent run --gpus 1 -- true"] / base
    verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
    print(f"ratio run / python -c pass: {ratio:.1f}x (target <= {RATIO_TARGET:g}x: {verdict})")
    cpu_ratio = cpu_med["rpool-agent run --gpus 1 -- true"] / cpu_base
    print(f"CPU time ratio: {cpu_ratio:.1f}x")

    result = {
        "runs": runs,
        "cpus": os.cpu_count(),
        "python": py,
        "command": agent,
        "median_ms": med,
        "ratio": ratio,
        "cpu_median_ms": cpu_med,
        "cpu_ratio": cpu_ratio,
        "load": os.getloadavg()[0],
        "runs_ms": times,
        "cpu_runs_ms": cpu,
    }
    write_result("run", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
