"""Probes -> the pool this node offers, and the topology report behind `--format json`.

The pool holds only what this process may use: one `cpus` instance per usable physical
core (or per usable logical CPU with `hyperthreads`), named by its lowest usable CPU
number, and one `gpus` instance per GPU, named by its NVML index (CTest accepts neither
UUIDs nor bus ids as ids). A MIG-enabled GPU is offered as its MIG devices, named
`<gpu index>_<mig index>` (CUDA cannot use it whole); with `mig=False` it is left out.
Topology rides along in instance properties and in the pool's `additional_properties`,
where every canary version ignores what it does not know.
"""

from __future__ import annotations

import os

from ._version import __version__
from .errors import ConfigError, ProbeError
from .pool import MAX_SLOTS, Instance, Pool

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

    from .probes.cpu import CpuTopology
    from .probes.gpu import Gpu, MigDevice
    from .probes.gpu_report import GpuReport
    from .probes.numa import NumaTopology
    from .probes.sysfs import Root


def detect_pool(
    root: str | os.PathLike[str] | Root = "/",
    *,
    hyperthreads: bool = False,
    slots_per_gpu: int = 1,
    mig: bool = True,
    gpu_report: GpuReport | None = None,
    notes: list[str] | None = None,
) -> Pool:
    """Probe `root` (the live `/` or a recorded tree) and build the pool it offers.

    `gpu_report` skips the GPU probe (the CLI passes the one whose `problem` it prints).
    `notes`, when given, gets a line for stderr per GPU left out (MIG mode, see
    `gpu_instances`). Raises ProbeError when the root holds no usable CPU, ConfigError for
    bad slot counts.
    """
    if not 1 <= slots_per_gpu <= MAX_SLOTS:
        raise ConfigError(f"slots per GPU must be 1..{MAX_SLOTS}, not {slots_per_gpu}")
    r = _root(root)
    cpu, numa = _probe_cpu_numa(r)
    report = gpu_report if gpu_report is not None else _probe_gpus(r)
    cpus = _cpu_instances(cpu, numa, hyperthreads)
    if cpu.quota is not None:  # a CPU-time limit: only as many cpus as it pays for
        cpus = cpus[: cpu.quota.limit]
    gpus, said = gpu_instances(report, slots_per_gpu, mig, numa)
    if notes is not None:
        notes.extend(said)
    # The host name is the node id: the flat form writes it as `additional_properties.host`
    # (a key it reserves for the node id), the node form as the node's `id`.
    props: dict[str, Any] = {"agent_version": __version__}
    props["numa"] = _numa_summary(cpu, numa, gpus)
    if cpu.quota is not None:
        props["cpu_quota"] = round(cpu.quota.cpus, 3)
    return Pool.single(
        {"cpus": cpus, "gpus": gpus}, node_id=hostname(r), additional_properties=props
    )


def topology_report(
    root: str | os.PathLike[str] | Root = "/", *, gpu_report: GpuReport | None = None
) -> dict[str, Any]:
    """Every probe field plus the counts tools compare with hwloc (JSON-ready).

    Counts of the online machine: packages, numa_nodes, cores, pus, offline_pus,
    pus_per_numa (node-id order); of what this process may use: allowed_pus,
    allowed_cores, allowed_cpulist, allowed_nodelist (nodes whose memory it may use:
    `cpuset.mems`, memory-only nodes included, as hwloc's allowed nodeset),
    allowed_cpu_nodelist (nodes holding a usable CPU), cpu_quota (the cgroup CPU quota
    and the whole CPUs it leaves the pool, or None); gpus; mig_minors (each MIG device's
    capability-file minors, for Slurm's gres.conf).
    """
    from dataclasses import asdict

    from .probes.sysfs import format_cpulist

    r = _root(root)
    cpu, numa = _probe_cpu_numa(r)
    report = gpu_report if gpu_report is not None else _probe_gpus(r)
    online, usable = set(cpu.online), set(cpu.usable)
    return {
        "host": hostname(r),
        "agent_version": __version__,
        "packages": len(cpu.packages),
        "numa_nodes": len(numa.nodes),
        "cores": len(cpu.cores),
        "pus": len(cpu.online),
        "offline_pus": len(cpu.offline),
        "pus_per_numa": [len(online.intersection(n.cpus)) for n in numa.nodes],
        "allowed_pus": len(cpu.usable),
        "allowed_cores": len(cpu.usable_cores()),
        "allowed_cpulist": format_cpulist(cpu.usable),
        "allowed_nodelist": format_cpulist(_mem_nodes(cpu, numa)),
        "allowed_cpu_nodelist": format_cpulist([n.id for n in numa.nodes if usable & set(n.cpus)]),
        "cpu_quota": _quota(cpu),
        "gpus": len(report.gpus),
        "cpu": _lists(asdict(cpu)),
        "numa": _lists(asdict(numa)),
        "nvidia": report.to_dict(),
        "mig_minors": _mig_minors(r, report),
    }


def hostname(root: Root) -> str:
    """The live node name, or the one recorded in the tree (`localhost` if none is)."""
    if root.is_live:
        return os.uname().nodename
    name = root.read("proc/sys/kernel/hostname", default=None) or root.read(
        "etc/hostname", default=None
    )
    return name or "localhost"


# --- building blocks ------------------------------------------------------------------------


def _mem_nodes(cpu: CpuTopology, numa: NumaTopology) -> list[int]:
    """Nodes whose memory this process may use: the cpuset's mems (all when none says)."""
    mems = cpu.cpuset.mems if cpu.cpuset is not None else None
    return [n.id for n in numa.nodes if mems is None or n.id in mems]


def _quota(cpu: CpuTopology) -> dict[str, Any] | None:
    q = cpu.quota
    if q is None:
        return None
    return {
        "quota_us": q.quota_us,
        "period_us": q.period_us,
        "cpus": q.cpus,
        "pool_cpus": q.limit,
        "file": q.file,
        "version": q.version,
    }


def _root(root: str | os.PathLike[str] | Root) -> Root:
    from .probes.sysfs import as_root

    r = as_root(root)  # "" is "/", as for the GPU probe (it once read "." for CPUs)
    if not os.path.isdir(r.dir):
        raise ProbeError(f"system root {str(r)!r} is not a directory")
    return r


def _probe_cpu_numa(r: Root) -> tuple[CpuTopology, NumaTopology]:
    from .probes.cpu import probe_cpus
    from .probes.numa import probe_numa

    cpu = probe_cpus(r)
    if not cpu.online:
        raise ProbeError(f"no CPUs found under {r} (not a /sys + /proc tree?)")
    if not cpu.usable:
        where = f" (cpuset {cpu.cpuset.file})" if cpu.cpuset else ""
        raise ProbeError(f"none of the online CPUs under {r} is usable{where}")
    return cpu, probe_numa(r, cpu.online)


def _probe_gpus(r: Root) -> GpuReport:
    from .probes.nvidia import probe_gpus

    return probe_gpus(r)


def _mig_minors(r: Root, report: GpuReport) -> dict[str, int]:
    """The MIG devices' capability-file minors (probes/nvidia_caps.py): export needs them."""
    from .probes.nvidia_caps import mig_minors

    wanted = [
        (g.minor_number, m.gpu_instance_id, m.compute_instance_id)
        for g in report.gpus
        if g.minor_number is not None
        for m in g.mig_devices
    ]
    return mig_minors(r, wanted)


def _cpu_instances(cpu: CpuTopology, numa: NumaTopology, hyperthreads: bool) -> list[Instance]:
    groups = [(c,) for c in cpu.usable] if hyperthreads else cpu.usable_cores()
    out = []
    for threads in groups:
        props: dict[str, Any] = {"threads": list(threads)}
        node = numa.node_of(threads[0])
        if node is not None:
            props["numa_node"] = node
        out.append(Instance(str(threads[0]), 1, props))
    return out


def gpu_instances(
    report: GpuReport, slots: int, mig: bool, numa: NumaTopology | None = None
) -> tuple[list[Instance], list[str]]:
    """The pool's `gpus`, and a line for each GPU left out.

    A GPU in MIG mode cannot be used whole by CUDA, so it is offered as its MIG devices
    (`mig`, the default) or not at all (`mig=False`, `--no-mig`: the admin keeps MIG GPUs
    out of the pool); one with no MIG device created offers nothing. An admin chooses per
    GPU with `nvidia-smi -i N -mig 0|1` and `nvidia-smi mig -cgi ... -C` (docs/gpus.md).
    """
    out: list[Instance] = []
    notes: list[str] = []
    for gpu in report.gpus:
        base = _base(gpu, numa)
        if not gpu.mig_enabled:
            out.append(_whole_gpu(gpu, slots, base))
        elif not mig:
            notes.append(f"GPU {gpu.index} is in MIG mode: left out (--no-mig)")
        elif not gpu.mig_devices:
            notes.append(
                f"GPU {gpu.index} is in MIG mode with no MIG device: left out (create MIG "
                f"devices, or turn MIG off: nvidia-smi -i {gpu.index} -mig 0)"
            )
        else:
            out += [_mig_device(gpu, m, slots, base) for m in gpu.mig_devices]
    return out, notes


def _base(gpu: Gpu, numa: NumaTopology | None) -> dict[str, Any]:
    """What a GPU and each of its MIG devices share: vendor (canary_nvidia reads it) and
    `numa_node`, the CPU node the allocator packs it with. On Grace Hopper NVML's node is
    the GPU's own memory, a node without CPUs; then `numa_node` is the nearest CPU node
    and `memory_numa_node` the GPU's."""
    base: dict[str, Any] = {"numa_node": gpu.numa_node, "vendor": "NVIDIA"}
    near = _cpu_node(gpu, numa) if numa is not None else gpu.numa_node
    if near != gpu.numa_node:
        base.update(numa_node=near, memory_numa_node=gpu.numa_node)
    return base


def _cpu_node(gpu: Gpu, numa: NumaTopology) -> int | None:
    """The CPU node nearest the GPU: its own when it has CPUs; else the node holding most
    of the GPU's CPU affinity; else the node at the smallest NUMA distance (lowest id on a
    tie); else unknown."""
    node = gpu.numa_node
    by_id = {n.id: n for n in numa.nodes}
    if node is None or node not in by_id or by_id[node].cpus:
        return node
    with_cpus = [n for n in numa.nodes if n.cpus]
    if gpu.cpu_affinity:
        near = set(gpu.cpu_affinity)
        counts = [(len(near.intersection(n.cpus)), -n.id) for n in with_cpus]
        best = max(counts, default=(0, 0))
        if best[0] > 0:
            return -best[1]
    dist = [(d, n.id) for n in with_cpus if (d := numa.distance(node, n.id)) is not None]
    return min(dist)[1] if dist else None


def _mig_device(gpu: Gpu, m: MigDevice, slots: int, base: dict[str, Any]) -> Instance:
    props = _present(
        uuid=m.uuid or None,
        parent_index=gpu.index,
        parent_uuid=gpu.uuid or None,
        memory_bytes=m.memory_bytes,
        name=m.name,
        gpu_instance_id=m.gpu_instance_id,
        compute_instance_id=m.compute_instance_id,
        **base,
    )
    return Instance(f"{gpu.index}_{m.index}", slots, props)


def _whole_gpu(gpu: Gpu, slots: int, base: dict[str, Any]) -> Instance:
    props = _present(
        index=gpu.index,
        uuid=gpu.uuid or None,
        name=gpu.name,
        memory_bytes=gpu.memory_bytes,
        pci_bus_id=gpu.pci_bus_id,
        minor_number=gpu.minor_number,
        compute_capability=gpu.compute_capability,
        **base,
    )
    return Instance(str(gpu.index), slots, props)


def _present(**fields: Any) -> dict[str, Any]:
    """Fields a device does not report are absent, not null ("" is an unknown UUID)."""
    return {k: v for k, v in fields.items() if v is not None}


def _numa_summary(
    cpu: CpuTopology, numa: NumaTopology, gpus: list[Instance]
) -> dict[str, dict[str, Any]]:
    """Per node (string keys, for JSON): usable CPU numbers, pool GPU ids, memory."""
    usable = set(cpu.usable)
    out: dict[str, dict[str, Any]] = {}
    for node in numa.nodes:
        entry: dict[str, Any] = {
            "cpus": [c for c in node.cpus if c in usable],
            "gpus": [g.id for g in gpus if g.properties.get("numa_node") == node.id],
        }
        if node.memory_bytes is not None:
            entry["memory_bytes"] = node.memory_bytes
        out[str(node.id)] = entry
    return out


def _lists(value: Any) -> Any:
    """`asdict`'s output with its tuples as lists: the shape the JSON document has."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value
