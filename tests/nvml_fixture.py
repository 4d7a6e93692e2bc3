"""The fake `libnvidia-ml.so.1` (tests/fake_nvml/fake_nvml.c), built once per session.

This machine has no NVIDIA driver, so NVML itself is what we fake, at the C level: the
real `pynvml` loads the fake through `LD_LIBRARY_PATH` in a subprocess (pynvml dlopens the
library at `nvmlInit`, and a process keeps the first one it loaded), so the ctypes
structures pynvml passes must really match. Nothing in pynvml is patched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

FAKE_SOURCE = Path(__file__).resolve().parent / "fake_nvml" / "fake_nvml.c"

# Runs in the child: the probe's report as JSON, plus whether pynvml got imported.
_CHILD = """
import json, sys
from rpool_agent.probes.nvidia import probe_gpus
before = "pynvml" in sys.modules
nvml = {"auto": None, "on": True}[sys.argv[2]]
report = probe_gpus(sys.argv[1], nvml=nvml)
print(json.dumps({"report": report.to_dict(), "pynvml_before": before,
                  "pynvml_after": "pynvml" in sys.modules}))
"""


@pytest.fixture(scope="session")
def fake_nvml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only the fake `libnvidia-ml.so.1`."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the fake libnvidia-ml.so.1")
    out = tmp_path_factory.mktemp("fake_nvml")
    cmd = [cc, "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out / "libnvidia-ml.so.1")]
    done = subprocess.run([*cmd, str(FAKE_SOURCE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def write_config(path: Path, gpus: list[dict[str, Any]], **system: Any) -> Path:
    """The fake's config: global `key=value`s, then one `[gpu]` section per GPU.

    A GPU dict's "migs" list becomes `[mig]` sections under it.
    """
    lines = [f"{k}={v}" for k, v in system.items()]
    for gpu in gpus:
        lines.append("[gpu]")
        lines += [f"{k}={v}" for k, v in gpu.items() if k != "migs"]
        for mig in gpu.get("migs", []):
            lines.append("[mig]")
            lines += [f"{k}={v}" for k, v in mig.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_environ() -> dict[str, str]:
    """Our environment without CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER: a test run inside a
    lease (or a CI executor given one GPU) must not change what the children see."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CUDA_")}


@dataclass
class ProbeRun:
    report: dict[str, Any]
    calls: list[str]  # NVML entry points the fake saw, in order
    pynvml_before: bool  # imported by merely importing probes.nvidia?
    pynvml_after: bool
    stderr: str


def run_probe(
    lib_dir: Path,
    root: Path | str,
    config: Path | None = None,
    *,
    nvml: str = "on",
    env: dict[str, str] | None = None,
) -> ProbeRun:
    """`probe_gpus(root, nvml=...)` in a child whose libnvidia-ml.so.1 is in `lib_dir`,
    with `env` added to a copy of ours that has no inherited CUDA_* variables."""
    log = Path(str(config) + ".calls") if config else Path(lib_dir) / "none.calls"
    log.unlink(missing_ok=True)
    env = {**clean_environ(), **(env or {})}
    env.update(LD_LIBRARY_PATH=str(lib_dir), FAKE_NVML_LOG=str(log))
    env["FAKE_NVML_CONFIG"] = str(config or "")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), nvml],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    calls = log.read_text().split() if log.exists() else []
    return ProbeRun(out["report"], calls, out["pynvml_before"], out["pynvml_after"], done.stderr)
