"""The per-job agent (`rpool-agent job -- CMD`, rpool_agent/job_agent.py) inside a
simulated allocation: the real wrapper process is started with its CPU affinity cut down
(`os.sched_setaffinity` in the process itself before it execs, which is what `taskset`
and Slurm's task/affinity do) and an inherited `CUDA_VISIBLE_DEVICES` over the fake NVML.
The job's own command then asks the private agent what it offers and leases everything;
nothing outside the allocation may ever appear. Real processes, sockets and pynvml; the
GPUs are the fake libnvidia-ml.so.1 (no GPU here).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nvml_fixture as nf
import pytest

fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake once

# The job's command: what the private agent offers, every lease it can get, and where.
JOB = r"""
import json, os, stat, sys
from rpool_agent import Client
from rpool_agent.errors import Unsatisfiable
sock = os.environ["RPOOL_AGENT_SOCKET"]
out = {"socket": sock, "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode)}
with Client() as c:
    res = c.pool()["resource_pool"]["nodes"][0]["resources"]
    out["pool"] = {k: [i["id"] for i in v] for k, v in res.items()}
    n_cpus, n_gpus = len(res["cpus"]), len(res.get("gpus", []))
    with c.acquire(cpus=n_cpus, gpus=n_gpus, timeout=10) as lease:
        out["cpus"] = lease.cpus
        out["gpus"] = [g.index for g in lease.gpus]
        env = lease.env()
        out["cuda"] = env.get("CUDA_VISIBLE_DEVICES")
    for more in ({"cpus": n_cpus + 1}, {"gpus": n_gpus + 1}):
        try:
            c.acquire(timeout=0, **more).release()
            out.setdefault("granted_beyond", []).append(more)
        except Unsatisfiable:
            pass
json.dump(out, open(sys.argv[1], "w"))
sys.exit(int(sys.argv[2]))
"""

# The allocation: affinity first, then exec the wrapper, as taskset would.
LAUNCH = r"""
import os, sys
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
from rpool_agent.job_agent import run_job
sys.exit(run_job(sys.argv[2:]))
"""
# The wrapper as the CLI runs it: its error is one line and exit status 125.
LAUNCH_ANY = r"""
import sys
from rpool_agent.job_agent import JobAgentError, run_job
try:
    sys.exit(run_job(sys.argv[1:]))
except JobAgentError as exc:
    print(f"rpool-agent: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def run_in_allocation(
    cpus: set[int], env: dict[str, str], tmp_path: Path, code: int = 0
) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = tmp_path / "job.json"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            LAUNCH,
            ",".join(map(str, sorted(cpus))),
            sys.executable,
            "-c",
            JOB,
            str(result),
            str(code),
        ],
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.exists(), done.stderr
    return done, json.loads(result.read_text())


def test_job_agent_offers_only_the_jobs_cpus_and_gpus(fake_nvml_dir: Path, tmp_path: Path) -> None:
    here = sorted(os.sched_getaffinity(0))
    if len(here) < 2:
        pytest.skip("needs two usable CPUs to leave one outside the allocation")
    job_cpus = {here[-1]}
    gpus = [
        {"name": "NVIDIA H100 80GB HBM3", "pci_bus_id": f"00000000:{b}:00.0", "minor": i}
        for i, b in enumerate(("18", "3A", "9A", "DB"))
    ]
    conf = nf.write_config(tmp_path / "nvml.conf", gpus)
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml_dir),
        "FAKE_NVML_CONFIG": str(conf),
        "CUDA_VISIBLE_DEVICES": "1,3",  # the job's GPUs, as Slurm or Flux hand them over
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    env.pop("RPOOL_AGENT_SOCKET", None)
    done, out = run_in_allocation(job_cpus, env, tmp_path, code=3)
    assert done.returncode == 3  # the command's status is the wrapper's
    assert out["pool"] == {"cpus": [str(here[-1])], "gpus": ["1", "3"]}
    assert out["cpus"] == [here[-1]] and out["gpus"] == [1, 3]
    assert out["cuda"] == "1,3"  # a lease inside hands on physical indices it was given
    assert "granted_beyond" not in out  # one more CPU or GPU is never offered
    assert out["dir_mode"] == 0o700  # only the job's user reaches the socket
    assert Path(out["socket"]).parent.parent == tmp_path  # under the job's TMPDIR
    assert not Path(out["socket"]).parent.exists()  # gone with the job
    assert "Traceback" not in done.stderr


def test_job_agent_without_gpus_and_with_all_cpus(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only job: no GPU, whatever the node has
    here = set(os.sched_getaffinity(0))
    done, out = run_in_allocation(here, env, tmp_path)
    assert done.returncode == 0
    assert sorted(out["cpus"]) == sorted(here)
    assert out["gpus"] == [] and out["pool"].get("gpus", []) == []


def test_job_agent_that_cannot_start_runs_nothing(tmp_path: Path) -> None:
    """A job TMPDIR so deep that no Unix socket fits under it: the agent cannot listen,
    the wrapper says why in one line, exits 125, and never runs the command."""
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    marker = tmp_path / "ran"
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH_ANY, sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        env={**env, "TMPDIR": str(deep)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 125, done.stderr
    assert "the job's agent" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()
    assert list(deep.iterdir()) == []


def test_job_agent_passes_sigterm_to_the_command(tmp_path: Path) -> None:
    """Slurm's time limit sends SIGTERM: the command gets it, the wrapper reports it."""
    ready = tmp_path / "ready"
    script = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
        f"pathlib.Path({str(ready)!r}).write_text('x')\n"
        "time.sleep(60)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    env["TMPDIR"] = str(tmp_path)
    launch = (
        "import sys; from rpool_agent.job_agent import run_job; sys.exit(run_job(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, sys.executable, "-c", script],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(ready, proc)
        proc.terminate()
        assert proc.wait(timeout=30) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p for p in tmp_path.iterdir() if p.name.startswith("rpool-private-")] == []


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until `path` exists (the command started), with a deadline; fails if proc ends."""
    import select
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} never appeared"
        select.select([], [], [], 0.02)


def test_job_command_shares_the_allocation_among_concurrent_runs(tmp_path: Path) -> None:
    """The recipe of packaging/slurm/ci-job.sbatch, for real: `rpool-agent job` around a
    shell that starts two `rpool-agent run` at once; each gets its own CPU of the job's."""
    here = sorted(os.sched_getaffinity(0))
    if len(here) < 2:
        pytest.skip("needs two usable CPUs for two concurrent leases")
    cli = [sys.executable, "-m", "rpool_agent.cli"]
    run = " ".join([*cli, "run", "--cpus", "1", "--timeout", "60", "--"])
    go = tmp_path / "go"  # each holder keeps its CPU until both hold one
    hold = f"sh -c 'echo $RPOOL_CPU_IDS > {tmp_path}/$0; until [ -e {go} ]; do sleep 0.01; done'"
    script = (
        f"{run} {hold} a & a=$!; {run} {hold} b & b=$!; "
        f"while [ ! -s {tmp_path}/a ] || [ ! -s {tmp_path}/b ]; do sleep 0.01; done; "
        f"touch {go}; wait $a && wait $b"
    )
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    done = subprocess.run(
        [*cli, "job", "--", "sh", "-c", script],
        env={**env, "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    held = {(tmp_path / n).read_text().strip() for n in ("a", "b")}
    assert held == {str(here[0]), str(here[1])}  # both at once, never the same CPU


def test_job_command_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "job"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert (
        done.stderr.splitlines()[-1] == "rpool-agent job: error: no command given (put it after --)"
    )


def test_agent_goes_when_the_wrapper_is_sigkilled(tmp_path: Path) -> None:
    """No agent outlives its job: SIGKILL the wrapper (the scheduler's last word) and the
    private agent notices its pipe close and stops."""
    import signal
    import time

    ready = tmp_path / "ready"
    script = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(ready)!r}).write_text("
        "f\"{os.getpid()} {os.environ['RPOOL_AGENT_SOCKET']}\")\n"
        "time.sleep(120)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH_ANY, sys.executable, "-c", script],
        env={**env, "TMPDIR": str(tmp_path)},
    )
    wait_for(ready, proc)
    command_pid, sock = ready.read_text().split(" ", 1)
    directory = os.path.dirname(sock)
    agents = [p for p in Path("/proc").iterdir() if p.name.isdigit() and directory in cmdline(p)]
    assert len(agents) == 1, agents
    agent = agents[0]
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while alive(agent):
            assert time.monotonic() < deadline, "the job's agent outlived its wrapper"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(command_pid), signal.SIGKILL)


def cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(proc: Path) -> bool:
    """Running, not gone and not a zombie waiting for a reaper."""
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_pytest_plugin_in_a_job_shares_the_jobs_agent(fake_nvml_dir: Path, tmp_path: Path) -> None:
    """A job's concurrent harnesses share ONE agent: with GPU 1 of the job's 1,3 held by
    an `rpool-agent run`, a pytest with the rpool plugin in the same job gets GPU 3. (Its
    own private agent on the inherited CUDA_VISIBLE_DEVICES would hand it GPU 1 again.)"""
    gpus = [
        {"name": "NVIDIA H100 80GB HBM3", "pci_bus_id": f"00000000:{b}:00.0", "minor": i}
        for i, b in enumerate(("18", "3A", "9A", "DB"))
    ]
    conf = nf.write_config(tmp_path / "nvml.conf", gpus)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_gpu.py").write_text(
        "import os, pathlib\n"
        "def test_gpu():\n"
        f"    pathlib.Path({str(tmp_path / 'pytest_gpu')!r})"
        ".write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
    )
    held, go = tmp_path / "run_gpu", tmp_path / "go"
    cli = f"{sys.executable} -m rpool_agent.cli"
    hold = f"sh -c 'echo $CUDA_VISIBLE_DEVICES > {held}; until [ -e {go} ]; do sleep 0.01; done'"
    pytest_cmd = (
        f"{sys.executable} -m pytest -q -p no:cacheprovider --rootdir {suite} -c /dev/null"
        f" --rpool-gpus 1 {suite}"
    )
    script = (
        f"{cli} run --gpus 1 --timeout 60 -- {hold} & r=$!; "
        f"until [ -s {held} ]; do sleep 0.01; done; "
        f"{pytest_cmd}; p=$?; touch {go}; wait $r && exit $p"
    )
    env = {k: v for k, v in os.environ.items() if k != "RPOOL_AGENT_SOCKET"}
    env.update(
        TMPDIR=str(tmp_path),
        LD_LIBRARY_PATH=str(fake_nvml_dir),
        FAKE_NVML_CONFIG=str(conf),
        CUDA_VISIBLE_DEVICES="1,3",
        CUDA_DEVICE_ORDER="PCI_BUS_ID",
    )
    done = subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "job", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    first = held.read_text().strip()
    assert first in ("1", "3")
    assert (tmp_path / "pytest_gpu").read_text() == ({"1", "3"} - {first}).pop()
