"""The service: each operation's handler, and the allocator's events sent where they belong.

A call comes in from a `Connection`, goes to its `op_*` handler, which asks the pure
allocator and answers with a reply or `_DEFERRED` (the reply comes from an event). Each
event is sent to the connection it names: a release on one connection grants a waiter on
another. Losing a peer is an input too: EOF -> `allocator.disconnect(owner)`, which reaps
its leases and serves the next waiter, with no polling and no timeout to wait out.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import calls, codec, protocol
from .allocator import Allocator
from .args import resource_arg, timeout_arg
from .connection import Connection, Limits
from .documents import PropertyIndex, lease_document
from .errors import (
    LimitExceeded,
    NotOwner,
    NotRecorded,
    PermissionDenied,
    ProtocolError,
    RequestError,
    RpoolAgentError,
    Timeout,
    UnknownLease,
)
from .holders import Holder, LeaseExtras, process_starttime, process_uid
from .journal import lease_record
from .lease import Denied, Granted, Lease, Queued, Reaped, Released
from .listener import peer_groups
from .monitor import Monitor
from .pidwatch import PidWatch
from .pool import Pool
from .requests import parse_request

Owner = tuple[Any, ...]
_DEFERRED = object()


@dataclass(eq=False, slots=True)
class Pending:
    """An acquire that waits. The record itself is the allocator's request key (compared
    by identity), so the reply's route, id, owner, token and file wish travel together."""

    conn: Connection
    call_id: Any
    owner: Owner
    token: str | None
    want_files: bool
    since: float  # when it was asked for, for the wait-time metric


class Service:
    """The `op_*` handlers and the event dispatch; `Server` adds connections and the loop."""

    pool: Pool
    allocator: Allocator
    limits: Limits
    state: Any
    gpu_health: Any
    notify: Callable[[str], Any] | None
    admin_gid: int | None
    files_dir: str
    log_events: bool
    connections: dict[int, Connection]
    extras: dict[str, LeaseExtras]
    pids: PidWatch
    waiting: set[Pending]
    uid_leases: Counter[int]
    uid_waiting: Counter[int]
    monitor: Monitor  # status document, GPU audit, metrics (monitor.py)
    _property_index: PropertyIndex | None = None

    def handle_frame(self, conn: Connection, frame: Any) -> None:
        rid: Any = None  # never echo an id parse_call did not accept (it may be anything)
        try:
            call = calls.parse_call(frame)
            rid = call.id
            if not conn.greeted and call.op != "hello":
                raise ProtocolError("the first message must be 'hello'")
            result = self._ops[call.op](conn, call)
        except RpoolAgentError as exc:
            rid = calls.request_id_of(exc) if rid is None else rid
            conn.send(protocol.error(rid, exc))
            return
        except Exception as exc:  # a bug: this call fails, the agent and its leases live on
            import traceback

            msg = f"internal error on {frame!r:.200}:\n{traceback.format_exc()}"
            self._log(msg, important=True)
            conn.send(protocol.error(rid, RpoolAgentError(f"internal error: {exc!r:.200}")))
            return
        if result is not _DEFERRED:
            conn.send(protocol.ok(rid, result))

    # --- operations (each returns the reply's result, or _DEFERRED) ----------------------

    def op_hello(self, conn: Connection, call: calls.Call) -> Any:
        # parse_call compares the version by value, where `true` and `1.0` equal 1
        if type(call.args.get("version")) is not int:
            raise ProtocolError("'version' must be an integer")
        client = call.args.get("client")
        if client is not None and not isinstance(client, str):
            raise ProtocolError("'client' must be a string")
        conn.greet()
        from ._version import __version__

        peer = conn.peer or Holder(-1, -1, -1)
        return {
            "version": protocol.PROTOCOL_VERSION,
            "server": f"rpool-agent {__version__}",
            "pid": os.getpid(),
            "you": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid},
        }

    def op_acquire(self, conn: Connection, call: calls.Call) -> Any:
        args = call.args
        request = parse_request(args.get("request"))
        timeout = timeout_arg(args.get("timeout"))
        files = args.get("files")
        if files is not None and not isinstance(files, bool):
            raise ProtocolError("'files' must be true or false")
        label = args.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            raise ProtocolError("'label' must be a string of at most 256 characters")
        if len(conn.pending) >= self.limits.max_pending_per_connection:
            raise LimitExceeded("too many pending acquires on this connection")
        peer = conn.peer or Holder(-1, -1, -1)
        self._check_uid_caps(peer.uid)
        owner: Owner = conn.owner
        holder = peer
        holder_pid = args.get("holder_pid")
        if holder_pid is not None:
            holder, owner = self._pid_holder(peer, holder_pid)
        if call.id in conn.pending:
            raise RequestError(f"request id {call.id!r} is already waiting")
        token = args.get("token")
        if token is not None:
            if not isinstance(token, str) or not 16 <= len(token) <= 128:
                raise ProtocolError("'token' must be a string of 16 to 128 characters")
            # A retry of an acquire whose reply an agent restart cut off: that lease.
            restored = self.state.restored_lease(token) if self.state is not None else None
            if restored is not None and restored in self.allocator.leases:
                return self._rebind(conn, restored, with_token=True)
        want_files = bool(files)
        now = time.monotonic()
        pending = Pending(conn, call.id, owner, token, want_files, now)
        events = self.allocator.submit(
            owner,
            pending,
            request,
            now=now,
            timeout=timeout,
            label=label,
            holder=holder.to_dict(),
        )
        # `submit` answers with exactly one event about this request: act on it here, and
        # keep the route to this connection only for a request that waits.
        (ev,) = events
        if type(ev) is Granted:
            self.monitor.tally.granted(0.0)  # waited for nothing
            self._grant(conn, call.id, ev.lease, holder, token, want_files)
            return _DEFERRED
        if type(ev) is Denied:
            conn.send(protocol.error(call.id, ev.error))
            return _DEFERRED
        conn.pending[call.id] = pending
        self.waiting.add(pending)
        self.uid_waiting[peer.uid] += 1
        self.dispatch(events)  # Queued: tell the client, arm its timeout
        return _DEFERRED

    def _check_uid_caps(self, uid: int) -> None:
        """Every acquire counts, empty ones too: held and waiting leases per uid are
        capped (root, the operator, is not), so no client can grow us without bound."""
        if uid == 0:
            return
        limits = self.limits
        if self.uid_waiting[uid] >= limits.max_waiting_per_uid:
            raise LimitExceeded(f"too many waiting acquires for this uid ({uid})")
        if self.uid_leases[uid] + self.uid_waiting[uid] >= limits.max_leases_per_uid:
            raise LimitExceeded(f"too many leases for this uid ({uid})")

    def _new_lease_id(self) -> str:
        """16 random hex digits: nobody can guess the next one (docs/security.md)."""
        while True:
            lease_id = secrets.token_hex(8)
            if lease_id not in self.extras and lease_id not in self.allocator.leases:
                return lease_id

    def _pid_holder(self, peer: Holder, pid: Any) -> tuple[Holder, Owner]:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ProtocolError("'holder_pid' must be a positive integer")
        try:  # out of descriptors is not "no such process": refuse, but say why
            start = process_starttime(pid, strict=True)
        except OSError as exc:
            raise LimitExceeded(f"cannot look at process {pid}: {exc.strerror or exc}") from None
        uid = process_uid(pid)
        if uid is None or start is None:
            raise ProtocolError(f"no process {pid}")
        if peer.uid not in (0, uid):
            raise PermissionDenied(f"process {pid} belongs to another user")
        return Holder(pid, uid, peer.gid, start), ("pid", pid, start)

    def op_cancel(self, conn: Connection, call: calls.Call) -> Any:
        target = call.args.get("request_id")
        if target is not None and not isinstance(target, (int, str)):
            raise ProtocolError("'request_id' must be an integer or a string")
        pending = conn.pending.get(target)
        if pending is None:
            return {"cancelled": False}
        self._unroute(pending)
        self.dispatch(self.allocator.cancel(pending.owner, pending))
        return {"cancelled": True}

    def _unroute(self, pending: Pending) -> bool:
        """Forget a waiting acquire (granted, denied, cancelled or its connection gone);
        True if it was still routed to its connection, which then gets one reply."""
        if pending not in self.waiting:
            return False
        self.waiting.discard(pending)
        pending.conn.pending.pop(pending.call_id, None)
        peer = pending.conn.peer
        uncount(self.uid_waiting, peer.uid if peer else -1)
        return True

    def op_release(self, conn: Connection, call: calls.Call) -> Any:
        lease_id = call.args.get("lease")
        if not isinstance(lease_id, str):
            raise ProtocolError("'lease' must be a lease id string")
        lease = self.allocator.leases.get(lease_id)
        if lease is None:
            raise UnknownLease(f"no lease {lease_id[:40]!r}")
        self._check_may_touch(conn, lease)
        events = self.allocator.release(lease.owner, lease_id)
        if len(events) == 1:  # [Released]: nobody waits, the queue and its timers are as they were
            self._end_lease(lease_id, "release")
        else:
            self.dispatch(events)
        return {"released": lease_id}

    def _check_may_touch(self, conn: Connection, lease: Lease) -> None:
        if lease.owner == conn.owner:
            return
        peer = conn.peer or Holder(-1, -1, -1)
        if peer.uid == 0:
            return
        if int(lease.holder.get("uid", -2)) == peer.uid:
            return
        raise NotOwner(f"lease {lease.id} belongs to another user")

    def op_status(self, conn: Connection, call: calls.Call) -> Any:
        # the documented schema: status_doc.py; everything only for the agent's owners
        return self.monitor.status_call(conn, call.args)

    def op_pool(self, conn: Connection, call: calls.Call) -> Any:
        fmt = call.args.get("format")
        if fmt is None:
            from .formats import to_document

            return to_document(self.pool, "canary-nodes")[0]
        from .formats import FORMATS, dumps

        if fmt not in FORMATS:
            raise ProtocolError(f"'format' must be one of {', '.join(FORMATS)}")
        return {"format": fmt, "text": dumps(self.pool, fmt)}

    def op_reclaim(self, conn: Connection, call: calls.Call) -> Any:
        lease_id, token = call.args.get("lease"), call.args.get("token")
        extras = self.extras.get(lease_id) if isinstance(lease_id, str) else None
        if extras is None or lease_id not in self.allocator.leases:
            raise UnknownLease(f"no lease {str(lease_id)[:40]!r}")
        if not isinstance(token, str) or not secrets.compare_digest(
            token.encode(errors="surrogatepass"), extras.token.encode(errors="surrogatepass")
        ):
            raise NotOwner("wrong token for this lease")
        return self._rebind(conn, lease_id, with_token=False)

    def _rebind(self, conn: Connection, lease_id: str, *, with_token: bool) -> Any:
        """Tie a lease to `conn`, and to its process: the holder a restart looks for."""
        extras = self.extras[lease_id]
        self._check_may_touch(conn, self.allocator.leases[lease_id])  # a token is not enough
        self.allocator.rebind(lease_id, conn.owner)
        self._close_pidfd(extras)
        if conn.peer is not None and conn.peer.pid > 0:
            extras.holder = conn.peer
            if extras.counted_uid != conn.peer.uid:  # root re-claimed another's lease
                if extras.counted_uid is not None:
                    uncount(self.uid_leases, extras.counted_uid)
                self.uid_leases[conn.peer.uid] += 1
                extras.counted_uid = conn.peer.uid
        self._changed(lease_id)
        doc = self.lease_document(self.allocator.leases[lease_id], with_token=with_token)
        if with_token and extras.files is not None:
            doc["files"] = dataclasses.asdict(extras.files)
        return doc

    def op_drain(self, conn: Connection, call: calls.Call) -> Any:
        self._require_admin(conn)
        rtype, rid = resource_arg(call.args.get("resource"))
        reason = call.args.get("reason") or ""
        if not isinstance(reason, str):
            raise ProtocolError("'reason' must be a string")
        self.allocator.drain(rtype, rid, reason[:256])
        self._log(f"drain {rtype}:{rid} reason={reason!r}")
        self._save_drains()
        return {"drained": f"{rtype}:{rid}"}

    def op_undrain(self, conn: Connection, call: calls.Call) -> Any:
        self._require_admin(conn)
        rtype, rid = resource_arg(call.args.get("resource"))
        self.dispatch(self.allocator.undrain(rtype, rid))
        self._log(f"undrain {rtype}:{rid}")
        self._save_drains()
        return {"undrained": f"{rtype}:{rid}"}

    def _save_drains(self) -> None:
        """An admin's drains outlive a restart and a reboot (drains.py); the health
        poller's own drains are its to make again."""
        drains = self.state.drains if self.state is not None else None
        if drains is not None:
            health = self.gpu_health.drained if self.gpu_health is not None else ()
            drains.save({k: r for k, r in self.allocator.drained.items() if k not in health})

    def op_reload(self, conn: Connection, call: calls.Call) -> Any:
        self._require_admin(conn)
        return self.reload()

    def is_admin(self, conn: Connection) -> bool:
        """Root, or a member of the admin group (by the groups the kernel recorded at
        connect())."""
        peer = conn.peer or Holder(-1, -1, -1)
        if peer.uid == 0:
            return True
        return self.admin_gid is not None and self.admin_gid in peer_groups(conn)

    def _require_admin(self, conn: Connection) -> None:
        if not self.is_admin(conn):
            raise PermissionDenied("this operation needs root or the agent's admin group")

    # --- events -> connections ------------------------------------------------------------

    def dispatch(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Granted):
                self._on_granted(ev)
            elif isinstance(ev, Denied):
                pending = ev.req_id
                self.monitor.tally.denied(timed_out=isinstance(ev.error, Timeout))
                if self._unroute(pending):
                    pending.conn.send(protocol.error(pending.call_id, ev.error))
            elif isinstance(ev, Queued):
                pending = ev.req_id
                if pending in self.waiting:
                    pending.conn.send(
                        {"id": pending.call_id, "event": "queued", "position": ev.position}
                    )
            elif isinstance(ev, Released):
                self._end_lease(ev.lease_id, "release")
            elif isinstance(ev, Reaped):
                for lease_id in ev.lease_ids:
                    self._end_lease(lease_id, "reap")
        self._reschedule()

    def _on_granted(self, ev: Granted) -> None:
        """A waiter's grant (a release, reap or timeout made room)."""
        p: Pending = ev.req_id
        self.monitor.tally.granted(ev.lease.granted_at - p.since)
        conn = p.conn if self._unroute(p) else None
        holder = Holder.from_dict(ev.lease.holder)
        self._grant(conn, p.call_id, ev.lease, holder, p.token, p.want_files)

    def _grant(
        self,
        conn: Connection | None,
        call_id: Any,
        lease: Lease,
        holder: Holder,
        token: str | None,
        want_files: bool,
    ) -> None:
        """Watch the holder, keep the lease's extras, write its files, journal it, log it,
        answer `conn` (if still there). What cannot be done for THIS grant (no descriptor
        left, files that cannot be written) takes the lease back and refuses it; no other
        lease is touched."""
        pidfd = None
        if lease.owner[0] == "pid":
            try:
                pidfd = self.pids.watch(holder.pid, holder.starttime, lease.owner)
            except OSError as exc:  # EMFILE and the like: says nothing about the holder
                why = f"cannot watch process {holder.pid}: {exc.strerror or exc}"
                self._refuse_grant(conn, call_id, lease, why)
                return
            if pidfd is None:  # the holder died while its request waited
                self._log(f"grant {lease.id} to pid={holder.pid}, which has exited")
                if conn is not None:
                    gone = UnknownLease(f"process {holder.pid} exited before the grant")
                    conn.send(protocol.error(call_id, gone))
                self._disconnect(lease.owner)
                return
        token = token or secrets.token_hex(16)
        extras = LeaseExtras(token, holder, pidfd=pidfd, counted_uid=holder.uid)
        self.uid_leases[holder.uid] += 1
        self.extras[lease.id] = extras
        doc = self.lease_document(lease, with_token=True)
        if want_files:
            try:
                extras.files = self._write_files(doc, holder)
            except (OSError, RpoolAgentError) as exc:
                why = f"cannot write the lease's files: {getattr(exc, 'strerror', None) or exc}"
                self._refuse_grant(conn, call_id, lease, why)
                return
            doc["files"] = dataclasses.asdict(extras.files)
        if self.log_events:
            self._log(
                f"grant {lease.id} {_fmt_held(lease.held)} pid={holder.pid} "
                f"uid={holder.uid}" + (f" label={lease.label!r}" if lease.label else "")
            )
        reply = codec.encode_frame(protocol.ok(call_id, doc))
        if self.state is not None:
            undo = functools.partial(self._unrecorded, lease.id, conn, call_id, reply)
            self.state.record_grant(lease.id, lease_record(lease, extras), undo)
        if self.notify is not None:
            self._notify_status()
        if conn is not None:
            conn.send_bytes(reply)

    def _unrecorded(
        self, lease_id: str, conn: Connection | None, call_id: Any, reply: bytes
    ) -> None:
        """The grant's journal line could not be written (a full disk): a restart would
        forget the lease, so it is not given: its reply becomes an error, the lease ends."""
        lease = self.allocator.leases.get(lease_id)
        if lease is None:  # ended already in this turn (its connection went away)
            return
        self._log(f"grant {lease_id} withdrawn: the journal could not be written", important=True)
        if conn is not None:
            why = NotRecorded(
                "the agent could not record the lease (its state dir cannot be written): "
                "nothing was granted"
            )
            conn.replace_frame(reply, codec.encode_frame(protocol.error(call_id, why)))
        self.dispatch(self.allocator.release(lease.owner, lease_id, now=time.monotonic()))

    def _refuse_grant(self, conn: Connection | None, call_id: Any, lease: Lease, why: str) -> None:
        """Take back a lease granted this moment (never journalled, never answered) and
        refuse its request; the slots go to the next waiter, if any."""
        self._log(f"grant {lease.id} refused: {why}", important=True)
        extras = self.extras.pop(lease.id, None)
        if extras is not None:
            self._drop_extras(lease.id, extras)
        events = self.allocator.release(lease.owner, lease.id, now=time.monotonic())
        self.dispatch([ev for ev in events if not isinstance(ev, Released)])
        if conn is not None:
            conn.send(protocol.error(call_id, LimitExceeded(f"{why}; try again later")))

    def _write_files(self, doc: dict[str, Any], holder: Holder) -> Any:
        """Per-lease pool files, readable by the holder alone, removed when the lease ends.

        The directory is the agent's, named by 32 random hex digits under the agent's own
        files directory (mode 0711: nobody can list it); as root, the files are created
        for the holder on their open descriptors (handoff.write_lease_files)."""
        from .handoff import lease_files_dir, write_lease_files

        directory = os.path.join(lease_files_dir(self.files_dir), secrets.token_hex(16))
        owner = (holder.uid, holder.gid) if os.geteuid() == 0 and holder.uid > 0 else None
        return write_lease_files(doc, directory, owner=owner)

    def _holder_exited(self, owner: Owner) -> None:
        self._disconnect(owner)

    def _disconnect(self, owner: Owner) -> None:
        """`owner` is gone: the allocator reaps its leases and drops its waiters. A holder
        process's waiters were filed by connections that are still there: each still gets
        its one reply (the allocator drops them without an event)."""
        events = self.allocator.disconnect(owner)
        if owner[0] == "pid":
            for p in [p for p in self.waiting if p.owner == owner]:
                self._unroute(p)
                gone = UnknownLease(f"process {owner[1]} exited before the grant")
                p.conn.send(protocol.error(p.call_id, gone))
        self.dispatch(events)

    def _end_lease(self, lease_id: str, how: str) -> None:
        """A lease ended: each clean-up step on its own, so that a failing one (files a
        holder tampered with) is logged and the lease, and this turn's other events, still
        end, get journalled and get answered."""
        self.monitor.tally.ended(how)
        extras = self.extras.pop(lease_id, None)
        if extras is not None:
            self._isolated(f"{how} {lease_id}: clean-up", self._drop_extras, lease_id, extras)
        if self.log_events:
            self._log(f"{how} {lease_id}")
        if self.state is not None:
            self._isolated(f"{how} {lease_id}: journal", self.state.record_end, lease_id)
        if self.notify is not None:
            self._notify_status()

    def _drop_extras(self, lease_id: str, extras: LeaseExtras) -> None:
        """Undo what a grant set up beside the allocator: its count, pidfd and files."""
        if extras.counted_uid is not None:
            uncount(self.uid_leases, extras.counted_uid)
            extras.counted_uid = None
        if extras.pidfd is not None:
            self._close_pidfd(extras)
        if extras.files is not None:
            from .handoff import remove_lease_files

            for problem in remove_lease_files(extras.files):
                self._log(f"lease {lease_id}: not removed: {problem}", important=True)

    def _isolated(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._log(f"{what} failed:\n{traceback.format_exc()}", important=True)

    def _close_pidfd(self, extras: LeaseExtras) -> None:
        if extras.pidfd is not None:
            self.pids.release(extras.pidfd)
            extras.pidfd = None

    def lease_document(self, lease: Lease, *, with_token: bool) -> dict[str, Any]:
        extras = self.extras.get(lease.id)
        token = extras.token if with_token and extras is not None else None
        index = self._property_index
        if index is None or index.pool is not self.pool:  # a reload brings a new pool
            index = self._property_index = PropertyIndex(self.pool)
        return lease_document(index, lease, token)


def _fmt_held(held: tuple[Any, ...]) -> str:
    """`cpus:0,1 gpus:3x2` for the log: slots per id, grouped by type."""
    if len(held) == 1:
        s = held[0]
        return f"{s.type}:{s.id}" + (f"x{s.slots}" if s.slots != 1 else "")
    by_type: dict[str, list[str]] = {}
    for s in held:
        by_type.setdefault(s.type, []).append(f"{s.id}" + (f"x{s.slots}" if s.slots != 1 else ""))
    return " ".join(f"{t}:" + ",".join(ids) for t, ids in by_type.items())


def uncount(counter: Counter[int], key: int) -> None:
    """One fewer under `key`; a key at zero is deleted (the counter never grows)."""
    n = counter[key] - 1
    if n > 0:
        counter[key] = n
    else:
        counter.pop(key, None)
