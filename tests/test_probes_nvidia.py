"""NVIDIA GPU probe: the real pynvml against a fake libnvidia-ml.so.1, and recorded /proc trees.

This machine has no NVIDIA GPU or driver; NVML is faked in C (tests/fake_nvml), nothing
in pynvml is patched. Each NVML case runs the probe in a subprocess (see nvml_fixture).
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import nvml_fixture as nf
import pytest
from rpool_agent.probes.nvidia import (
    affinity_cpus,
    format_cuda_version,
    normalize_bus_id,
    parse_driver_version,
    probe_gpus,
)

TREES = Path(__file__).resolve().parent / "trees"
fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake once

NODE0 = [*range(0, 24), *range(48, 72)]
NODE1 = [*range(24, 48), *range(72, 96)]
DGX_BUSES = ["18", "2a", "3a", "5d", "9a", "ab", "ba", "db"]


def h100(i: int, bus: str, **extra: object) -> dict[str, object]:
    gpu: dict[str, object] = {
        "uuid": f"GPU-{i:08x}-1111-2222-3333-444455556666",
        "name": "NVIDIA H100 80GB HBM3",
        "memory": 85520809984,
        "pci_bus_id": f"00000000:{bus.upper()}:00.0",
        "minor": (i + 3) % 8,  # /dev/nvidiaN numbering differs from NVML's index
        "cc": "9.0",
        "mig_mode": 0,
    }
    gpu.update(extra)
    return gpu


def balanced(run: nf.ProbeRun) -> bool:
    """Every nvmlInit matched by an nvmlShutdown, and nothing called after the last one."""
    inits, shutdowns = run.calls.count("nvmlInit"), run.calls.count("nvmlShutdown")
    return inits == shutdowns and (not run.calls or run.calls[-1] == "nvmlShutdown")


# --- through NVML ------------------------------------------------------------------------


def test_zero_gpus_is_no_problem(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = nf.write_config(tmp_path / "c", [], driver_version="550.54.15")
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert run.report == {
        "gpus": [],
        "driver_version": "550.54.15",
        "cuda_driver_version": "12.4",
        "source": "nvml",
    }
    assert balanced(run) and run.calls[0] == "nvmlInit"
    assert not run.pynvml_before and run.pynvml_after  # imported lazily, by the probe


def test_eight_gpus_over_two_numa_nodes(fake_nvml_dir: Path, tmp_path: Path) -> None:
    # x86 reality: nvmlDeviceGetNumaNodeId is NOT_SUPPORTED (GPUs are not NUMA nodes), so
    # the node comes from sysfs; GPUs 4-7 also give no NVML affinity (-> local_cpulist).
    gpus = [
        h100(i, bus, cpu_affinity="0-23,48-71" if i < 4 else "", not_supported="numa_node")
        for i, bus in enumerate(DGX_BUSES)
    ]
    for gpu in gpus[4:]:
        gpu["not_supported"] = "numa_node,cpu_affinity"
    conf = nf.write_config(tmp_path / "c", gpus)
    run = nf.run_probe(fake_nvml_dir, TREES / "gpu-nvml-8", conf)
    got = run.report["gpus"]
    assert [g["index"] for g in got] == list(range(8))
    assert [g["pci_bus_id"] for g in got] == [f"0000:{b}:00.0" for b in DGX_BUSES]
    assert [g["minor_number"] for g in got] == [3, 4, 5, 6, 7, 0, 1, 2]
    assert [g["numa_node"] for g in got] == [0, 0, 0, 0, 1, 1, 1, 1]
    # NVML's bitmask spans two 64-bit words (CPUs 0-95, "possible" says so): both read.
    assert [g["cpu_affinity"] for g in got] == [NODE0] * 4 + [NODE1] * 4
    assert {g["compute_capability"] for g in got} == {"9.0"}
    assert {g["memory_bytes"] for g in got} == {85520809984}
    assert {g["mig_enabled"] for g in got} == {False}
    assert got[5]["uuid"] == "GPU-00000005-1111-2222-3333-444455556666"
    assert run.report["source"] == "nvml" and "problem" not in run.report
    assert balanced(run)


def test_mig_devices_replace_nothing_but_are_listed(fake_nvml_dir: Path, tmp_path: Path) -> None:
    # A GH200-like GPU: NVML knows its NUMA node (the GPU's memory is one); MIG on, with
    # slots 0, 1 and 5 configured out of 7 (empty slots answer NOT_FOUND and are skipped).
    migs = [
        {"slot": 0, "uuid": "MIG-aaaa0000", "name": "NVIDIA GH200 MIG 3g.48gb"},
        {"slot": 1, "uuid": "MIG-aaaa0001", "name": "NVIDIA GH200 MIG 3g.48gb", "gi": 2, "ci": 0},
        {"slot": 5, "uuid": "MIG-aaaa0005", "name": "NVIDIA GH200 MIG 1g.12gb", "gi": 9, "ci": 1},
    ]
    migs[0]["memory"] = 51539607552
    migs[2]["not_supported"] = "memory"  # absent on this one only
    gpus = [
        h100(0, "09", name="NVIDIA GH200 480GB", numa_node=2, mig_mode=1, max_mig=7, migs=migs),
        h100(1, "19"),
    ]
    conf = nf.write_config(tmp_path / "c", gpus)
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    mig_gpu, plain = run.report["gpus"]
    assert mig_gpu["mig_enabled"] is True and mig_gpu["numa_node"] == 2
    assert [m["index"] for m in mig_gpu["mig_devices"]] == [0, 1, 5]
    assert [m["uuid"] for m in mig_gpu["mig_devices"]] == [
        "MIG-aaaa0000",
        "MIG-aaaa0001",
        "MIG-aaaa0005",
    ]
    first, second, third = mig_gpu["mig_devices"]
    assert first["memory_bytes"] == 51539607552
    assert (second["gpu_instance_id"], second["compute_instance_id"]) == (2, 0)
    assert third["name"] == "NVIDIA GH200 MIG 1g.12gb" and "memory_bytes" not in third
    assert plain["mig_enabled"] is False and plain["mig_devices"] == []
    assert run.calls.count("nvmlDeviceGetMigDeviceHandleByIndex") == 7
    assert balanced(run)


def test_not_supported_fields_are_absent_not_fatal(fake_nvml_dir: Path, tmp_path: Path) -> None:
    everything = "name,memory,pci,minor,numa_node,cpu_affinity,cc,mig_mode"
    gpus = [
        h100(0, "3b", not_supported=everything),
        h100(1, "5e", fail="mig_mode:2,memory:4"),  # Invalid Argument / No Permission
    ]
    conf = nf.write_config(tmp_path / "c", gpus, not_supported="cuda_driver_version")
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    bare, partial = run.report["gpus"]
    # NOT_SUPPORTED MIG mode means "this GPU cannot do MIG": off, the one singled-out case.
    assert bare == {
        "index": 0,
        "uuid": "GPU-00000000-1111-2222-3333-444455556666",
        "mig_enabled": False,
        "mig_devices": [],
    }
    # Other errors that do not say the GPU is broken: unknown, so absent; the GPU stays.
    assert "mig_enabled" not in partial and "memory_bytes" not in partial
    assert partial["compute_capability"] == "9.0"
    assert "cuda_driver_version" not in run.report and "problem" not in run.report
    assert run.report["driver_version"] == "550.54.15"
    assert balanced(run)


@pytest.mark.parametrize(
    ("fail", "says"),
    [
        ("memory:15", "nvmlDeviceGetMemoryInfo: GPU is lost"),
        ("uuid:999", "nvmlDeviceGetUUID: Unknown Error"),
        ("uuid:4", "nvmlDeviceGetUUID: Insufficient Permissions"),  # no UUID: no name for CUDA
        ("cc:16", "nvmlDeviceGetCudaComputeCapability: GPU requires restart"),  # RESET_REQUIRED
    ],
)
def test_gpu_whose_queries_fail_is_left_out_and_named(
    fake_nvml_dir: Path, tmp_path: Path, fail: str, says: str
) -> None:
    """Issue 12, item 4: the handle opens, but the GPU is lost (or NVML cannot say what
    it is): it was offered with an empty UUID; now it is left out, and stderr names it."""
    gpus = [h100(0, "18"), h100(1, "2a", fail=fail), h100(2, "3a")]
    conf = nf.write_config(tmp_path / "c", gpus)
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert [g["index"] for g in run.report["gpus"]] == [0, 2]
    assert run.report["problem"] == f"GPU 1 skipped ({says})"
    assert balanced(run)


def test_gpu_without_handle_is_skipped_with_reason(fake_nvml_dir: Path, tmp_path: Path) -> None:
    gpus = [h100(0, "18"), h100(1, "2a", fail="handle:4"), h100(2, "3a")]
    conf = nf.write_config(tmp_path / "c", gpus)
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert [g["index"] for g in run.report["gpus"]] == [0, 2]  # NVML's numbering is kept
    assert "GPU 1 skipped" in run.report["problem"]
    assert "Insufficient Permissions" in run.report["problem"]  # NO_PERMISSION (4)


def test_init_failing_without_driver(fake_nvml_dir: Path, tmp_path: Path) -> None:
    # The library is installed, the kernel driver is not loaded, /proc lists no GPU: a node
    # without NVIDIA GPUs (CUDA packages in the image), not a failure.
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")], fail="init:9")
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert run.report["gpus"] == [] and run.report["source"] == "none"
    assert run.report["problem"] == "no NVIDIA GPUs: nvmlInit failed: Driver Not Loaded"
    assert run.calls == ["nvmlInit"]  # nothing else asked of a library that said no


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"fail": "init:18"}, "nvmlInit failed: RM has detected an NVML/RM version mismatch."),
        ({"fail": "init:4"}, "nvmlInit failed: Insufficient Permissions"),
        ({"fail": "init:999"}, "nvmlInit failed: Unknown Error"),
        ({"fail": "count:999"}, "nvmlDeviceGetCount failed: Unknown Error"),
    ],
)
def test_nvml_that_will_not_answer_offers_no_gpus(
    fake_nvml_dir: Path, tmp_path: Path, config: dict[str, str], says: str
) -> None:
    """Issue 12, item 3: a driver upgraded without a reboot, a container without the
    device files... The driver's /proc files still list the GPUs, and they used to be
    offered from there: a pool that looks GPU-capable where every GPU job fails."""
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")], **config)
    run = nf.run_probe(fake_nvml_dir, TREES / "gpu-procfs-4", conf)
    assert run.report["gpus"] == [] and run.report["source"] == "failed"
    assert run.report["problem"].startswith(f"NVIDIA GPUs unavailable: {says}")
    assert run.report["driver_version"] == "535.129.03"  # what the driver says, for the record


def test_driver_not_loaded_yet_listing_gpus_is_a_failure(
    fake_nvml_dir: Path, tmp_path: Path
) -> None:
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")], fail="init:9")
    run = nf.run_probe(fake_nvml_dir, TREES / "gpu-procfs-4", conf)
    assert run.report["source"] == "failed" and run.report["gpus"] == []
    assert "Driver Not Loaded, yet the driver lists 4 GPU(s)" in run.report["problem"]


def test_mismatch_says_what_to_do(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")], fail="init:18")
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert "reload the nvidia kernel modules or reboot" in run.report["problem"]


def test_count_failing_still_shuts_nvml_down(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")], fail="count:999")
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf)
    assert run.report["gpus"] == [] and run.report["source"] == "failed"
    assert run.calls == ["nvmlInit", "nvmlDeviceGetCount_v2", "nvmlShutdown"]


def test_no_library_falls_back_to_proc_with_a_warning(tmp_path: Path) -> None:
    """The one case the /proc reading exists for: a live node whose driver is loaded but
    whose NVML library is not installed (or not found)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    run = nf.run_probe(empty, TREES / "gpu-procfs-4")
    assert run.report["source"] == "procfs" and len(run.report["gpus"]) == 4
    assert run.report["problem"].startswith("warning: cannot load NVML")
    assert "read 4 GPU(s) from /proc/driver/nvidia/gpus instead" in run.report["problem"]


def test_library_missing(tmp_path: Path) -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("a real libnvidia-ml.so.1 is installed system-wide")
    empty = tmp_path / "empty"
    empty.mkdir()
    run = nf.run_probe(empty, tmp_path)
    assert run.report == {
        "gpus": [],
        "source": "none",
        "problem": run.report["problem"],
    }
    assert run.report["problem"].startswith("no NVIDIA GPUs: cannot load NVML")
    assert "libnvidia-ml.so.1" in run.report["problem"]
    assert not run.pynvml_after  # the dlopen check spared the pynvml import


def test_recorded_tree_never_calls_nvml(fake_nvml_dir: Path, tmp_path: Path) -> None:
    # NVML would describe this machine, not the tree: the fake must see no call at all.
    conf = nf.write_config(tmp_path / "c", [h100(0, "18")])
    run = nf.run_probe(fake_nvml_dir, TREES / "gpu-procfs-4", conf, nvml="auto")
    assert run.calls == []
    assert run.report["source"] == "procfs" and len(run.report["gpus"]) == 4


# --- from /proc/driver/nvidia (in-process: no NVML involved) ------------------------------


def test_procfs_tree_four_gpus() -> None:
    report = probe_gpus(TREES / "gpu-procfs-4")
    assert report.source == "procfs" and report.problem is None
    assert report.driver_version == "535.129.03" and report.cuda_driver_version is None
    gpus = report.gpus
    # 5 listed, 1 excluded; index follows PCI bus order as NVML's does.
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.pci_bus_id for g in gpus] == [
        "0000:1b:00.0",
        "0000:3d:00.0",
        "0000:89:00.0",
        "0000:b1:00.0",
    ]
    assert [g.minor_number for g in gpus] == [2, 3, 0, 1]
    assert [g.numa_node for g in gpus] == [0, 0, 1, 1]
    assert gpus[0].cpu_affinity == tuple(NODE0) and gpus[3].cpu_affinity == tuple(NODE1)
    assert gpus[0].uuid == "GPU-9221d5d1-b60b-a624-bf14-0a1819cfda3b"
    assert {g.name for g in gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(g.memory_bytes is None and g.mig_enabled is None for g in gpus)
    json.dumps(report.to_dict())  # plain data throughout


def test_procfs_uninitialised_gpu_on_old_driver() -> None:
    report = probe_gpus(str(TREES / "gpu-procfs-noinit"))
    (gpu,) = report.gpus
    assert gpu.uuid == ""  # "GPU-????????-..." until the GPU is initialised
    assert gpu.numa_node is None  # numa_node -1
    assert gpu.cpu_affinity == tuple(range(8))  # from the hex mask local_cpus
    assert gpu.name == "Tesla V100-SXM2-16GB" and gpu.minor_number == 0
    assert report.driver_version == "470.57.02"
    assert "numa_node" not in gpu.to_dict()


def test_tree_without_driver(tmp_path: Path) -> None:
    report = probe_gpus(tmp_path)
    assert report.gpus == () and report.source == "none"
    assert report.problem is not None and "proc/driver/nvidia/gpus" in report.problem


def test_live_machine_never_raises() -> None:
    report = probe_gpus()
    assert report.source in {"nvml", "procfs", "none"}
    assert report.gpus or report.problem  # zero GPUs always comes with a reason


# --- pure parsers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00000000:3B:00.0", "0000:3b:00.0"),  # NVML's busId
        ("0000:3B:00.0", "0000:3b:00.0"),  # NVML's busIdLegacy
        ("0000:3b:00.0", "0000:3b:00.0"),  # sysfs, /proc
        ("3b:00.1", "0000:3b:00.1"),  # lspci without -D
        ("00010000:01:00.0", "10000:01:00.0"),  # VMD domains are wider than 4 digits
        ("not a bus id", None),
        ("", None),
    ],
)
def test_normalize_bus_id(text: str, expected: str | None) -> None:
    assert normalize_bus_id(text) == expected


def test_small_parsers() -> None:
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(11080) == "11.8"
    assert affinity_cpus([0b101, 1 << 63]) == (0, 2, 127)
    assert parse_driver_version("NVRM version: weird") is None
    assert parse_driver_version("") is None
