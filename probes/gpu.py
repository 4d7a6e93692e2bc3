"""One GPU and its MIG devices as the probe read them (`GpuReport.gpus` holds these), and
the JSON form of these records and of the report.

A module of its own so that only a probe that finds a GPU loads it: `detect` runs in every
job's prologue, and on a node without NVIDIA GPUs (most CI nodes) it then never defines
these records, whose dataclass methods are generated when the class is (docs/detect.md,
Speed; tests/test_layering.py keeps it so).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any


def as_dict(obj: Any) -> dict[str, Any]:
    """Fields as plain JSON values; `None` (absent) fields are left out, tuples become lists."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        name = f.name
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        out[name] = value
    return out


@dataclass(slots=True)
class MigDevice:
    """One MIG device; `index` is its NVML slot under the parent (slots can be sparse)."""

    index: int
    uuid: str  # "MIG-..."; "" if NVML would not say
    name: str | None
    memory_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)


@dataclass(slots=True)
class Gpu:
    """One physical GPU. `None` means NVML (or /proc) did not say: the field is absent."""

    index: int  # NVML index (PCI bus order), also under the /proc fallback
    uuid: str  # "GPU-..."; "" when unknown (driver has not initialised the GPU)
    name: str | None
    memory_bytes: int | None
    pci_bus_id: str | None  # sysfs form "0000:3b:00.0", see normalize_bus_id
    minor_number: int | None  # N of /dev/nvidiaN; can differ from index
    numa_node: int | None
    cpu_affinity: tuple[int, ...] | None  # CPUs close to the GPU
    compute_capability: str | None  # "9.0"
    mig_enabled: bool | None
    mig_devices: tuple[MigDevice, ...]

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)
