"""GPUs in trouble, end to end (issue 12, items 2-4): `rpool-agent detect` and `serve` on
the live root, with the real pynvml loading the fake libnvidia-ml.so.1 (no driver here).

The probe-level cases are in test_probes_nvidia.py; here the commands' answers: exit
codes, stderr lines, the pool offered.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nvml_fixture as nf

from rpool_agent.formats import parse_text

fake_nvml_dir = nf.fake_nvml_dir

A100 = {"name": "NVIDIA A100-SXM4-80GB", "memory": 85899345920, "cc": "8.0"}


def config(tmp_path: Path, *gpus: dict[str, object], **system: object) -> Path:
    full = [{**A100, "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000", **g} for i, g in
            enumerate(gpus)]  # fmt: skip
    return nf.write_config(tmp_path / "nvml.conf", full, **system)


def detect(lib: Path, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(conf)}
    return subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "detect", "-f", "canary-nodes", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def gpu_ids(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert done.returncode == 0, done.stderr
    return [g.id for g in parse_text(done.stdout, format="canary-nodes").local.resources["gpus"]]


def test_nvml_failing_makes_detect_fail_in_one_line(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = config(tmp_path, {}, fail="init:18")  # driver upgraded, not yet reloaded
    done = detect(fake_nvml_dir, conf)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "rpool-agent: NVIDIA GPUs unavailable: nvmlInit failed: RM has detected an NVML/RM "
        "version mismatch. (the driver and NVML library versions differ: after a driver "
        "upgrade, reload the nvidia kernel modules or reboot)"
    ]


def test_mig_gpu_offered_as_its_devices_unless_no_mig(fake_nvml_dir: Path, tmp_path: Path) -> None:
    migs = [{"slot": 0, "uuid": "MIG-aaaa", "gi": 1, "ci": 0}]
    conf = config(tmp_path, {}, {"mig_mode": 1, "migs": migs}, {"mig_mode": 1})
    done = detect(fake_nvml_dir, conf)
    assert gpu_ids(done) == ["0", "1_0"]  # no --mig needed; GPU 2 has no MIG device
    assert "GPU 2 is in MIG mode with no MIG device: left out" in done.stderr
    done = detect(fake_nvml_dir, conf, "--no-mig")  # the admin keeps MIG GPUs out
    assert gpu_ids(done) == ["0"]
    assert "GPU 1 is in MIG mode: left out (--no-mig)" in done.stderr


def test_lost_gpu_is_not_offered(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = config(tmp_path, {}, {"fail": "memory:15,uuid:15"}, {})
    done = detect(fake_nvml_dir, conf)
    assert gpu_ids(done) == ["0", "2"]
    assert done.stderr.strip() == "rpool-agent: GPU 1 skipped (nvmlDeviceGetUUID: GPU is lost)"
