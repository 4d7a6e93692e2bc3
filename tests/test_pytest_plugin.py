"""The pytest plugin, end to end: real inner pytest runs under real pytest-xdist, against a
real agent (a pool file, or a private agent detecting the fake NVML: no GPU here).

Inner tests record what they saw (pid, `CUDA_VISIBLE_DEVICES`, a monotonic interval; the
clock is system-wide) as JSON lines in one file per outer test; the outer test checks the
intervals: no GPU is ever used by two processes at once. Each inner run costs about a
second (xdist workers import pytest), so the runs are few and each checks much.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

import nvml_fixture as nf
from agent_fixture import gpu_pool, running_agent, wait_until

from rpool_agent.lease_wait import describe_wait

fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake NVML once

# hypothesis' plugin costs each xdist worker seconds here, and the inner runs need none.
PYTEST = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]

RPOOL_RUN = [sys.executable, "-m", "rpool_agent.cli", "run"]

RECORD = """
import json, os, time

def record(**extra):
    rec = {"pid": os.getpid(), "run": os.environ.get("RUN", ""),
           "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "aff": sorted(os.sched_getaffinity(0)), **extra}
    with open(os.environ["RECORD"], "a") as fh:
        fh.write(json.dumps(rec) + "\\n")
"""

# conftest.py: what a GPU project's conftest sees at import, before any test module.
CONFTEST = (
    RECORD
    + """
import time
record(event="conftest", t=time.monotonic())
"""
)

TESTS = """
import os, time, pytest
from conftest import record

@pytest.mark.parametrize("i", range({n}))
def test_work(i):
    start = time.monotonic()
    time.sleep({sleep})
    record(event="test", start=start, end=time.monotonic())
"""

ALONE = (
    RECORD
    + """
import time
start = time.monotonic()
time.sleep(0.3)
record(event="test", start=start, end=time.monotonic())
"""
)


def project(tmp_path: Path, name: str, tests: str, conftest: str = CONFTEST) -> Path:
    """A tiny test project of its own (its own ini file: no outer configuration leaks in)."""
    root = tmp_path / name
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(conftest)
    (root / "test_it.py").write_text(tests)
    return root


def inner_env(tmp_path: Path, socket: str | None, run: str = "", **extra: str) -> dict[str, str]:
    """The environment of an inner run: nothing of an outer lease, agent or xdist run."""
    drop = ("RPOOL_", "CUDA_", "PYTEST_", "CTEST_RESOURCE_GROUP_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(XDG_RUNTIME_DIR=str(tmp_path), RECORD=str(tmp_path / "record.jsonl"), RUN=run)
    if socket is not None:
        env["RPOOL_AGENT_SOCKET"] = socket
    env.update(extra)
    return env


def start(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    out = open(cwd / "out.txt", "w")  # noqa: SIM115 - the child owns it; read via output()
    return subprocess.Popen(
        [*PYTEST, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )


def output(cwd: Path) -> str:
    return (cwd / "out.txt").read_text()


def finish(proc: subprocess.Popen[str], cwd: Path, timeout: float = 60) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"inner pytest hung:\n{output(cwd)}") from None
    return output(cwd)


def records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def overlaps(recs: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of intervals from two processes that share a GPU and overlap in time."""
    tests = [r for r in recs if r["event"] == "test"]
    return [
        (a, b)
        for a, b in combinations(tests, 2)
        if a["pid"] != b["pid"]
        and set(a["cvd"].split(",")) & set(b["cvd"].split(","))
        and a["start"] < b["end"]
        and b["start"] < a["end"]
    ]


def by_pid(recs: Iterable[dict[str, Any]], run: str) -> dict[int, set[str]]:
    """Each test process's GPUs (the controller, which runs no test, is left out)."""
    out: dict[int, set[str]] = {}
    testers = {r["pid"] for r in recs if r["event"] == "test"}
    for r in recs:
        if r["run"] == run and r["pid"] in testers:
            out.setdefault(r["pid"], set()).add(r["cvd"])
    return out


# --- process leases on a shared agent -----------------------------------------------------------


def test_xdist_runs_and_run_share_one_agent_without_overlap(tmp_path: Path) -> None:
    """`pytest -n 4 --rpool-gpus 1` next to a lone pytest run and `rpool-agent run --gpus 1`
    on 4 GPUs: every test process holds one GPU of its own, from before its conftest is
    imported to its end, and no GPU is ever used by two processes at once."""
    with running_agent(tmp_path, gpu_pool(4, 2)) as agent:
        a = project(tmp_path, "a", TESTS.format(n=8, sleep=0.1))
        b = project(tmp_path, "b", TESTS.format(n=4, sleep=0.1))
        runs = [
            (
                a,
                start(
                    a, inner_env(tmp_path, agent.socket, "a"), "-n", "4", "--rpool-gpus", "1", "-v"
                ),
            ),
            (b, start(b, inner_env(tmp_path, agent.socket, "b"), "--rpool-gpus=1")),
        ]
        (tmp_path / "alone.py").write_text(ALONE)
        cli = subprocess.Popen(
            [*RPOOL_RUN, "--gpus", "1", "--", sys.executable, str(tmp_path / "alone.py")],
            env=inner_env(tmp_path, agent.socket, "cli"),
        )
        outs = [finish(proc, cwd) for cwd, proc in runs]
        assert cli.wait(60) == 0
        assert all(proc.returncode == 0 for _, proc in runs), outs
        assert agent.status()["leases"] == []  # every worker's lease ended with it
    recs = records(tmp_path)
    assert overlaps(recs) == []
    workers = by_pid(recs, "a")
    assert len(workers) == 4 and all(len(cvds) == 1 for cvds in workers.values())
    assert sorted(cvd for cvds in workers.values() for cvd in cvds) == ["0", "1", "2", "3"]
    [b_cvds] = by_pid(recs, "b").values()
    assert len(b_cvds) == 1 and b_cvds < {"0", "1", "2", "3"}
    assert len([r for r in recs if r["run"] == "a" and r["event"] == "test"]) == 8
    assert "rpool: each worker leases gpus:1 for its life" in outs[0]
    for n in range(4):  # -v: which lease each worker holds
        assert f"[gw{n}] rpool: lease " in outs[0], outs[0]


# The surviving worker keeps its GPU until the replacement holds one (else, all tests done,
# it could end first and free its GPU, and the replacement might get that one instead).
HOLD_UNTIL_REPLACED = """
def pytest_sessionfinish():
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(os.environ["RECORD"]) as fh:
            lines = [json.loads(line) for line in fh]
        if sum(r["event"] == "conftest" and r["cvd"] != "-1" for r in lines) >= 3:
            return
        time.sleep(0.02)
"""


def test_sigkilled_worker_lease_is_reaped_for_its_replacement(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-test frees its GPU and cpu at once; xdist's replacement
    worker is granted them (the others stay held by the surviving worker), and the run
    ends. Each worker's affinity is its one leased cpu."""
    tests = (
        TESTS.format(n=4, sleep=0.05)
        + """
def test_killed():
    flag = os.path.join(os.path.dirname(os.environ["RECORD"]), "killed-once")
    if not os.path.exists(flag):
        open(flag, "w").close()
        record(event="killed")
        os.kill(os.getpid(), 9)
"""
    )
    with running_agent(tmp_path, gpu_pool(2, 2)) as agent:
        root = project(tmp_path, "k", tests, conftest=CONFTEST + HOLD_UNTIL_REPLACED)
        env = inner_env(tmp_path, agent.socket, "k")
        out = finish(start(root, env, "-n", "2", "--rpool-gpus", "1", "--rpool-cpus", "1"), root)
    assert "crashed" in out and "1 failed, 4 passed" in out, out
    recs = records(tmp_path)
    [killed] = [r for r in recs if r["event"] == "killed"]
    imports = [r for r in recs if r["event"] == "conftest"]
    assert imports[0]["cvd"] == "-1"  # the controller imports conftest.py too: no GPU
    imports = imports[1:]
    assert len(imports) == 3  # two workers, then the replacement
    replacement = imports[-1]
    assert replacement["pid"] != killed["pid"] and replacement["cvd"] == killed["cvd"]
    assert replacement["aff"] == killed["aff"] and len(killed["aff"]) == 1  # its cpu too
    assert imports[0]["aff"] != imports[1]["aff"] and len(imports[0]["aff"]) == 1
    assert overlaps(recs) == []


# --- per-test leases ----------------------------------------------------------------------------

MARKED = """
import os, time, pytest
from conftest import record

@pytest.mark.rpool(gpus=1)
@pytest.mark.parametrize("i", range(6))
def test_marked(i, rpool_lease):
    start = time.monotonic()
    [gpu] = rpool_lease.gpus
    env = rpool_lease.env()
    assert env["CUDA_VISIBLE_DEVICES"] == str(gpu.index) and env["RPOOL_LEASE_ID"] == rpool_lease.id
    time.sleep(0.2)
    rec = {"cvd": env["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.monotonic()}
    record(event="test", **rec)

@pytest.mark.rpool(gpus=3)
def test_never(rpool_lease):
    pass

def test_unmarked(rpool_lease):
    pass
"""


def test_marked_tests_bound_concurrency_and_never_overlap(tmp_path: Path) -> None:
    """`@pytest.mark.rpool(gpus=1)` under `-n 3` on 2 GPUs: at most two marked tests run at
    once, never two on one GPU; a test asking for more than the pool fails at once with
    the reason; `rpool_lease` outside any lease says why."""
    with running_agent(tmp_path, gpu_pool(2, 2)) as agent:
        root = project(tmp_path, "m", MARKED, conftest=RECORD)
        out = finish(start(root, inner_env(tmp_path, agent.socket, "m"), "-n", "3"), root)
        assert agent.status()["leases"] == []
    assert "6 passed, 2 errors" in out, out
    assert "test_never - Failed: rpool: gpus=3 can never be granted" in out, out
    assert "During handling" not in out
    assert "rpool_lease: this test has no @pytest.mark.rpool" in out
    recs = [r for r in records(tmp_path) if r["event"] == "test"]
    assert len(recs) == 6 and overlaps(recs) == []
    for r in recs:  # how many marked tests ran at the moment r started
        assert sum(o["start"] <= r["start"] < o["end"] for o in recs) <= 2


# --- the private agent --------------------------------------------------------------------------


def nvml_env(tmp_path: Path, fake_nvml_dir: Path, n: int = 2) -> dict[str, str]:
    conf = nf.write_config(tmp_path / "nvml.conf", [{"uuid": f"GPU-{i}"} for i in range(n)])
    return {"LD_LIBRARY_PATH": str(fake_nvml_dir), "FAKE_NVML_CONFIG": str(conf)}


PRIVATE_CONFTEST = (
    CONFTEST
    + """
from rpool_agent.client import Client
with Client(os.environ["RPOOL_AGENT_SOCKET"]) as c:
    record(event="agent", agent_pid=c.server_info["pid"], socket=c.socket_path)
"""
)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's PID 1 may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_private_agent_shared_by_workers_and_gone_after(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """No agent answers: the controller starts one on the detected pool (the fake NVML's
    one GPU), `--rpool-slots-per-gpu 3` lets 3 workers share it (`-n auto`: as many
    workers as the pool has room for, not one per cpu), and after the run neither the
    agent process nor its directory is left."""
    root = project(tmp_path, "p", TESTS.format(n=3, sleep=0.05), conftest=PRIVATE_CONFTEST)
    env = inner_env(
        tmp_path, str(tmp_path / "nobody.sock"), "p", **nvml_env(tmp_path, fake_nvml_dir, 1)
    )
    args = ("-n", "auto", "--rpool-gpus", "1", "--rpool-slots-per-gpu", "3")
    out = finish(start(root, env, *args), root)
    assert "3 passed" in out and "created: 3/3 workers" in out, out
    assert "rpool: private agent (pid " in out and "nobody.sock" in out, out
    recs = records(tmp_path)
    agents = {(r["agent_pid"], r["socket"]) for r in recs if r["event"] == "agent"}
    assert len(agents) == 1  # one agent for all the workers
    [(pid, socket)] = agents
    assert gone(pid) and not os.path.exists(os.path.dirname(socket))
    cvds = sorted(r["cvd"] for r in recs if r["event"] == "conftest")
    assert cvds == ["-1", "0", "0", "0"]  # the controller's, then 3 workers on GPU 0


def test_private_agent_never_outlives_its_starter(tmp_path: Path) -> None:
    """SIGKILL the process that started a private agent: the agent stops by itself."""
    code = "from rpool_agent import private_agent as p; a = p.start(); print(a.pid, a.directory)"
    code += "; import sys; sys.stdout.flush(); input()"
    starter = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    pid, directory = starter.stdout.readline().split()
    assert not gone(int(pid))
    starter.kill()
    starter.wait()
    wait_until(lambda: gone(int(pid)), timeout=10)
    assert not os.path.exists(os.path.join(directory, "agent.sock"))  # it stopped cleanly


def test_lone_process_lease_is_what_run_hands_a_command(
    tmp_path: Path, fake_nvml_dir: Path
) -> None:
    """No xdist: the one pytest process leases a GPU and a cpu (a private agent on the
    detected pool) and its environment and affinity are what `rpool-agent run` sets."""
    tests = """
import os
import signal
from rpool_agent.handoff import lease_env

def test_env(rpool_lease):
    env = dict(os.environ)
    assert env == lease_env(rpool_lease.document, env)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["OMP_NUM_THREADS"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == str(rpool_lease.gpus[0].index)
    assert os.path.exists(env["RPOOL_CTEST_SPEC_FILE"])
    assert sorted(os.sched_getaffinity(0)) == rpool_lease.cpus
    assert "CTEST_RESOURCE_GROUP_COUNT" not in env
"""
    root = project(tmp_path, "l", tests, conftest=CONFTEST)
    env = inner_env(
        tmp_path, None, "l", CTEST_RESOURCE_GROUP_COUNT="1", **nvml_env(tmp_path, fake_nvml_dir)
    )
    out = finish(start(root, env, "--rpool-gpus", "1", "--rpool-cpus", "1"), root)
    assert "1 passed" in out, out
    assert "rpool: this process holds lease " in out and "CUDA_VISIBLE_DEVICES=" in out, out
    [conf] = [r for r in records(tmp_path) if r["event"] == "conftest"]
    assert conf["cvd"] in ("0", "1")  # the lease was there before conftest.py was imported


# --- more workers than GPUs ---------------------------------------------------------------------


def test_more_workers_than_gpus_fails_at_once_or_says_who_holds_them(tmp_path: Path) -> None:
    """2 GPUs of one slot: `-n 3` can never run (xdist waits for all workers to collect),
    so it is refused at once with the reason; `-n 2` while a GPU is held elsewhere waits,
    and says on the terminal what for and who holds it, and runs once it is freed."""
    with running_agent(tmp_path, gpu_pool(2, 2)) as agent:
        root = project(tmp_path, "w", TESTS.format(n=2, sleep=0.01))
        env = inner_env(tmp_path, agent.socket, "w")
        t0 = time.monotonic()
        out = finish(start(root, env, "-n", "3", "--rpool-gpus", "1"), root)
        assert time.monotonic() - t0 < 20
        assert (
            "ERROR: rpool: 3 workers x gpus:1 need 3 gpus slots at once and the pool has 2" in out
        )
        assert "--rpool-slots-per-gpu" in out

        with agent.client() as holder, holder.acquire(gpus=1, label="someone else"):
            proc = start(root, env, "-n", "2", "--rpool-gpus", "1")
            wait_until(lambda: "waiting for gpus:1 for each of 2 workers" in output(root), 30)
            said = output(root)
            assert "gpus: 1 of 2 free" in said and "'someone else' holds gpus" in said, said
            assert proc.poll() is None
        out = finish(proc, root)
    assert "2 passed" in out, out


def test_plugin_idle_without_options(tmp_path: Path) -> None:
    """Installed but not asked: no agent contacted, no client imported, nothing changed;
    bad settings are one line and exit status 4."""
    tests = """
import os, sys
def test_idle():
    assert "rpool_agent.client" not in sys.modules
    assert not {"RPOOL_LEASE_ID", "RPOOL_PYTEST_CONTROLLER"} & set(os.environ)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
"""
    root = project(tmp_path, "i", tests, conftest="")
    env = inner_env(tmp_path, str(tmp_path / "nobody.sock"))
    out = finish(start(root, env), root)
    assert "1 passed" in out and "rpool:" not in out, out
    (root / "pytest.ini").write_text("[pytest]\nrpool_gpus = two\n")
    bad = subprocess.run([*PYTEST], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 4
    assert bad.stderr.strip() == "ERROR: rpool: rpool_gpus = 'two': expected a whole number"
    (root / "pytest.ini").write_text("[pytest]\n")
    nobody = str(tmp_path / "nobody.sock")
    cmd = [*PYTEST, "--rpool-gpus", "1", "--rpool-agent", nobody]
    bad = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 4
    assert bad.stderr.strip() == f"ERROR: rpool: no agent answers at {nobody} (--rpool-agent)"


def test_describe_wait_names_holders() -> None:
    snap = {
        "types": {"gpus": {"total": 2, "free": 0, "drained": 1}, "cpus": {"total": 4, "free": 4}},
        "leases": [
            {"holder": {"pid": 7}, "label": "pytest[5] gw0", "resources": {"gpus": [{"id": "0"}]}},
            {"holder": {"pid": 8}, "resources": {"cpus": [{"id": "1"}]}},
        ],
        "waiters": [{}],
    }
    assert describe_wait(snap, {"gpus": 1}) == (
        "gpus: 0 of 2 free, 1 drained; pid 7 'pytest[5] gw0' holds gpus 0; 1 request(s) waiting"
    )


def test_nested_in_a_lease_uses_only_that_lease(tmp_path: Path, fake_nvml_dir: Path) -> None:
    """`rpool-agent run --gpus 1 -- pytest --rpool-gpus 1`: the inner run leases from a
    private agent, whose detection honours the outer lease's `CUDA_VISIBLE_DEVICES`, so
    its test gets the outer lease's GPU (2: the test holds 0 and 1) and no other. So does
    a run given `CUDA_VISIBLE_DEVICES=1` by a batch system, though an agent answers."""
    root = project(tmp_path, "n", TESTS.format(n=1, sleep=0.01))
    env = inner_env(tmp_path, None, "n", **nvml_env(tmp_path, fake_nvml_dir, 3))
    with running_agent(tmp_path, gpu_pool(3, 2)) as agent:
        env["RPOOL_AGENT_SOCKET"] = agent.socket
        with agent.client() as other, other.acquire(gpus=2):
            done = subprocess.run(
                [*RPOOL_RUN, "--gpus", "1", "--", *PYTEST, "--rpool-gpus", "1"],
                cwd=root,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "rpool: private agent (pid " in done.stdout and "inside lease " in done.stdout
        assert {r["cvd"] for r in records(tmp_path)} == {"2"}

        # A Slurm job's CUDA_VISIBLE_DEVICES, with the node's agent answering: the same.
        # Without CUDA_DEVICE_ORDER the index means no GPU (docs/gpus.md), and the
        # refusal says why, in the agent's words.
        env["CUDA_VISIBLE_DEVICES"] = "1"
        out = finish(start(root, env, "--rpool-gpus", "1"), root)
        assert "ERROR: rpool: gpus=1 can never be granted" in out
        assert "(the private agent says: CUDA_VISIBLE_DEVICES='1': this process" in out, out
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        out = finish(start(root, env, "--rpool-gpus", "1"), root)
    assert "1 passed" in out and "CUDA_VISIBLE_DEVICES=1 is inherited" in out, out
    assert {r["cvd"] for r in records(tmp_path)} == {"2", "1"}


def test_worker_that_cannot_take_its_lease_fails_its_tests_with_the_reason(
    tmp_path: Path,
) -> None:
    """A pool whose cpus are not this machine's: each worker says why on the terminal and
    fails its tests at setup with that reason, instead of crashing with a traceback over
    and over until xdist's restart limit."""
    pool = gpu_pool(1, 0)
    pool["resource_pool"]["resources"]["cpus"] = [{"id": "4096", "slots": 2}]
    with running_agent(tmp_path, pool) as agent:
        root = project(tmp_path, "c", TESTS.format(n=2, sleep=0), conftest=RECORD)
        out = finish(
            start(root, inner_env(tmp_path, agent.socket), "-n", "2", "--rpool-cpus=1"), root
        )
    assert "2 errors" in out and "Traceback" not in out and "crashed" not in out, out
    said = [ln for ln in out.splitlines() if "rpool: cannot bind to the leased CPUs 4096" in ln]
    # Each worker says it once on the terminal; each test's error carries the reason (how
    # often depends on pytest's version: newer ones repeat it untruncated in the summary).
    assert sorted(ln[:5] for ln in said if ln.startswith("[gw")) == ["[gw0]", "[gw1]"], out
    assert len([ln for ln in said if not ln.startswith("[gw")]) >= 2, out


HOLD = """
import signal, time
from conftest import record

def test_hold():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # execnet's first try to stop a worker
    record(event="worker")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
"""


def test_killed_controller_keeps_the_gpus_until_its_workers_are_gone(tmp_path: Path) -> None:
    """SIGKILL the xdist controller: its workers run on (execnet stops them only seconds
    later), so the agent must not hand their GPUs out yet. The run lease ends when the
    last worker has gone, and so does the run's private agent."""
    with running_agent(tmp_path, gpu_pool(2, 2)) as agent:
        root = project(tmp_path, "h", HOLD, conftest=RECORD)
        proc = start(root, inner_env(tmp_path, agent.socket), "-n", "1", "--rpool-gpus=1")
        wait_until(lambda: records(tmp_path), timeout=60)
        [worker] = records(tmp_path)
        serving = int(output(root).split("a private agent (pid ")[1].split(")")[0])
        proc.kill()
        proc.wait()
        held = [le["label"] for le in agent.status()["leases"]]
        assert not gone(worker["pid"])  # so it was running while the agent said `held`
        assert held == [f"pytest[{proc.pid}] 1 workers"]
        os.kill(worker["pid"], signal.SIGKILL)
        wait_until(lambda: agent.status()["leases"] == [], timeout=10)
        wait_until(lambda: gone(serving), timeout=10)
