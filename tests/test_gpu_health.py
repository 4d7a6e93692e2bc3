"""A serving agent and GPUs that fail (issue 12, items 3 and 5), against the real pynvml
loading the fake libnvidia-ml.so.1.

The agent is a real `rpool-agent serve` child that detects its pool (no pool file); the
fake NVML reads a control file at every call, so a test breaks a GPU while the agent runs,
as a GPU falling off the bus would, and mends it again.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nvml_fixture as nf
import pytest
from agent_fixture import wait_for_socket, wait_until

from rpool_agent.client import Client
from rpool_agent.errors import ResourceUnavailable

fake_nvml_dir = nf.fake_nvml_dir


def gpus(n: int) -> list[dict[str, object]]:
    return [
        {"uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000", "name": "NVIDIA A100", "cc": "8.0"}
        for i in range(n)
    ]


@contextmanager
def agent(
    tmp_path: Path, lib: Path, conf: Path, config_yaml: str = "", *args: str
) -> Iterator[tuple[str, Path]]:
    """A detecting agent; yields its socket and its log file."""
    sock, log = str(tmp_path / "a.sock"), tmp_path / "a.log"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_yaml or "log_level: info\n")
    env = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(conf)}
    env["FAKE_NVML_CONTROL"] = str(tmp_path / "control")
    env["FAKE_NVML_LOG"] = str(tmp_path / "calls")
    cmd = [sys.executable, "-m", "rpool_agent.cli", "serve", "--socket", sock]
    cmd += ["--state-dir", str(tmp_path / "state"), "--config", str(cfg), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_socket(sock, proc)
        yield sock, log
    finally:
        proc.terminate()
        proc.wait(10)


def status(sock: str) -> dict[str, Any]:
    with Client(sock) as c:
        return c.status()


def drains(sock: str) -> dict[str, str]:
    return {d["id"]: d["reason"] for d in status(sock)["drained"]}


def polls(tmp_path: Path) -> int:
    calls = tmp_path / "calls"
    return calls.read_text().split().count("nvmlDeviceGetHandleByUUID") if calls.exists() else 0


def test_failed_gpu_is_drained_its_holder_keeps_it_and_it_comes_back(
    fake_nvml_dir: Path, tmp_path: Path
) -> None:
    conf = nf.write_config(tmp_path / "nvml.conf", gpus(3))
    control = tmp_path / "control"
    with (
        agent(tmp_path, fake_nvml_dir, conf, "gpu_health_interval: 0.05\n") as (sock, log),
        Client(sock) as holder,
        Client(sock) as other,
    ):
        held = holder.acquire({"gpus": 1}, timeout=5)
        mine = held.gpus[0].id
        spare = next(i for i in "012" if i != mine)
        control.write_text(f"gpu{mine}=15\ngpu{spare}=15\n")  # both fall off the bus
        wait_until(lambda: set(drains(sock)) == {mine, spare})
        reasons = drains(sock)
        assert reasons[mine] == "health: nvmlDeviceGetHandleByUUID: GPU is lost"
        snap = status(sock)
        assert [le["id"] for le in snap["leases"]] == [held.id]  # the holder keeps it
        assert snap["types"]["gpus"]["free"] == 1
        with pytest.raises(ResourceUnavailable):
            other.acquire({"gpus": 2}, timeout=0.2)  # only one GPU answers
        control.write_text("")  # they answer again
        wait_until(lambda: drains(sock) == {})
        assert status(sock)["types"]["gpus"]["free"] == 2
        held.release()
    text = log.read_text()
    assert f"drain gpus:{mine} (health: nvmlDeviceGetHandleByUUID: GPU is lost)" in text
    assert f"undrain gpus:{spare} (health: answers again)" in text


def test_an_admin_drain_is_not_lifted_by_the_poller(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = nf.write_config(tmp_path / "nvml.conf", gpus(2))
    with (
        agent(tmp_path, fake_nvml_dir, conf, "", "--gpu-health-interval", "0.05") as (sock, _),
        Client(sock) as admin,  # the tests run as root: root may drain
    ):
        admin.drain("gpus:1", "maintenance")
        seen = polls(tmp_path)
        wait_until(lambda: polls(tmp_path) >= seen + 6)  # three more polls of 2 GPUs
        assert drains(sock) == {"1": "maintenance"}


def test_polling_runs_off_the_event_loop(fake_nvml_dir: Path, tmp_path: Path) -> None:
    """nvmlInit can take seconds (no persistence mode); the agent answers meanwhile."""
    conf = nf.write_config(tmp_path / "nvml.conf", gpus(1), init_delay_ms=1000)
    with agent(tmp_path, fake_nvml_dir, conf, "gpu_health_interval: 0.01\n") as (sock, _):
        calls = tmp_path / "calls"
        inits = calls.read_text().split().count("nvmlInit")
        wait_until(lambda: calls.read_text().split().count("nvmlInit") > inits, timeout=10)
        start = time.monotonic()  # a poll is now inside its 1 s nvmlInit
        status(sock)
        assert time.monotonic() - start < 0.5


def test_nvml_failing_at_start_serves_cpus_and_says_why(
    fake_nvml_dir: Path, tmp_path: Path
) -> None:
    conf = nf.write_config(tmp_path / "nvml.conf", gpus(2), fail="init:18")
    with agent(tmp_path, fake_nvml_dir, conf) as (sock, log):
        snap = status(sock)
        assert snap["gpus_unavailable"].startswith(
            "NVIDIA GPUs unavailable: nvmlInit failed: RM has detected an NVML/RM version"
        )
        assert snap["types"]["cpus"]["total"] >= 1 and snap["types"]["gpus"]["total"] == 0
        with Client(sock) as c:
            c.acquire({"cpus": 1}, timeout=5).release()
        from rpool_agent.runner import format_status

        assert "GPUs unavailable: NVIDIA GPUs unavailable: nvmlInit" in format_status(snap)
    assert "serving the CPUs only" in log.read_text()
