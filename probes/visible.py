"""An inherited `CUDA_VISIBLE_DEVICES`, read the way CUDA reads it, applied to a GPU report.

A Slurm or Flux job, a CI executor or an outer `rpool-agent run` hands this process some
GPUs through `CUDA_VISIBLE_DEVICES`; the others belong to someone else, so the pool must
not offer them. CUDA's rules (CUDA Programming Guide, "CUDA Environment Variables"):

- a comma list of integer indices, `GPU-...` UUIDs or `MIG-...` UUIDs; a UUID may be
  shortened to any prefix (with its `GPU-`/`MIG-`) that names exactly one device;
- the list ends at the first invalid entry (`0,2,-1,1` is GPUs 0 and 2);
- empty means no GPU (and `-1`, being invalid at once, too);
- an index is the ordinal in `CUDA_DEVICE_ORDER`: `PCI_BUS_ID` is NVML's order; the
  default, `FASTEST_FIRST`, is an order of CUDA's own that NVML cannot reproduce when the
  GPUs differ. There we offer none of the GPUs named by index and say why.

Where CUDA's documentation is silent we follow PyTorch's reading of CUDA
(`torch.cuda._parse_visible_devices`): an index entry is read like `strtoul` (`"1gpu"` is
1), a device named twice makes the whole list empty, and an entry of another kind than the
first (an index after UUIDs, a `MIG-` after `GPU-`) ends the list. Each of these offers
fewer GPUs, never one CUDA would hide. Pure: no environment, no files.
"""

from __future__ import annotations

from dataclasses import replace

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from .gpu import Gpu, MigDevice

PCI_BUS_ID = "PCI_BUS_ID"


class _Stop(Exception):
    """An entry CUDA would not accept: the list ends before it (the message says why)."""


def restrict(
    gpus: tuple[Gpu, ...], value: str | None, order: str | None
) -> tuple[tuple[Gpu, ...], list[str]]:
    """The GPUs (with the MIG devices) `CUDA_VISIBLE_DEVICES=value` leaves, in NVML order,
    and notes for stderr. `value` None (unset) leaves every GPU and says nothing."""
    if value is None:
        return gpus, []
    shown = f"CUDA_VISIBLE_DEVICES={value!r}"
    if not value.strip():
        return (), [f"{shown} is empty: this process may use no GPU"]
    notes: list[str] = []
    picked: list[tuple[int, int | None]] = []
    kind = ""
    for raw in value.split(","):
        entry = raw.strip()
        try:
            this = _kind(entry)
            if kind and this != kind:
                raise _Stop(f"entry {entry!r} is of another kind than the first")
            kind = this
            device = _resolve(entry, this, gpus, order)
        except _Stop as why:
            if not picked:
                notes.append(f"{shown}: this process may use no GPU ({why})")
            elif entry:  # a trailing comma ends nothing that was there
                notes.append(f"{shown}: {why}; CUDA ignores it and what follows")
            break
        if device in picked:
            notes.append(f"{shown} names {entry!r} twice: CUDA then shows no GPU")
            return (), notes
        picked.append(device)
    whole: set[int] = set()  # NVML indices of GPUs named whole
    parts: dict[int, set[int]] = {}  # NVML index -> MIG slots named one by one
    for index, slot in picked:
        if slot is None:
            whole.add(index)
        else:
            parts.setdefault(index, set()).add(slot)
    out: list[Gpu] = []
    for gpu in gpus:
        if gpu.index in whole:
            out.append(gpu)
        elif gpu.index in parts:
            migs = tuple(m for m in gpu.mig_devices if m.index in parts[gpu.index])
            out.append(replace(gpu, mig_devices=migs))
    return tuple(out), notes


def _kind(entry: str) -> str:
    if entry[:4].upper() in ("GPU-", "MIG-"):
        return entry[:4].upper()
    if _leading_number(entry) is None:
        raise _Stop(f"entry {entry!r} is neither an index nor a GPU-/MIG- UUID")
    return "index"


def _leading_number(entry: str) -> int | None:
    """`strtoul`'s reading: optional `+`, then digits; anything after them is ignored."""
    text = entry[1:] if entry.startswith("+") else entry
    digits = len(text) - len(text.lstrip("0123456789"))
    return int(text[:digits]) if digits else None


def _resolve(
    entry: str, kind: str, gpus: tuple[Gpu, ...], order: str | None
) -> tuple[int, int | None]:
    """(NVML index, MIG slot or None for the whole GPU) that one entry names."""
    if kind == "index":
        return _by_index(entry, gpus, order), None
    if kind == "MIG-" and "/" in entry:  # before driver 470: MIG-<GPU UUID>/<GI>/<CI>
        return _legacy_mig(entry, gpus)
    want = entry.lower()
    if kind == "GPU-":
        hits: list[tuple[int, int | None]] = [
            (g.index, None) for g in gpus if g.uuid and g.uuid.lower().startswith(want)
        ]
    else:
        hits = [
            (g.index, m.index)
            for g in gpus
            for m in g.mig_devices
            if m.uuid and m.uuid.lower().startswith(want)
        ]
    if len(hits) != 1:
        what = "no GPU here" if not hits else f"{len(hits)} devices (a prefix must be unique)"
        raise _Stop(f"entry {entry!r} names {what}")
    return hits[0]


def _by_index(entry: str, gpus: tuple[Gpu, ...], order: str | None) -> int:
    index = _leading_number(entry)
    known = {g.index for g in gpus}
    if index is None or index not in known:
        raise _Stop(f"entry {entry!r} is not the index of a GPU here")
    if (order or "").strip() != PCI_BUS_ID and not _uniform(gpus):
        models = ", ".join(sorted({g.name or "unknown model" for g in gpus}))
        raise _Stop(
            f"entry {entry!r} is an index, and without CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA "
            f"numbers these different GPUs ({models}) fastest first, an order NVML cannot "
            "reproduce; offering none of them (set CUDA_DEVICE_ORDER=PCI_BUS_ID or name "
            "GPUs by UUID)"
        )
    return index


def _uniform(gpus: tuple[Gpu, ...]) -> bool:
    """True when every GPU is the same known model: then CUDA's fastest-first order is
    PCI bus order, as it breaks ties by bus id (so it is NVML's order)."""
    models = {(g.name, g.compute_capability) for g in gpus}
    return len(models) <= 1 and all(g.name for g in gpus)


def _legacy_mig(entry: str, gpus: tuple[Gpu, ...]) -> tuple[int, int | None]:
    parent, _, rest = entry[4:].partition("/")
    gi, _, ci = rest.partition("/")
    for g in gpus:
        if g.uuid and g.uuid.lower() == parent.lower():
            for m in g.mig_devices:
                if _ids(m) == (gi, ci):
                    return g.index, m.index
    raise _Stop(f"entry {entry!r} names no MIG device here")


def _ids(m: MigDevice) -> tuple[str, str]:
    return str(m.gpu_instance_id), str(m.compute_instance_id)
