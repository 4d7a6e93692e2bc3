"""canary's flat form (canary-wm up to 26.4.x): one node, instances hold only id and slots.

    resource_pool:
      additional_properties: {...}
      resources: {<type>: [{id, slots}]}

canary rejects any other key in an instance, so everything the model keeps beyond id and
slots lives under reserved keys of `additional_properties` and moves back on read:
`host` (the node id, when not "localhost"), `node_properties` (the node's own
additional_properties) and `instances: {<type>: {<id>: {...properties}}}`. Also read:
the same without the `resource_pool:` wrapper, and shorthand counts (`{cpus: 8}`,
`resources: {gpus: 2}`) meaning ids "0".."N-1" with one slot each.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import PoolFormatError
from ..pool import Instance, Node, Pool, copy_data
from .validate import Problems, at, read_resources

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

NAME = "canary"
HOST, NODE_PROPERTIES, INSTANCES = "host", "node_properties", "instances"
RESERVED = (HOST, NODE_PROPERTIES, INSTANCES)
DEFAULT_NODE = "localhost"


def read(payload: Mapping[Any, Any], problems: Problems, where: str) -> Pool:
    """The pool in `payload` (the mapping under `resource_pool:`, or the bare document)."""
    if "resources" not in payload and "additional_properties" not in payload:
        # shorthand: the whole payload is the resources mapping
        resources = read_resources(
            problems, payload, where, allowed=("id", "slots"), allow_int_ids=True, allow_counts=True
        )
        return Pool.single(resources, node_id=DEFAULT_NODE)
    problems.unknown_keys(payload, ("additional_properties", "resources"), where)
    if "resources" not in payload:
        problems.add("missing 'resources'", where)
    resources = read_resources(
        problems,
        payload.get("resources", {}),
        at(where, "resources"),
        allowed=("id", "slots"),
        allow_int_ids=True,
        allow_counts=True,
    )
    ap_where = at(where, "additional_properties")
    ap_doc = problems.mapping(payload.get("additional_properties", {}), ap_where) or {}
    ap = dict(ap_doc)
    node = Node(id=_host(problems, ap.pop(HOST, DEFAULT_NODE), at(ap_where, HOST)))
    node.resources = resources
    if NODE_PROPERTIES in ap:
        props = problems.mapping(ap.pop(NODE_PROPERTIES), at(ap_where, NODE_PROPERTIES))
        node.additional_properties = dict(props or {})
    if INSTANCES in ap:
        _attach(problems, ap.pop(INSTANCES), resources, at(ap_where, INSTANCES))
    return Pool(nodes=[node], additional_properties=ap)


def _host(problems: Problems, host: Any, where: str) -> str:
    if isinstance(host, int) and not isinstance(host, bool):
        host = str(host)
    if not isinstance(host, str) or not host:
        problems.add(f"host (the node id) must be a non-empty string, not {host!r}", where)
        return DEFAULT_NODE
    return host


def _attach(problems: Problems, doc: Any, resources: dict[str, list[Instance]], where: str) -> None:
    """Move `instances.<type>.<id>: {...}` onto the instances they describe."""
    by_type = problems.mapping(doc, where)
    for rtype, by_id_doc in (by_type or {}).items():
        here = at(where, str(rtype))
        if rtype not in resources:
            problems.add(f"properties for resource type {rtype!r}, which the pool lacks", here)
            continue
        by_id = problems.mapping(by_id_doc, here)
        index = {inst.id: inst for inst in resources[rtype]}
        for rid, props in (by_id or {}).items():
            there = at(here, str(rid))
            inst = index.get(str(rid)) if not isinstance(rid, bool) else None
            if inst is None:
                problems.add(f"properties for {rtype} id {rid!r}, which the pool lacks", there)
                continue
            got = problems.mapping(props, there)
            if got is not None:
                inst.properties = dict(got)


def write(pool: Pool) -> tuple[dict[str, Any], list[str]]:
    """The flat document; fails for more than one node (the form cannot say which is which)."""
    if len(pool.nodes) > 1:
        raise PoolFormatError(
            f"the flat canary form holds one node, this pool has {len(pool.nodes)} "
            "(write canary-nodes instead)"
        )
    ap = copy_data(pool.additional_properties)
    for key in RESERVED:
        if key in ap:
            raise PoolFormatError(
                f"additional_properties.{key} is reserved by the flat canary form "
                "(rename it, or write canary-nodes)"
            )
    resources: dict[str, list[dict[str, str | int]]] = {}
    if pool.nodes:
        node = pool.nodes[0]
        if node.id != DEFAULT_NODE:
            ap[HOST] = node.id
        if node.additional_properties:
            ap[NODE_PROPERTIES] = copy_data(node.additional_properties)
        props: dict[str, dict[str, Any]] = {}
        for rtype, instances in node.resources.items():
            resources[rtype] = [inst.to_seed() for inst in instances]
            described = {i.id: copy_data(i.properties) for i in instances if i.properties}
            if described:
                props[rtype] = described
        if props:
            ap[INSTANCES] = props
    return {"resource_pool": {"additional_properties": ap, "resources": resources}}, []
