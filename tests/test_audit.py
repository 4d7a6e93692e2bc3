"""The GPU audit: who uses a GPU without a lease on it.

The rule itself is a pure function of a status document, NVML's process lists and the
process tree (a table below). End to end, the agent loads the fake `libnvidia-ml.so.1`
(tests/fake_nvml) through the real pynvml; the test writes each GPU's process list into
the fake's config, with the pids of real processes: a lease holder, its child, and an
intruder that holds nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import nvml_fixture as nf
import pytest
from agent_fixture import gpu_pool, running_agent, wait_until

from rpool_agent.audit import find_violations, run_audit
from rpool_agent.status_text import render_audit

fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake NVML once

RPOOL = [sys.executable, "-m", "rpool_agent.cli"]
ME = pwd.getpwuid(os.getuid()).pw_name


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-0000-0000-0000-000000000000"  # as agent_fixture.gpu_pool names them


def doc_with(*leases: tuple[str, int, list[str]], migs: bool = False) -> dict[str, Any]:
    """A status document: GPUs 0 and 1 (or two MIG devices of GPU 0); (lease, pid, ids)."""
    if migs:
        rows = [
            {
                "id": f"0_{n}",
                "parent_uuid": uuid(0),
                "gpu_instance_id": gi,
                "compute_instance_id": 0,
            }
            for n, gi in ((0, 7), (1, 8))
        ]
    else:
        rows = [{"id": str(i), "index": i, "uuid": uuid(i)} for i in (0, 1)]
    for row in rows:
        row["leases"] = [lid for lid, _, ids in leases if row["id"] in ids]
    return {
        "instances": {"gpus": rows, "cpus": [{"id": "0", "leases": []}]},
        "leases": [{"id": lid, "holder": {"pid": pid}} for lid, pid, _ in leases],
    }


TREE = {100: [1], 101: [100, 1], 102: [1], 103: [1]}  # pid -> ancestors; 104 has exited


@pytest.mark.parametrize(
    ("use", "violation"),
    [
        ({"pid": 100, "index": 0, "uuid": uuid(0)}, False),  # the holder, on its GPU
        ({"pid": 101, "index": 0, "uuid": uuid(0)}, False),  # the holder's child
        ({"pid": 102, "index": 0, "uuid": uuid(0)}, True),  # someone else
        ({"pid": 100, "index": 1, "uuid": uuid(1)}, True),  # the holder, on a GPU not leased
        ({"pid": 103, "index": 1, "uuid": uuid(1)}, True),  # on a GPU nobody holds
        ({"pid": 102, "index": 5, "uuid": uuid(5)}, False),  # a GPU outside the pool
        ({"pid": 104, "index": 0, "uuid": uuid(0)}, False),  # exited since NVML listed it
    ],
)
def test_who_breaks_the_rules(use: dict[str, Any], violation: bool) -> None:
    doc = doc_with(("L1", 100, ["0"]))
    found = find_violations(doc, [{**use, "kind": "compute"}], TREE.get)
    assert bool(found) == violation
    if violation:
        assert found == [
            {"type": "gpus", "gpu": str(use["index"]), "uuid": use["uuid"], "pid": use["pid"]}
            | {"kind": "compute"}
        ]


def test_processes_on_mig_devices_match_by_instance_ids() -> None:
    doc = doc_with(("L1", 100, ["0_0"]), migs=True)
    on = [
        {"pid": 100, "index": 0, "uuid": uuid(0), "gi": 7, "ci": 0, "kind": "compute"},
        {"pid": 100, "index": 0, "uuid": uuid(0), "gi": 8, "ci": 0, "kind": "compute"},
        {"pid": 102, "index": 0, "uuid": uuid(0), "gi": 7, "ci": 0, "kind": "compute"},
    ]
    found = find_violations(doc, on, TREE.get)
    assert [(v["gpu"], v["pid"]) for v in found] == [("0_1", 100), ("0_0", 102)]


def test_a_pool_without_gpus_is_not_audited_and_nvml_trouble_is_said() -> None:
    def no_call() -> Any:
        raise AssertionError("NVML asked for a pool without GPUs")

    assert run_audit({"instances": {"cpus": [{"id": "0"}]}}, lister=no_call)["problem"] is None
    out = run_audit(doc_with(), lister=lambda: ([], []))
    assert out == {"violations": [], "notes": [], "problem": None}
    assert render_audit({**out, "age_s": 3})[0].startswith("GPU audit (3s ago): every process")


def audit_metric(path: Path, gpu: int) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            if s.name == "rpool_agent_audit_violations" and s.labels["id"] == str(gpu):
                return s.value
    return None


def test_audit_without_nvml_says_so_in_one_line(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(1, 1)) as agent:
        env = {**agent.env, "LD_LIBRARY_PATH": str(tmp_path)}  # no libnvidia-ml.so.1 there
        out = subprocess.run([*RPOOL, "audit"], env=env, capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (3, "")
    assert out.stderr.startswith("rpool-agent: cannot audit the GPUs: NVML cannot be opened")
    assert len(out.stderr.splitlines()) == 1


def test_the_agent_audits_gpus_through_nvml(
    fake_nvml_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = nf.write_config(
        tmp_path / "nvml.conf", [{"uuid": uuid(i), "name": "Fake GPU"} for i in (0, 1)]
    )
    monkeypatch.setenv("LD_LIBRARY_PATH", str(fake_nvml_dir))  # the agent inherits these
    monkeypatch.setenv("FAKE_NVML_CONFIG", str(config))
    agent_yaml = tmp_path / "agent.yaml"
    metrics = tmp_path / "rpool.prom"
    agent_yaml.write_text(f"audit_interval: 0.1\nmetrics_file: {metrics}\nmetrics_interval: 0.1\n")
    procs: list[subprocess.Popen[str]] = []
    with running_agent(tmp_path, gpu_pool(2, 2), "--config", str(agent_yaml)) as agent:
        try:
            # the holder (sh, exec'd by run) starts a child that stays on the GPU too
            holder = subprocess.Popen(
                [*RPOOL, "run", "--gpus", "1", "--", "sh", "-c", "sleep 60 & echo $!; wait"],
                env=agent.env,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(holder)
            assert holder.stdout is not None
            child = int(holder.stdout.readline())
            intruder = subprocess.Popen(["sleep", "60"])
            procs.append(intruder)  # type: ignore[arg-type]
            (lease,) = agent.status()["leases"]
            mine = int(lease["resources"]["gpus"][0]["id"])
            other = 1 - mine
            gpus = [{"uuid": uuid(i), "name": "Fake GPU"} for i in (0, 1)]
            gpus[mine]["processes"] = f"{holder.pid},{child}:1048576,{intruder.pid}"
            gpus[other]["graphics_processes"] = str(child)  # not its lease's GPU
            nf.write_config(config, gpus)

            def violations() -> list[tuple[int, str, str]]:
                audit = agent.status()["audit"] or {}
                return sorted((v["pid"], v["gpu"], v["kind"]) for v in audit.get("violations", []))

            expected = sorted(
                [(intruder.pid, str(mine), "compute"), (child, str(other), "graphics")]
            )
            wait_until(lambda: violations() == expected)
            audit = agent.status()["audit"]
            assert audit["problem"] is None and audit["age_s"] >= 0
            by_pid = {v["pid"]: v for v in audit["violations"]}
            assert (by_pid[intruder.pid]["user"], by_pid[intruder.pid]["command"]) == (ME, "sleep")
            assert by_pid[intruder.pid]["uuid"] == uuid(mine)
            wait_until(
                lambda: f"audit: pid={intruder.pid} user={ME} command='sleep'" in agent.log()
            )
            wait_until(lambda: f'rpool_agent_audit_violations{{id="{mine}"' in metrics.read_text())

            # `rpool-agent audit` asks NVML itself, from the leases the agent reports
            out = subprocess.run(
                [*RPOOL, "audit", "--json"], env=agent.env, capture_output=True, text=True
            )
            assert out.returncode == 1, out.stderr  # 1: someone breaks the rules
            got = json.loads(out.stdout)
            assert sorted((v["pid"], v["gpu"], v["kind"]) for v in got["violations"]) == expected
            table = subprocess.run([*RPOOL, "audit"], env=agent.env, capture_output=True, text=True)
            lines = table.stdout.splitlines()
            assert table.returncode == 1
            assert lines[0] == "GPU audit: 2 processes use a GPU without a lease on it"
            assert lines[1].split() == ["GPU", "UUID", "PID", "USER", "COMMAND", "KIND"]
            rows = sorted(ln.split() for ln in lines[2:])
            assert [str(intruder.pid), ME, "sleep", "compute"] in [r[2:] for r in rows]
            shown = subprocess.run(
                [*RPOOL, "status"], env=agent.env, capture_output=True, text=True
            )
            audit_part = shown.stdout.split("GPU audit (", 1)[1].splitlines()
            assert audit_part[0].endswith("2 processes use a GPU without a lease on it")
            short = uuid(mine)[:12]
            assert [str(mine), short, str(intruder.pid), ME, "sleep", "compute"] in [
                ln.split() for ln in audit_part
            ]

            intruder.kill()
            intruder.wait()
            gpus[mine]["processes"] = f"{holder.pid},{child}"
            nf.write_config(config, gpus)
            wait_until(lambda: violations() == [(child, str(other), "graphics")])
            gpus[other].pop("graphics_processes")
            nf.write_config(config, gpus)
            clean = subprocess.run([*RPOOL, "audit"], env=agent.env, capture_output=True, text=True)
            assert clean.returncode == 0, clean.stdout + clean.stderr
            assert clean.stdout == "GPU audit: every process on a GPU holds a lease on it\n"
        finally:
            for p in procs:
                p.kill()
                p.wait()


_LIST = """
import json
from rpool_agent.audit import gpu_processes
print(json.dumps(gpu_processes()))
"""


def test_process_lists_as_pynvml_reads_them_from_the_fake(
    fake_nvml_dir: Path, tmp_path: Path
) -> None:
    """The real pynvml against the fake's process lists: the two-call size protocol,
    the v3 structure's MIG instance ids, and a GPU whose list NVML refuses."""
    config = nf.write_config(
        tmp_path / "nvml.conf",
        [
            {"uuid": uuid(0), "processes": "4242:1048576,4243@7.0", "graphics_processes": "4244"},
            {"uuid": uuid(1), "fail": "processes:3"},
        ],
    )
    log = tmp_path / "calls"
    env = {**nf.clean_environ(), "LD_LIBRARY_PATH": str(fake_nvml_dir)}
    env.update(FAKE_NVML_CONFIG=str(config), FAKE_NVML_LOG=str(log))
    done = subprocess.run([sys.executable, "-c", _LIST], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    uses, notes = json.loads(done.stdout)
    assert uses == [
        {"index": 0, "uuid": uuid(0), "pid": 4242, "kind": "compute", "gi": None, "ci": None},
        {"index": 0, "uuid": uuid(0), "pid": 4243, "kind": "compute", "gi": 7, "ci": 0},
        {"index": 0, "uuid": uuid(0), "pid": 4244, "kind": "graphics", "gi": None, "ci": None},
    ]
    assert notes == ["GPU 1: cannot list its processes: Not Supported"]
    calls = log.read_text().split()
    assert "nvmlDeviceGetComputeRunningProcesses_v3" in calls
    assert calls.count("nvmlInit") == calls.count("nvmlShutdown") == 1
