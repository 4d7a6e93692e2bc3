"""What a granted lease hands to a program: environment, CPU list and per-lease pool files.

Input is the lease document the server sends on a grant (docs/protocol.md): `id`,
`resources` (`{type: [{id, slots}]}`), `groups` (one list of `{type, id, slots}` units per
CTest resource group), `request`, and `properties` (`{type: {id: {...}}}`, possibly absent
for hand-written pools). docs/handoff.md explains every choice made here; in short:

- A program sees the leased GPUs through `CUDA_VISIBLE_DEVICES` (NVML indices, PCI order,
  MIG devices by MIG UUID; `-1` when the lease has none) and CUDA renumbers them 0..n-1.
  Harnesses that pick a device by index (CTest, canary <= 26.4) therefore get the lease's
  GPUs as "0".."n-1" in the CTest spec and the flat canary pool.
- canary >= 26.9 *replaces* `CUDA_VISIBLE_DEVICES` with each test's pool ids, so the
  node-form pool keeps the physical NVML indices (a child's restriction does not nest).
- Everything else (cpus, other types) keeps its pool id: no consumer maps those to
  hardware, and the real CPU numbers are in `RPOOL_CPU_IDS` and the affinity.

Only `write_lease_files` / `remove_lease_files` touch the file system; the rest is pure.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import PermissionDenied, PoolFormatError

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

    from .pool import Pool  # the pool model: the lease files' only (`run` does not need it)

#: `CUDA_VISIBLE_DEVICES` for a lease without GPUs. CUDA documents that enumeration stops
#: at the first invalid entry, so "-1" hides every GPU; unlike "" it survives shell
#: `${VAR:-0}` defaults and `os.environ.get(...) or` checks that treat empty as unset
#: (Flux exports the same).
NO_GPUS = "-1"

CTEST_GROUP_PREFIX = "CTEST_RESOURCE_GROUP_"
CTEST_SPEC_NAME = "ctest-spec.json"
POOL_NAME = "pool.yaml"
POOL_NODES_NAME = "pool-nodes.yaml"

#: Variables this module owns; stale copies in the base environment (a lease run inside
#: another lease) are dropped before the new values go in.
FILE_VARS = ("RPOOL_CTEST_SPEC_FILE", "RPOOL_POOL_FILE", "RPOOL_POOL_NODES_FILE")

_PLACEHOLDER = re.compile(r"\{(ctest_spec|pool_nodes|pool)\}")


@dataclass(frozen=True, slots=True)
class LeasedGpu:
    """One leased GPU or MIG device, with what CUDA needs to name it."""

    id: str  # pool id
    index: int | None  # NVML index of a whole GPU (PCI order); None for MIG or unknown
    uuid: str | None  # full `GPU-...` / `MIG-...` UUID, when known
    mig: bool
    properties: Mapping[str, Any]

    @property
    def cuda_name(self) -> str:
        """This device's entry in `CUDA_VISIBLE_DEVICES`.

        MIG devices only by full MIG UUID (short UUIDs break PyTorch); whole GPUs by
        index, which `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes mean the NVML index. A GPU with
        neither is written as its pool id: CUDA stops at an entry it cannot parse, so at
        worst the program sees fewer GPUs, never one outside the lease.
        """
        if self.mig and self.uuid:
            return self.uuid
        if self.index is not None:
            return str(self.index)
        return self.uuid or self.id

    @property
    def physical_id(self) -> str:
        """The id in the node-form pool: the NVML index canary >= 26.9 exports as-is."""
        if not self.mig and self.index is not None:
            return str(self.index)
        return self.id


@dataclass(frozen=True, slots=True)
class LeaseFiles:
    """Paths of one lease's pool files (all inside `directory`, mode 0700)."""

    directory: str
    ctest_spec: str
    pool: str
    pool_nodes: str


# --- reading the lease document -------------------------------------------------------------


def _resources(doc: Mapping[str, Any]) -> Mapping[str, list[Mapping[str, Any]]]:
    return doc.get("resources") or {}


def _props(doc: Mapping[str, Any], rtype: str, rid: str) -> Mapping[str, Any]:
    by_type = (doc.get("properties") or {}).get(rtype) or {}
    return by_type.get(rid) or {}


def _numeric(rid: str) -> int | None:
    return int(rid) if rid.isascii() and rid.isdigit() else None


def _slots(doc: Mapping[str, Any], rtype: str) -> dict[str, int]:
    """Leased slots per pool id (an id listed twice adds up)."""
    out: dict[str, int] = {}
    for item in _resources(doc).get(rtype, ()):
        rid = str(item["id"])
        out[rid] = out.get(rid, 0) + int(item.get("slots", 1))
    return out


def _gpu(rid: str, props: Mapping[str, Any]) -> LeasedGpu:
    uuid = props.get("uuid")
    mig = bool(
        (isinstance(uuid, str) and uuid.startswith("MIG-"))
        or "parent_uuid" in props
        or "parent_index" in props
    )
    index = props.get("index")
    if index is None and not mig:
        index = _numeric(rid)  # hand-written pool, or canary's detection: the id is the index
    return LeasedGpu(
        id=rid,
        index=None if mig or index is None else int(index),
        uuid=uuid if isinstance(uuid, str) and uuid else None,
        mig=mig,
        properties=dict(props),
    )


def _physical_order(gpu: LeasedGpu) -> tuple[bool, int]:
    """PCI order: a whole GPU by its index, a MIG device next to its parent."""
    key = gpu.index if not gpu.mig else gpu.properties.get("parent_index")
    return (key is None, int(key) if key is not None else 0)


def leased_gpus(doc: Mapping[str, Any]) -> list[LeasedGpu]:
    """The leased GPUs in PCI order (the pool's own order; stable for unknown indices).

    This order is the lease's CUDA numbering: the k-th GPU here is CUDA device k inside
    `CUDA_VISIBLE_DEVICES`, and lease-local id "k" in the CTest spec and flat pool.
    """
    gpus = [_gpu(rid, _props(doc, "gpus", rid)) for rid in _slots(doc, "gpus")]
    return sorted(gpus, key=_physical_order)


def _cpu_threads(doc: Mapping[str, Any], rid: str) -> list[int]:
    threads = _props(doc, "cpus", rid).get("threads")
    if threads is not None:
        return [int(t) for t in threads]
    n = _numeric(rid)
    return [] if n is None else [n]


def leased_cpus(doc: Mapping[str, Any]) -> list[int]:
    """Hardware CPU numbers of the leased cpus, hyperthread siblings included, sorted.

    Empty when the lease has no cpus or none maps to hardware (non-numeric ids without
    `threads`): the caller must then leave the affinity alone.
    """
    return sorted({t for rid in _slots(doc, "cpus") for t in _cpu_threads(doc, rid)})


def request_form(doc: Mapping[str, Any]) -> str:
    """ "groups" if the lease was asked for as groups of units, "mapping" for `{type: n}`.

    On the wire (`requests.Request.to_wire`) a RESOURCE_GROUPS request and canary's item
    list are the same thing, a list (one group flat, several as a list of lists); only the
    `{type: n}` form (`--gpus N`) is a mapping. A raw RESOURCE_GROUPS string counts as groups.
    """
    req = doc.get("request")
    if isinstance(req, Mapping):
        return "mapping"
    if isinstance(req, str) and req.strip().startswith("{"):
        return "mapping"
    return "groups" if isinstance(req, (list, tuple, str)) else "mapping"


# --- lease-local ids ------------------------------------------------------------------------


def _local_ids(doc: Mapping[str, Any]) -> dict[tuple[str, str], str]:
    """(type, pool id) -> the id the CTest spec and the flat pool use.

    GPUs become "0".."n-1" in CUDA order inside the lease; every other type keeps its id.
    """
    out = {("gpus", g.id): str(k) for k, g in enumerate(leased_gpus(doc))}
    for rtype, items in _resources(doc).items():
        for item in items:
            out.setdefault((rtype, str(item["id"])), str(item["id"]))
    return out


def _local_pool(doc: Mapping[str, Any]) -> Pool:
    """The lease as one node with lease-local ids, no properties (CTest spec, flat pool)."""
    from .pool import Instance, Pool

    local = _local_ids(doc)
    resources: dict[str, list[Instance]] = {}
    for rtype in _resources(doc):
        slots = _slots(doc, rtype)
        order = [g.id for g in leased_gpus(doc)] if rtype == "gpus" else list(slots)
        resources[rtype] = [Instance(local[(rtype, rid)], slots[rid]) for rid in order]
    return Pool.single(resources)


def _node_pool(doc: Mapping[str, Any], node_id: str) -> Pool:
    """The lease for canary >= 26.9: GPUs under their NVML index with vendor/uuid/name."""
    from .pool import Instance, Pool

    resources: dict[str, list[Instance]] = {}
    for rtype in _resources(doc):
        slots = _slots(doc, rtype)
        if rtype != "gpus":
            resources[rtype] = [Instance(rid, n) for rid, n in slots.items()]
            continue
        gpus: list[Instance] = []
        seen: set[str] = set()
        for gpu in leased_gpus(doc):
            pid = gpu.physical_id
            if pid in seen:
                raise PoolFormatError(
                    f"gpus {gpu.id!r}: node-form id {pid!r} names two leased devices "
                    "(give MIG devices ids that are not GPU indices)"
                )
            seen.add(pid)
            props: dict[str, Any] = {"vendor": str(gpu.properties.get("vendor") or "NVIDIA")}
            for key in ("uuid", "name", "parent_index", "parent_uuid"):
                if gpu.properties.get(key) is not None:
                    props[key] = gpu.properties[key]
            gpus.append(Instance(pid, slots[gpu.id], props))
        resources[rtype] = gpus
    return Pool.single(resources, node_id=node_id)


# --- environment ----------------------------------------------------------------------------


def _join(values: Iterable[object]) -> str:
    return ",".join(str(v) for v in values)


def ctest_group_env(doc: Mapping[str, Any]) -> dict[str, str]:
    """`CTEST_RESOURCE_GROUP_*` exactly as ctest sets them, with lease-local ids.

    Per group: the sorted type list, and per type `id:<id>,slots:<k>` joined by ";" in the
    group's order (two units on one id stay two entries, as in ctest).
    """
    local = _local_ids(doc)
    groups = doc.get("groups") or []
    env = {f"{CTEST_GROUP_PREFIX}COUNT": str(len(groups))}
    for n, units in enumerate(groups):
        by_type: dict[str, list[str]] = {}
        for unit in units:
            rtype, rid = str(unit["type"]), str(unit["id"])
            rid = local.get((rtype, rid), rid)
            by_type.setdefault(rtype, []).append(f"id:{rid},slots:{int(unit.get('slots', 1))}")
        env[f"{CTEST_GROUP_PREFIX}{n}"] = ",".join(sorted(by_type))
        for rtype, entries in by_type.items():
            env[f"{CTEST_GROUP_PREFIX}{n}_{rtype.upper()}"] = ";".join(entries)
    return env


def lease_env(
    doc: Mapping[str, Any], base_env: Mapping[str, str], files: LeaseFiles | None = None
) -> dict[str, str]:
    """A new, complete environment for a program running inside the lease.

    `base_env` is copied, never changed. Stale `CTEST_RESOURCE_GROUP_*` and per-lease file
    variables are dropped; CTest group variables are set only when the lease was asked
    for as groups (RESOURCE_GROUPS or canary items), not as `{type: n}` (docs/handoff.md).
    """
    env = {
        k: v
        for k, v in base_env.items()
        if not k.startswith(CTEST_GROUP_PREFIX) and k not in FILE_VARS
    }
    gpus = leased_gpus(doc)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = _join(g.cuda_name for g in gpus) if gpus else NO_GPUS
    env["RPOOL_LEASE_ID"] = str(doc["id"])
    env["RPOOL_GPU_IDS"] = _join(g.id for g in gpus)
    env["RPOOL_GPU_UUIDS"] = _join(g.uuid or "" for g in gpus)
    env["RPOOL_CPU_IDS"] = _join(leased_cpus(doc))
    env["CANARY_GPU_IDS"] = _join(g.physical_id for g in gpus)
    env["CANARY_CPU_IDS"] = _join(_slots(doc, "cpus"))
    for rtype in _resources(doc):
        if rtype not in ("cpus", "gpus"):  # canary: CANARY_<type without final s>_IDS
            name = rtype[:-1] if rtype.endswith("s") else rtype
            env[f"CANARY_{name.upper()}_IDS"] = _join(_slots(doc, rtype))
    cpu_slots = sum(_slots(doc, "cpus").values())
    if cpu_slots:
        env["OMP_NUM_THREADS"] = str(cpu_slots)
    if request_form(doc) == "groups":
        env.update(ctest_group_env(doc))
    if files is not None:
        env["RPOOL_CTEST_SPEC_FILE"] = files.ctest_spec
        env["RPOOL_POOL_FILE"] = files.pool
        env["RPOOL_POOL_NODES_FILE"] = files.pool_nodes
    return env


def substitute_args(args: Sequence[str], files: LeaseFiles) -> list[str]:
    """`{ctest_spec}`, `{pool}`, `{pool_nodes}` -> file paths, also inside longer args.

    Only those exact tokens change; other braces (`{}`, `{x}`) are left as they are.
    """
    paths = {"ctest_spec": files.ctest_spec, "pool": files.pool, "pool_nodes": files.pool_nodes}
    return [_PLACEHOLDER.sub(lambda m: paths[m.group(1)], arg) for arg in args]


# --- per-lease files ------------------------------------------------------------------------


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def lease_files_dir(directory: str) -> str:
    """`directory`, the agent's own for per-lease files: made mode 0711 (others may pass,
    not list), and refused if it is a link or anyone else's."""
    os.makedirs(directory, mode=0o711, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionDenied(f"{directory}: not a directory of uid {os.geteuid()}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IRGRP | stat.S_IROTH):
        os.chmod(directory, 0o711, follow_symlinks=False)
    return directory


def _open_lease_dir(directory: str, mode: int) -> int:
    """A descriptor of `directory`: made with `mode`, or an existing one that is ours and
    real (not a link). Everything in it is then done through this descriptor."""
    parent, name = os.path.split(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    pfd = os.open(parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, mode, dir_fd=pfd)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError:  # a link (ELOOP) or a file (ENOTDIR) in its place
            fd = -1
    finally:
        os.close(pfd)
    st = os.fstat(fd) if fd >= 0 else None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        if fd >= 0:
            os.close(fd)
        raise PermissionDenied(
            f"{directory}: exists and is not a directory owned by uid {os.geteuid()}"
        )
    os.fchmod(fd, mode)  # mkdir's mode is filtered by the umask
    return fd


def _write_at(dir_fd: int, name: str, text: str, owner: tuple[int, int] | None) -> None:
    """Write `name` in the directory whole: a new temp file (O_EXCL | O_NOFOLLOW: never
    an existing file or a link), its mode and owner set on the open descriptor, then
    renamed over `name`."""
    import secrets

    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fd, 0o600)
            if owner is not None:
                os.fchown(fd, *owner)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _dump_nodes(pool: Pool) -> str:
    """The node form; for a lease without cpus, unchecked.

    `formats` refuses a node without cpus (canary gives every test at least one, so no
    test could run). A GPU-only lease is still a valid lease: its file says exactly what
    it holds, and a canary run on it reports its tests as not runnable instead of `run`
    failing before the command starts.
    """
    from .formats import canary_nodes, dumps
    from .formats.yaml_emit import dumps as yaml_dumps

    if pool.local.resources.get("cpus"):
        return dumps(pool, "canary-nodes")
    doc, _ = canary_nodes.write(pool)
    return yaml_dumps(doc)


def write_lease_files(
    doc: Mapping[str, Any], directory: str, *, owner: tuple[int, int] | None = None
) -> LeaseFiles:
    """Write the lease's CTest spec, flat canary pool and node-form canary pool.

    Each file appears whole, mode 0600. With `owner` (uid, gid), the agent running as root
    for another user, the files are that user's while the directory stays the agent's,
    mode 0711: the holder reads its files by name but cannot add, rename or replace
    anything in the directory. Without, the directory is mode 0700. Nothing here follows
    a link or acts on a path a client could change (docs/security.md).
    """
    from .formats import dumps  # the YAML writer is heavy; lease_env alone never needs it

    local = _local_pool(doc)
    texts = {
        CTEST_SPEC_NAME: dumps(local, "ctest"),
        POOL_NAME: dumps(local, "canary"),
        POOL_NODES_NAME: _dump_nodes(_node_pool(doc, os.uname().nodename)),
    }
    fd = _open_lease_dir(directory, 0o700 if owner is None else 0o711)
    try:
        for name, text in texts.items():
            _write_at(fd, name, text, owner)
    finally:
        os.close(fd)
    return LeaseFiles(
        directory=directory,
        ctest_spec=os.path.join(directory, CTEST_SPEC_NAME),
        pool=os.path.join(directory, POOL_NAME),
        pool_nodes=os.path.join(directory, POOL_NODES_NAME),
    )


def remove_lease_files(files: LeaseFiles) -> list[str]:
    """Remove the three files and the directory; missing ones are fine. Never raises,
    never follows a link: returns what could not be removed, for the log.

    Anything else in the directory stays, and so does the directory then: this never
    deletes what it did not write. A link in a file's place is removed itself (never its
    target); a directory in a file's place is left where it is.
    """
    problems: list[str] = []
    parent, name = os.path.split(files.directory)
    try:
        pfd = os.open(parent or ".", _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return problems
    except OSError as exc:
        return [f"{parent}: {exc.strerror or exc}"]
    try:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            return problems
        except OSError as exc:  # a link or a file where the directory was
            return [f"{files.directory}: {exc.strerror or exc}"]
        try:
            for path in (files.ctest_spec, files.pool, files.pool_nodes):
                try:  # unlink removes a link itself, never its target
                    os.unlink(os.path.basename(path), dir_fd=fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:  # a directory in its place (EISDIR), ...
                    problems.append(f"{path}: {exc.strerror or exc}")
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"{files.directory}: {exc.strerror or exc}")
    finally:
        os.close(pfd)
    return problems
