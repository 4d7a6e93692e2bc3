"""The lease daemon: an asyncio shell around the pure allocator and the sans-IO codec.

Three parts, each its own module: `connection` (reads, backpressure, the reply queue),
`service` (the `op_*` handlers and the events they cause) and `listener` (the socket and
peer identity). This one ties them to the loop: it keeps every connection, runs the end
of each loop turn (the journal is written once, then every queued reply), the timers,
signals and systemd notifications.

Sockets, SO_PEERCRED, timers, logging and sd_notify live here and in those modules; no
allocation decision does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from . import protocol
from .allocator import Allocator
from .connection import Connection, Limits
from .errors import LimitExceeded, RpoolAgentError
from .journal import lease_record
from .listener import bind_socket, check_socket_dir
from .monitor import Monitor
from .pidwatch import PidWatch
from .pool import Pool
from .restore import restore_leases
from .service import LeaseExtras, Pending, Service, uncount

_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

__all__ = ["Connection", "LeaseExtras", "Limits", "Server", "check_socket_dir", "run_server"]


def _log_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Server(Service):
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
        gpu_health: Any = None,
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
        self.gpu_health = gpu_health  # gpu_health.GpuHealth: drains GPUs that fail
        self.allocator = Allocator(pool, new_lease_id=self._new_lease_id)
        self.connections: dict[int, Connection] = {}
        self.extras: dict[str, LeaseExtras] = {}
        self.pids = PidWatch(self._holder_exited)  # one pidfd per holder process
        self.waiting: set[Pending] = set()  # acquires that wait, each routed to its conn
        self.uid_connections: Counter[int] = Counter()
        self.uid_leases: Counter[int] = Counter()
        self.uid_waiting: Counter[int] = Counter()
        self._numbers = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._owned_socket = False
        self._accept_warned = 0.0  # monotonic time before which accept() errors stay unsaid
        self._status_pending = False
        self._log_lines: list[str] = []
        self._turn_end: dict[Callable[[], None], None] = {}
        self._turn_end_scheduled = False
        self._outbox: list[Connection] = []  # connections with frames queued this turn
        self._in_read = False  # inside Connection.buffer_updated: it schedules the turn end
        # op name -> handler, bound once (not a getattr and an f-string per message)
        self._ops = {op: getattr(self, f"op_{op}") for op in protocol.OPERATIONS}
        self.monitor = Monitor(self)

    # --- connections ------------------------------------------------------------------

    def new_connection(self) -> Connection:
        conn = Connection(self, next(self._numbers))
        self.connections[conn.number] = conn
        return conn

    def admit(self, conn: Connection) -> bool:
        """Count the connection under its uid, or refuse it over the uid's cap (root's
        too: a leaking root job must not grow the agent without bound)."""
        uid = conn.peer.uid if conn.peer else -1
        cap = self.limits.max_connections_root if uid == 0 else self.limits.max_connections_per_uid
        if self.uid_connections[uid] >= cap:
            conn.send(protocol.error(None, LimitExceeded("too many connections for this uid")))
            conn.close()
            return False
        self.uid_connections[uid] += 1
        conn.counted_uid = uid
        return True

    def forget(self, conn: Connection) -> None:
        """A connection closed, however it closed: reap what it held, serve the next waiter."""
        if self.connections.pop(conn.number, None) is None:
            return
        if conn.counted_uid is not None:
            uncount(self.uid_connections, conn.counted_uid)
            conn.counted_uid = None
        pending = list(conn.pending.values())
        for p in pending:
            self._unroute(p)
        # Disconnect first: it drops all of this connection's waiters at once, so none of
        # them is granted (and reaped straight away) while the others are cancelled.
        events = self.allocator.disconnect(conn.owner)
        for p in pending:
            if p.owner != conn.owner:  # waiters filed for a holder pid
                events += self.allocator.cancel(p.owner, p)
        self.dispatch(events)

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
        usage = self.allocator.free_of_total().items()
        parts = [f"{free} {t} free of {total}" for t, (free, total) in usage]
        return f"{'; '.join(parts) or 'empty pool'}; {len(self.allocator.leases)} leases"

    def _changed(self, lease_id: str) -> None:
        """A lease was granted, re-bound or ended: journal it (written before any reply
        leaves, see `_flush_outbox`), tell systemd."""
        state = self.state
        if state is not None:
            lease = self.allocator.leases.get(lease_id)
            extras = self.extras.get(lease_id)
            if lease is not None and extras is not None:
                state.record_grant(lease_id, lease_record(lease, extras))
            else:
                state.record_end(lease_id)
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
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (start-up, shutdown, tests feeding bytes): now
            self._run_turn_end()
            return
        self._turn_end_scheduled = True
        loop.call_soon(self._run_turn_end)

    def _read_finished(self) -> None:
        """A read (or a held-back part of one) is handled: end the turn if it left work.
        One `call_soon` serves every read of this loop iteration (several busy clients:
        one journal write and one log write for all of their calls)."""
        self._in_read = False
        if self._outbox or self._turn_end:
            self._schedule_turn_end()

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
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        if self.state is not None:  # before anyone can connect
            restore_leases(self, self.state)
        if sock is None:
            sock = self._bind()
        self._server = await loop.create_unix_server(self.new_connection, sock=sock, backlog=512)
        self._reschedule()
        self.monitor.start()  # periodic GPU audit and metrics file, when configured
        if self.notify is not None and self.watchdog_interval:
            self._watchdog()
        if self.gpu_health is not None:
            self.gpu_health.start(self)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's report of a failed callback. Out of descriptors at accept(), asyncio
        itself stops accepting for a second and tries again: say so in one line (once a
        minute at most), not with a traceback per try."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            now = time.monotonic()
            if now >= self._accept_warned:
                self._accept_warned = now + 60.0
                self._log(
                    f"cannot accept connections: {exc.strerror}; retrying each second "
                    "(raise LimitNOFILE, or look for a client that leaks connections)",
                    important=True,
                )
            return
        loop.default_exception_handler(context)

    def _watchdog(self) -> None:
        """WATCHDOG=1 at the rate systemd asked for, from the loop: a stuck loop stops it."""
        assert self.notify is not None and self.watchdog_interval
        self.notify("WATCHDOG=1")
        asyncio.get_running_loop().call_later(self.watchdog_interval, self._watchdog)

    def _bind(self) -> socket.socket:
        sock = bind_socket(self.socket_path, self.socket_gid, self.socket_mode)
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
        await self.monitor.stop()
        self._flush_log()
        if self.gpu_health is not None:
            self.gpu_health.stop()
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
