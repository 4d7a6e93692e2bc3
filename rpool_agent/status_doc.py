"""The `status` reply: a stable, documented schema (docs/status.md) built from the agent.

What the allocator keeps is shaped for allocating (owner tuples, request keys, monotonic
timestamps); what `status` shows is shaped for people and tools: per-instance rows with
the GPU index and UUID, holders and waiters named by user and command, ages in seconds.
This module is the one place that turns the one into the other, so the server's handler
is a single call and the schema has one definition. Nothing internal leaks: no owner
tuples, no request keys, no raw clock values, no lease tokens.
"""

from __future__ import annotations

import os
from typing import Any

from .procinfo import ProcessNames

#: Bumped only for changes that break readers; new fields may appear at any version.
#: 2: `leases`, `waiters` and the rows of non-GPU types are a bounded page by default.
SCHEMA_VERSION = 2

#: Leases and waiters listed by default: a reply costs this page, not what the agent holds.
DEFAULT_LIMIT = 100

#: Instance properties copied into `instances` rows, when the pool has them.
_INSTANCE_FIELDS = (
    "index",
    "uuid",
    "name",
    "numa_node",
    "parent_index",  # MIG devices: their GPU, and their instance ids (the audit's keys)
    "parent_uuid",
    "gpu_instance_id",
    "compute_instance_id",
)


def status_document(
    service: Any,
    *,
    now: float,
    names: ProcessNames,
    audit: dict[str, Any] | None = None,
    limit: int | None = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """The status of `service` (the agent's allocator, pool, lease extras, connections).

    `now` is the monotonic clock the allocator's timestamps use; `names` caches who each
    pid is; `audit` is the latest GPU audit (audit.py), None when none has run. `limit`
    (None: everything) bounds the leases and waiters listed; every lease on a GPU-like
    type is listed anyway (GPUs are few, and the audit needs their holders), and the
    other types get rows only for the listed leases' instances and drained ones, their
    idle instances summed up in `idle`.
    """
    whole = _gpu_types(service.pool)
    snap = service.allocator.snapshot(limit, whole)
    extras = getattr(service, "extras", {})
    holders = _Holders(names)
    leases = [_lease(item, extras.get(item["id"]), now, holders) for item in snap["leases"]]
    waiters = [_waiter(service, item, now, holders) for item in snap["waiters"]]
    names.forget_all_but(holders.pids())
    drained = {(d["type"], d["id"]): d["reason"] for d in snap["drained"]}
    from ._version import __version__

    paged = limit is not None
    counts = snap["counts"]
    instances = _instances(
        service.pool, leases, drained, snap["vanished"], whole if paged else None
    )
    return {
        "schema": SCHEMA_VERSION,
        "agent": {"pid": os.getpid(), "version": __version__},
        "connections": len(getattr(service, "connections", ())),
        "types": {t: dict(v) for t, v in snap["types"].items()},
        "instances": instances,
        "idle": {t: _ranges(service.allocator.idle(t)) for t in snap["types"] if t not in whole},
        "complete": counts["leases"] == len(leases) and counts["waiters"] == len(waiters),
        "leases": leases,
        "waiters": waiters,
        "more": {
            "leases": counts["leases"] - len(leases),
            "waiters": counts["waiters"] - len(waiters),
        },
        "drained": [{"type": t, "id": i, "reason": r} for (t, i), r in drained.items()],
        "vanished": [
            {"type": v["type"], "id": v["id"], "held": v["held"]} for v in snap["vanished"]
        ],
        "audit": audit,
        # NVML failed at detection: no GPU is offered, and this says why (docs/gpus.md)
        "gpus_unavailable": service.pool.additional_properties.get("gpus_unavailable") or None,
    }


class _Holders:
    """The `holder` objects of one status document, one per process: a node's leases
    mostly share a few holders (a harness's workers), and 10,000 leases need not make
    10,000 copies of the same user and command."""

    def __init__(self, names: ProcessNames) -> None:
        self.names = names
        self.made: dict[tuple[Any, ...], dict[str, Any]] = {}

    def of(self, holder: dict[str, Any]) -> dict[str, Any]:
        """pid, uid, gid and start time (the process's identity), user name and command."""
        pid, uid, start = int(holder.get("pid", -1)), holder.get("uid"), holder.get("starttime")
        key = (pid, uid, holder.get("gid"), start)
        made = self.made.get(key)
        if made is None:
            described = self.names.describe(pid, uid, start)
            made = {**described, "uid": uid, "gid": key[2], "starttime": start}
            self.made[key] = made
        return made

    def pids(self) -> list[int]:
        return [key[0] for key in self.made]


def _lease(item: dict[str, Any], extras: Any, now: float, holders: _Holders) -> dict[str, Any]:
    # the current holder: a re-claim moves the lease to another process
    holder = extras.holder.to_dict() if extras is not None else item["holder"]
    return {
        "id": item["id"],
        "label": item["label"],
        "holder": holders.of(holder),
        "age_s": round(max(0.0, now - item["granted_at"]), 3),
        "resources": item["resources"],
        "stale": bool(item["stale"]),
    }


def _waiter(service: Any, item: dict[str, Any], now: float, holders: _Holders) -> dict[str, Any]:
    from .requests import parse_request

    since, deadline = item["since"], item["deadline"]
    request = item["request"]
    return {
        "position": item["position"],
        "holder": holders.of(_waiter_holder(service, item["req_id"])),
        "label": item["label"],
        "request": request,
        "request_text": str(parse_request(request)),
        "waited_s": round(max(0.0, now - since), 3),
        "timeout_s": None if deadline is None else round(deadline - since, 3),
    }


def _waiter_holder(service: Any, pending: Any) -> dict[str, Any]:
    """Whose lease a waiter asks for: the holder pid it named, else the connection's peer
    (`pending` is the server's request record: its `owner` and `conn`)."""
    owner = getattr(pending, "owner", None)
    if isinstance(owner, tuple) and owner and owner[0] == "pid":
        from .holders import process_uid

        return {"pid": owner[1], "uid": process_uid(owner[1]), "starttime": owner[2]}
    peer = getattr(getattr(pending, "conn", None), "peer", None)
    if peer is not None:
        return peer.to_dict()
    return {"pid": -1, "uid": None}


def _instances(
    pool: Any,
    leases: list[dict[str, Any]],
    drained: dict[tuple[str, str], str],
    vanished: list[dict[str, Any]],
    whole: frozenset[str] | None,
) -> dict[str, list[dict[str, Any]]]:
    """One row per instance of each type: capacity, use, the leases on it, drain reason.
    With `whole` (a paged reply), types not in it get rows only for instances that the
    listed leases hold or that are drained."""
    held: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for le in leases:
        for rtype, items in le["resources"].items():
            for it in items:
                held.setdefault((rtype, str(it["id"])), []).append((le["id"], int(it["slots"])))
    out: dict[str, list[dict[str, Any]]] = {}
    none: list[str] = []  # shared by every idle row: the document is encoded, not kept
    for node in pool.nodes[:1]:  # an agent serves one node
        for rtype, insts in node.resources.items():
            rows = out.setdefault(rtype, [])
            if whole is not None and rtype not in whole:
                insts = _some(node, rtype, held, drained)
            for inst in insts:
                key = (rtype, inst.id)
                on = held.get(key)
                row: dict[str, Any] = {
                    "id": inst.id,
                    "slots": inst.slots,
                    "used": sum(n for _, n in on) if on else 0,
                }
                props = inst.properties
                if props:
                    row.update({k: props[k] for k in _INSTANCE_FIELDS if k in props})
                row["leases"] = [lid for lid, _ in on] if on else none
                row["drained"] = drained.get(key) if drained else None
                row["vanished"] = False
                rows.append(row)
    for v in vanished:  # held on an instance a reload removed: shown until released
        on = held.get((v["type"], v["id"]), [])
        out.setdefault(v["type"], []).append(
            {
                "id": v["id"],
                "slots": 0,
                "used": v["held"],
                "leases": [lid for lid, _ in on],
                "drained": drained.get((v["type"], v["id"])),
                "vanished": True,
            }
        )
    return out


def _gpu_types(pool: Any) -> frozenset[str]:
    """Types whose instances have a UUID or an NVML index: listed whole, every lease too."""
    return _indexed(pool.nodes[0])[1] if pool.nodes else frozenset()


def _some(
    node: Any, rtype: str, held: dict[tuple[str, str], Any], drained: dict[tuple[str, str], str]
) -> list[Any]:
    """The instances of `rtype` that a listed lease holds or that are drained, pool order:
    looked up by id, not found by a walk over every instance."""
    where = _indexed(node)[0].get(rtype, {})
    ids = {i for t, i in held if t == rtype} | {i for t, i in drained if t == rtype}
    insts = node.resources[rtype]
    return [insts[n] for n in sorted(where[i] for i in ids if i in where)]


_last: list[Any] = [None, ({}, frozenset())]  # the node last indexed, and its index


def _indexed(node: Any) -> tuple[dict[str, dict[str, int]], frozenset[str]]:
    """({type: {id: position}}, GPU-like types) of `node`, made once per pool (a reload
    makes new nodes) rather than by a walk over every instance on each call."""
    if _last[0] is not node:
        where = {t: {i.id: n for n, i in enumerate(insts)} for t, insts in node.resources.items()}
        gpus = frozenset(
            t
            for t, insts in node.resources.items()
            if any("uuid" in i.properties or "index" in i.properties for i in insts)
        )
        _last[:] = [node, (where, gpus)]
    return _last[1]


def _ranges(ids: list[str]) -> str:
    """Numeric ids as a cpulist (`0-63,70`), others joined by commas."""
    if ids and all(i.isdigit() for i in ids):
        from .probes.sysfs import format_cpulist

        return format_cpulist([int(i) for i in ids])
    return ",".join(ids)
