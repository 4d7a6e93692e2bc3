"""The lease daemon: an asyncio shell around the pure allocator and the sans-IO codec.

Each connection runs wsproto's three steps: 1) bytes from the socket go into the frame
decoder, 2) each call goes to the allocator, which answers with events, 3) each event is
queued for whichever connection it names (a release on one connection grants a waiter on
another); at the end of the loop turn the journal is written once, then every queued
reply. Losing a peer is an input too: EOF -> `allocator.disconnect(owner)`, which reaps
its leases and serves the next waiter, with no polling and no timeout to wait out.

Sockets, SO_PEERCRED, timers, logging and sd_notify live here; no allocation decision does.
`asyncio.BufferedProtocol` rather than streams: it reads into one preallocated buffer and
costs a fraction of a StreamReader per message (see bench/lease.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import secrets
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import protocol
from .allocator import Allocator
from .errors import (
    AgentUnavailable,
    LimitExceeded,
    MessageTooLarge,
    NotOwner,
    PermissionDenied,
    ProtocolError,
    RpoolAgentError,
    UnknownLease,
)
from .holders import Holder, open_pidfd, peer_credentials, process_starttime, process_uid
from .lease import Denied, Granted, Lease, Queued, Reaped, Released
from .pool import Pool
from .protocol import json_str
from .requests import parse_request
from .state import grant_line_of, holder_json

Owner = tuple[Any, ...]


@dataclass
class Limits:
    """Per-connection and per-uid limits: nothing a client sends may grow memory unbounded."""

    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    max_pending_per_connection: int = 16
    max_connections_per_uid: int = 64
    handshake_timeout: float = 10.0
    # Replies one connection may have queued before the rest of its read waits: 64 KiB of
    # pipelined `status` calls would otherwise queue thousands of large replies at once.
    max_reply_backlog: int = 256 << 10


@dataclass(slots=True)
class LeaseExtras:
    """What the shell keeps beside an allocator lease: secret token, files, requester."""

    token: str
    holder: Holder
    files: Any = None  # handoff.LeaseFiles once written
    pidfd: int | None = None


@dataclass
class Connection(asyncio.BufferedProtocol):
    server: Server
    number: int
    transport: asyncio.Transport | None = None
    peer: Holder | None = None
    decoder: protocol.FrameDecoder = field(default_factory=protocol.FrameDecoder)
    greeted: bool = False
    pending: set[Any] = field(default_factory=set)  # allocator request keys still queued
    _buffer: bytearray = field(default_factory=lambda: bytearray(65536))
    _out: list[bytes] = field(default_factory=list)  # frames queued this loop turn
    _out_bytes: int = 0  # their size
    _backlog: tuple[list[Any], Any] | None = None  # (frames, too_large) held back
    _writing_paused: bool = False  # the transport's buffer is over its high-water mark
    _view: memoryview | None = None  # of _buffer, made once
    holder_json: str | None = None  # `peer` as a grant's JSON, made once
    _handshake_timer: asyncio.TimerHandle | None = None

    owner: Owner = field(init=False)  # ("conn", number): the allocator's key for us

    def __post_init__(self) -> None:
        self.owner = ("conn", self.number)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            self.peer = peer_credentials(sock)
        except OSError:
            self.peer = Holder(-1, -1, -1)
        self.decoder = protocol.FrameDecoder(self.server.limits.max_message_bytes)
        if not self.server.admit(self):
            return
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.server.limits.handshake_timeout, self._handshake_expired
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        view = self._view
        if view is None:
            view = self._view = memoryview(self._buffer)
        return view

    def buffer_updated(self, nbytes: int) -> None:
        server = self.server
        server._in_read = True
        try:
            self._handle_bytes(nbytes)
        finally:
            server._read_finished()

    def _handle_bytes(self, nbytes: int) -> None:
        # 1) bytes into the codec
        too_large: MessageTooLarge | None = None
        try:
            frames = self.decoder.feed(self._buffer[:nbytes])  # a bytearray: one copy
        except MessageTooLarge as exc:  # the frames before it are answered, then we close
            frames, too_large = getattr(exc, "frames", []), exc
        self._handle_frames(frames, too_large)

    def _handle_frames(self, frames: list[Any], too_large: MessageTooLarge | None) -> None:
        # 2) + 3) each frame to the core, events out to their connections
        limit = self.server.limits.max_reply_backlog
        for i, frame in enumerate(frames):
            if self.transport is None or self.transport.is_closing():
                return
            self.server.handle_frame(self, frame)
            if self._out_bytes > limit and (i + 1 < len(frames) or too_large is not None):
                # Replies pile up faster than they leave: the rest of this read waits,
                # and reading stops, until the replies are on their way (_resume_backlog).
                self._backlog = (frames[i + 1 :], too_large)
                self.transport.pause_reading()
                return
        if too_large is not None:
            self.send(protocol.error(None, too_large))
            self.close()

    def _resume_backlog(self) -> None:
        """Handle the frames a full reply queue held back, then read again."""
        backlog, self._backlog = self._backlog, None
        transport = self.transport
        if backlog is None or transport is None or transport.is_closing():
            return
        server = self.server
        server._in_read = True
        try:
            self._handle_frames(*backlog)
        finally:
            server._read_finished()
        if self._backlog is None and not self._writing_paused and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    # A peer that sends calls but never reads the replies would grow our write buffer
    # without bound: stop reading from it until it catches up (asyncio's flow control).
    def pause_writing(self) -> None:
        self._writing_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._backlog is not None:
            self._resume_backlog()  # it reads again once the backlog is handled
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer:
            self._handshake_timer.cancel()
        self.server.forget(self)
        self.transport = None
        self._out.clear()
        self._out_bytes = 0
        self._backlog = None

    # -- helpers -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_bytes(protocol.encode(message))

    def send_bytes(self, data: bytes) -> None:
        """Queue a frame; it leaves at the end of this loop turn, after the journal lines
        of the same turn are written (what a client is told is never ahead of the state
        file), in one write per connection and one journal write for all of them."""
        if self.transport is not None and not self.transport.is_closing():
            out = self._out
            out.append(data)
            self._out_bytes += len(data)
            if len(out) == 1:
                self.server._queue_output(self)

    def flush(self) -> None:
        """Write what is queued for this connection now (journal first)."""
        out = self._out
        transport = self.transport
        if out and transport is not None and not transport.is_closing():
            state = self.server.state
            if state is not None and state.pending:
                state.flush()
            transport.write(out[0] if len(out) == 1 else b"".join(out))  # may pause_writing
            if self._backlog is not None and not self._writing_paused:
                # all of it went to the socket at once: nothing will call resume_writing
                loop = self.server._running_loop()
                if loop is not None:
                    loop.call_soon(self._resume_backlog)
        out.clear()
        self._out_bytes = 0

    def close(self) -> None:
        if self.transport is not None:
            self.flush()  # an error sent just before closing must still leave
            self.transport.close()

    def greet(self) -> None:
        self.greeted = True
        if self._handshake_timer:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _handshake_expired(self) -> None:
        if not self.greeted:
            self.send(protocol.error(None, ProtocolError("no handshake in time")))
            self.close()


def _log_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Server:
    """Holds the pool, the allocator and every connection; one per process."""

    def __init__(
        self,
        pool: Pool,
        *,
        socket_path: str,
        limits: Limits | None = None,
        log: Callable[[str], None] = _log_stderr,
        files_dir: str | None = None,
        admin_gid: int | None = None,
        socket_mode: int = 0o660,
        socket_gid: int | None = None,
        notify: Callable[[str], Any] | None = None,
        state: Any = None,
        pool_loader: Callable[[], Pool] | None = None,
        watchdog_interval: float | None = None,
        log_events: bool = True,
    ) -> None:
        self.pool = pool
        self.socket_path = socket_path
        self.limits = limits or Limits()
        self.log = log
        self.files_dir = files_dir or os.path.join(os.path.dirname(socket_path), "leases")
        self.admin_gid = admin_gid
        self.socket_mode = socket_mode
        self.socket_gid = socket_gid
        self.notify = notify
        self.state = state
        self.pool_loader = pool_loader
        self.watchdog_interval = watchdog_interval
        self.log_events = log_events
        # A random prefix per agent start keeps ids unique across restarts (a re-adopted
        # lease keeps its id); the counter keeps them unique, and cheap, within one.
        prefix = secrets.token_hex(3)
        self._lease_ids = (f"{prefix}-{i:x}" for i in itertools.count(1))
        self.allocator = Allocator(pool, new_lease_id=lambda: next(self._lease_ids))
        self.connections: dict[int, Connection] = {}
        self.extras: dict[str, LeaseExtras] = {}
        self._routes: dict[Any, Connection] = {}  # allocator request key -> requesting conn
        self._want_files: set[Any] = set()  # request keys whose grant writes per-lease files
        self._tokens: dict[Any, str] = {}  # request key -> the lease token its client chose
        self._numbers = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._owned_socket = False
        self._status_pending = False
        self._log_lines: list[str] = []
        self._turn_end: dict[Callable[[], None], None] = {}
        self._turn_end_scheduled = False
        self._outbox: list[Connection] = []  # connections with frames queued this turn
        self._in_read = False  # inside Connection.buffer_updated: it schedules the turn end
        self._loop: asyncio.AbstractEventLoop | None = None
        self._random = b""  # urandom drawn in bulk for lease tokens
        # op name -> handler, bound once (not a getattr and an f-string per message)
        self._ops = {op: getattr(self, f"op_{op}") for op in protocol.OPERATIONS}

    # --- connections ------------------------------------------------------------------

    def new_connection(self) -> Connection:
        conn = Connection(self, next(self._numbers))
        self.connections[conn.number] = conn
        return conn

    def admit(self, conn: Connection) -> bool:
        uid = conn.peer.uid if conn.peer else -1
        same_uid = sum(1 for c in self.connections.values() if c.peer and c.peer.uid == uid)
        if uid != 0 and same_uid > self.limits.max_connections_per_uid:
            conn.send(protocol.error(None, LimitExceeded("too many connections for this uid")))
            conn.close()
            return False
        return True

    def forget(self, conn: Connection) -> None:
        """A connection closed, however it closed: reap what it held, serve the next waiter."""
        if self.connections.pop(conn.number, None) is None:
            return
        for key in conn.pending:
            self._routes.pop(key, None)
            self._want_files.discard(key)
            self._tokens.pop(key, None)
        # Disconnect first: it drops all of this connection's waiters at once, so none of
        # them is granted (and reaped straight away) while the others are cancelled.
        events = self.allocator.disconnect(conn.owner)
        for key in conn.pending:
            if key[2] != conn.owner:  # waiters filed for a holder pid
                events += self.allocator.cancel(key[2], key)
        conn.pending.clear()
        self.dispatch(events)

    # --- frames -----------------------------------------------------------------------

    def handle_frame(self, conn: Connection, frame: Any) -> None:
        rid: Any = None  # never echo an id parse_call did not accept (it may be anything)
        try:
            call = protocol.parse_call(frame)
            rid = call.id
            if not conn.greeted and call.op != "hello":
                raise ProtocolError("the first message must be 'hello'")
            result = self._ops[call.op](conn, call)
        except RpoolAgentError as exc:
            rid = protocol.request_id_of(exc) if rid is None else rid
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

    def op_hello(self, conn: Connection, call: protocol.Call) -> Any:
        conn.greet()
        from ._version import __version__

        peer = conn.peer or Holder(-1, -1, -1)
        return {
            "version": protocol.PROTOCOL_VERSION,
            "server": f"rpool-agent {__version__}",
            "pid": os.getpid(),
            "you": {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid},
        }

    def op_acquire(self, conn: Connection, call: protocol.Call) -> Any:
        args = call.args
        request = parse_request(args.get("request"))
        timeout = args.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
        ):
            raise ProtocolError("'timeout' must be a number >= 0 or null")
        label = args.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 256):
            raise ProtocolError("'label' must be a string of at most 256 characters")
        if len(conn.pending) >= self.limits.max_pending_per_connection:
            raise LimitExceeded("too many pending acquires on this connection")
        peer = conn.peer or Holder(-1, -1, -1)
        owner: Owner = conn.owner
        holder = peer
        holder_pid = args.get("holder_pid")
        if holder_pid is not None:
            holder, owner = self._pid_holder(peer, holder_pid)
        key = (conn.number, call.id, owner)
        token = args.get("token")
        if token is not None:
            if not isinstance(token, str) or not 16 <= len(token) <= 128:
                raise ProtocolError("'token' must be a string of 16 to 128 characters")
            # A retry of an acquire whose reply an agent restart cut off: that lease.
            restored = self.state.restored_lease(token) if self.state is not None else None
            if restored is not None and restored in self.allocator.leases:
                return self._rebind(conn, restored, with_token=True)
        want_files = bool(args.get("files"))
        events = self.allocator.submit(
            owner,
            key,
            request,
            now=time.monotonic(),
            timeout=timeout,
            label=label,
            holder=holder.to_dict(),
        )
        # `submit` answers with exactly one event about this request: act on it here, and
        # keep the route to this connection only for a request that waits.
        (ev,) = events
        if type(ev) is Granted:
            self._grant(conn, ev.req_id, ev.lease, holder, token, want_files)
            return _DEFERRED
        if type(ev) is Denied:
            conn.send(protocol.error(call.id, ev.error))
            return _DEFERRED
        self._routes[key] = conn
        conn.pending.add(key)
        if token is not None:
            self._tokens[key] = token
        if want_files:
            self._want_files.add(key)
        self.dispatch(events)  # Queued: tell the client, arm its timeout
        return _DEFERRED

    def _pid_holder(self, peer: Holder, pid: Any) -> tuple[Holder, Owner]:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ProtocolError("'holder_pid' must be a positive integer")
        uid = process_uid(pid)
        start = process_starttime(pid)
        if uid is None or start is None:
            raise ProtocolError(f"no process {pid}")
        if peer.uid not in (0, uid):
            raise PermissionDenied(f"process {pid} belongs to another user")
        return Holder(pid, uid, peer.gid, start), ("pid", pid, start)

    def op_cancel(self, conn: Connection, call: protocol.Call) -> Any:
        target = call.args.get("request_id")
        for key in list(conn.pending):
            if key[1] == target:
                conn.pending.discard(key)
                self._routes.pop(key, None)
                self._tokens.pop(key, None)
                self._want_files.discard(key)
                self.dispatch(self.allocator.cancel(key[2], key))
                return {"cancelled": True}
        return {"cancelled": False}

    def op_release(self, conn: Connection, call: protocol.Call) -> Any:
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
        if not lease_id.isascii():  # a restored lease's id can be anything
            return {"released": lease_id}
        # The hot reply, pre-encoded: `{"released": lease_id}`.
        conn.send_bytes(protocol.ok_json(call.id, f'{{"released":{protocol.json_str(lease_id)}}}'))
        return _DEFERRED

    def _check_may_touch(self, conn: Connection, lease: Lease) -> None:
        if lease.owner == conn.owner:
            return
        peer = conn.peer or Holder(-1, -1, -1)
        if peer.uid == 0:
            return
        if int(lease.holder.get("uid", -2)) == peer.uid:
            return
        raise NotOwner(f"lease {lease.id} belongs to another user")

    def op_status(self, conn: Connection, call: protocol.Call) -> Any:
        snap = self.allocator.snapshot()
        now = time.monotonic()
        for item in snap.get("leases", []):
            item["age_s"] = round(now - item.get("granted_at", now), 3)
            extras = self.extras.get(item["id"])
            if extras is not None:  # the current holder: a re-claim moves the lease
                item["holder"] = extras.holder.to_dict()
        for item in snap.get("waiters", []):
            item["waiting_s"] = round(now - item.get("since", now), 3)
        snap["connections"] = len(self.connections)
        return snap

    def op_pool(self, conn: Connection, call: protocol.Call) -> Any:
        fmt = call.args.get("format")
        if fmt is None:
            from .formats import to_document

            return to_document(self.pool, "canary-nodes")[0]
        from .formats import FORMATS, dumps

        if fmt not in FORMATS:
            raise ProtocolError(f"'format' must be one of {', '.join(FORMATS)}")
        return {"format": fmt, "text": dumps(self.pool, fmt)}

    def op_reclaim(self, conn: Connection, call: protocol.Call) -> Any:
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
        self._changed(lease_id)
        doc = self.lease_document(self.allocator.leases[lease_id], with_token=with_token)
        if with_token and extras.files is not None:
            doc["files"] = dataclasses.asdict(extras.files)
        return doc

    def op_drain(self, conn: Connection, call: protocol.Call) -> Any:
        self._require_admin(conn)
        rtype, rid = _resource_arg(call.args.get("resource"))
        reason = call.args.get("reason") or ""
        if not isinstance(reason, str):
            raise ProtocolError("'reason' must be a string")
        self.allocator.drain(rtype, rid, reason[:256])
        self._log(f"drain {rtype}:{rid} reason={reason!r}")
        return {"drained": f"{rtype}:{rid}"}

    def op_undrain(self, conn: Connection, call: protocol.Call) -> Any:
        self._require_admin(conn)
        rtype, rid = _resource_arg(call.args.get("resource"))
        self.dispatch(self.allocator.undrain(rtype, rid))
        self._log(f"undrain {rtype}:{rid}")
        return {"undrained": f"{rtype}:{rid}"}

    def op_reload(self, conn: Connection, call: protocol.Call) -> Any:
        self._require_admin(conn)
        return self.reload()

    def _require_admin(self, conn: Connection) -> None:
        peer = conn.peer or Holder(-1, -1, -1)
        if peer.uid == 0:
            return
        if self.admin_gid is not None and self.admin_gid in _peer_groups(conn):
            return
        raise PermissionDenied("this operation needs root or the agent's admin group")

    # --- events -> connections ------------------------------------------------------------

    def dispatch(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Granted):
                self._on_granted(ev)
            elif isinstance(ev, Denied):
                self._want_files.discard(ev.req_id)
                self._tokens.pop(ev.req_id, None)
                conn = self._routes.pop(ev.req_id, None)
                if conn is not None:
                    conn.pending.discard(ev.req_id)
                    conn.send(protocol.error(ev.req_id[1], ev.error))
            elif isinstance(ev, Queued):
                conn = self._routes.get(ev.req_id)
                if conn is not None:
                    conn.send({"id": ev.req_id[1], "event": "queued", "position": ev.position})
            elif isinstance(ev, Released):
                self._end_lease(ev.lease_id, "release")
            elif isinstance(ev, Reaped):
                for lease_id in ev.lease_ids:
                    self._end_lease(lease_id, "reap")
        self._reschedule()

    def _on_granted(self, ev: Granted) -> None:
        """A waiter's grant (a release, reap or timeout made room)."""
        conn = self._routes.pop(ev.req_id, None)
        if conn is not None:
            conn.pending.discard(ev.req_id)
        want_files = ev.req_id in self._want_files
        if want_files:
            self._want_files.discard(ev.req_id)
        token = self._tokens.pop(ev.req_id, None)
        self._grant(conn, ev.req_id, ev.lease, Holder.from_dict(ev.lease.holder), token, want_files)

    def _grant(
        self,
        conn: Connection | None,
        req_id: Any,
        lease: Lease,
        holder: Holder,
        token: str | None,
        want_files: bool,
    ) -> None:
        """Keep the lease's extras, journal it, log it, answer `conn` (if still there)."""
        extras = LeaseExtras(token=token or self._new_token(), holder=holder)
        self.extras[lease.id] = extras
        if lease.owner[0] == "pid":
            extras.pidfd = open_pidfd(holder.pid, holder.starttime)
            if extras.pidfd is None:  # the holder died while its request waited
                self._log(f"grant {lease.id} to pid={holder.pid}, which has exited")
                if conn is not None:
                    gone = UnknownLease(f"process {holder.pid} exited before the grant")
                    conn.send(protocol.error(req_id[1], gone))
                self._disconnect(lease.owner)
                return
            loop = self._running_loop()
            assert loop is not None
            loop.add_reader(extras.pidfd, self._holder_exited, lease.owner)
        if self.log_events:
            self._log(
                f"grant {lease.id} {_fmt_held(lease.held)} pid={holder.pid} "
                f"uid={holder.uid}" + (f" label={lease.label!r}" if lease.label else "")
            )
        if want_files:
            doc = self.lease_document(lease, with_token=True)
            extras.files = self._write_files(lease, doc, holder)
            doc["files"] = dataclasses.asdict(extras.files)
            self._changed(lease.id)
            if conn is not None:
                conn.send(protocol.ok(req_id[1], doc))
            return
        texts = self._grant_texts(req_id[1], lease, extras, conn)
        if texts is None:  # an unusual lease: the general encoders
            self._changed(lease.id)
            if conn is not None:
                conn.send(protocol.ok(req_id[1], self.lease_document(lease, with_token=True)))
            return
        reply, line = texts
        if self.state is not None:
            self.state.record_line(self, line)
        if self.notify is not None:
            self._notify_status()
        if conn is not None:
            conn.send_bytes(reply)

    def _grant_texts(
        self, rid: Any, lease: Lease, extras: LeaseExtras, conn: Connection | None
    ) -> tuple[bytes, str] | None:
        """(the grant reply, its journal line), from ONE set of pre-encoded pieces: the
        bytes the generic encoders would give for `lease_document` and `state.grant_line`
        (tests/test_lease_json.py), at a fraction of their cost. None for a lease they
        must build (odd types, lone surrogates)."""
        h = extras.holder
        start = h.starttime
        owner = lease.owner
        granted_at = lease.granted_at
        if type(granted_at) is not float or not (start is None or type(start) is int):
            return None
        if len(owner) == 2 and owner[0] == "conn" and type(owner[1]) is int:
            owner_json = f'"conn",{owner[1]}'
        elif all(type(x) is str or type(x) is int for x in owner):
            owner_json = ",".join(json_str(x) if type(x) is str else str(x) for x in owner)
        else:
            return None
        holder = conn.holder_json if conn is not None and h is conn.peer else None
        if holder is None:
            holder = holder_json(h)
            if conn is not None and h is conn.peer:
                conn.holder_json = holder
        lid = json_str(lease.id)
        label = "null" if lease.label is None else json_str(lease.label)
        resources = protocol.held_json(lease.held)
        request = protocol.wire_json(lease.request)
        token = json_str(extras.token)
        groups = lease.groups
        if len(groups) == 1 and len(groups[0]) == 1:  # the usual lease: one unit
            u = groups[0][0]
            t, i, n = json_str(u.type), json_str(u.id), int(u.slots)
            groups_obj = f'[[{{"type":{t},"id":{i},"slots":{n}}}]]'
            groups_list = f"[[[{t},{i},{n}]]]"
        else:
            groups_obj = protocol.slice_groups_json(groups, as_objects=True)
            groups_list = protocol.slice_groups_json(groups, as_objects=False)
        props = self._properties(lease)
        text = (
            f'{{"id":{protocol.id_json(rid)},"ok":true,"result":{{"id":{lid},"label":{label},'
            f'"resources":{resources},"groups":{groups_obj},"request":{request},'
            f'"properties":{protocol.json_value(props) if props else "{}"},'
            f'"holder":{holder},"token":{token}}}}}\n'
        )
        try:
            reply = text.encode()
        except UnicodeEncodeError:  # a lone surrogate in a label or token
            return None
        line = grant_line_of(
            lid, owner_json, request, groups_list, resources, label, holder, granted_at, token
        )
        return reply, line

    def _new_token(self) -> str:
        """What secrets.token_hex(16) returns, from urandom drawn 4 KiB at a time: one
        getrandom() per 256 grants instead of one per grant."""
        r = self._random
        if len(r) < 16:
            r = os.urandom(4096)
        self._random = r[16:]
        return r[:16].hex()

    def _write_files(self, lease: Lease, doc: dict[str, Any], holder: Holder) -> Any:
        """Per-lease pool files, readable by the holder alone, removed when the lease ends."""
        from .handoff import write_lease_files

        directory = os.path.join(self.files_dir, lease.id)
        os.makedirs(self.files_dir, mode=0o755, exist_ok=True)
        files = write_lease_files(doc, directory)
        if os.geteuid() == 0 and holder.uid > 0:
            for path in (directory, files.ctest_spec, files.pool, files.pool_nodes):
                os.chown(path, holder.uid, holder.gid)
        return files

    def _holder_exited(self, owner: Owner) -> None:
        self._disconnect(owner)

    def _disconnect(self, owner: Owner) -> None:
        """`owner` is gone: the allocator reaps its leases and drops its waiters. A holder
        process's waiters were filed by connections that are still there: each still gets
        its one reply (the allocator drops them without an event)."""
        events = self.allocator.disconnect(owner)
        if owner[0] == "pid":
            for key in [k for k in self._routes if k[2] == owner]:
                conn = self._routes.pop(key)
                conn.pending.discard(key)
                self._want_files.discard(key)
                self._tokens.pop(key, None)
                gone = UnknownLease(f"process {owner[1]} exited before the grant")
                conn.send(protocol.error(key[1], gone))
        self.dispatch(events)

    def _end_lease(self, lease_id: str, how: str) -> None:
        extras = self.extras.pop(lease_id, None)
        if extras is not None:
            if extras.pidfd is not None:
                self._close_pidfd(extras)
            if extras.files is not None:
                from .handoff import remove_lease_files

                remove_lease_files(extras.files)
        if self.log_events:
            self._log(f"{how} {lease_id}")
        if self.state is not None:
            self.state.record_end(self, lease_id)
        if self.notify is not None:
            self._notify_status()

    def _close_pidfd(self, extras: LeaseExtras) -> None:
        if extras.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(extras.pidfd)
            os.close(extras.pidfd)
            extras.pidfd = None

    def lease_document(self, lease: Lease, *, with_token: bool) -> dict[str, Any]:
        """The lease as a client sees it: ids, slots, groups and each instance's properties."""
        extras = self.extras.get(lease.id)
        doc: dict[str, Any] = {
            "id": lease.id,
            "label": lease.label,
            "resources": lease.resources(),
            "groups": [
                [{"type": s.type, "id": s.id, "slots": s.slots} for s in group]
                for group in lease.groups
            ],
            "request": lease.request.to_wire(),
            "properties": self._properties(lease),
            "holder": dict(lease.holder),
        }
        if with_token and extras is not None:
            doc["token"] = extras.token
        return doc

    def _properties(self, lease: Lease) -> dict[str, dict[str, Any]]:
        """{type: {id: properties}} of the leased instances that have any."""
        props: dict[str, dict[str, Any]] = {}
        node = self.pool.nodes[0] if self.pool.nodes else None
        if node is None:
            return props
        for s in lease.held:
            inst = node.instance(s.type, s.id)
            if inst is not None and inst.properties:
                props.setdefault(s.type, {})[s.id] = inst.properties
        return props

    # --- timers, status -------------------------------------------------------------------

    def _reschedule(self) -> None:
        deadline = self.allocator.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.dispatch(self.allocator.expire(time.monotonic()))

    def status_line(self) -> str:
        snap = self.allocator.snapshot()
        parts = [f"{v['free']} {t} free of {v['total']}" for t, v in snap["types"].items()]
        return f"{'; '.join(parts) or 'empty pool'}; {len(self.allocator.leases)} leases"

    def _changed(self, lease_id: str) -> None:
        """A lease was granted, re-bound or ended: journal it (written before any reply
        leaves, see `_flush_outbox`), tell systemd."""
        if self.state is not None:
            self.state.record(self, lease_id)
        self._notify_status()

    def _log(self, line: str, *, important: bool = False) -> None:
        """One log line per event, written once per loop turn: a busy agent makes one
        write for a burst of grants instead of one per grant. Event lines are `info`:
        `log_level: warning` (or above) keeps only the important ones."""
        if not (important or self.log_events):
            return
        self._log_lines.append(line)
        if len(self._log_lines) == 1:
            self.at_turn_end(self._flush_log)

    def at_turn_end(self, fn: Callable[[], None]) -> None:
        """Run `fn` once when this loop turn's events are handled, together with every
        other deferred flush (replies, journal, log lines) in ONE scheduled callback: a
        loop iteration per flush per message was a measurable share of a lease cycle."""
        if fn not in self._turn_end:
            self._turn_end[fn] = None
            self._schedule_turn_end()

    def _queue_output(self, conn: Connection) -> None:
        self._outbox.append(conn)
        self._schedule_turn_end()

    def _schedule_turn_end(self) -> None:
        if self._turn_end_scheduled or self._in_read:  # a read's end schedules it
            return
        loop = self._running_loop()
        if loop is None:  # no loop (start-up, shutdown, tests feeding bytes): now
            self._run_turn_end()
            return
        self._turn_end_scheduled = True
        loop.call_soon(self._run_turn_end)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop we serve on. Cached at start: `asyncio.get_running_loop()` costs a
        getpid() system call each time, twice per lease cycle."""
        loop = self._loop
        if loop is not None and loop.is_running():
            return loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def _read_finished(self) -> None:
        """A read (or a held-back part of one) is handled: end the turn if it left work."""
        self._in_read = False
        if (self._outbox or self._turn_end) and not self._turn_end_scheduled:
            self._read_done()

    def _read_done(self) -> None:
        """A read's calls are handled and left turn-end work. When no other callback is
        ready in this loop iteration, this IS the end of the turn: run it now. Else one
        `call_soon` serves every read of this iteration (8 busy clients: ~5 reads a turn,
        one journal write and one log write for all of them)."""
        loop = self._running_loop()
        if loop is None:
            self._run_turn_end()
            return
        # `_ready` is asyncio's own queue of callbacks due this turn; a loop without one
        # (another implementation) gets the plain call_soon.
        if getattr(loop, "_ready", True):
            self._turn_end_scheduled = True
            loop.call_soon(self._run_turn_end)
            return
        try:
            self._run_turn_end()
        except Exception as exc:  # as from a callback: logged, and this connection lives on
            loop.call_exception_handler({"message": "turn-end work failed", "exception": exc})

    def _run_turn_end(self) -> None:
        self._turn_end_scheduled = True  # what these flushes queue is taken by this loop
        try:
            while self._outbox or self._turn_end:
                if self._outbox:
                    self._flush_outbox()  # replies first: clients work while we log
                callbacks, self._turn_end = self._turn_end, {}
                for fn in callbacks:
                    try:
                        fn()
                    except Exception as exc:  # a bug: the other flushes still run
                        self._report_bug("turn-end work", exc)
        finally:
            self._turn_end_scheduled = False

    def _flush_outbox(self) -> None:
        """Journal lines of this turn in one write, then each connection's replies."""
        conns, self._outbox = self._outbox, []
        state = self.state
        if state is not None and state.pending:
            try:
                state.flush()  # a failed write is handled (and said) there
            except Exception as exc:  # a bug: the replies still leave, or clients hang
                self._report_bug("journal flush", exc)
        for conn in conns:
            try:
                conn.flush()
            except Exception as exc:  # a bug: the other connections' replies still leave
                self._report_bug("reply flush", exc)

    def _report_bug(self, what: str, exc: Exception) -> None:
        """Log a failure in the turn-end machinery now, not at the turn end: a failing log
        flush reported through the log flush would never stop."""
        with contextlib.suppress(Exception):
            self.log(f"{what} failed: {exc!r}")

    def _flush_log(self) -> None:
        lines, self._log_lines = self._log_lines, []
        if lines:
            self.log("\n".join(lines))

    def _notify_status(self) -> None:
        """STATUS= for systemd, coalesced: at most one per 50 ms however busy we are."""
        if self.notify is None or self._status_pending:
            return
        self._status_pending = True
        asyncio.get_running_loop().call_later(0.05, self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        if self.notify is not None:
            self.notify(f"STATUS={self.status_line()}")

    def reload(self) -> dict[str, Any]:
        if self.pool_loader is None:
            return {"reloaded": False}
        pool = self.pool_loader()
        self.pool = pool
        self.dispatch(self.allocator.set_pool(pool))
        self._log(f"reload: {pool.summary()}")
        return {"reloaded": True, "pool": pool.summary()}

    # --- lifetime ---------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (inherited from systemd) or on a socket we create."""
        loop = self._loop = asyncio.get_running_loop()
        if self.state is not None:  # before anyone can connect
            self.state.restore(self)
        if sock is None:
            sock = self._bind()
        self._server = await loop.create_unix_server(self.new_connection, sock=sock, backlog=512)
        self._reschedule()
        if self.notify is not None and self.watchdog_interval:
            self._watchdog()

    def _watchdog(self) -> None:
        """WATCHDOG=1 at the rate systemd asked for, from the loop: a stuck loop stops it."""
        assert self.notify is not None and self.watchdog_interval
        self.notify("WATCHDOG=1")
        asyncio.get_running_loop().call_later(self.watchdog_interval, self._watchdog)

    def _bind(self) -> socket.socket:
        """Create the listening socket where nobody else can swap it (docs/security.md)."""
        path = Path(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            check_socket_dir(path.parent)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISLNK(st.st_mode):
                    raise AgentUnavailable(f"{path} is a symlink; refusing to replace it")
                if not stat.S_ISSOCK(st.st_mode):
                    raise AgentUnavailable(f"{path} exists and is not a socket; refusing")
                if _answers(str(path)):
                    raise AgentUnavailable(f"another agent already listens on {path}")
                path.unlink()  # stale: left by an agent that died
            old_umask = os.umask(0o177)  # 0600 until chmod: never briefly too open
            try:
                sock.bind(str(path))
            finally:
                os.umask(old_umask)
            if self.socket_gid is not None:
                os.chown(path, -1, self.socket_gid)
            os.chmod(path, self.socket_mode)
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot listen on {path}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        self._owned_socket = True
        return sock

    def install_signal_handlers(self) -> asyncio.Event:
        """SIGTERM/SIGINT stop, SIGHUP reloads; installed before the socket is opened so
        that a signal arriving right after start-up is never taken by the default action."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        return self._stopped

    def _on_sighup(self) -> None:
        # RELOADING=1 ... READY=1 brackets the reload for systemd (`systemctl status` shows
        # "reloading"); MONOTONIC_USEC is what Type=notify-reload (systemd 253+) requires.
        if self.notify is not None:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            self.reload()
        except RpoolAgentError as exc:
            self.log(f"reload failed, keeping the old pool: {exc}")
        finally:
            if self.notify is not None:
                self.notify(f"READY=1\nSTATUS={self.status_line()}")

    async def close(self) -> None:
        self._flush_log()
        if self._server is not None:
            self._server.close()
        if self.state is not None:
            # Leases outlive a clean stop too (upgrade, `systemctl restart`): journal
            # nothing more and keep their files; the next agent re-adopts them.
            self.state.close()
            self.extras.clear()
        for conn in list(self.connections.values()):
            conn.close()
        if self._owned_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)


_DEFERRED = object()


def _resource_arg(value: Any) -> tuple[str, str]:
    if not isinstance(value, str) or ":" not in value:
        raise ProtocolError("'resource' must be 'TYPE:ID'")
    rtype, _, rid = value.partition(":")
    return rtype, rid


def _fmt_held(held: tuple[Any, ...]) -> str:
    """`cpus:0,1 gpus:3x2` for the log: slots per id, grouped by type."""
    if len(held) == 1:
        s = held[0]
        return f"{s.type}:{s.id}" + (f"x{s.slots}" if s.slots != 1 else "")
    by_type: dict[str, list[str]] = {}
    for s in held:
        by_type.setdefault(s.type, []).append(f"{s.id}" + (f"x{s.slots}" if s.slots != 1 else ""))
    return " ".join(f"{t}:" + ",".join(ids) for t, ids in by_type.items())


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python lacks the name


def _peer_groups(conn: Connection) -> set[int]:
    """The peer's groups as the kernel recorded them at connect() (SO_PEERGROUPS).

    Not /proc/<pid>/status: that pid may have exited and been reused by a process of
    someone else since. Python caps getsockopt at 1024 bytes (256 groups); a peer in more
    groups falls back to /proc, trusted only while the process start time still matches.
    """
    peer = conn.peer
    if peer is None or conn.transport is None:
        return set()
    groups = {peer.gid}
    sock = conn.transport.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        return groups | set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        with open(f"/proc/{peer.pid}/status", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return groups
    if peer.starttime is None or process_starttime(peer.pid) != peer.starttime:
        return groups
    for line in lines:
        if line.startswith(b"Groups:"):
            groups.update(int(g) for g in line.split()[1:])
    return groups


def check_socket_dir(directory: str | os.PathLike[str]) -> None:
    """Refuse a socket directory that someone else could use to swap our socket.

    The directory (symlinks resolved) must be owned by root or by us and writable by its
    owner alone: others-writable is refused even with the sticky bit, since in a /tmp-like
    directory anyone may create the name before we start or after we stop, and clients
    would then talk to an impostor. Each directory above it must be owned by root or us
    and, if others can write it, sticky (so /tmp/<ours>/agent.sock is fine).
    """
    real = Path(os.path.realpath(directory))
    me = os.geteuid()
    for n, d in enumerate([real, *real.parents]):
        st = d.stat()
        if st.st_uid not in (0, me):
            raise AgentUnavailable(f"{d} belongs to uid {st.st_uid}; refusing to listen under it")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if n == 0 and writable:
            raise AgentUnavailable(
                f"{d} is writable by group or others; give the socket a directory of its own"
            )
        if writable and not st.st_mode & stat.S_ISVTX:
            raise AgentUnavailable(f"{d} is writable by group or others and not sticky; refusing")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def run_server(server: Server, sock: socket.socket | None = None) -> None:
    """Start, say READY once the socket accepts, serve until SIGTERM/SIGINT, stop cleanly."""

    async def main() -> None:
        stopped = server.install_signal_handlers()
        await server.start(sock)
        if server.notify is not None:
            server.notify(f"READY=1\nSTATUS={server.status_line()}")
        server.log(f"serving {server.pool.summary()} on {server.socket_path}")
        try:
            await stopped.wait()
        finally:
            if server.notify is not None:
                server.notify("STOPPING=1")
            await server.close()
            server.log("stopped")

    asyncio.run(main())
