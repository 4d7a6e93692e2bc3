"""Metrics: the agent's node_exporter textfile, read back with prometheus-client's parser.

The events are real: a grant, a waiter granted when the holder releases, a timeout, a
holder killed with SIGKILL (a reap), a drain with a reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import running_agent, wait_until
from prometheus_client.parser import text_string_to_metric_families

from rpool_agent.errors import Timeout
from rpool_agent.metrics import Tally, render, write_textfile

RPOOL = [sys.executable, "-m", "rpool_agent.cli"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(name, sorted labels): value} of a text exposition, through the real parser
    (which raises on anything malformed)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def test_metrics_file_counts_what_happened(tmp_path: Path) -> None:
    metrics = tmp_path / "node" / "rpool.prom"
    metrics.parent.mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(f"metrics_file: {metrics}\nmetrics_interval: 0.1\n")
    with running_agent(tmp_path, None, "--config", str(config)) as agent:
        wait_until(lambda: metrics.exists())
        with agent.client() as c:
            everything = c.acquire(gpus=4)  # grant 1, at once
            waiter = subprocess.Popen(
                [*RPOOL, "run", "--gpus", "1", "--", "sleep", "60"],
                env=agent.env,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_until(lambda: len(agent.status()["waiters"]) == 1)
                with agent.client() as other, pytest.raises(Timeout):
                    other.acquire(gpus=1, timeout=0.05)  # timeout 1
                c.drain("gpus:3", "bad fan")
                everything.release()  # release 1; the waiter gets grant 2
                wait_until(lambda: len(agent.status()["leases"]) == 1)
                waiter.send_signal(signal.SIGKILL)  # reap 1
                waiter.wait()
                wait_until(lambda: value(metrics.read_text(), "rpool_agent_reaps_total") == 1)
            finally:
                waiter.kill()
                waiter.wait()
        text = metrics.read_text()
    got = samples(text)
    assert value(text, "rpool_agent_grants_total") == 2
    assert value(text, "rpool_agent_releases_total") == 1
    assert value(text, "rpool_agent_timeouts_total") == 1
    assert value(text, "rpool_agent_slots", type="gpus") == 4
    assert value(text, "rpool_agent_slots_free", type="gpus") == 3
    assert value(text, "rpool_agent_slots_drained", type="gpus") == 1
    assert value(text, "rpool_agent_slots_free", type="cpus") == 4
    assert value(text, "rpool_agent_leases") == 0 and value(text, "rpool_agent_waiters") == 0
    assert value(text, "rpool_agent_drained", type="gpus", id="3", reason="bad fan") == 1
    assert value(text, "rpool_agent_wait_seconds_count") == 2
    assert 0 < got["rpool_agent_wait_seconds_sum", ()] < 60  # the waiter waited, a little
    assert value(text, "rpool_agent_wait_seconds_bucket", le="+Inf") == 2
    assert value(text, "rpool_agent_audit_up") == 0  # no NVML here: said, not hidden
    assert not list(tmp_path.glob("node/.*"))  # no temporary file left behind


def test_render_parses_with_odd_label_values() -> None:
    doc: dict[str, Any] = {
        "types": {"gpus": {"total": 1, "free": 0, "used": 0, "drained": 1}},
        "drained": [{"type": "gpus", "id": "0", "reason": 'quote " back\\slash\nnewline'}],
        "audit": {"problem": None, "violations": [{"type": "gpus", "gpu": "0", "pid": 9}]},
    }
    tally = Tally()
    tally.granted(5000.0)  # past the last bucket: +Inf only
    text = render(doc, tally).decode()
    assert (
        value(text, "rpool_agent_drained", type="gpus", id="0", reason=doc["drained"][0]["reason"])
        == 1
    )
    assert value(text, "rpool_agent_audit_violations", type="gpus", id="0") == 1
    assert value(text, "rpool_agent_wait_seconds_bucket", le="14400.0") == 1
    assert value(text, "rpool_agent_wait_seconds_bucket", le="3600.0") == 0


def test_write_textfile_never_follows_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.umask(old := os.umask(0o077))  # an agent under UMask=0077 still writes a 0644 file
    target = tmp_path / "rpool.prom"
    os.symlink(victim, tmp_path / f".rpool.prom.{os.getpid()}.tmp")
    os.umask(0o077)
    try:
        write_textfile(str(target), b"rpool_agent_leases 0\n")
    finally:
        os.umask(old)
    assert victim.read_text() == "precious"
    assert target.read_text() == "rpool_agent_leases 0\n" and not target.is_symlink()
    assert oct(target.stat().st_mode & 0o777) == "0o644"


def test_write_textfile_replaces_only_a_regular_file(tmp_path: Path) -> None:
    link = tmp_path / "link.prom"
    link.symlink_to(tmp_path / "elsewhere")
    fifo = tmp_path / "fifo.prom"
    os.mkfifo(fifo)
    for path in (link, fifo):  # as /dev/null would be: never replaced by a file
        with pytest.raises(OSError, match="not a regular file"):
            write_textfile(str(path), b"x 1\n")
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_leases_and_waiters_count_what_a_page_left_out(tmp_path: Path) -> None:
    """The agent's metrics come from a paged status document (docs/status.md): the
    gauges count every lease and waiter, not only the listed ones."""
    with running_agent(tmp_path) as agent, agent.client() as c:
        for _ in range(3):
            c.acquire(cpus=1)
        waiter = subprocess.Popen(
            [*RPOOL, "run", "--cpus", "4", "--", "true"], env=agent.env, stderr=subprocess.DEVNULL
        )
        try:
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            page = c.status(limit=0)
        finally:
            waiter.kill()
            waiter.wait()
    assert page["leases"] == [] and page["waiters"] == []
    text = render(page, Tally()).decode()
    assert value(text, "rpool_agent_leases") == 3
    assert value(text, "rpool_agent_waiters") == 1
