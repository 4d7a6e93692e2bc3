"""Harnesses nested in a lease: the real ctest and the real canary, run by `rpool-agent run`.

Their tests record the GPUs they were handed (`CUDA_VISIBLE_DEVICES` and the harness's
id); those must resolve to the lease's physical GPUs and to nothing else. There is no
GPU here and none is needed: which GPU a test would touch is decided by the variables
the harness hands it, and those are what is recorded and checked.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, running_agent

PY = sys.executable
RPOOL = [PY, "-m", "rpool_agent.cli"]

needs_ctest = pytest.mark.skipif(not shutil.which("ctest"), reason="ctest not installed")


def _canary_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in metadata.version("canary-wm").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()


needs_canary = pytest.mark.skipif(
    _canary_version() < (26, 9) or not shutil.which("canary"),
    reason="canary-wm >= 26.9 not installed (it is in the test extra)",
)


# --- ctest ---------------------------------------------------------------------------------

# One ctest test: announce itself, wait until a test of the *other* lease has started too
# (so the two leased runs provably overlap), then hold its GPU a moment and record.
RECORD = """
import json, os, sys, time
out, name = sys.argv[1], sys.argv[2]
lease = os.environ["RPOOL_LEASE_ID"]
open(os.path.join(out, "started", f"{lease}.{name}"), "w").close()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if any(not m.startswith(lease + ".") for m in os.listdir(os.path.join(out, "started"))):
        break
    time.sleep(0.01)
start = time.time()
time.sleep(0.2)
keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "CTEST_RESOURCE_GROUP_COUNT",
        "CTEST_RESOURCE_GROUP_0_GPUS", "RPOOL_LEASE_ID", "RPOOL_GPU_IDS")
rec = {k: os.environ.get(k) for k in keys}
rec.update(name=name, start=start, end=time.time())
with open(os.path.join(out, f"{lease}.{name}.json"), "w") as fh:
    json.dump(rec, fh)
"""


def ctest_dir(root: Path, out: Path, names: list[str]) -> Path:
    """A CTestTestfile.cmake (no configure step needed) of `gpus:1` tests that record."""
    root.mkdir()
    record = out / "record.py"
    lines = []
    for name in names:
        lines.append(f'add_test({name} "{PY}" "{record}" "{out}" "{name}")')
        lines.append(f'set_tests_properties({name} PROPERTIES RESOURCE_GROUPS "gpus:1")')
    (root / "CTestTestfile.cmake").write_text("\n".join(lines) + "\n")
    return root


def physical_gpu(rec: dict[str, Any]) -> str:
    """The GPU a test would open: its lease-local id, looked up in CUDA_VISIBLE_DEVICES."""
    entry = rec["CTEST_RESOURCE_GROUP_0_GPUS"]  # "id:<k>,slots:1"
    local = int(entry.split(",")[0].removeprefix("id:"))
    return str(rec["CUDA_VISIBLE_DEVICES"].split(",")[local])


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["start"] < b["end"] and b["start"] < a["end"])


@needs_ctest
def test_two_concurrent_ctest_runs_use_disjoint_leased_gpus(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "started").mkdir(parents=True)
    (out / "record.py").write_text(RECORD)
    names = ["t1", "t2", "t3", "t4"]
    cmd = ["run", "--gpus", "2", "--", "ctest", "--resource-spec-file", "{ctest_spec}", "-j2"]
    with running_agent(tmp_path, gpu_pool(4, 2)) as agent:
        procs = [
            subprocess.Popen(
                [*RPOOL, *cmd],
                cwd=ctest_dir(tmp_path / run, out, names),
                env=agent.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for run in ("a", "b")
        ]
        logs = [p.communicate(timeout=60)[0] for p in procs]
        for proc, log in zip(procs, logs, strict=True):
            assert proc.returncode == 0, log
        assert agent.status()["leases"] == []

    records = [json.loads(p.read_text()) for p in out.glob("*.json")]
    by_lease: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_lease.setdefault(rec["RPOOL_LEASE_ID"], []).append(rec)
    assert len(by_lease) == 2, "two runs, two leases"
    used: list[set[str]] = []
    for recs in by_lease.values():
        assert sorted(r["name"] for r in recs) == names
        leased = set(recs[0]["RPOOL_GPU_IDS"].split(","))
        assert len(leased) == 2
        for rec in recs:
            assert rec["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            assert rec["CTEST_RESOURCE_GROUP_COUNT"] == "1"
            assert set(rec["CUDA_VISIBLE_DEVICES"].split(",")) == leased
        gpus = {physical_gpu(r) for r in recs}
        assert gpus <= leased, (gpus, leased)
        used.append(gpus)
    assert not used[0] & used[1], f"both runs used GPU(s) {used[0] & used[1]}"
    # ... while they ran at the same time.
    a, b = by_lease.values()
    assert any(overlap(x, y) for x, y in itertools.product(a, b))


# --- canary --------------------------------------------------------------------------------

PYT = """
import json, os, sys
import canary_pyt
canary_pyt.directives.gpus({gpus})

def test():
    keys = ("CUDA_VISIBLE_DEVICES", "CANARY_GPU_IDS", "CUDA_DEVICE_ORDER", "RPOOL_GPU_IDS")
    with open({out!r}, "w") as fh:
        json.dump({{k: os.environ.get(k) for k in keys}}, fh)

if __name__ == "__main__":
    sys.exit(test())
"""


def canary_suite(tmp_path: Path, gpus: dict[str, int]) -> tuple[Path, Path]:
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir()
    out.mkdir()
    for name, n in gpus.items():
        (suite / f"{name}.pyt").write_text(PYT.format(gpus=n, out=str(out / f"{name}.json")))
    return suite, out


def run_canary(agent: Agent, cwd: Path, pool_arg: str, suite: Path) -> Any:
    cmd = ["run", "--gpus", "2", "--cpus", "2", "--", "canary", "--no-banner"]
    cmd += ["--resource-pool-file", pool_arg, "run", str(suite)]
    return subprocess.run(
        [*RPOOL, *cmd], cwd=cwd, env=agent.env, capture_output=True, text=True, timeout=60
    )


@needs_canary
@pytest.mark.slow
def test_nested_canary_runs_tests_on_leased_physical_gpus_only(tmp_path: Path) -> None:
    tests = {"one_a": 1, "one_b": 1, "one_c": 1, "both": 2}
    suite, out = canary_suite(tmp_path, tests)
    work = tmp_path / "work"
    work.mkdir()
    with running_agent(tmp_path, gpu_pool(4, 2)) as agent, agent.client() as c:
        # Another job holds a GPU, so the lease is not GPUs 0,1 and the lease-local ids
        # 0,1 would be the wrong answer: canary must export physical indices.
        with c.acquire(gpus=1) as held:
            [other] = [g["id"] for g in held.resources["gpus"]]
            proc = run_canary(agent, work, "{pool_nodes}", suite)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = {name: json.loads((out / f"{name}.json").read_text()) for name in tests}
    leased = recs["both"]["RPOOL_GPU_IDS"].split(",")
    assert len(leased) == 2 and other not in leased
    for name, rec in recs.items():
        visible = rec["CUDA_VISIBLE_DEVICES"].split(",")
        assert len(visible) == tests[name]
        assert set(visible) <= set(leased), (name, rec)  # physical GPUs of the lease only
        assert rec["CANARY_GPU_IDS"] == rec["CUDA_VISIBLE_DEVICES"]
        assert rec["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # indices mean NVML (PCI) order
    assert sorted(recs["both"]["CUDA_VISIBLE_DEVICES"].split(",")) == sorted(leased)


@needs_canary
def test_nested_canary_refuses_the_flat_pool(tmp_path: Path) -> None:
    # The flat pool numbers GPUs 0..n-1 (for canary <= 26.4, which sets no
    # CUDA_VISIBLE_DEVICES). canary >= 26.9 would export those ids as physical GPUs;
    # it refuses the flat form instead, so that mistake cannot put a test off-lease.
    suite, out = canary_suite(tmp_path, {"one": 1})
    with running_agent(tmp_path, gpu_pool(4, 2)) as agent:
        proc = run_canary(agent, tmp_path, "{pool}", suite)
    assert proc.returncode != 0
    assert "nodes" in proc.stdout + proc.stderr
    assert not (out / "one.json").exists()
