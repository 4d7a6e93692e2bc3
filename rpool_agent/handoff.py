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
The environment itself is handoff_env.py's (re-exported here): `rpool-agent run` imports
only that, no value types.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import PermissionDenied, PoolFormatError
from .handoff_env import (  # noqa: F401  (re-exported: the handoff's public names)
    CTEST_GROUP_PREFIX,
    FILE_VARS,
    NO_GPUS,
    _local_ids,
    _resources,
    _slots,
    ctest_group_env,
    cuda_name,
    gpu_facts,
    lease_env,
    leased_cpus,
    physical_id,
    request_form,
    substitute_args,
)

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

    from .pool import Pool  # the pool model: the lease files' only (`run` does not need it)

CTEST_SPEC_NAME = "ctest-spec.json"
POOL_NAME = "pool.yaml"
POOL_NODES_NAME = "pool-nodes.yaml"


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
        """This device's entry in `CUDA_VISIBLE_DEVICES` (handoff_env.cuda_name)."""
        return cuda_name(self.id, self.index, self.uuid, self.mig)

    @property
    def physical_id(self) -> str:
        """The id in the node-form pool: the NVML index canary >= 26.9 exports as-is."""
        return physical_id(self.id, self.index, self.mig)


def leased_gpus(doc: Mapping[str, Any]) -> list[LeasedGpu]:
    """The leased GPUs in PCI order, the lease's CUDA numbering (handoff_env.gpu_facts)."""
    return [LeasedGpu(*facts) for facts in gpu_facts(doc)]


@dataclass(frozen=True, slots=True)
class LeaseFiles:
    """Paths of one lease's pool files (all inside `directory`, mode 0700)."""

    directory: str
    ctest_spec: str
    pool: str
    pool_nodes: str


# --- lease-local ids ------------------------------------------------------------------------


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
    from .statedir import replace_file

    fd = _open_lease_dir(directory, 0o700 if owner is None else 0o711)
    try:
        for name, text in texts.items():
            replace_file(fd, name, text.encode(), owner=owner)  # 0600, the holder's
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
