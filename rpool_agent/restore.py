"""Restart: re-adopt the journaled leases whose holder still runs, before anyone connects.

The journal (`state.py`) says which leases were held and by which process (pid and start
time). A lease whose holder still runs is given back to the allocator, bound to that
process until a client re-claims it by id and token; the rest are dropped and their
per-lease files removed. Then the store starts a fresh journal holding what was kept.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from .errors import ConfigError, RpoolAgentError
from .holders import Holder, LeaseExtras
from .lease import Lease
from .state import StateStore


def restore_leases(server: Any, store: StateStore) -> None:
    """Re-adopt what `store` recorded into `server` (its allocator, extras and pid watch),
    then start the store's new journal. ConfigError if the state dir cannot be used.

    The cyclic garbage collector is paused meanwhile, and what was built is then frozen
    out of its view (`gc.freeze`): re-adopting builds a dozen objects per lease and no
    cyclic garbage, and the collector's passes over that heap, during the restore and at
    the first replies after it, cost more than the work (bench/growth.py, restart row)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        records = store.open(server.log)
        kept: list[str] = []
        dropped: list[str] = []
        me = os.getpid()
        for rec in records.values():
            (kept if _adopt(server, store, rec, me) else dropped).append(rec["id"])
    finally:
        gc.freeze()  # what start-up built stays: no later pass needs to walk it again
        if was_enabled:
            gc.enable()
    for lease_id in dropped:
        files = _lease_files(records[lease_id].get("files"))
        if files is not None:
            from .handoff import remove_lease_files

            try:
                remove_lease_files(files)
            except OSError as exc:
                server.log(f"state: files of dropped lease {lease_id}: {exc}")
    _restore_drains(server, store)
    if records:
        server.log(
            f"state: restored {len(kept)} lease(s) whose holder still runs"
            + (f" ({_ids(kept)})" if kept else "")
            + f", dropped {len(dropped)}"
            + (f" ({_ids(dropped)})" if dropped else "")
        )
    store.start(
        kept,
        at_turn_end=server.at_turn_end,
        log=lambda line: server._log(line, important=True),
    )


def _restore_drains(server: Any, store: StateStore) -> None:
    """Drain again what an admin drained before the restart (or the reboot)."""
    if store.drains is None:
        return
    for rtype, rid, reason in store.drains.load():
        try:
            server.allocator.drain(rtype, rid, reason)
        except RpoolAgentError:
            server.log(f"state: drain of {rtype}:{rid} dropped: the pool has no such instance")
            continue
        server.log(f"state: {rtype}:{rid} drained again (reason={reason!r})")


def _ids(ids: list[str], most: int = 20) -> str:
    return ", ".join(ids[:most]) + (f", ... ({len(ids) - most} more)" if len(ids) > most else "")


def _adopt(server: Any, store: StateStore, rec: dict[str, Any], me: int) -> bool:
    """Give one recorded lease back to the allocator if its holder still runs."""
    h = rec["holder"]
    holder = Holder(h["pid"], h["uid"], h["gid"], h.get("starttime"))
    if holder.starttime is None or holder.pid == me:
        return False  # a holder we cannot tell from a recycled pid is not trusted
    owner = ("pid", holder.pid, holder.starttime)
    try:
        fd = server.pids.watch(holder.pid, holder.starttime, owner)
    except OSError as exc:  # EMFILE and the like: says nothing about the holder, so the
        # lease can be neither kept nor dropped safely: no start (fail closed)
        raise ConfigError(
            f"state: cannot watch process {holder.pid}, holder of lease {rec['id']}: "
            f"{exc.strerror or exc} (raise LimitNOFILE?)"
        ) from None
    if fd is None:
        return False
    try:  # the allocator's part of the record is checked here, once
        lease = Lease.from_dict({**rec, "owner": list(owner)})
        server.allocator.adopt(lease)
    except RpoolAgentError as exc:
        server.pids.release(fd)
        server.log(f"state: lease {rec['id']} not restored: {exc}")
        return False
    files = _lease_files(rec.get("files"))
    server.extras[lease.id] = LeaseExtras(rec["token"], holder, files, fd, holder.uid)
    server.uid_leases[holder.uid] += 1  # counts under the per-uid lease limit, as a grant
    store.note_restored(rec["token"], lease.id)
    return True


def _lease_files(d: Any) -> Any:
    """The recorded per-lease files as `handoff.LeaseFiles` (None if none, or malformed)."""
    if not d:
        return None
    from .handoff import LeaseFiles

    try:
        return LeaseFiles(**d)
    except TypeError:
        return None
