"""The environment a command gets inside a lease, read from the grant document alone.

Split from handoff.py so that `rpool-agent run`, which needs only this, creates no value
types and imports neither dataclasses nor the pool model (tests/test_run_cli.py checks).
handoff.py builds its `LeasedGpu`s and per-lease files from the same readings here, and
re-exports what is public. docs/handoff.md explains the choices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

    #: One leased GPU as read from the document: pool id, NVML index (None for MIG or
    #: unknown), full UUID when known, MIG or not, its properties. `LeasedGpu`'s fields.
    GpuFacts = tuple[str, int | None, str | None, bool, dict[str, Any]]

#: `CUDA_VISIBLE_DEVICES` for a lease without GPUs. CUDA documents that enumeration stops
#: at the first invalid entry, so "-1" hides every GPU; unlike "" it survives shell
#: `${VAR:-0}` defaults and `os.environ.get(...) or` checks that treat empty as unset
#: (Flux exports the same).
NO_GPUS = "-1"

CTEST_GROUP_PREFIX = "CTEST_RESOURCE_GROUP_"
#: Variables this module owns; stale copies in the base environment (a lease run inside
#: another lease) are dropped before the new values go in.
FILE_VARS = ("RPOOL_CTEST_SPEC_FILE", "RPOOL_POOL_FILE", "RPOOL_POOL_NODES_FILE")

_PLACEHOLDER = re.compile(r"\{(ctest_spec|pool_nodes|pool)\}")


# --- reading the lease document -------------------------------------------------------------


def _resources(doc: Mapping[str, Any]) -> Mapping[str, list[Mapping[str, Any]]]:
    return doc.get("resources") or {}


def _props(doc: Mapping[str, Any], rtype: str, rid: str) -> Mapping[str, Any]:
    by_type = (doc.get("properties") or {}).get(rtype) or {}
    return by_type.get(rid) or {}


def _numeric(rid: str) -> int | None:
    return int(rid) if rid.isascii() and rid.isdigit() else None


def _slots(doc: Mapping[str, Any], rtype: str) -> dict[str, int]:
    """Leased slots per pool id (an id listed twice adds up)."""
    out: dict[str, int] = {}
    for item in _resources(doc).get(rtype, ()):
        rid = str(item["id"])
        out[rid] = out.get(rid, 0) + int(item.get("slots", 1))
    return out


def _gpu(rid: str, props: Mapping[str, Any]) -> GpuFacts:
    uuid = props.get("uuid")
    mig = bool(
        (isinstance(uuid, str) and uuid.startswith("MIG-"))
        or "parent_uuid" in props
        or "parent_index" in props
    )
    index = props.get("index")
    if index is None and not mig:
        index = _numeric(rid)  # hand-written pool, or canary's detection: the id is the index
    return (
        rid,
        None if mig or index is None else int(index),
        uuid if isinstance(uuid, str) and uuid else None,
        mig,
        dict(props),
    )


def _physical_order(gpu: GpuFacts) -> tuple[bool, int]:
    """PCI order: a whole GPU by its index, a MIG device next to its parent."""
    _, index, _, mig, props = gpu
    key = index if not mig else props.get("parent_index")
    return (key is None, int(key) if key is not None else 0)


def gpu_facts(doc: Mapping[str, Any]) -> list[GpuFacts]:
    """The leased GPUs in PCI order (the pool's own order; stable for unknown indices).

    This order is the lease's CUDA numbering: the k-th GPU here is CUDA device k inside
    `CUDA_VISIBLE_DEVICES`, and lease-local id "k" in the CTest spec and flat pool.
    """
    gpus = [_gpu(rid, _props(doc, "gpus", rid)) for rid in _slots(doc, "gpus")]
    return sorted(gpus, key=_physical_order)


def cuda_name(rid: str, index: int | None, uuid: str | None, mig: bool) -> str:
    """A GPU's entry in `CUDA_VISIBLE_DEVICES`.

    MIG devices only by full MIG UUID (short UUIDs break PyTorch); whole GPUs by index,
    which `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes mean the NVML index. A GPU with neither is
    written as its pool id: CUDA stops at an entry it cannot parse, so at worst the
    program sees fewer GPUs, never one outside the lease.
    """
    if mig and uuid:
        return uuid
    if index is not None:
        return str(index)
    return uuid or rid


def physical_id(rid: str, index: int | None, mig: bool) -> str:
    """A GPU's id in the node-form pool: the NVML index canary >= 26.9 exports as-is."""
    if not mig and index is not None:
        return str(index)
    return rid


def _cpu_threads(doc: Mapping[str, Any], rid: str) -> list[int]:
    threads = _props(doc, "cpus", rid).get("threads")
    if threads is not None:
        return [int(t) for t in threads]
    n = _numeric(rid)
    return [] if n is None else [n]


def leased_cpus(doc: Mapping[str, Any]) -> list[int]:
    """Hardware CPU numbers of the leased cpus, hyperthread siblings included, sorted.

    Empty when the lease has no cpus or none maps to hardware (non-numeric ids without
    `threads`): the caller must then leave the affinity alone.
    """
    return sorted({t for rid in _slots(doc, "cpus") for t in _cpu_threads(doc, rid)})


def request_form(doc: Mapping[str, Any]) -> str:
    """ "groups" if the lease was asked for as groups of units, "mapping" for `{type: n}`.

    On the wire (`requests.Request.to_wire`) a RESOURCE_GROUPS request and canary's item
    list are the same thing, a list (one group flat, several as a list of lists); only the
    `{type: n}` form (`--gpus N`) is a mapping. A raw RESOURCE_GROUPS string counts as groups.
    """
    req = doc.get("request")
    if isinstance(req, Mapping):
        return "mapping"
    if isinstance(req, str) and req.strip().startswith("{"):
        return "mapping"
    return "groups" if isinstance(req, (list, tuple, str)) else "mapping"


def _local_ids(doc: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(type, pool id) -> the id the CTest spec and the flat pool use.

    GPUs become "0".."n-1" in CUDA order inside the lease; every other type keeps its id.
    """
    out = {("gpus", rid): str(k) for k, (rid, *_) in enumerate(gpu_facts(doc))}
    for rtype, items in _resources(doc).items():
        for item in items:
            out.setdefault((rtype, str(item["id"])), str(item["id"]))
    return out


# --- environment ----------------------------------------------------------------------------


def _join(values: Iterable[object]) -> str:
    return ",".join(str(v) for v in values)


def ctest_group_env(doc: Mapping[str, Any]) -> dict[str, str]:
    """`CTEST_RESOURCE_GROUP_*` exactly as ctest sets them, with lease-local ids.

    Per group: the sorted type list, and per type `id:<id>,slots:<k>` joined by ";" in the
    group's order (two units on one id stay two entries, as in ctest).
    """
    local = _local_ids(doc)
    groups = doc.get("groups") or []
    env = {f"{CTEST_GROUP_PREFIX}COUNT": str(len(groups))}
    for n, units in enumerate(groups):
        by_type: dict[str, list[str]] = {}
        for unit in units:
            rtype, rid = str(unit["type"]), str(unit["id"])
            rid = local.get((rtype, rid), rid)
            by_type.setdefault(rtype, []).append(f"id:{rid},slots:{int(unit.get('slots', 1))}")
        env[f"{CTEST_GROUP_PREFIX}{n}"] = ",".join(sorted(by_type))
        for rtype, entries in by_type.items():
            env[f"{CTEST_GROUP_PREFIX}{n}_{rtype.upper()}"] = ";".join(entries)
    return env


def lease_env(doc: Mapping[str, Any], base_env: Mapping[str, str]) -> dict[str, str]:
    """A new, complete environment for a program running inside the lease.

    `base_env` is copied, never changed. Stale `CTEST_RESOURCE_GROUP_*` and per-lease file
    variables are dropped; CTest group variables are set only when the lease was asked
    for as groups (RESOURCE_GROUPS or canary items), not as `{type: n}` (docs/handoff.md).
    """
    env = {
        k: v
        for k, v in base_env.items()
        if not k.startswith(CTEST_GROUP_PREFIX) and k not in FILE_VARS
    }
    gpus = gpu_facts(doc)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    names = [cuda_name(rid, index, uuid, mig) for rid, index, uuid, mig, _ in gpus]
    env["CUDA_VISIBLE_DEVICES"] = _join(names) if gpus else NO_GPUS
    env["RPOOL_LEASE_ID"] = str(doc["id"])
    env["RPOOL_GPU_IDS"] = _join(rid for rid, *_ in gpus)
    env["RPOOL_GPU_UUIDS"] = _join(uuid or "" for _, _, uuid, _, _ in gpus)
    env["RPOOL_CPU_IDS"] = _join(leased_cpus(doc))
    env["CANARY_GPU_IDS"] = _join(physical_id(rid, index, mig) for rid, index, _, mig, _ in gpus)
    env["CANARY_CPU_IDS"] = _join(_slots(doc, "cpus"))
    for rtype in _resources(doc):
        if rtype not in ("cpus", "gpus"):  # canary: CANARY_<type without final s>_IDS
            name = rtype[:-1] if rtype.endswith("s") else rtype
            env[f"CANARY_{name.upper()}_IDS"] = _join(_slots(doc, rtype))
    cpu_slots = sum(_slots(doc, "cpus").values())
    if cpu_slots:
        env["OMP_NUM_THREADS"] = str(cpu_slots)
    if request_form(doc) == "groups":
        env.update(ctest_group_env(doc))
    files = doc.get("files")  # the per-lease files, when asked for (`files: true`)
    if files:
        env["RPOOL_CTEST_SPEC_FILE"] = files["ctest_spec"]
        env["RPOOL_POOL_FILE"] = files["pool"]
        env["RPOOL_POOL_NODES_FILE"] = files["pool_nodes"]
    return env


def substitute_args(args: Sequence[str], files: Mapping[str, str]) -> list[str]:
    """`{ctest_spec}`, `{pool}`, `{pool_nodes}` -> file paths, also inside longer args.

    Only those exact tokens change; other braces (`{}`, `{x}`) are left as they are.
    """
    return [_PLACEHOLDER.sub(lambda m: files[m.group(1)], arg) for arg in args]
