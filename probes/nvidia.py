"""NVIDIA GPUs: through NVML when the driver answers, else from the driver's /proc files.

NVML (`pynvml`, which dlopens `libnvidia-ml.so.1`) is opened, read and shut down in one
go: a process holding NVML open stops others from reconfiguring the GPU (MIG, persistence),
so we never keep it. Every NVML call goes through one door, `_Nvml.get`, which turns an
`NVMLError` into `None` (the field is absent); `NotSupported` is singled out only where it
means something (MIG mode: a GPU without MIG runs with MIG off).

Without NVML (no library, no driver, `nvmlInit` failing) the kernel driver still lists
each GPU in `/proc/driver/nvidia/gpus/<bus id>/information`, as Slurm's `AutoDetect=nvidia`
reads it. A recorded tree (`--sysroot`) is read only that way: NVML would describe the
machine we run on, not the tree. See docs/gpus.md.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .gpu_report import GpuReport
from .sysfs import Root, as_root, parse_cpulist, parse_cpumask

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    import re
    from collections.abc import Mapping
    from types import ModuleType
    from typing import Any

    from .gpu import Gpu, MigDevice

__all__ = ["GpuReport", "normalize_bus_id", "probe_gpus"]

LIBRARY = "libnvidia-ml.so.1"
PROC_GPUS = "proc/driver/nvidia/gpus"
PROC_VERSION = "proc/driver/nvidia/version"
NVML_DEVICE_MIG_ENABLE = 1  # nvml.h; spelled out so the module needs no pynvml to import
# nvml.h return codes that mean "this GPU is broken", not "this query does not apply":
# TIMEOUT, IRQ_ISSUE, GPU_IS_LOST, RESET_REQUIRED, GPU_NOT_FOUND, UNKNOWN.
DEVICE_BROKEN = frozenset({10, 11, 15, 16, 28, 999})
# nvmlInit's "no driver here" (DRIVER_NOT_LOADED): a node without NVIDIA GPUs, unless the
# driver's /proc files say otherwise. Every other nvmlInit error is NVML failing.
NVML_ERROR_DRIVER_NOT_LOADED = 9


# --- pure parsers ----------------------------------------------------------------------

_BUS_ID: re.Pattern[str] | None = None  # compiled on first use: most nodes have no GPU


def _bus_fields(text: str) -> tuple[int, int, int, int] | None:
    global _BUS_ID
    if _BUS_ID is None:
        import re

        _BUS_ID = re.compile(
            r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$"
        )
    m = _BUS_ID.match(text.strip())
    if not m:
        return None
    domain, bus, dev, fn = m.groups()
    return int(domain or "0", 16), int(bus, 16), int(dev, 16), int(fn, 16)


def normalize_bus_id(text: str) -> str | None:
    """NVML's "00000000:3B:00.0" -> "0000:3b:00.0", the name sysfs and /proc use.

    One form everywhere, so a bus id from NVML finds its `/sys/bus/pci/devices` entry and
    matches `lspci -D`; NVML's form is "0000" + upper case of this one again.
    """
    parts = _bus_fields(text)
    if parts is None:
        return None
    domain, bus, dev, fn = parts
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn:x}"


def parse_information(text: str) -> dict[str, str]:
    """`/proc/driver/nvidia/gpus/*/information`: "Key:   value" lines -> {key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_driver_version(text: str) -> str | None:
    """First line of `/proc/driver/nvidia/version` -> "535.129.03".

    Proprietary: "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Tue Oct ...";
    open modules: "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.129.03 ...".
    """
    import re

    first = text.splitlines()[0] if text else ""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", first)
    return m.group(1) if m else None


def format_cuda_version(value: int) -> str:
    """NVML's 12040 -> "12.4" (major * 1000 + minor * 10)."""
    return f"{value // 1000}.{value % 1000 // 10}"


def affinity_cpus(words: Any) -> tuple[int, ...]:
    """NVML's cpuSet (64-bit words, CPU n = bit n % 64 of word n // 64) -> CPU numbers."""
    cpus: list[int] = []
    for i, word in enumerate(words):
        cpus.extend(i * 64 + b for b in range(64) if int(word) >> b & 1)
    return tuple(cpus)


# --- sysfs -----------------------------------------------------------------------------


def _sysfs_numa_node(root: Root, bus_id: str) -> int | None:
    text = root.read(f"sys/bus/pci/devices/{bus_id}/numa_node", default=None)
    try:
        node = int(text) if text is not None else -1
    except ValueError:
        return None
    return node if node >= 0 else None  # -1: the platform has no NUMA info for the slot


def _sysfs_local_cpus(root: Root, bus_id: str) -> tuple[int, ...] | None:
    base = f"sys/bus/pci/devices/{bus_id}"
    try:
        text = root.read(f"{base}/local_cpulist", default=None)
        if text is not None:
            return tuple(parse_cpulist(text)) or None
        mask = root.read(f"{base}/local_cpus", default=None)  # old kernels: hex mask only
        if mask is None:
            return None
        return tuple(parse_cpumask(mask)) or None
    except ValueError:
        return None


def _cpu_words(root: Root) -> int:
    """How many 64-bit words NVML needs to describe every possible CPU."""
    text = root.read("sys/devices/system/cpu/possible", default=None)
    try:
        highest = max(parse_cpulist(text)) if text else (os.cpu_count() or 1) - 1
    except ValueError:
        highest = (os.cpu_count() or 1) - 1
    return highest // 64 + 1


# --- NVML ------------------------------------------------------------------------------


class _Nvml:
    """The one door to NVML: every call goes through `get`, so errors are handled once."""

    def __init__(self, lib: ModuleType) -> None:
        self.lib = lib
        mismatch = getattr(lib, "NVMLLibraryMismatchError", lib.NVMLError)
        self._errors: tuple[type[BaseException], ...] = (lib.NVMLError, mismatch)
        self.last_error: str | None = None
        #: the first error that says the device itself is broken (lost, unknown...), since
        #: the caller last cleared it: such a GPU is left out, not offered half-read
        self.broken: str | None = None

    def get(self, name: str, *args: Any, not_supported: Any = None) -> Any:
        """`pynvml.<name>(*args)`, bytes decoded; any NVML error -> None (field absent).

        A function this pynvml lacks is absent too (e.g. `nvmlDeviceGetNumaNodeId` arrived
        late); `not_supported` is returned instead of None where NotSupported has a meaning.
        """
        fn = getattr(self.lib, name, None)
        if fn is None:
            self.last_error = f"{name}: not in this pynvml"
            return None
        try:
            value = fn(*args)
        except self.lib.NVMLError_NotSupported:
            self.last_error = f"{name}: Not Supported"
            return not_supported
        except self._errors as err:
            self.last_error = f"{name}: {err}"
            if getattr(err, "value", None) in DEVICE_BROKEN and self.broken is None:
                self.broken = self.last_error
            return None
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    def first(self, names: tuple[str, ...], *args: Any) -> Any:
        """The first of several versions of a call that answers (newest first)."""
        for name in names:
            value = self.get(name, *args)
            if value is not None:
                return value
        return None


def _pci_bus_id(pci: Any) -> str | None:
    if pci is None:
        return None
    for attr in ("busId", "busIdLegacy"):
        raw = getattr(pci, attr, b"")
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        bus_id = normalize_bus_id(text)
        if bus_id:
            return bus_id
    return None


def _read_migs(nv: _Nvml, handle: Any) -> tuple[MigDevice, ...]:
    from .gpu import MigDevice

    out: list[MigDevice] = []
    for slot in range(nv.get("nvmlDeviceGetMaxMigDeviceCount", handle) or 0):
        mig = nv.get("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
        if mig is None:  # NOT_FOUND: nothing configured in this slot
            continue
        uuid = nv.get("nvmlDeviceGetUUID", mig)
        if uuid is None:  # CUDA names a MIG device only by its UUID: unusable without
            continue
        memory = nv.get("nvmlDeviceGetMemoryInfo", mig)
        out.append(
            MigDevice(
                index=slot,
                uuid=uuid,
                name=nv.get("nvmlDeviceGetName", mig),
                memory_bytes=memory.total if memory is not None else None,
                gpu_instance_id=nv.get("nvmlDeviceGetGpuInstanceId", mig),
                compute_instance_id=nv.get("nvmlDeviceGetComputeInstanceId", mig),
            )
        )
    return tuple(out)


def _read_gpu(nv: _Nvml, index: int, root: Root, words: int) -> Gpu | None:
    """GPU `index`, or None when its handle will not open, its UUID cannot be read, or any
    query says the GPU itself is broken (lost, fallen off the bus): CUDA cannot use it
    either, so it is left out (`nv.last_error` / `nv.broken` say why)."""
    nv.broken = None
    handle = nv.get("nvmlDeviceGetHandleByIndex", index)
    if handle is None:
        return None
    uuid = nv.get("nvmlDeviceGetUUID", handle)
    if uuid is None:
        nv.broken = nv.broken or nv.last_error
        return None
    bus_id = _pci_bus_id(nv.first(("nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo"), handle))

    numa = nv.get("nvmlDeviceGetNumaNodeId", handle)
    if numa is None or numa < 0:  # NVML answers only where GPUs are NUMA nodes (GH200)
        numa = _sysfs_numa_node(root, bus_id) if bus_id else None

    words_out = nv.get("nvmlDeviceGetCpuAffinity", handle, words)
    cpus = affinity_cpus(words_out) if words_out is not None else ()
    if not cpus and bus_id:
        cpus = _sysfs_local_cpus(root, bus_id) or ()

    cc = nv.get("nvmlDeviceGetCudaComputeCapability", handle)
    memory = nv.get("nvmlDeviceGetMemoryInfo", handle)
    # A GPU that cannot do MIG (NotSupported) runs with MIG off; other errors: unknown.
    mode = nv.get("nvmlDeviceGetMigMode", handle, not_supported=(0, 0))
    mig_enabled = None if mode is None else mode[0] == NVML_DEVICE_MIG_ENABLE
    from .gpu import Gpu  # here, not at the top: only where a GPU is found (gpu.py)

    gpu = Gpu(
        index=index,
        uuid=uuid,
        name=nv.get("nvmlDeviceGetName", handle),
        memory_bytes=memory.total if memory is not None else None,
        pci_bus_id=bus_id,
        minor_number=nv.get("nvmlDeviceGetMinorNumber", handle),
        numa_node=numa,
        cpu_affinity=cpus or None,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
        mig_enabled=mig_enabled,
        mig_devices=_read_migs(nv, handle) if mig_enabled else (),
    )
    return None if nv.broken else gpu


# How NVML answered: it did; there is no NVML here to ask (library or pynvml missing);
# it says there is no driver; or it is there and will not answer (a failure to report).
OK, ABSENT, NO_DRIVER, FAILED = "ok", "absent", "no driver", "failed"

_HINTS = {
    4: " (this user may not open the GPUs' device files)",  # NO_PERMISSION
    18: " (the driver and NVML library versions differ: after a driver upgrade, reload"
    " the nvidia kernel modules or reboot)",  # LIB_RM_VERSION_MISMATCH
}


def nvml_error(where: str, err: BaseException) -> str:
    code = getattr(err, "value", None)
    return f"{where} failed: {err}{_HINTS.get(code, '') if isinstance(code, int) else ''}"


def load_library() -> str | None:
    """None when `libnvidia-ml.so.1` loads, else why not. pynvml's own first step, done
    first: importing pynvml costs far more than a failing `dlopen` with ctypes' import,
    and most nodes a CI pool runs on have no NVIDIA driver."""
    import ctypes

    try:
        ctypes.CDLL(LIBRARY, mode=ctypes.RTLD_LOCAL)
    except OSError as err:
        return f"cannot load NVML ({err})"
    return None


def import_pynvml() -> tuple[ModuleType | None, str]:
    """(pynvml, "") once `libnvidia-ml.so.1` loads, else (None, why NVML cannot be asked):
    the probe's and the health poller's (nvml_check.py) first step."""
    why = load_library()
    if why is not None:
        return None, why
    try:
        import pynvml  # only here, never at module import
    except ImportError:
        return None, "pynvml (nvidia-ml-py) is not installed"
    return pynvml, ""


def _probe_nvml(root: Root) -> tuple[GpuReport | None, str, str]:
    """(report, OK, "") when NVML answered, else (None, outcome, why not)."""
    pynvml, why = import_pynvml()
    if pynvml is None:
        return None, ABSENT, why
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as err:
        if isinstance(err, pynvml.NVMLError_LibraryNotFound):
            return None, ABSENT, f"NVML library {LIBRARY} not found"
        if getattr(err, "value", None) == NVML_ERROR_DRIVER_NOT_LOADED:
            return None, NO_DRIVER, f"nvmlInit failed: {err}"
        return None, FAILED, nvml_error("nvmlInit", err)
    nv = _Nvml(pynvml)
    try:
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            return None, FAILED, nvml_error("nvmlDeviceGetCount", err)
        words = _cpu_words(root)
        gpus: list[Gpu] = []
        skipped: list[str] = []
        for index in range(count):
            gpu = _read_gpu(nv, index, root, words)
            if gpu is None:
                skipped.append(f"GPU {index} skipped ({nv.broken or nv.last_error})")
            else:
                gpus.append(gpu)
        cuda = nv.first(("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"))
        report = GpuReport(
            gpus=tuple(gpus),
            driver_version=nv.get("nvmlSystemGetDriverVersion"),
            cuda_driver_version=format_cuda_version(cuda) if cuda else None,
            source="nvml",
            problem="; ".join(skipped) or None,
        )
        return report, OK, ""
    finally:
        nv.get("nvmlShutdown")


# --- /proc fallback --------------------------------------------------------------------


def _read_procfs(root: Root) -> tuple[Gpu, ...]:
    """GPUs from the driver's /proc files, indexed in PCI bus order as NVML numbers them."""
    found: list[tuple[tuple[int, int, int, int], Gpu]] = []
    for entry in root.listdir(PROC_GPUS):
        text = root.read(f"{PROC_GPUS}/{entry}/information", default=None)
        if text is None:
            continue
        info = parse_information(text)
        if info.get("GPU Excluded", "No").lower().startswith("yes"):
            continue  # NVML does not enumerate excluded GPUs either
        bus_id = normalize_bus_id(info.get("Bus Location", "")) or normalize_bus_id(entry)
        key = _bus_fields(bus_id) if bus_id else None
        if bus_id is None or key is None:
            continue
        uuid = info.get("GPU UUID", "")
        minor = info.get("Device Minor", "")
        from .gpu import Gpu

        gpu = Gpu(
            index=-1,
            uuid="" if "?" in uuid else uuid,  # "GPU-????????-..." until the GPU is initialised
            name=info.get("Model") or None,
            memory_bytes=None,
            pci_bus_id=bus_id,
            minor_number=int(minor) if minor.isdigit() else None,
            numa_node=_sysfs_numa_node(root, bus_id),
            cpu_affinity=_sysfs_local_cpus(root, bus_id),
            compute_capability=None,
            mig_enabled=None,
            mig_devices=(),
        )
        found.append((key, gpu))
    found.sort(key=lambda kv: kv[0])
    return tuple(replace(gpu, index=i) for i, (_, gpu) in enumerate(found))


# --- entry point -----------------------------------------------------------------------


def probe_gpus(
    root: Root | str = "/",
    *,
    nvml: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> GpuReport:
    """Every NVIDIA GPU under `root` that this process may use; never raises for a missing
    library or driver.

    `nvml=None` uses NVML only on the live root. `nvml=True` forces it with another root
    (tests: the fake NVML for the GPUs, a recorded tree for sysfs facts). On the live root
    (or with NVML forced) `environ` (default `os.environ`) is this process's environment:
    its `CUDA_VISIBLE_DEVICES` restricts the GPUs (visible.py). A recorded tree describes
    another machine, whose processes' environment we do not have.
    """
    root = as_root(root)
    use_nvml = root.is_live if nvml is None else nvml
    report = _probe(root, use_nvml)
    if environ is None and not use_nvml:
        return report
    env = os.environ if environ is None else environ
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return report
    from .visible import restrict

    gpus, notes = restrict(report.gpus, value, env.get("CUDA_DEVICE_ORDER"))
    problem = "; ".join([report.problem, *notes] if report.problem else notes) or None
    return replace(report, gpus=gpus, problem=problem, visible_devices=value)


def _probe(root: Root, use_nvml: bool) -> GpuReport:
    """NVML when it can be asked; the driver's /proc files only where there is no NVML
    library (or on a recorded tree); no GPUs, with the reason, where NVML fails."""
    outcome, why = ABSENT, ""
    if use_nvml:
        report, outcome, why = _probe_nvml(root)
        if report is not None:
            return report
    gpus = _read_procfs(root)
    version = root.read(PROC_VERSION, default=None)
    driver = parse_driver_version(version) if version else None
    if outcome == NO_DRIVER and gpus:  # yet the driver lists GPUs: NVML is what is broken
        outcome = FAILED
        why += f", yet the driver lists {len(gpus)} GPU(s) in /{PROC_GPUS}"
    if outcome == FAILED:
        return GpuReport((), driver, None, FAILED, f"NVIDIA GPUs unavailable: {why}")
    if gpus:
        if use_nvml:  # a live node without the NVML library: what the driver says
            why = (
                f"warning: {why}; read {len(gpus)} GPU(s) from /{PROC_GPUS} instead"
                " (no memory, compute capability or MIG mode)"
            )
        return GpuReport(gpus, driver, None, "procfs", why or None)
    if not use_nvml:
        why = f"no {PROC_GPUS}/*/information under {root}"
    return GpuReport((), driver, None, "none", f"no NVIDIA GPUs: {why}")
