"""The GPU report's value types: what `probe_gpus` returns and `visible.restrict` narrows.

Kept apart from nvidia.py so the pure readers of a report (visible.py) need not import
the probe that makes one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any


def _to_dict(obj: Any) -> dict[str, Any]:
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


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG device; `index` is its NVML slot under the parent (slots can be sparse)."""

    index: int
    uuid: str  # "MIG-..."; "" if NVML would not say
    name: str | None
    memory_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass(frozen=True, slots=True)
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
        return _to_dict(self)


@dataclass(frozen=True, slots=True)
class GpuReport:
    gpus: tuple[Gpu, ...]
    driver_version: str | None  # "550.54.15"
    cuda_driver_version: str | None  # "12.4"
    source: str  # "nvml" | "procfs" | "none" | "failed" (NVML is there but will not answer)
    problem: str | None  # one line for stderr: why no GPUs, or why the reading is partial
    #: the inherited `CUDA_VISIBLE_DEVICES` that restricted `gpus` (None: unset, or a tree)
    visible_devices: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @property
    def failed(self) -> bool:
        """NVML is installed but will not answer: no GPU can be offered, and `problem`
        says why (detect exits non-zero; serve serves the CPUs and says so in status)."""
        return self.source == "failed"
