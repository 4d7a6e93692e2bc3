"""Benchmark: `rpool-agent detect` against hwloc's `lstopo-no-graphics --of xml`.

    python bench/detect.py [--runs 30] [--sysroot DIR]

Runs both commands alternately in the same process (so both see the same machine load),
reports medians and their ratio, the in-process probe time (`detect_pool`, no interpreter
start-up), and the start-up costs that sit under the command (bare Python, `import typer`,
`import rpool_agent.cli`) so a miss can be placed. Writes the numbers as JSON to
bench/results/. Targets (2-core CI VM): probe < 10 ms, command <= 6x lstopo.
A benchmark, not a test: nothing here fails a build.
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
# What `detect` does, minus typer: the floor the command could reach.
NO_CLI = (
    "import sys; from rpool_agent.detect import detect_pool; from rpool_agent.formats import"
    " dumps; sys.stdout.write(dumps(detect_pool({!r}), 'canary'))"
)


def agent_command() -> list[str]:
    """The console script beside this interpreter, not a PATH shim: pyenv's shims are bash
    scripts that add ~60 ms and would be measured as ours."""
    script = Path(sys.executable).with_name("rpool-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "rpool_agent.cli"]


# An installed package runs from cached bytecode; with PYTHONDONTWRITEBYTECODE set (as in
# some CI images) every start-up would recompile our modules and we would time that.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall_ms(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=CHILD_ENV
    )
    return (time.perf_counter() - start) * 1000


def median_ms(fn: object, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))  # type: ignore[operator]


def probe_ms(sysroot: str, runs: int) -> tuple[float, float, float]:
    """detect_pool in this process: (importing the probes, first call, median warm call).
    The first call reads a cold /sys; later calls find the kernel's sysfs caches warm."""
    start = time.perf_counter()
    from rpool_agent.probes import cpu, numa, nvidia  # noqa: F401 - timed import

    from rpool_agent.detect import detect_pool

    imports = (time.perf_counter() - start) * 1000

    def once() -> float:
        t0 = time.perf_counter()
        detect_pool(sysroot)
        return (time.perf_counter() - t0) * 1000

    first = once()
    return imports, first, median_ms(once, runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per command (median)")
    parser.add_argument("--sysroot", default="/", help="probe a recorded tree instead")
    args = parser.parse_args()
    runs = max(3, args.runs)

    detect = [*agent_command(), "detect"]
    if args.sysroot != "/":
        detect += ["--sysroot", args.sysroot]
    lstopo_bin = shutil.which("lstopo-no-graphics")
    lstopo = [lstopo_bin, "--of", "xml"] if lstopo_bin else None
    py = sys.executable
    baselines = {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import typer'": [py, "-c", "import typer"],
        "python -c 'import rpool_agent.cli'": [py, "-c", "import rpool_agent.cli"],
        "same work without the CLI (python -c)": [py, "-c", NO_CLI.format(args.sysroot)],
    }

    for cmd in [detect, *([lstopo] if lstopo else []), *baselines.values()]:
        wall_ms(cmd)  # warm the page cache and write the bytecode caches
    detect_runs: list[float] = []
    lstopo_runs: list[float] = []
    for _ in range(runs):  # alternate, so load spikes hit both
        detect_runs.append(wall_ms(detect))
        if lstopo:
            lstopo_runs.append(wall_ms(lstopo))
    base = {name: median_ms(lambda c=cmd: wall_ms(c), runs) for name, cmd in baselines.items()}
    imports, first, probe = probe_ms(args.sysroot, runs)

    detect_med = statistics.median(detect_runs)
    lstopo_med = statistics.median(lstopo_runs) if lstopo_runs else None
    ratio = detect_med / lstopo_med if lstopo_med else None

    rows = [
        ("rpool-agent detect (command)", detect_med),
        ("lstopo-no-graphics --of xml", lstopo_med),
        *base.items(),
        ("import rpool_agent.detect + probes", imports),
        ("detect_pool, first call in process", first),
        ("detect_pool, median warm call", probe),
    ]
    print(f"{'what':<40} {'median ms':>10}   ({runs} runs, {os.cpu_count()} CPUs)")
    for name, ms in rows:
        print(f"{name:<40} {'-' if ms is None else f'{ms:10.1f}':>10}")
    if ratio is not None:
        verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
        print(f"ratio detect / lstopo: {ratio:.1f}x (target <= {RATIO_TARGET:g}x: {verdict})")
    else:
        print("lstopo-no-graphics not found: install hwloc (apt-get install hwloc) for the ratio")
    verdict = "ok" if first < PROBE_TARGET_MS else "MISSED"
    print(f"probe time: {first:.1f} ms first call (target < {PROBE_TARGET_MS:g} ms: {verdict})")

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    path = out / f"detect-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result = {
        "runs": runs,
        "cpus": os.cpu_count(),
        "sysroot": args.sysroot,
        "command": detect,
        "detect_ms": detect_med,
        "lstopo_ms": lstopo_med,
        "ratio": ratio,
        "baselines_ms": base,
        "probe_imports_ms": imports,
        "probe_first_ms": first,
        "probe_warm_ms": probe,
        "detect_runs_ms": detect_runs,
        "lstopo_runs_ms": lstopo_runs,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
