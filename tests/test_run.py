"""`rpool-agent run`, end to end: a real agent, the real CLI, real child processes.

Everything the lease hands over is checked from inside the command (its environment,
`os.sched_getaffinity(0)`, the per-lease files it was given); lifetimes are checked with
real signals. The pools' cpu ids are CPUs 0 and 1, which every machine running this has.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_fixture import Agent, gpu_pool, running_agent, wait_until

PY = sys.executable
RPOOL = [PY, "-m", "rpool_agent.cli"]

# The command under test: dumps what it was handed as JSON on stdout, including the agent's
# own view of its lease (asked from inside, so it is the lease this very process holds).
DUMP = """
import json, os, sys
from rpool_agent.client import Client
files = {p: (open(p).read() if os.path.exists(p) else None) for p in sys.argv[1:]}
with Client(os.environ["RPOOL_AGENT_SOCKET"]) as c:
    leases = c.status()["leases"]
json.dump({
    "env": dict(os.environ), "affinity": sorted(os.sched_getaffinity(0)), "argv": sys.argv[1:],
    "files": files, "pid": os.getpid(), "leases": leases,
}, sys.stdout)
"""


def rpool(agent: Agent, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Any:
    return subprocess.run(
        [*RPOOL, *args],
        env={**agent.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_dump(agent: Agent, *opts: str, args: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
    proc = rpool(agent, "run", *opts, "--", PY, "-c", DUMP, *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def one_line_error(proc: Any) -> str:
    """The CLI's refusal: non-zero, nothing on stdout, one line on stderr, no traceback
    (after the one line saying that it waited, when it did: see test_wait_report.py)."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    if len(lines) == 2 and lines[0].startswith("rpool-agent: waiting "):
        lines = lines[1:]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def lease_ids(agent: Agent) -> list[str]:
    return [le["id"] for le in agent.status()["leases"]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """One 4-GPU, 2-cpu agent for the tests that leave nothing behind (saves a start each)."""
    with running_agent(tmp_path_factory.mktemp("shared"), gpu_pool(4, 2)) as agent:
        yield agent
    # every test using it must have ended all its leases


# --- what the command is handed ------------------------------------------------------------


def test_run_hands_the_lease_to_the_command(tmp_path: Path) -> None:
    stale = {
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
        "CTEST_RESOURCE_GROUP_COUNT": "1",
        "CTEST_RESOURCE_GROUP_0": "gpus",
        "CTEST_RESOURCE_GROUP_0_GPUS": "id:3,slots:1",
        "RPOOL_POOL_FILE": "/stale/pool.yaml",
        "OMP_NUM_THREADS": "64",
    }
    with running_agent(tmp_path, gpu_pool(4, 2)) as agent, agent.client() as c:
        held = c.acquire(gpus=1)  # someone else holds a GPU: the lease is not just "0,1"
        [other] = [g["id"] for g in held.resources["gpus"]]
        got = run_dump(
            agent,
            *("--gpus", "2", "--cpus", "1", "--label", "dump"),
            args=("{ctest_spec}", "{pool}", "{pool_nodes}", "--pool={pool}", "{other}"),
            env=stale,
        )
        env = got["env"]
        [mine] = [le for le in got["leases"] if le["id"] == env["RPOOL_LEASE_ID"]]
        assert mine["holder"]["pid"] == got["pid"]  # exec: the command is the lease's holder
        assert mine["label"] == "dump"
        gpus = sorted(g["id"] for g in mine["resources"]["gpus"])
        [cpu] = [c["id"] for c in mine["resources"]["cpus"]]
        assert len(gpus) == 2 and other not in gpus
        # CUDA sees exactly the leased physical GPUs (gpu_pool: index == id), in PCI order.
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(gpus)
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert env["RPOOL_GPU_IDS"] == ",".join(gpus)
        uuids = [f"GPU-{int(g):08x}-0000-0000-0000-000000000000" for g in gpus]
        assert env["RPOOL_GPU_UUIDS"] == ",".join(uuids)
        assert env["CANARY_GPU_IDS"] == ",".join(gpus)
        assert env["RPOOL_CPU_IDS"] == env["CANARY_CPU_IDS"] == cpu
        assert env["OMP_NUM_THREADS"] == "1"
        assert got["affinity"] == [int(cpu)]
        # `--gpus/--cpus` is a mapping request: no CTest group variables, stale ones gone.
        assert not [k for k in env if k.startswith("CTEST_RESOURCE_GROUP")]
        # The three per-lease files exist while the command runs, and the placeholders
        # (alone or inside a longer argument) name them; other braces stay as they are.
        paths = [env["RPOOL_CTEST_SPEC_FILE"], env["RPOOL_POOL_FILE"], env["RPOOL_POOL_NODES_FILE"]]
        assert got["argv"] == [*paths, f"--pool={paths[1]}", "{other}"]
        # One directory per lease, named by the agent at random (not by the lease id,
        # which every user sees in `status`: docs/security.md)
        [lease_dir] = {Path(p).parent for p in paths}
        assert lease_dir.name != mine["id"] and len(lease_dir.name) == 32
        spec = json.loads(got["files"][paths[0]])
        assert [g["id"] for g in spec["local"][0]["gpus"]] == ["0", "1"]  # CUDA's numbering
        [node] = yaml.safe_load(got["files"][paths[2]])["resource_pool"]["nodes"]
        assert [g["id"] for g in node["resources"]["gpus"]] == gpus  # physical, for canary
        assert [c["id"] for c in node["resources"]["cpus"]] == [cpu]
        # ... and are gone, with the lease, once the command has exited.
        wait_until(lambda: env["RPOOL_LEASE_ID"] not in lease_ids(agent), 5)
        assert not any(os.path.exists(p) for p in paths)
        assert not Path(paths[0]).parent.exists()
        held.release()


def hyperthread_pool() -> dict[str, Any]:
    """One core (pool cpu "0") with hardware threads 0 and 1; two GPUs."""
    pool = gpu_pool(2, 1)
    pool["resource_pool"]["additional_properties"]["instances"]["cpus"] = {
        "0": {"threads": [0, 1], "numa": 0}
    }
    return pool


def test_cpus_only_lease_hides_every_gpu_and_binds_hyperthread_siblings(tmp_path: Path) -> None:
    with running_agent(tmp_path, hyperthread_pool()) as agent:
        env_before = {"CUDA_VISIBLE_DEVICES": "0", "CANARY_GPU_IDS": "0"}
        got = run_dump(agent, "--cpus", "1", env=env_before)
        env = got["env"]
        assert env["CUDA_VISIBLE_DEVICES"] == "-1"  # no GPU, and not "" (see docs/handoff.md)
        assert env["RPOOL_GPU_IDS"] == env["RPOOL_GPU_UUIDS"] == env["CANARY_GPU_IDS"] == ""
        assert env["RPOOL_CPU_IDS"] == "0,1"  # the core's hardware threads
        assert env["CANARY_CPU_IDS"] == "0"  # the pool id
        assert env["OMP_NUM_THREADS"] == "1"  # one thread per leased core
        assert got["affinity"] == [0, 1]


def test_leased_cpus_this_machine_lacks_are_refused_before_the_command_runs(
    tmp_path: Path,
) -> None:
    pool = gpu_pool(1, 1)
    absent = max(os.sched_getaffinity(0)) + 4096  # beyond any CPU this process may use
    pool["resource_pool"]["additional_properties"]["instances"]["cpus"] = {
        "0": {"threads": [absent]}
    }
    marker = tmp_path / "ran"
    with running_agent(tmp_path, pool) as agent:
        proc = rpool(agent, "run", "--cpus", "1", "--", "touch", str(marker))
        line = one_line_error(proc)
        assert "cannot bind to the leased CPUs" in line and str(absent) in line
        assert not marker.exists()
        wait_until(lambda: lease_ids(agent) == [], 5)


@pytest.mark.parametrize(
    ("request_", "n_gpus", "groups"),
    [
        ("gpus:1", 1, "1"),  # CTest RESOURCE_GROUPS string
        ("2,gpus:1", 2, "2"),
        ('[{"type": "gpus", "slots": 1}]', 1, "1"),  # canary's item list: one group
        ('{"gpus": 2, "cpus": 1}', 2, None),  # mapping: no group variables
    ],
)
def test_request_forms(shared: Agent, request_: str, n_gpus: int, groups: str | None) -> None:
    env = run_dump(shared, "--request", request_)["env"]
    assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == n_gpus
    assert env.get("CTEST_RESOURCE_GROUP_COUNT") == groups
    if groups:  # lease-local ids, as ctest would hand them to one test
        assert env["CTEST_RESOURCE_GROUP_0_GPUS"] in ("id:0,slots:1", "id:1,slots:1")


def test_options_end_at_the_command(shared: Agent) -> None:
    # Without `--`, what follows the command is the command's: `--gpus 3` is not run's.
    proc = rpool(shared, "run", "--gpus", "1", PY, "-c", DUMP, "--gpus", "3", "--")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["argv"] == ["--gpus", "3", "--"]
    assert got["env"]["RPOOL_GPU_IDS"].count(",") == 0


# --- exit status and refusals --------------------------------------------------------------


def test_exit_status_is_the_commands(shared: Agent, tmp_path: Path) -> None:
    assert rpool(shared, "run", "--gpus", "1", "--", "sh", "-c", "exit 7").returncode == 7
    assert rpool(shared, "run", "--gpus", "1", "--", "true").returncode == 0
    # A signal death stays a signal death (the shell sees 128+n), as exec implies.
    killed = rpool(shared, "run", "--gpus", "1", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == -signal.SIGTERM
    missing = rpool(shared, "run", "--gpus", "1", "--", "no-such-command-xyz", "arg")
    assert missing.returncode == 127
    assert "no-such-command-xyz" in one_line_error(missing)
    not_exec = rpool(shared, "run", "--gpus", "1", "--", str(tmp_path))
    assert not_exec.returncode == 126
    one_line_error(not_exec)
    wait_until(lambda: lease_ids(shared) == [], 5)  # failed execs left nothing held


def test_python_ignored_signals_are_not_passed_on(shared: Agent) -> None:
    # Python ignores SIGPIPE; exec would keep that, and `run -- yes | head -1` would
    # then have `yes` report a broken pipe instead of dying of SIGPIPE like it should.
    proc = rpool(shared, "run", "--gpus", "1", "--", "sh", "-c", "grep SigIgn /proc/$$/status")
    mask = int(proc.stdout.split()[1], 16)
    assert not mask & (1 << (signal.SIGPIPE - 1))
    assert not mask & (1 << (signal.SIGXFSZ - 1))
    piped = subprocess.run(
        f"{' '.join(RPOOL)} run --gpus 1 -- yes | head -1",
        shell=True,
        env=shared.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert piped.stdout == "y\n" and "Broken pipe" not in piped.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--gpus", "9", "--", "true"], "can never be granted"),  # pool: 4
        (["--request", "fpgas:1", "--", "true"], "unknown resource type"),
        (["--request", "gpus:x", "--", "true"], "RESOURCE_GROUPS"),
        (["--request", "{bad", "--", "true"], "not valid JSON"),
        (["--gpus", "1", "--request", "gpus:1", "--", "true"], "not both"),
        (["--", "true"], "nothing requested"),
        (["--gpus", "1", "--timeout", "0.2", "--", "true"], "not granted within 0.2 s"),
        (["--gpus", "1", "--timeout", "nan", "--", "true"], "timeout must be a number"),
    ],
)
def test_bad_requests_fail_in_one_line(shared: Agent, args: list[str], says: str) -> None:
    with shared.client() as c, c.acquire(gpus=4):  # so that a request that waits times out
        proc = rpool(shared, "run", *args)
    assert proc.returncode == 125  # run's own failure, not a status the command could give
    assert says.lower() in one_line_error(proc).lower()


@pytest.mark.parametrize("token", ["{pool_nodes}", "{pool}"])
def test_a_canary_pool_for_a_lease_without_cpus_is_refused_with_the_reason(
    shared: Agent, token: str
) -> None:
    """canary runs no test on a pool without cpus ("no jobs to run", exit 7): the README's
    `run --gpus 2 -- canary ... {pool_nodes}` failed so, looking like canary's fault."""
    proc = rpool(shared, "run", "--gpus", "1", "--", "echo", f"--resource-pool-file={token}")
    assert proc.returncode == 125 and proc.stdout == ""
    assert one_line_error(proc) == (
        f"rpool-agent: {token}: this lease holds no cpus, and canary runs no test on a pool"
        " without them: lease some too (--cpus N, or cpus in --request)"
    )
    assert lease_ids(shared) == []  # the lease went with the refusal
    ok = rpool(shared, "run", "--gpus", "1", "--cpus", "1", "--", "test", "-s", token)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--bogus", "--", "true"],
        ["--gpus", "-1", "--", "true"],
        ["--timeout", "soon", "--gpus", "1", "--", "true"],
        ["--gpus", "1"],  # no command
    ],
)
def test_bad_options_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    # Refused by the option parser before any agent is contacted: none is running here.
    env = {**os.environ, "RPOOL_AGENT_SOCKET": str(tmp_path / "none.sock")}
    proc = subprocess.run([*RPOOL, "run", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: rpool-agent run ")


def test_no_agent_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "RPOOL_AGENT_SOCKET": str(tmp_path / "none.sock")}
    proc = subprocess.run(
        [*RPOOL, "run", "--gpus", "1", "--", "true"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 125
    assert "no agent at" in one_line_error(proc)


# --- lifetime: the lease lasts exactly as long as the command ------------------------------


def start_run(agent: Agent, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*RPOOL, "run", *args], env=agent.env)


def holder_of(agent: Agent, pid: int) -> str | None:
    for le in agent.status()["leases"]:
        if le["holder"]["pid"] == pid:
            return str(le["id"])
    return None


def waiter(agent: Agent, got: dict[str, Any]) -> threading.Thread:
    """A client blocked on the only GPU; records when it is granted."""

    def wait() -> None:
        with agent.client() as c:
            lease = c.acquire(gpus=1, timeout=30, label="waiter")
            got["at"] = time.monotonic()
            got["gpus"] = [g["id"] for g in lease.resources["gpus"]]

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    wait_until(lambda: len(agent.status()["waiters"]) == 1)
    return t


def test_sigkilled_run_takes_its_command_and_lease_down(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1, 1)) as agent:
        proc = start_run(agent, "--gpus", "1", "--", "sleep", "60")
        wait_until(lambda: holder_of(agent, proc.pid) is not None)
        lease_id = holder_of(agent, proc.pid)
        # The pid that holds the lease *is* the command (exec): no wrapper to outlive.
        wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes() == b"sleep\x0060\x00")
        got: dict[str, Any] = {}
        t = waiter(agent, got)
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(5) == -signal.SIGKILL
        t.join(10)
        assert got["gpus"] == ["0"]
        assert got["at"] - killed_at < 2.0  # reaped on EOF, far below the waiter's 30 s
        assert lease_id not in lease_ids(agent)
        assert not (tmp_path / "leases" / str(lease_id)).exists()


def test_lease_ends_when_the_command_exits(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
    with running_agent(tmp_path, gpu_pool(1, 1)) as agent:
        proc = start_run(agent, "--gpus", "1", "--timeout", "10", "--", PY, "-c", script)
        wait_until(lambda: holder_of(agent, proc.pid) is not None)
        lease_id = holder_of(agent, proc.pid)
        got: dict[str, Any] = {}
        t = waiter(agent, got)
        time.sleep(0.2)
        assert holder_of(agent, proc.pid) == lease_id  # held for as long as it runs
        assert "at" not in got
        go.touch()
        assert proc.wait(10) == 0
        exited_at = time.monotonic()
        t.join(10)
        assert got["gpus"] == ["0"] and got["at"] - exited_at < 1.0
        assert lease_id not in lease_ids(agent)


# --- the admin commands, from the command line -----------------------------------------------


def test_drain_undrain_and_reload_say_what_they_did(tmp_path: Path) -> None:
    config = tmp_path / "admin.yaml"  # our own group is the admin group: no root needed
    config.write_text(f"admin_group: {grp.getgrgid(os.getgid()).gr_name}\n")
    with running_agent(tmp_path, gpu_pool(2), "--config", str(config)) as agent:
        drained = rpool(agent, "drain", "gpus:1", "--reason", "bad fan")
        assert (drained.returncode, drained.stdout) == (0, "drained gpus:1\n")
        assert agent.status()["drained"] == [{"type": "gpus", "id": "1", "reason": "bad fan"}]
        undrained = rpool(agent, "undrain", "gpus:1")
        assert (undrained.returncode, undrained.stdout) == (0, "undrained gpus:1\n")
        assert agent.status()["drained"] == []
        reloaded = rpool(agent, "reload")  # once printed a Python dict
        assert reloaded.returncode == 0
        assert reloaded.stdout.startswith("reloaded: 1 node; ") and "gpus: 2" in reloaded.stdout
        assert "TYPE:ID" in one_line_error(rpool(agent, "drain", "bogus"))
