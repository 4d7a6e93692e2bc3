"""`rpool-agent export slurm`: this node's slurm.conf line and gres.conf lines.

The input is detect's topology report (`detect --format json`, `detect.topology_report`):
nothing here probes, so the export says exactly what detect found.

Where the machine is regular (every socket the same number of cores, every core the same
number of threads) the node line is the one `slurmd -C` prints: slurmd counts hwloc's
online PUs, cores and the packages holding cores (`xcpuinfo_hwloc_topo_get`), and its
RealMemory is `sysconf(_SC_PHYS_PAGES)` pages in MiB, computed through a C `float`
(`get_memory`). Where it is not, slurmd prints quotients that Slurm then believes (a
socket of 7 cores when they are 8 and 6), and we print the best line Slurm accepts when
slurmd registers (its counts are never below ours, or the node drains) plus notes for
stderr saying what Slurm cannot express and what an admin can choose instead.

GPU type names are Slurm's NVML autodetect's (`gpu_nvml.c`): NVML's product name, lower
case, spaces made underscores; a MIG device is the parent's name up to its first `-`,
then the profile after `mig` in the MIG device's own name (`nvidia_a100_3g.20gb`).
gres.conf `Cores=` are Slurm's logical core indices (socket by socket, as `lstopo -l`
numbers them), whole sockets at a time, as gres.conf(5) requires.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass

from .probes.sysfs import format_cpulist

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MIB = 1 << 20


@dataclass(slots=True)
class SlurmExport:
    """What `export slurm` prints: one slurm.conf line, gres.conf lines, stderr notes."""

    node_line: str
    gres_lines: list[str]
    notes: list[str]  # what Slurm cannot express, and what an admin should choose

    def text(self) -> str:
        out = ["# slurm.conf", self.node_line]
        if self.gres_lines:
            out += ["# gres.conf", *self.gres_lines]
        return "\n".join(out) + "\n"


@dataclass(slots=True)
class Layout:
    """The node as Slurm will be told it: counts plus Slurm's logical core numbering."""

    sockets: int
    cores_per_socket: int
    threads_per_core: int
    cores: list[list[int]]  # logical core index -> its online CPUs, ascending
    socket_of: list[int]  # logical core index -> package index (detect's order)
    notes: list[str]

    @property
    def cpus(self) -> int:
        return self.sockets * self.cores_per_socket * self.threads_per_core


def slurm_export(report: dict[str, Any], *, page_size: int | None = None) -> SlurmExport:
    """The node line and gres.conf lines for the machine `report` describes.

    `page_size` (default: this machine's) only matters to RealMemory's rounding, which
    follows slurmd's `float` arithmetic above 64 GiB of 4 KiB pages.
    """
    layout = node_layout(report)
    notes = list(layout.notes)
    node = short_host(str(report.get("host") or "localhost"))
    fields = [
        f"NodeName={node}",
        f"CPUs={layout.cpus}",
        "Boards=1",
        f"SocketsPerBoard={layout.sockets}",
        f"CoresPerSocket={layout.cores_per_socket}",
        f"ThreadsPerCore={layout.threads_per_core}",
    ]
    memory = total_memory(report)
    if memory is None:
        notes.append(
            "RealMemory left out: the NUMA nodes' MemTotal could not be read;"
            " set it from `free -m` (a little below, so the node does not drain)"
        )
    else:
        fields.append(f"RealMemory={real_memory_mib(memory, page_size or _page_size())}")
    spec = _cpu_spec(report, layout, notes)
    if spec:
        fields.append(f"CpuSpecList={spec}")
    gres, types = gres_lines(report, layout, node, notes)
    if types:
        fields.append("Gres=" + ",".join(_gres_word(t, n) for t, n in types.items()))
    notes += gpu_notes(report)
    return SlurmExport(" ".join(fields), gres, notes)


def gpu_notes(report: dict[str, Any]) -> list[str]:
    """The GPU probe's own line, and whether an inherited CUDA_VISIBLE_DEVICES hid GPUs."""
    nvidia = report.get("nvidia") or {}
    notes = [nvidia["problem"]] if nvidia.get("problem") else []
    if nvidia.get("visible_devices") is not None:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={nvidia['visible_devices']!r} limits the GPUs this process"
            " sees, so only those are listed; export outside the job, without it, to"
            " describe every GPU of the node"
        )
    return notes


# --- the node line ----------------------------------------------------------------------


def short_host(host: str) -> str:
    """slurmd names the node by its short host name (`gethostname_short`)."""
    return host.split(".", 1)[0] or host


def real_memory_mib(memory_bytes: int, page_size: int) -> int:
    """slurmd's RealMemory: `(float)pages * (page_size / 1048576.0)`, truncated.

    The page count goes through a 32-bit float, so above 2**24 pages it is rounded the
    way slurmd rounds it (glibc's _SC_PHYS_PAGES is MemTotal in pages).
    """
    pages = memory_bytes // page_size
    as_float = struct.unpack("f", struct.pack("f", float(pages)))[0]
    return int(as_float * (page_size / float(MIB)))


def total_memory(report: dict[str, Any]) -> int | None:
    """MemTotal of the machine: the sum over its NUMA nodes (the kernel's own sum)."""
    sizes = [n.get("memory_bytes") for n in report["numa"]["nodes"]]
    if not sizes or any(s is None for s in sizes):
        return None
    return sum(sizes)


def node_layout(report: dict[str, Any]) -> Layout:
    """Sockets, cores per socket and threads per core that Slurm can accept.

    Regular machines get slurmd's own numbers. Sockets with different core counts become
    one socket of as many cores as slurmd registers (all of them, unless the total does
    not divide by the sockets): Slurm's abstract core numbers then keep matching the real
    cores, which they do not with slurmd's quotient layout. Cores with different thread
    counts become one thread per core.
    """
    cpu = report["cpu"]
    notes: list[str] = []
    cores = _logical_cores(report)
    packages = [c["package"] for c in cores]
    per_socket = Counter(packages)
    threads = Counter(len(c["cpus"]) for c in cores)
    total, pus, n_sockets = len(cores), len(cpu["online"]), len(per_socket)
    # What slurmd registers (and `slurmd -C` prints): plain quotients. Slurm drains a
    # node whose registered sockets*cores*threads or CPUs fall below the configured ones.
    slurmd = (n_sockets, total // n_sockets, pus // total)
    offline = cpu.get("offline") or []
    if offline:
        notes.append(
            f"{_cpus(offline)} present but offline: Slurm (like"
            " `slurmd -C`) counts online CPUs only, so this line leaves them out; bring"
            " them online and export again to schedule them"
        )
    if len(threads) == 1:
        (tpc,) = threads
    else:
        tpc = 1
        kinds = ", ".join(f"{n} with {t}" for t, n in sorted(threads.items(), reverse=True))
        notes.append(
            f"cores have different thread counts ({kinds}: hybrid P/E cores, or offline"
            " sibling threads) and Slurm takes one ThreadsPerCore: printed"
            " ThreadsPerCore=1, one CPU per core, so every core is scheduled but not its"
            f" extra threads. `slurmd -C` prints CPUs={pus} ThreadsPerCore={slurmd[2]},"
            " which do not multiply up; Slurm 23.02 and later drop Intel E-cores"
            " themselves unless SlurmdParameters=allow_ecores (then configure only the"
            " cores with the most threads)"
        )
    if len(set(per_socket.values())) == 1:
        sockets, per = n_sockets, total // n_sockets
    else:
        sockets, per = 1, slurmd[0] * slurmd[1]
        counts = ", ".join(f"socket {i}: {n}" for i, n in sorted(per_socket.items()))
        left = f"; {total - per} core(s) left out, beyond what slurmd registers" * (per < total)
        notes.append(
            f"sockets have different core counts ({counts}) and Slurm takes one"
            f" CoresPerSocket: printed SocketsPerBoard=1 CoresPerSocket={per}, so Slurm"
            f" does not place tasks by socket{left}. `slurmd -C` prints SocketsPerBoard="
            f"{slurmd[0]} CoresPerSocket={slurmd[1]}, a layout that does not exist (Slurm's"
            " core numbers would then point into the wrong socket)"
        )
    kept = cores[: sockets * per]  # Slurm's logical cores 0..n-1; the rest it never sees
    return Layout(sockets, per, tpc, [c["cpus"] for c in kept], packages[: len(kept)], notes)


def _logical_cores(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Online cores in Slurm's (hwloc's) logical order: by socket, then NUMA node (a
    socket split in NUMA nodes is grouped by them), then lowest CPU."""
    node_of: dict[int, int] = {}
    for position, node in enumerate(report["numa"]["nodes"]):
        for c in node["cpus"]:
            node_of.setdefault(c, position)
    return sorted(
        report["cpu"]["cores"],
        key=lambda c: (c["package"], node_of.get(c["cpus"][0], 0), c["cpus"][0]),
    )


def _cpu_spec(report: dict[str, Any], layout: Layout, notes: list[str]) -> str:
    """Slurm abstract CPU ids of the online CPUs this process may not use (its cpuset or
    affinity), for CpuSpecList; "" when it may use them all."""
    usable = set(report["cpu"]["usable"])
    online = report["cpu"]["online"]
    if usable >= set(online):
        return ""
    t = layout.threads_per_core
    ids = [
        k * t + p
        for k, threads in enumerate(layout.cores)
        for p, c in enumerate(threads[:t])
        if c not in usable
    ]
    cpuset = report["cpu"].get("cpuset") or {}
    where = f" (cgroup cpuset {cpuset['file']})" if cpuset.get("file") else " (affinity)"
    notes.append(
        f"this process may use only CPUs {format_cpulist(sorted(usable))}{where}; slurmd"
        " started the same way could not run jobs on the others, and `slurmd -C` does not"
        f" say so: printed CpuSpecList={format_cpulist(ids)} (Slurm's abstract ids of the"
        " rest) to keep jobs off them; run slurmd outside that cpuset and drop"
        " CpuSpecList to use the whole node"
    )
    return format_cpulist(ids)


# --- GPUs -------------------------------------------------------------------------------


def gpu_type(name: str | None) -> str:
    """NVML's product name as Slurm types it: lower case, spaces made underscores."""
    return (name or "").lower().replace(" ", "_")


def mig_type(parent_name: str | None, mig_name: str | None) -> str | None:
    """`NVIDIA A100-SXM4-40GB` + `NVIDIA A100-SXM4-40GB MIG 3g.20gb` ->
    `nvidia_a100_3g.20gb`; None when the MIG name carries no profile."""
    parent = gpu_type(parent_name).split("-", 1)[0]
    name = gpu_type(mig_name)
    at = name.find("mig_")
    return parent + name[at + 3 :] if at >= 0 else None


def gres_lines(
    report: dict[str, Any], layout: Layout, node: str, notes: list[str]
) -> tuple[list[str], dict[str, int]]:
    """gres.conf lines, and the count per type (in first-seen order) for `Gres=`."""
    lines: list[str] = []
    types: dict[str, int] = {}
    minors = report.get("mig_minors") or {}
    narrow = False
    for gpu in (report.get("nvidia") or {}).get("gpus", []):
        minor = gpu.get("minor_number")
        if minor is None:
            notes.append(
                f"GPU {gpu['index']}: the driver did not give its minor number, so its"
                " gres.conf File=/dev/nvidiaN is unknown (see `ls -l /dev/nvidia*`); left out"
            )
            continue
        cores, wider = _gpu_cores(gpu.get("cpu_affinity"), layout)
        narrow = narrow or wider
        tail = f" Cores={cores}" if cores else ""
        device = f"/dev/nvidia{minor}"
        if gpu.get("mig_enabled"):
            migs = gpu.get("mig_devices") or []
            if not migs:
                notes.append(
                    f"GPU {gpu['index']} is in MIG mode with no MIG devices: nothing to"
                    " schedule on it (create MIG instances, or disable MIG mode)"
                )
            for mig in migs:
                kind = mig_type(gpu.get("name"), mig.get("name")) or gpu_type(gpu.get("name"))
                files = _mig_files(device, minor, mig, minors, notes)
                lines.append(_gres_line(node, kind, f"MultipleFiles={files}", tail))
                types[kind] = types.get(kind, 0) + 1
            continue
        kind = gpu_type(gpu.get("name"))
        lines.append(_gres_line(node, kind, f"File={device}", tail))
        types[kind] = types.get(kind, 0) + 1
    if narrow:
        notes.append(
            "a GPU's nearest CPUs are less than a socket (NUMA nodes smaller than sockets):"
            " Slurm ties GPUs to whole sockets, so Cores= names whole sockets; to tie them"
            " to NUMA nodes set SlurmdParameters=numa_node_as_socket (SocketsPerBoard then"
            " counts NUMA nodes: check with `slurmd -C`)"
        )
    return lines, types


def _gres_line(node: str, kind: str, files: str, tail: str) -> str:
    typed = f" Type={kind}" if kind else ""
    return f"NodeName={node} Name=gpu{typed} {files}{tail}"


def _gres_word(kind: str, count: int) -> str:
    return f"gpu:{kind}:{count}" if kind else f"gpu:{count}"


def _gpu_cores(affinity: list[int] | None, layout: Layout) -> tuple[str, bool]:
    """Logical cores of the sockets holding the GPU's nearest CPUs; "" when that is every
    core (gres.conf(5): then leave Cores out) or unknown. Also: narrower than a socket?"""
    if not affinity:
        return "", False
    near = set(affinity)
    touched = [k for k, threads in enumerate(layout.cores) if near & set(threads)]
    if not touched:
        return "", False
    if layout.sockets == 1:
        return "", False
    sockets = {layout.socket_of[k] for k in touched}
    whole = [k for k, s in enumerate(layout.socket_of) if s in sockets]
    if len(whole) == len(layout.cores):
        return "", False
    return format_cpulist(whole), len(touched) < len(whole)


def _mig_files(
    device: str, minor: int, mig: dict[str, Any], minors: dict[str, int], notes: list[str]
) -> str:
    """The parent GPU's device file plus the MIG device's GPU- and compute-instance
    capability files, as Slurm's autodetect lists them."""
    gi, ci = mig.get("gpu_instance_id"), mig.get("compute_instance_id")
    gi_minor = minors.get(f"gpu{minor}/gi{gi}/access")
    ci_minor = minors.get(f"gpu{minor}/gi{gi}/ci{ci}/access")
    if gi_minor is None or ci_minor is None:
        notes.append(
            f"{device} MIG {mig.get('index')}: no /proc/driver/nvidia-caps/mig-minors entry"
            f" for gpu{minor}/gi{gi}/ci{ci}: add its two /dev/nvidia-caps/nvidia-capN files"
            " to MultipleFiles by hand"
        )
        return device
    caps = "/dev/nvidia-caps/nvidia-cap"
    return f"{device},{caps}{gi_minor},{caps}{ci_minor}"


def _cpus(cpus: list[int]) -> str:
    return f"CPU {cpus[0]} is" if len(cpus) == 1 else f"CPUs {format_cpulist(cpus)} are"


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4096
