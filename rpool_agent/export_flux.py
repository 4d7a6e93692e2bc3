"""`rpool-agent export flux`: this node as a Flux resource set, RFC 20 "R" version 1.

The input is detect's topology report (`detect --format json`); nothing here probes. One
execution target (rank 0 unless told otherwise) whose children are `core`, the node's
online cores as hwloc's logical indices (socket by socket, then NUMA node, then lowest
CPU: Flux numbers cores as hwloc does), and `gpu`, the GPUs' NVML indices (the order
CUDA and Flux's hwloc discovery both use). `nodelist` holds the host name. `starttime`
and `expiration` are 0, "unset" in RFC 20: an inventory has no lifetime. Concatenate the
R_lite entries of several nodes (distinct ranks) to describe a fleet, or hand the files
to `flux R` for that.
"""

from __future__ import annotations

from .export_slurm import gpu_notes, short_host
from .probes.sysfs import format_cpulist

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def flux_r(
    report: dict[str, Any],
    *,
    rank: int = 0,
    starttime: float = 0.0,
    expiration: float = 0.0,
) -> dict[str, Any]:
    """R version 1 for the machine `report` describes (a JSON-ready dict)."""
    children = {"core": idset(range(len(report["cpu"]["cores"])))}
    gpus = [g["index"] for g in (report.get("nvidia") or {}).get("gpus", [])]
    if gpus:
        children["gpu"] = idset(gpus)
    return {
        "version": 1,
        "execution": {
            "R_lite": [{"rank": str(rank), "children": children}],
            "nodelist": [short_host(str(report.get("host") or "localhost"))],
            "starttime": float(starttime),
            "expiration": float(expiration),
        },
    }


def flux_notes(report: dict[str, Any]) -> list[str]:
    """What the resource set leaves out that an admin may want to know (for stderr)."""
    notes = []
    usable, online = set(report["cpu"]["usable"]), report["cpu"]["online"]
    if not usable >= set(online):
        notes.append(
            f"this process may use only CPUs {format_cpulist(sorted(usable))}; R lists every"
            " online core, as the Flux system instance sees the node (a broker started in"
            " this cpuset discovers only its own cores)"
        )
    offline = report["cpu"].get("offline") or []
    if offline:
        notes.append(f"offline CPUs {format_cpulist(offline)} are not in R (hwloc skips them)")
    return notes + gpu_notes(report)


def idset(ids: Any) -> str:
    """RFC 22 idset: ascending, unique, ranges with `-` (`0-3,8`)."""
    return format_cpulist(sorted(set(ids)))
