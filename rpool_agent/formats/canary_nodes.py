"""canary's node form (canary-wm 26.9 and later, which reject the flat form).

    resource_pool:
      allow_multinode: true            # optional
      additional_properties: {...}
      nodes:
      - id: <node>
        additional_properties: {...}   # optional
        resources: {<type>: [{id, slots, properties: {...}}]}

Mirrors `_canary.resource_pool.schemas.resource_pool_schema` (unknown keys are errors
there too) plus two rules canary enforces later or relies on: every node has `cpus`
(canary gives every test at least one cpu), and ids follow CTest's rules. The model has
no field for `allow_multinode`; it rides in the pool's additional_properties.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..pool import Instance, Node, Pool, copy_data
from .validate import Problems, at, kind, read_resources

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

NAME = "canary-nodes"
ALLOW_MULTINODE = "allow_multinode"
#: canary's own GPU detection (gpu_select._gpu_resource_spec) writes these first.
GPU_KEYS = ("vendor", "uuid", "name")


def read(payload: Mapping[Any, Any], problems: Problems, where: str) -> Pool:
    problems.unknown_keys(payload, (ALLOW_MULTINODE, "additional_properties", "nodes"), where)
    ap_doc = problems.mapping(
        payload.get("additional_properties", {}), at(where, "additional_properties")
    )
    ap = dict(ap_doc or {})
    if ALLOW_MULTINODE in payload:
        flag = payload[ALLOW_MULTINODE]
        if not isinstance(flag, bool):
            problems.add(f"must be true or false, not {kind(flag)}", at(where, ALLOW_MULTINODE))
        elif ALLOW_MULTINODE in ap:
            problems.add(
                f"{ALLOW_MULTINODE} given twice (here and at top level)",
                at(at(where, "additional_properties"), ALLOW_MULTINODE),
            )
        else:
            ap[ALLOW_MULTINODE] = flag
    nodes_where = at(where, "nodes")
    nodes_doc = payload.get("nodes")
    if "nodes" not in payload:
        problems.add("missing 'nodes'", where)
        nodes_doc = []
    elif not isinstance(nodes_doc, list):
        problems.add(f"must be a list of nodes, not {kind(nodes_doc)}", nodes_where)
        nodes_doc = []
    nodes: list[Node] = []
    seen: dict[str, int] = {}
    for i, node_doc in enumerate(nodes_doc):
        node = _read_node(problems, node_doc, at(nodes_where, i))
        if node is None:
            continue
        if node.id in seen:
            problems.add(
                f"duplicate node id {node.id!r} (first at {at(nodes_where, seen[node.id])})",
                at(at(nodes_where, i), "id"),
            )
            continue
        seen[node.id] = i
        nodes.append(node)
    return Pool(nodes=nodes, additional_properties=ap)


def _read_node(problems: Problems, doc: Any, where: str) -> Node | None:
    got = problems.mapping(doc, where)
    if got is None:
        return None
    problems.unknown_keys(got, ("id", "additional_properties", "resources"), where)
    nid = got.get("id")
    if isinstance(nid, int) and not isinstance(nid, bool):
        nid = str(nid)
    if not isinstance(nid, str) or not nid:
        what = "node has no id" if "id" not in got else f"node id must be a string, not {nid!r}"
        problems.add(what, at(where, "id") if "id" in got else where)
        nid = None
    ap = problems.mapping(got.get("additional_properties", {}), at(where, "additional_properties"))
    if "resources" not in got:
        problems.add("node has no resources", where)
        return None
    resources = read_resources(
        problems,
        got["resources"],
        at(where, "resources"),
        allowed=("id", "slots", "properties"),
        allow_int_ids=True,
    )
    if isinstance(got["resources"], Mapping) and not got["resources"].get("cpus"):
        problems.add(
            f"node {nid or '?'!r} has no cpus (canary gives every test at least one cpu)",
            at(where, "resources"),
        )
    if nid is None:
        return None
    return Node(id=nid, resources=resources, additional_properties=dict(ap or {}))


def _instance(rtype: str, inst: Instance) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": inst.id, "slots": inst.slots}
    props = copy_data(inst.properties)
    uuid = props.get("uuid")
    if (
        rtype == "gpus"
        and "vendor" not in props
        and isinstance(uuid, str)
        and uuid.startswith(("GPU-", "MIG-"))  # NVML's UUID forms; other vendors' differ
    ):
        props["vendor"] = "NVIDIA"  # what canary's own detection writes for an NVIDIA GPU
    if props:
        first = {k: props.pop(k) for k in GPU_KEYS if k in props} if rtype == "gpus" else {}
        doc["properties"] = {**first, **props}
    return doc


def write(pool: Pool) -> tuple[dict[str, Any], list[str]]:
    ap = copy_data(pool.additional_properties)
    out: dict[str, Any] = {}
    if ALLOW_MULTINODE in ap:
        out[ALLOW_MULTINODE] = ap.pop(ALLOW_MULTINODE)
    out["additional_properties"] = ap
    nodes = []
    for node in pool.nodes:
        node_doc: dict[str, Any] = {"id": node.id}
        if node.additional_properties:
            node_doc["additional_properties"] = copy_data(node.additional_properties)
        node_doc["resources"] = {
            rtype: [_instance(rtype, inst) for inst in instances]
            for rtype, instances in node.resources.items()
        }
        nodes.append(node_doc)
    out["nodes"] = nodes
    return {"resource_pool": out}, []
