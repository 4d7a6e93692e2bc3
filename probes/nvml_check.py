"""Is each GPU still usable? One cheap NVML pass, for the agent's health poller.

`check_devices` opens NVML, looks each GPU or MIG device up by its UUID, asks one cheap
question that needs the device (its memory), and shuts NVML down again: as for the probe,
NVML is never held open between polls (a holder stops others reconfiguring the GPUs). It
blocks (nvmlInit can take seconds on a node without persistence mode), so the agent runs
it in a thread, off its event loop.
"""

from __future__ import annotations

import contextlib

from .nvidia import import_pynvml, nvml_error

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from collections.abc import Iterable


class NvmlUnavailable(Exception):
    """There is no NVML here to ask (no library, no pynvml): nothing can be checked."""


def check_devices(uuids: Iterable[str]) -> dict[str, str]:
    """{uuid: why it cannot be used now} for each device that fails; absent means fine.

    NVML failing as a whole (nvmlInit) fails every device with that reason: a GPU job
    would fail on each of them. Raises NvmlUnavailable when the library cannot be loaded.
    """
    pynvml, why = import_pynvml()
    if pynvml is None:
        raise NvmlUnavailable(why)
    wanted = list(uuids)
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as err:
        return dict.fromkeys(wanted, nvml_error("nvmlInit", err))
    failed: dict[str, str] = {}
    try:
        for uuid in wanted:
            where = "nvmlDeviceGetHandleByUUID"
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
                where = "nvmlDeviceGetMemoryInfo"
                pynvml.nvmlDeviceGetMemoryInfo(handle)
            except pynvml.NVMLError_NotSupported:
                continue  # the device answered: it merely has no such figure
            except pynvml.NVMLError as err:
                failed[uuid] = f"{where}: {err}"
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return failed
