"""An inherited CUDA_VISIBLE_DEVICES restricts what detect and serve offer (issue 12, item 1).

The rules are CUDA's (probes/visible.py cites them). The table tests call the pure reader;
the others run the real pynvml over the fake libnvidia-ml.so.1 in a child process whose
environment carries the variable, as a Slurm job or an outer lease would hand it down.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nvml_fixture as nf
import pytest
from agent_fixture import wait_for_socket
from rpool_agent.probes.gpu import Gpu, MigDevice
from rpool_agent.probes.nvidia import probe_gpus
from rpool_agent.probes.visible import restrict

from rpool_agent.formats import parse_text

fake_nvml_dir = nf.fake_nvml_dir
TREES = Path(__file__).resolve().parent / "trees"
UUIDS = [
    "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
    "GPU-8932f938-0000-0000-0000-000000000001",
    "GPU-1111aaaa-0000-0000-0000-000000000002",
    "GPU-2222bbbb-0000-0000-0000-000000000003",
]


def gpu(i: int, name: str = "NVIDIA H100 80GB HBM3", migs: tuple[MigDevice, ...] = ()) -> Gpu:
    return Gpu(i, UUIDS[i], name, None, None, None, None, None, "9.0", bool(migs), migs)


MIGS = (
    MigDevice(0, "MIG-aaaa0000-1111-2222-3333-444444444444", "1g.10gb", None, 7, 0),
    MigDevice(2, "MIG-bbbb0002-1111-2222-3333-444444444444", "1g.10gb", None, 9, 0),
)
SAME = (gpu(0), gpu(1), gpu(2), gpu(3, migs=MIGS))
MIXED = (gpu(0, "NVIDIA A100-SXM4-40GB"), gpu(1), gpu(2), gpu(3))


def offered(gpus: tuple[Gpu, ...], value: str | None, order: str | None = None) -> list[str]:
    """Pool-style names of what is left: NVML index, or index_slot for MIG devices."""
    left, _ = restrict(gpus, value, order)
    out: list[str] = []
    for g in left:
        out += [f"{g.index}_{m.index}" for m in g.mig_devices] if g.mig_enabled else [str(g.index)]
    return out


@pytest.mark.parametrize(
    ("value", "order", "expected"),
    [
        (None, None, ["0", "1", "2", "3_0", "3_2"]),  # unset: everything
        ("", None, []),  # empty: no GPU
        ("-1", None, []),  # Flux's "none": invalid at once
        ("1", "PCI_BUS_ID", ["1"]),
        ("2,1", None, ["1", "2"]),  # same model everywhere: fastest first is PCI order
        ("0,2,-1,1", "PCI_BUS_ID", ["0", "2"]),  # CUDA's own example: stops at -1
        ("0, 2", "PCI_BUS_ID", ["0", "2"]),  # blanks around entries
        ("1gpu,2", "PCI_BUS_ID", ["1", "2"]),  # strtoul: trailing junk ignored
        ("1,7,2", "PCI_BUS_ID", ["1"]),  # no GPU 7: stops there
        ("10000", None, []),  # HTCondor's "none"
        ("1,1", "PCI_BUS_ID", []),  # a device named twice: CUDA shows none
        ("GPU-1111aaaa", None, ["2"]),  # a unique UUID prefix
        ("GPU-8932f93", None, []),  # prefix of two GPUs: invalid
        ("GPU-2222BBBB-0000-0000-0000-000000000003", None, ["3_0", "3_2"]),  # MIG GPU, whole
        (f"{UUIDS[2]},{UUIDS[0]}", None, ["0", "2"]),
        ("GPU-1111aaaa,1", "PCI_BUS_ID", ["2"]),  # another kind of entry ends the list
        ("MIG-bbbb", None, ["3_2"]),  # one MIG device by UUID prefix
        ("MIG-aaaa,MIG-bbbb0002", None, ["3_0", "3_2"]),
        (f"MIG-{UUIDS[3]}/9/0", None, ["3_2"]),  # before driver 470: MIG-<GPU>/<GI>/<CI>
        ("MIG-ffff", None, []),
        ("nvidia0", None, []),
    ],
)
def test_cuda_rules(value: str | None, order: str | None, expected: list[str]) -> None:
    assert offered(SAME, value, order) == expected


def test_mixed_node_by_index_needs_pci_order() -> None:
    # CUDA's default order is fastest first; an A100 among H100s: NVML cannot tell us
    # which index CUDA gives which GPU, so no GPU is offered and the note says why.
    left, notes = restrict(MIXED, "0", None)
    assert left == ()
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in notes[0] and "fastest first" in notes[0]
    assert offered(MIXED, "0", "PCI_BUS_ID") == ["0"]
    assert offered(MIXED, UUIDS[1], None) == ["1"]  # UUIDs do not depend on the order


def test_notes_say_what_was_cut() -> None:
    _, notes = restrict(SAME, "0,2,-1,1", "PCI_BUS_ID")
    assert notes == ["CUDA_VISIBLE_DEVICES='0,2,-1,1': entry '-1' is neither an index nor a "
                     "GPU-/MIG- UUID; CUDA ignores it and what follows"]  # fmt: skip
    assert restrict(SAME, "0,1", "PCI_BUS_ID")[1] == []  # nothing to say
    assert restrict(SAME, "0,1,", "PCI_BUS_ID")[1] == []  # a trailing comma cuts nothing


def test_recorded_tree_ignores_this_process_environment() -> None:
    # A tree is another machine: our environment does not describe its processes...
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert len(probe_gpus(TREES / "gpu-procfs-4").gpus) == 4
    # ...unless the caller hands one in (the /proc reading follows the same rules).
    report = probe_gpus(TREES / "gpu-procfs-4", environ={**env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert [g.index for g in report.gpus] == [1] and report.visible_devices == "1"


# --- the real pynvml over the fake NVML -----------------------------------------------------


def two_gpus(tmp_path: Path) -> Path:
    gpus = [
        {"uuid": UUIDS[0], "name": "NVIDIA H100", "pci_bus_id": "00000000:18:00.0", "cc": "9.0"},
        {"uuid": UUIDS[2], "name": "NVIDIA H100", "pci_bus_id": "00000000:2A:00.0", "cc": "9.0"},
    ]
    return nf.write_config(tmp_path / "nvml.conf", gpus)


def test_probe_keeps_only_the_inherited_gpu(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = two_gpus(tmp_path)
    run = nf.run_probe(fake_nvml_dir, tmp_path, conf, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert [g["index"] for g in run.report["gpus"]] == [1]  # the physical index stays
    assert run.report["visible_devices"] == "1"
    assert "problem" not in run.report


def detect(conf: Path, lib: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(lib), "FAKE_NVML_CONFIG": str(conf)}
    return subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "detect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**full, **env},
    )


def test_detect_offers_exactly_the_visible_gpus(fake_nvml_dir: Path, tmp_path: Path) -> None:
    conf = two_gpus(tmp_path)
    done = detect(conf, fake_nvml_dir, "--format", "canary-nodes", CUDA_VISIBLE_DEVICES="GPU-11")
    assert done.returncode == 0, done.stderr
    (only,) = parse_text(done.stdout, format="canary-nodes").local.resources["gpus"]
    assert only.id == "1" and only.properties["uuid"] == UUIDS[2]
    done = detect(conf, fake_nvml_dir, "--format", "json", CUDA_VISIBLE_DEVICES="-1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["gpus"] == 0 and report["nvidia"]["visible_devices"] == "-1"
    assert "may use no GPU" in done.stderr


def test_serve_offers_exactly_the_visible_gpus(fake_nvml_dir: Path, tmp_path: Path) -> None:
    """A detecting agent inside a job given GPU 1: it leases GPU 1 only, by its physical
    index, so the program it runs is sent to that GPU and no other."""
    conf = two_gpus(tmp_path)
    sock = str(tmp_path / "a.sock")
    env = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(fake_nvml_dir)}
    env.update(FAKE_NVML_CONFIG=str(conf), CUDA_VISIBLE_DEVICES="1", CUDA_DEVICE_ORDER="PCI_BUS_ID")
    cmd = [sys.executable, "-m", "rpool_agent.cli", "serve", "--socket", sock]
    cmd += ["--state-dir", str(tmp_path / "state")]
    with open(tmp_path / "a.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_socket(sock, proc)
        from rpool_agent.client import Client

        with Client(sock) as c:
            assert c.status()["types"]["gpus"]["total"] == 1
            lease = c.acquire({"gpus": 1}, timeout=5)
            assert lease.env({})["CUDA_VISIBLE_DEVICES"] == "1"
            lease.release()
    finally:
        proc.terminate()
        proc.wait(10)
