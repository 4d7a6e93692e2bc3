"""Benchmark: `rpool-agent detect` against hwloc's `lstopo-no-graphics --of xml`.

    python bench/detect.py [--runs 30] [--sysroot DIR] [--python PY | --script PATH]

Runs both commands alternately in the same process (so both see the same machine load),
reports medians and their ratio, the probe time inside one process (`detect_pool`, no
interpreter start-up), and the start-up costs that sit under the command (bare Python,
`import re`, `import argparse`, `import argparse, dataclasses`, `import rpool_agent.cli`)
so a miss can be placed. Writes the
numbers as JSON to bench/results/. Targets (2-core CI VM): probe < 10 ms, command <= 6x
lstopo. A benchmark, not a test: nothing here fails a build.

`--python PY` measures the install that interpreter sees (the `rpool-agent` script beside
it, its baselines, its probe time): point it at a clean venv with a non-editable install
(`pip install --no-deps .`), since an editable install's finder and a busy site-packages
add start-up time that is not the command's. `--script PATH` names the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROBE_TARGET_MS = 10.0
RATIO_TARGET = 6.0
# What `detect` does, minus the command line: the floor the command could reach.
NO_CLI = (
    "import sys; from rpool_agent.detect import detect_pool; from rpool_agent.formats import"
    " dumps; sys.stdout.write(dumps(detect_pool({!r}), 'canary'))"
)
# The probe inside one process of the measured interpreter: (import ms, first call ms,
# median warm call ms) as JSON. The first call reads a cold /sys; later calls find the
# kernel's sysfs caches warm.
PROBE = """
import json, statistics, sys, time
t0 = time.perf_counter()
from rpool_agent.probes import cpu, numa, nvidia
from rpool_agent.detect import detect_pool
imports = (time.perf_counter() - t0) * 1000
def once():
    t = time.perf_counter()
    detect_pool(sys.argv[1])
    return (time.perf_counter() - t) * 1000
first = once()
print(json.dumps([imports, first, statistics.median(once() for _ in range(int(sys.argv[2])))]))
"""


def agent_command(python: str) -> list[str]:
    """The console script beside `python`, not a PATH shim: pyenv's shims are bash scripts
    that add ~60 ms and would be measured as ours."""
    script = Path(python).with_name("rpool-agent")
    if script.exists():
        return [str(script)]
    return [python, "-m", "rpool_agent.cli"]


def script_python(script: str) -> str:
    """The interpreter a console script runs (its `#!` line)."""
    with open(script, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    if not first.startswith("#!"):
        raise SystemExit(f"{script}: not a script with a #! line")
    return first[2:].strip().split()[0]


def add_install_options(parser: argparse.ArgumentParser) -> None:
    """--python / --script / --against: which installs to time (bench/run.py too)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--python", help="measure the install this interpreter sees (default: this one)"
    )
    which.add_argument("--script", help="measure this rpool-agent script (and its #! python)")
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="SCRIPT",
        help="also time this rpool-agent script in the same loop (e.g. an older install)",
    )


def chosen_install(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(the interpreter, the command that runs rpool-agent) from add_install_options'."""
    if args.script:
        return script_python(args.script), [args.script]
    py = args.python or sys.executable
    return py, agent_command(py)


# An installed package runs from cached bytecode; with PYTHONDONTWRITEBYTECODE set (as in
# some CI images) every start-up would recompile our modules and we would time that.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
# Children run from "/": `python -c` puts its working directory first on sys.path, and from
# a checkout that would import the checkout's rpool_agent instead of the measured install.
CHILD_CWD = "/"


def wall_ms(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        env=CHILD_ENV,
        cwd=CHILD_CWD,
    )
    return (time.perf_counter() - start) * 1000


def median_ms(fn: object, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))  # type: ignore[operator]


def probe_ms(python: str, sysroot: str, runs: int) -> tuple[float, float, float]:
    """detect_pool in one process of `python`: (importing the probes, first call, median
    warm call)."""
    out = subprocess.run(
        [python, "-c", PROBE, sysroot, str(runs)],
        capture_output=True,
        text=True,
        check=True,
        env=CHILD_ENV,
        cwd=CHILD_CWD,
    ).stdout
    imports, first, warm = json.loads(out.splitlines()[-1])
    return imports, first, warm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per command (median)")
    parser.add_argument("--sysroot", default="/", help="probe a recorded tree instead")
    add_install_options(parser)
    args = parser.parse_args()
    runs = max(3, args.runs)
    sysroot = os.path.abspath(args.sysroot)  # children run elsewhere

    py, agent = chosen_install(args)
    detect = [*agent, "detect"]
    if sysroot != "/":
        detect += ["--sysroot", sysroot]
    lstopo_bin = shutil.which("lstopo-no-graphics")
    lstopo = [lstopo_bin, "--of", "xml"] if lstopo_bin else None
    baselines = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import re' (pip's script does)": [py, "-c", "import re"],
        "python -c 'import argparse'": [py, "-c", "import argparse"],
        # the floor under any dataclass-typed probe: the value types' module imports inspect
        "python -c 'import argparse, dataclasses'": [py, "-c", "import argparse, dataclasses"],
        "python -c 'import rpool_agent.cli'": [py, "-c", "import rpool_agent.cli"],
        "same work without the CLI (python -c)": [py, "-c", NO_CLI.format(sysroot)],
    }

    others = {script: [script, *detect[1:]] for script in args.against}
    for cmd in [detect, *([lstopo] if lstopo else []), *others.values()]:
        wall_ms(cmd)  # warm the page cache and write the bytecode caches
    for name, cmd in list(baselines.items()):
        if subprocess.run(cmd, capture_output=True, env=CHILD_ENV, cwd=CHILD_CWD).returncode:
            del baselines[name]  # e.g. an install too old to have the module
    detect_runs: list[float] = []
    lstopo_runs: list[float] = []
    other_runs: dict[str, list[float]] = {script: [] for script in others}
    for _ in range(runs):  # alternate, so load spikes hit all
        detect_runs.append(wall_ms(detect))
        if lstopo:
            lstopo_runs.append(wall_ms(lstopo))
        for script, cmd in others.items():
            other_runs[script].append(wall_ms(cmd))
    other_med = {script: statistics.median(ms) for script, ms in other_runs.items()}
    base = {name: median_ms(lambda c=cmd: wall_ms(c), runs) for name, cmd in baselines.items()}
    imports, first, probe = probe_ms(py, sysroot, runs)

    detect_med = statistics.median(detect_runs)
    lstopo_med = statistics.median(lstopo_runs) if lstopo_runs else None
    ratio = detect_med / lstopo_med if lstopo_med else None

    rows = [
        ("rpool-agent detect (command)", detect_med),
        ("lstopo-no-graphics --of xml", lstopo_med),
        *((f"against: {script} detect", ms) for script, ms in other_med.items()),
        *base.items(),
        ("import rpool_agent.detect + probes", imports),
        ("detect_pool, first call in process", first),
        ("detect_pool, median warm call", probe),
    ]
    print(f"command: {' '.join(detect)}")
    print(f"python:  {py}")
    print(f"{'what':<44} {'median ms':>10}   ({runs} runs, {os.cpu_count()} CPUs)")
    for name, ms in rows:
        print(f"{name:<44} {'-' if ms is None else f'{ms:10.1f}':>10}")
    if ratio is not None:
        verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
        print(f"ratio detect / lstopo: {ratio:.1f}x (target <= {RATIO_TARGET:g}x: {verdict})")
        for script, ms in other_med.items():
            print(f"ratio against {script}: {ms / lstopo_med:.1f}x")
    else:
        print("lstopo-no-graphics not found: install hwloc (apt-get install hwloc) for the ratio")
    verdict = "ok" if first < PROBE_TARGET_MS else "MISSED"
    print(f"probe time: {first:.1f} ms first call (target < {PROBE_TARGET_MS:g} ms: {verdict})")

    result = {
        "runs": runs,
        "cpus": os.cpu_count(),
        "sysroot": sysroot,
        "command": detect,
        "python": py,
        "detect_ms": detect_med,
        "lstopo_ms": lstopo_med,
        "ratio": ratio,
        "baselines_ms": base,
        "probe_imports_ms": imports,
        "probe_first_ms": first,
        "probe_warm_ms": probe,
        "detect_runs_ms": detect_runs,
        "lstopo_runs_ms": lstopo_runs,
        "against_ms": other_med,
        "against_runs_ms": other_runs,
    }
    write_result("detect", result)
    return 0


def write_result(name: str, result: dict[str, object]) -> None:
    """`result` as bench/results/<name>-<time>.json (bench/run.py writes its own here too)."""
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    sys.exit(main())
