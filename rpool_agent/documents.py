"""A granted lease as its client sees it: the lease document, with each instance's
properties from the pool (a GPU's uuid and index, say)."""

from __future__ import annotations

from typing import Any

from .lease import Lease
from .pool import Pool


def lease_document(pool: Pool, lease: Lease, token: str | None) -> dict[str, Any]:
    """The lease as a client sees it: ids, slots, groups and each instance's properties."""
    doc: dict[str, Any] = {
        "id": lease.id,
        "label": lease.label,
        "resources": lease.resources(),
        "groups": [
            [{"type": s.type, "id": s.id, "slots": s.slots} for s in group]
            for group in lease.groups
        ],
        "request": lease.request.to_wire(),
        "properties": properties(pool, lease),
        "holder": dict(lease.holder),
    }
    if token is not None:
        doc["token"] = token
    return doc


def properties(pool: Pool, lease: Lease) -> dict[str, dict[str, Any]]:
    """{type: {id: properties}} of the leased instances that have any."""
    props: dict[str, dict[str, Any]] = {}
    node = pool.nodes[0] if pool.nodes else None
    if node is None:
        return props
    for s in lease.held:
        inst = node.instance(s.type, s.id)
        if inst is not None and inst.properties:
            props.setdefault(s.type, {})[s.id] = inst.properties
    return props
