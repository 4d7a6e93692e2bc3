"""Prometheus metrics, as a node_exporter textfile-collector file (docs/status.md).

Why a file and not a scrape endpoint: node admins already run node_exporter, whose
textfile collector publishes `*.prom` files from one directory; the agent, which runs as
root and serves hostile users, then opens no TCP port of its own, and a stopped agent
leaves its last numbers (with their timestamp) rather than a failed scrape.

`Tally` counts what happens (grants, releases, reaps, timeouts, wait times) with plain
integers on the event loop; `render` turns a status document plus the tally into the
text format through prometheus-client's own families and encoder, and `write_textfile`
replaces the file atomically. Both run in a worker thread; prometheus-client is imported
only there, and only by an agent configured with a `metrics_file`.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

#: Wait-time histogram buckets, seconds: a CI job waits for a GPU from nothing to hours.
WAIT_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)


class Tally:
    """Event counts since the agent started; updated on the loop, read by `render`."""

    def __init__(self) -> None:
        self.grants = 0
        self.releases = 0
        self.reaps = 0
        self.timeouts = 0
        self.wait_counts = [0] * (len(WAIT_BUCKETS) + 1)  # the last one is +Inf
        self.wait_sum = 0.0

    def granted(self, waited: float) -> None:
        """A grant after `waited` seconds in the queue (0 for one granted at once)."""
        waited = max(0.0, waited)
        self.grants += 1
        self.wait_sum += waited
        for i, bound in enumerate(WAIT_BUCKETS):
            if waited <= bound:
                self.wait_counts[i] += 1
                break
        else:
            self.wait_counts[-1] += 1

    def ended(self, how: str) -> None:
        """A lease ended: "release" or "reap"."""
        if how == "reap":
            self.reaps += 1
        else:
            self.releases += 1

    def denied(self, *, timed_out: bool) -> None:
        self.timeouts += timed_out

    def copy(self) -> Tally:
        """The counts as they are now, for a worker thread to read while these move on."""
        other = Tally()
        other.grants, other.releases, other.reaps = self.grants, self.releases, self.reaps
        other.timeouts, other.wait_sum = self.timeouts, self.wait_sum
        other.wait_counts = list(self.wait_counts)
        return other


def render(doc: dict[str, Any], tally: Tally) -> bytes:
    """The text exposition format of one status document and the tally."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    families: list[Any] = []

    def gauge(
        name: str, doc_: str, labels: list[str], samples: list[tuple[list[str], float]]
    ) -> None:
        g = GaugeMetricFamily(name, doc_, labels=labels)
        for values, value in samples:
            g.add_metric(values, value)
        families.append(g)

    types = doc.get("types", {})
    for key, what in (
        ("total", "Slots of live instances"),
        ("free", "Slots grantable now"),
        ("used", "Slots held by leases"),
        ("drained", "Free slots withheld by drains"),
    ):
        suffix = "" if key == "total" else f"_{key}"
        gauge(
            f"rpool_agent_slots{suffix}",
            f"{what}, per resource type.",
            ["type"],
            [([t], v.get(key, 0)) for t, v in sorted(types.items())],
        )
    gauge("rpool_agent_leases", "Leases held.", [], [([], _count(doc, "leases"))])
    gauge(
        "rpool_agent_waiters",
        "Acquires waiting in the queue.",
        [],
        [([], _count(doc, "waiters"))],
    )
    gauge(
        "rpool_agent_drained",
        "Drained instances (1 each), with the drain reason.",
        ["type", "id", "reason"],
        [([d["type"], d["id"], _label(d["reason"])], 1) for d in doc.get("drained", [])],
    )
    for name, value, what in (
        ("grants", tally.grants, "Leases granted"),
        ("releases", tally.releases, "Leases released by their holder"),
        ("reaps", tally.reaps, "Leases reaped: their holder died"),
        ("timeouts", tally.timeouts, "Acquires that timed out waiting"),
    ):
        c = CounterMetricFamily(f"rpool_agent_{name}", f"{what}, since the agent started.")
        c.add_metric([], value)
        families.append(c)
    buckets, running = [], 0
    for bound, n in zip((*WAIT_BUCKETS, float("inf")), tally.wait_counts, strict=False):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    h = HistogramMetricFamily(
        "rpool_agent_wait_seconds", "Time from acquire to grant (0 when granted at once)."
    )
    h.add_metric([], buckets, sum_value=tally.wait_sum)
    families.append(h)
    audit = doc.get("audit")
    gauge(
        "rpool_agent_audit_up",
        "1 if the last GPU audit could read NVML, else 0.",
        [],
        [([], 1 if audit is not None and not audit.get("problem") else 0)],
    )
    per_gpu: dict[tuple[str, str], int] = {}
    for v in (audit or {}).get("violations", []):
        per_gpu[v["type"], v["gpu"]] = per_gpu.get((v["type"], v["gpu"]), 0) + 1
    gauge(
        "rpool_agent_audit_violations",
        "Processes using a GPU without a lease on it, at the last audit.",
        ["type", "id"],
        [([t, i], n) for (t, i), n in sorted(per_gpu.items())],
    )

    class _Families:
        def collect(self) -> Any:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)


def _label(text: str, width: int = 120) -> str:
    """A label value kept short (reasons are free text from an admin)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def write_textfile(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically, as the textfile collector needs (it must
    never read half a file), through statedir.replace_file. (prometheus-client's
    `write_to_textfile` opens a predictable temporary name with plain `open`, which
    follows a planted link.)"""
    from .statedir import replace_file

    directory, name = os.path.split(os.path.abspath(path))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:  # a device or a link there is not ours to replace (metrics_file: /dev/null)
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EEXIST, "exists and is not a regular file", path)
        except FileNotFoundError:
            pass
        replace_file(dfd, name, data, mode=0o644)  # node_exporter reads it as another user
    finally:
        os.close(dfd)


def _count(doc: dict[str, Any], key: str) -> int:
    """All the leases or waiters, not only the listed page (docs/status.md `more`)."""
    return len(doc.get(key, [])) + int((doc.get("more") or {}).get(key, 0))
