"""The synchronous client: `Client` speaks to the agent, `Lease` is what it grants.

Plain blocking sockets on purpose: a test harness or `rpool-agent run` pays no asyncio
import and no event loop. A lease belongs to this connection: close the connection (or
let the process die) and the agent reaps it. If the agent restarts while leases are held,
the client reconnects and re-claims them by id and token on its next call.

    with Client() as c, c.acquire(gpus=1, cpus=2, timeout=60, label="test_foo") as lease:
        subprocess.run(cmd, env=lease.env())
"""

from __future__ import annotations

import itertools
import os
import socket
import time

from . import protocol
from .errors import AgentUnavailable, ProtocolError, RequestError, RpoolAgentError, UnknownLease

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

    from .client_lease import Lease

#: Replies can be far larger than requests (`status` of a busy node lists every lease and
#: waiter); the agent is trusted, so the client's bound is only against a runaway stream.
MAX_REPLY_BYTES = 64 * 1024 * 1024


def __getattr__(name: str) -> Any:
    """`Lease` lives in client_lease.py: `rpool-agent run` never makes one (no dataclasses)."""
    if name == "Lease":
        from .client_lease import Lease

        return Lease
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_socket_path() -> str:
    from .paths import client_socket_path

    return client_socket_path()


class Client:
    """A connection to the agent. Not thread-safe: one per thread."""

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        connect_timeout: float = 5.0,
        reconnect_timeout: float = 30.0,
    ) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self._sock: socket.socket | None = None
        self._decoder = protocol.FrameDecoder(MAX_REPLY_BYTES)
        self._frames: list[Any] = []
        self._ids = itertools.count(1)
        self._held: dict[str, str | None] = {}  # lease id -> its token, to re-claim it
        self._lost: set[str] = set()  # held leases the agent no longer had after a restart
        self._on_event: Any = None  # called with each event frame of the call in progress
        self.server_info: dict[str, Any] = {}

    # --- connection ---------------------------------------------------------------------

    def connect(self) -> Client:
        if self._sock is not None:
            return self
        sock = self._open_socket()
        sock.settimeout(None)
        self._sock = sock
        self._decoder = protocol.FrameDecoder(MAX_REPLY_BYTES)
        self._frames = []
        try:
            self.server_info = self._call_once(
                "hello", {"version": protocol.PROTOCOL_VERSION, "client": "rpool-agent-client"}
            )
        except _ConnectionLost:
            self.close()
            raise AgentUnavailable(f"the agent at {self.socket_path} hung up") from None
        return self

    def _open_socket(self) -> socket.socket:
        """Connect; while the socket file is there but refuses (an agent restarting after a
        crash), keep trying for `connect_timeout` seconds rather than fail a job at once."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(self.socket_path)
                return sock
            except ConnectionRefusedError as exc:
                sock.close()
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                reason = exc.strerror or str(exc)
            except FileNotFoundError as exc:
                sock.close()
                reason = exc.strerror or str(exc)
            except PermissionError as exc:
                sock.close()
                raise AgentUnavailable(permission_hint(self.socket_path, exc)) from None
            except OSError as exc:
                sock.close()
                raise AgentUnavailable(f"cannot connect to {self.socket_path}: {exc}") from None
            raise AgentUnavailable(
                f"no agent at {self.socket_path} ({reason}); "
                "start one with 'rpool-agent serve' or set RPOOL_AGENT_SOCKET"
            )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def fileno(self) -> int:
        """The connection's fd: a process holding it open keeps its leases alive."""
        self.connect()
        assert self._sock is not None
        return self._sock.fileno()

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls --------------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        """Send one call, wait for its reply. If the agent restarts meanwhile: reconnect
        (for up to `reconnect_timeout` s), re-claim the leases held, send the call again.

        An acquire carries the token its lease will have, so one that was granted just
        before the restart, reply lost, comes back as that lease rather than a second one.
        """
        self.connect()
        while True:
            try:
                return self._call_once(op, args)
            except _ConnectionLost:
                self.close()
            # from the loss, not from the call: an acquire may have waited for an hour
            self._reconnect(time.monotonic() + self.reconnect_timeout)

    def _reconnect(self, deadline: float) -> None:
        while True:
            try:
                self.connect()
                for lease_id, token in list(self._held.items()):
                    try:
                        self._call_once("reclaim", {"lease": lease_id, "token": token})
                    except RpoolAgentError:
                        self._held.pop(lease_id, None)  # ended while we were away
                        self._lost.add(lease_id)
                return
            except (AgentUnavailable, _ConnectionLost):
                self.close()
                if time.monotonic() > deadline:
                    msg = f"the agent at {self.socket_path} went away and did not come back"
                    raise AgentUnavailable(msg) from None
                time.sleep(0.05)

    def _call_once(self, op: str, args: dict[str, Any]) -> Any:
        rid = next(self._ids)
        msg = {"id": rid, "op": op, **{k: v for k, v in args.items() if v is not None}}
        sock = self._sock
        if sock is None:
            raise _ConnectionLost()
        try:
            sock.sendall(protocol.encode(msg))
        except OSError:
            raise _ConnectionLost() from None
        while True:
            reply = self._next_frame()
            if isinstance(reply, dict) and reply.get("id") == rid:
                if "event" not in reply:
                    return protocol.raise_for_reply(reply)
                if self._on_event is not None:
                    self._on_event(reply)
            if isinstance(reply, dict) and reply.get("id") is None and reply.get("ok") is False:
                protocol.raise_for_reply(reply)  # the server refused us as a whole

    def _next_frame(self) -> Any:
        assert self._sock is not None
        while not self._frames:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                raise _ConnectionLost()
            self._frames.extend(self._decoder.feed(data))
        frame = self._frames.pop(0)
        if isinstance(frame, ProtocolError):
            raise frame
        return frame

    # --- operations ---------------------------------------------------------------------

    def acquire(self, request: Any = None, **kwargs: Any) -> Lease:
        """Lease resources; blocks until granted, `timeout` (seconds) runs out, or refusal.

        `request` takes any of the three forms (canary item list, `{type: n}` mapping,
        CTest RESOURCE_GROUPS string); or give counts: `gpus=2, cpus=4`. `timeout=0` never
        waits; None waits as long as it takes. `label`, `holder_pid`, `files` and
        `on_event` (called with each event the agent sends while the acquire waits,
        `{"event": "queued", "position": n}`) are `acquire_document`'s.
        """
        from .client_lease import Lease

        return Lease(self.acquire_document(request, **kwargs), self)

    def acquire_document(
        self,
        request: Any = None,
        *,
        gpus: int | None = None,
        cpus: int | None = None,
        timeout: float | None = None,
        label: str | None = None,
        holder_pid: int | None = None,
        files: bool = False,
        on_event: Any = None,
        **counts: int,
    ) -> dict[str, Any]:
        """`acquire`, returning the grant document itself (docs/protocol.md), not a `Lease`:
        what `rpool-agent run` needs to build the environment. The lease is this
        connection's all the same: it ends with the connection, or with `release(id)`.

        `request` takes any of the three forms (canary item list, `{type: n}` mapping,
        CTest RESOURCE_GROUPS string); or give counts: `gpus=2, cpus=4`. `timeout=0` never
        waits; None waits as long as it takes. `on_event` is called with each event the
        agent sends while the acquire waits (`{"event": "queued", "position": n}`).
        """
        if request is None:
            wanted = {k: v for k, v in {"gpus": gpus, "cpus": cpus, **counts}.items() if v}
            request = wanted
        timeout = _wire_timeout(timeout)
        self._on_event = on_event
        try:
            doc = self.call(
                "acquire",
                request=request,
                timeout=timeout,
                # a label from argv or a file name may hold undecodable bytes (as lone
                # surrogates), which the agent refuses as no text
                label=protocol.valid_text(label) if label is not None else None,
                holder_pid=holder_pid,
                files=files or None,
                token=os.urandom(16).hex(),
            )
        finally:
            self._on_event = None
        self._held[str(doc["id"])] = doc.get("token")
        return doc

    def release(self, lease_id: str) -> None:
        try:
            self.call("release", lease=lease_id)
        except UnknownLease:
            if lease_id not in self._lost:  # else: ended while the agent restarted
                raise
        self._held.pop(lease_id, None)

    def status(self, *, limit: int | None = None, all: bool = False) -> dict[str, Any]:
        """The status document (docs/status.md): a bounded page of leases and waiters
        (`limit` of each, default the agent's), or everything with `all`."""
        args: dict[str, Any] = {"all": True} if all else {}
        if limit is not None:
            args["limit"] = limit
        return self.call("status", **args)

    def pool(self, format: str | None = None) -> Any:
        return self.call("pool", format=format)

    def drain(self, resource: str, reason: str = "") -> Any:
        return self.call("drain", resource=resource, reason=reason)

    def undrain(self, resource: str) -> Any:
        return self.call("undrain", resource=resource)

    def reload(self) -> Any:
        return self.call("reload")


def _wire_timeout(timeout: Any) -> float | None:
    """A timeout as the protocol takes it: JSON has no NaN or Infinity, so infinity is
    sent as None (wait as long as it takes) and NaN is refused here, in plain words."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise RequestError(f"timeout must be a number of seconds >= 0 or None, not {timeout!r}")
    return None if timeout == float("inf") else timeout


class _ConnectionLost(Exception):
    """Internal: the agent closed the connection (restart, crash)."""


def permission_hint(path: str, exc: OSError) -> str:
    """A refused connection, with what to do: join the socket's group (the agent admits
    that group's members), or, where the socket cannot even be seen, its directory's."""
    import grp

    for where in (path, os.path.dirname(path)):
        try:
            gid = os.stat(where).st_gid
        except OSError:
            continue
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
        return (
            f"cannot connect to {path}: {exc.strerror}; the agent admits members of group"
            f" {group}: ask an admin to add you (usermod -aG {group} USER), then log in"
            " again, or start your own agent (rpool-agent serve) and set RPOOL_AGENT_SOCKET"
        )
    return f"cannot connect to {path}: {exc.strerror}"
