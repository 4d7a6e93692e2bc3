"""`rpool-agent status` for people: one table per resource type, its waiters, the audit.

Reads the documented status schema (status_doc.py, docs/status.md), nothing else, so it
renders a reply from any agent that speaks schema 1 or 2. Every string that came from a
client (labels) or from /proc (commands) is made printable first: a label holding
terminal escapes must not redraw an admin's screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: GPU-like types (instances with a UUID or an index) with at most this many instances
#: get a row per instance; other types list only the held and drained ones, then the free
#: ids in one line: a 128-core node would otherwise print 128 rows of "free".
MAX_ROWS_ALL = 32
_LABEL_WIDTH = 40


def printable(text: Any, width: int = 60) -> str:
    """`text` with control characters shown as `?`, cut to `width` (… marks the cut)."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    return s if len(s) <= width else s[: width - 1] + "…"


def format_age(seconds: float | None) -> str:
    """12s, 4m05s, 3h07m, 2d04h: two units at most, as a person reads an age."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def short_uuid(uuid: str | None) -> str:
    """GPU-8a1b2c3d-... -> GPU-8a1b2c3d (what nvidia-smi -L users recognise)."""
    if not uuid:
        return "-"
    head, sep, rest = uuid.partition("-")
    return f"{head}{sep}{rest[:8]}" if sep else uuid[:12]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns as wide as their widest cell; no trailing spaces."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    out = []
    for r in [list(headers), *rows]:
        out.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return out


def who(holder: dict[str, Any] | None) -> tuple[str, str, str]:
    """(pid, user, command) cells for a holder."""
    if not holder:
        return ("-", "-", "-")
    pid = holder.get("pid")
    return (
        str(pid) if isinstance(pid, int) and pid > 0 else "-",
        printable(holder.get("user") or "?", 20),
        printable(holder.get("command") or "?", 24),
    )


def render_status(doc: dict[str, Any]) -> str:
    """The whole human view of one status document."""
    leases = {le["id"]: le for le in doc.get("leases", [])}
    waiters = doc.get("waiters", [])
    lines: list[str] = []
    instances = doc.get("instances", {})
    for rtype, rows in sorted(instances.items(), key=lambda kv: (not _gpu_like(kv[1]), kv[0])):
        if lines:
            lines.append("")
        idle = doc.get("idle", {}).get(rtype)
        lines += _type_section(rtype, doc.get("types", {}).get(rtype, {}), rows, leases, idle)
        lines += _waiters(w for w in waiters if rtype in request_types(w))
    other = [w for w in waiters if not request_types(w) & set(doc.get("instances", {}))]
    if other:
        lines += ["", *_waiters(other)]
    more = doc.get("more") or {}
    if more.get("leases") or more.get("waiters"):
        what = [f"{more[k]} more {k}" for k in ("leases", "waiters") if more.get(k)]
        lines += ["", f"and {' and '.join(what)} not listed (`rpool-agent status --all`)"]
    if not lines:
        lines.append("empty pool")
    if doc.get("gpus_unavailable"):
        lines[:0] = [f"GPUs unavailable: {printable(doc['gpus_unavailable'], 200)}", ""]
    lines += ["", *render_audit(doc.get("audit"))]
    return "\n".join(lines)


def _gpu_like(rows: list[dict[str, Any]]) -> bool:
    return any("uuid" in r or "index" in r for r in rows)


def request_types(waiter: dict[str, Any]) -> set[str]:
    """The resource types a waiter asks for, from its wire-form request."""
    req = waiter.get("request")
    if isinstance(req, dict):
        return set(req)
    if isinstance(req, list):
        items = [i for g in req for i in (g if isinstance(g, list) else [g])]
        return {i.get("type") for i in items if isinstance(i, dict)}
    return set()


def _type_section(
    rtype: str,
    counts: dict[str, Any],
    rows: list[dict[str, Any]],
    leases: dict[str, Any],
    idle_ids: str | None = None,
) -> list[str]:
    """`idle_ids`: the document's summary of the idle instances (schema 2), which a paged
    reply has no rows for."""
    total, free = counts.get("total", 0), counts.get("free", 0)
    head = f"{printable(rtype, 32)}: {free} of {total} slots free"
    extra = [f"{counts[k]} {k}" for k in ("used", "drained", "stale") if counts.get(k)]
    lines = [head + (f" ({', '.join(extra)})" if extra else "")]
    gpu_like = _gpu_like(rows)
    show = rows
    idle = [r for r in rows if not r.get("leases") and r.get("drained") is None]
    if not gpu_like or len(rows) > MAX_ROWS_ALL:
        show = [r for r in rows if r not in idle]
    cells = []
    for r in show:
        ident = [printable(r["id"], 16)]
        if gpu_like:
            ident.append(short_uuid(r.get("uuid")))
        if any(x.get("slots", 1) != 1 for x in rows):
            ident.append(f"{r.get('used', 0)}/{r.get('slots', 0)}")
        state = _state(r)
        if not r.get("leases"):
            cells.append([*ident, state, "-", "-", "-", "", ""])
        for n, lid in enumerate(r.get("leases", [])):
            le = leases.get(lid, {})
            if n:  # more leases on one multi-slot instance: one row each
                ident = ["", *([""] * (len(ident) - 1))]
            label = printable(le.get("label") or "", _LABEL_WIDTH)
            cells.append(
                [*ident, state, *who(le.get("holder")), label, format_age(le.get("age_s"))]
            )
    headers = ["ID"] + (["UUID"] if gpu_like else [])
    if any(x.get("slots", 1) != 1 for x in rows):
        headers.append("SLOTS")
    headers += ["STATE", "PID", "USER", "COMMAND", "LABEL", "AGE"]
    if cells:
        lines += table(headers, cells)
    if idle_ids is not None and not gpu_like:
        if idle_ids:
            lines.append(f"  free: {printable(idle_ids, 200)}")
    elif len(show) < len(rows):
        lines.append(f"  free: {_id_list([r['id'] for r in idle])}")
    elif not rows:
        lines.append("  no instances")
    return lines


def _state(row: dict[str, Any]) -> str:
    parts = []
    if row.get("vanished"):
        parts.append("gone from pool")
    elif row.get("leases"):
        parts.append("held")
    if row.get("drained") is not None:
        reason = printable(row["drained"], 40)
        parts.append(f"drained: {reason}" if reason else "drained")
    return ", ".join(parts) or "free"


def _id_list(ids: list[str]) -> str:
    if ids and all(i.isdigit() for i in ids):
        from .probes.sysfs import format_cpulist

        return format_cpulist([int(i) for i in ids])
    return printable(",".join(ids), 200)


def _waiters(waiters: Any) -> list[str]:
    rows = [
        [
            str(w.get("position", "?")),
            *who(w.get("holder")),
            printable(w.get("request_text") or w.get("request"), 30),
            printable(w.get("label") or "", _LABEL_WIDTH),
            format_age(w.get("waited_s")),
        ]
        for w in waiters
    ]
    if not rows:
        return []
    head = ["  waiting:"]
    return head + table(["POS", "PID", "USER", "COMMAND", "REQUEST", "LABEL", "WAITED"], rows)


def render_audit(audit: dict[str, Any] | None) -> list[str]:
    """The GPU audit's lines: who uses a GPU without a lease on it."""
    if audit is None:
        return ["GPU audit: not run yet"]
    if audit.get("problem"):
        return [f"GPU audit: not possible: {printable(audit['problem'], 200)}"]
    age = audit.get("age_s")
    when = f" ({format_age(age)} ago)" if age is not None else ""
    found = audit.get("violations", [])
    if not found:
        return [f"GPU audit{when}: every process on a GPU holds a lease on it"]
    rows = [
        [
            printable(v.get("gpu", "?"), 16),
            short_uuid(v.get("uuid")),
            *who(v),
            printable(v.get("kind", ""), 10),
        ]
        for v in found
    ]
    n = len(found)
    what = "1 process uses" if n == 1 else f"{n} processes use"
    lines = [f"GPU audit{when}: {what} a GPU without a lease on it"]
    return lines + table(["GPU", "UUID", "PID", "USER", "COMMAND", "KIND"], rows)
