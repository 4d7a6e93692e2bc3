"""Benchmark: what the `rpool` pytest plugin costs a pytest run.

    python bench/pytest_plugin.py [--rounds 5] [--tests 2000]

Three pairs, each run alternately in the same rounds (both sides see the same load), with
medians and the ratio against the baseline of its own pair:

1. idle: `pytest` on N trivial tests with the plugin installed but unused, against
   `pytest -p no:rpool` (the plugin never loaded). The issue's promise: no slower.
2. process lease: `pytest --rpool-gpus 1` against plain `pytest` on 20 tests, with an
   agent on a 4-GPU pool file: what one lease and its hand-over add to a run.
3. per-test leases: 200 tests marked `@pytest.mark.rpool(gpus=1)` against the same tests
   unmarked: the cost of a lease per test (acquire at setup, release at teardown).

Writes JSON to bench/results/. A benchmark, not a test: nothing here fails a build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
PYTEST += ["-p", "no:hypothesispytest"]
SERVE = [sys.executable, "-m", "rpool_agent.cli", "serve"]

POOL = {
    "resource_pool": {
        "additional_properties": {
            "instances": {"gpus": {str(i): {"index": i, "vendor": "NVIDIA"} for i in range(4)}}
        },
        "resources": {
            "gpus": [{"id": str(i), "slots": 1} for i in range(4)],
            "cpus": [{"id": "0", "slots": 1}],
        },
    }
}


def project(root: Path, name: str, n: int, marked: bool) -> Path:
    d = root / name
    d.mkdir()
    (d / "pytest.ini").write_text("[pytest]\n")
    mark = "@pytest.mark.rpool(gpus=1)\n" if marked else ""
    (d / "test_many.py").write_text(
        f"import pytest\n\n{mark}@pytest.mark.parametrize('i', range({n}))\ndef test_t(i):\n"
        "    pass\n"
    )
    return d


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = (time.perf_counter() - t) * 1000
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tests", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pool.json").write_text(json.dumps(POOL))
        sock, state = str(root / "agent.sock"), str(root / "state")
        agent = subprocess.Popen(
            [*SERVE, "--pool", str(root / "pool.json"), "--socket", sock, "--state-dir", state],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock) and time.monotonic() < deadline:
                time.sleep(0.05)
            env = {k: v for k, v in os.environ.items() if not k.startswith(("RPOOL_", "CUDA_"))}
            env["RPOOL_AGENT_SOCKET"] = sock
            many = project(root, "many", args.tests, marked=False)
            few = project(root, "few", 20, marked=False)
            marked = project(root, "marked", 200, marked=True)
            plain = project(root, "plain", 200, marked=False)
            pairs = {
                f"idle plugin, {args.tests} tests": (
                    ([*PYTEST], many),
                    ([*PYTEST, "-p", "no:rpool"], many),
                ),
                "--rpool-gpus 1, 20 tests": (
                    ([*PYTEST, "--rpool-gpus", "1"], few),
                    ([*PYTEST], few),
                ),
                "200 marked tests vs unmarked": (([*PYTEST], marked), ([*PYTEST], plain)),
            }
            times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in pairs}
            for _ in range(args.rounds):
                for name, ((cmd, cwd), (base, bcwd)) in pairs.items():
                    times[name][0].append(timed(cmd, cwd, env))
                    times[name][1].append(timed(base, bcwd, env))
        finally:
            agent.terminate()
            agent.wait()
    rows = []
    print(f"{'what':<32} {'median ms':>10} {'baseline ms':>12} {'ratio':>6}")
    for name, (ours, base) in times.items():
        m, b = statistics.median(ours), statistics.median(base)
        rows.append({"what": name, "median_ms": m, "baseline_ms": b, "ratio": m / b})
        print(f"{name:<32} {m:>10.0f} {b:>12.0f} {m / b:>6.2f}")
    out = HERE / "results" / f"pytest_plugin-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
