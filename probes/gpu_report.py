"""The GPU report: what `probe_gpus` returns and `visible.restrict` narrows.

Kept apart from nvidia.py so the pure readers of a report (visible.py) need not import
the probe that makes one. The GPUs in it are `gpu.Gpu` records, in a module of their own:
see there why.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

    from .gpu import Gpu


@dataclass(slots=True)
class GpuReport:
    """What `probe_gpus` found: the GPUs this process may use, and how it knows."""

    gpus: tuple[Gpu, ...]
    driver_version: str | None  # "550.54.15"
    cuda_driver_version: str | None  # "12.4"
    source: str  # "nvml" | "procfs" | "none" | "failed" (NVML is there but will not answer)
    problem: str | None  # one line for stderr: why no GPUs, or why the reading is partial
    #: the inherited `CUDA_VISIBLE_DEVICES` that restricted `gpus` (None: unset, or a tree)
    visible_devices: str | None = None

    def to_dict(self) -> dict[str, Any]:
        from .gpu import as_dict

        return as_dict(self)

    @property
    def failed(self) -> bool:
        """NVML is installed but will not answer: no GPU can be offered, and `problem`
        says why (detect exits non-zero; serve serves the CPUs and says so in status)."""
        return self.source == "failed"
