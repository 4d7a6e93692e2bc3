"""A granted lease as its client sees it: the lease document, with each instance's
properties from the pool (a GPU's uuid and index, say)."""

from __future__ import annotations

from typing import Any

from .lease import Lease
from .pool import Pool


def lease_document(index: PropertyIndex, lease: Lease, token: str | None) -> dict[str, Any]:
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
        "properties": index.of(lease),
        "holder": dict(lease.holder),
    }
    if token is not None:
        doc["token"] = token
    return doc


class PropertyIndex:
    """The properties of one pool's instances by (type, id), looked up once per leased
    instance: a lease's cost must not grow with the size of the pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        node = pool.nodes[0] if pool.nodes else None
        self._props: dict[tuple[str, str], Any] = {}
        if node is not None:
            for rtype, instances in node.resources.items():
                for inst in instances:
                    if inst.properties:
                        self._props[rtype, inst.id] = inst.properties

    def of(self, lease: Lease) -> dict[str, dict[str, Any]]:
        """{type: {id: properties}} of the leased instances that have any."""
        props: dict[str, dict[str, Any]] = {}
        if not self._props:
            return props
        for s in lease.held:
            found = self._props.get((s.type, s.id))
            if found is not None:
                props.setdefault(s.type, {})[s.id] = found
        return props
