"""The GPU audit: which processes use a GPU without a lease on it.

The agent promises that a leased GPU is used by its lease holder alone; nothing else on
a node tells the admin who breaks that. NVML lists each GPU's running compute and
graphics processes; a process is within the rules when it holds a lease on that GPU, or
descends from a process that does (psutil's process tree: `run` execs the command, whose
children inherit the lease). Everything else on a GPU of the pool is a violation.

GPUs that NVML reports but the pool does not hold are not audited: nobody can lease
them, so the admin keeps them out of the agent's promise on purpose. NVML lists a process
on a MIG device under the parent GPU, with the GPU and compute instance ids; those find
the MIG instance of the pool (`parent_uuid`, `gpu_instance_id`, `compute_instance_id`).

Reading NVML and /proc takes milliseconds to seconds on a busy node: `serve` runs
`run_audit` in a worker thread, never on its event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from .errors import ProbeError
from .procinfo import ProcessNames, ancestors

_NO_INSTANCE = 0xFFFFFFFF  # NVML's gpuInstanceId for a process not on a MIG device
_LISTS = (
    (
        "compute",
        ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"),
    ),
    (
        "graphics",
        ("nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
    ),
)


def gpu_processes() -> tuple[list[dict[str, Any]], list[str]]:
    """Every process NVML sees on a GPU: ({index, uuid, pid, kind, gi, ci}, ...) and notes
    on GPUs it could not list. gi and ci are the MIG instance ids, None off MIG. Raises
    ProbeError when NVML cannot be opened at all."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ProbeError(f"NVML cannot be opened: {exc}") from None
    uses: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                for kind, names in _LISTS:
                    for p in _newest(pynvml, names, handle):
                        gi, ci = p.gpuInstanceId, p.computeInstanceId
                        mig = gi is not None and gi != _NO_INSTANCE
                        use = {"index": index, "uuid": uuid, "pid": p.pid, "kind": kind}
                        uses.append({**use, "gi": gi if mig else None, "ci": ci if mig else None})
            except pynvml.NVMLError as exc:
                notes.append(f"GPU {index}: cannot list its processes: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return uses, notes


def _newest(pynvml: Any, names: tuple[str, ...], handle: Any) -> list[Any]:
    """The newest version of an entry point the driver has (_v3 came with driver 510)."""
    for name in names[:-1]:
        try:
            return getattr(pynvml, name)(handle)
        except pynvml.NVMLError_FunctionNotFound:
            continue
    return getattr(pynvml, names[-1])(handle)


def find_violations(
    doc: dict[str, Any],
    uses: list[dict[str, Any]],
    parents_of: Callable[[int], list[int] | None] = ancestors,
) -> list[dict[str, Any]]:
    """The uses (from `gpu_processes`) that no lease on that GPU covers.

    `doc` is a status document (status_doc.py): its instances with a `uuid` (or an
    `index`) are the pool's GPUs, its leases say who holds each. A process that has
    exited since NVML listed it is dropped (`parents_of` returns None for it).
    """
    holders = {le["id"]: le["holder"]["pid"] for le in doc.get("leases", [])}
    gpus = _gpu_rows(doc)
    found = []
    for use in uses:
        hit = _instance_of(use, gpus)
        if hit is None:
            continue  # not a GPU of the pool
        rtype, row = hit
        allowed = {holders[lid] for lid in row.get("leases", []) if lid in holders}
        pid = use["pid"]
        if pid in allowed:
            continue
        parents = parents_of(pid)
        if parents is None or allowed.intersection(parents):
            continue
        found.append(
            {
                "type": rtype,
                "gpu": row["id"],
                "uuid": row.get("uuid"),
                "pid": pid,
                "kind": use["kind"],
            }
        )
    return found


Row = tuple[str, dict[str, Any]]


def _gpu_rows(doc: dict[str, Any]) -> dict[Any, Row]:
    """The pool's GPUs and MIG devices by every key a process's NVML entry may match."""
    keys: dict[Any, Row] = {}
    for rtype, rows in doc.get("instances", {}).items():
        for row in rows:
            if row.get("parent_uuid") and row.get("gpu_instance_id") is not None:
                gi, ci = row["gpu_instance_id"], row.get("compute_instance_id")
                keys[("mig", row["parent_uuid"], gi, ci)] = (rtype, row)
                keys.setdefault(("mig", row["parent_uuid"], gi, None), (rtype, row))
            elif row.get("uuid"):
                keys[("uuid", row["uuid"])] = (rtype, row)
            elif isinstance(row.get("index"), int):
                keys[("index", row["index"])] = (rtype, row)
    return keys


def _instance_of(use: dict[str, Any], gpus: dict[Any, Row]) -> Row | None:
    if use.get("gi") is not None:
        return gpus.get(("mig", use["uuid"], use["gi"], use.get("ci"))) or gpus.get(
            ("mig", use["uuid"], use["gi"], None)
        )
    return gpus.get(("uuid", use["uuid"])) or gpus.get(("index", use["index"]))


def run_audit(
    doc: dict[str, Any],
    names: ProcessNames | None = None,
    lister: Callable[[], tuple[list[dict[str, Any]], list[str]]] = gpu_processes,
) -> dict[str, Any]:
    """One audit against the status document `doc`: the schema's `audit` object.

    `{"violations": [{type, gpu, uuid, pid, user, command, kind}], "notes": [...],
    "problem": None | why no audit was possible}`; `status` adds `age_s`.
    """
    names = names or ProcessNames()
    if not _gpu_rows(doc):  # nothing to audit: no NVML call, no complaint about NVML
        return {"violations": [], "notes": ["the pool has no GPUs"], "problem": None}
    try:
        uses, notes = lister()
    except ProbeError as exc:
        return {"violations": [], "notes": [], "problem": str(exc)}
    found = find_violations(doc, uses)
    for v in found:
        d = names.describe(v["pid"])
        v["user"], v["command"] = d["user"], d["command"]
    return {"violations": found, "notes": notes, "problem": None}


def audit_lines(result: dict[str, Any]) -> list[str]:
    """One log line per violation (what `serve` logs after each periodic audit)."""
    return [
        f"audit: pid={v['pid']} user={v.get('user')} command={v.get('command')!r} uses "
        f"{v['type']}:{v['gpu']} ({v.get('uuid')}) without a lease on it"
        for v in result.get("violations", [])
    ]
