"""One client connection: bytes in, frames to the service, replies out at the turn end.

Each connection runs wsproto's three steps: 1) bytes from the socket go into the frame
decoder, 2) each call goes to the server (the allocator answers with events), 3) each
reply is queued and leaves at the end of the loop turn, after the journal. A peer that
sends faster than it reads is paused (backpressure) instead of growing our buffers.

`asyncio.BufferedProtocol` rather than streams: it reads into one buffer and costs a
fraction of a StreamReader per message (see bench/lease.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from . import codec, protocol
from .errors import MessageTooLarge, ProtocolError
from .holders import Holder, peer_credentials

Owner = tuple[Any, ...]


@dataclass
class Limits:
    """Per-connection and per-uid limits: nothing a client sends may grow memory unbounded."""

    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    max_pending_per_connection: int = 16
    max_connections_per_uid: int = 64
    max_connections_root: int = 1024  # root is trusted, but its leaks must not grow us
    max_leases_per_uid: int = 1024  # held and waiting together, empty requests included
    max_waiting_per_uid: int = 256
    handshake_timeout: float = 10.0
    # Replies one connection may have queued before the rest of its read waits: 64 KiB of
    # pipelined `status` calls would otherwise queue thousands of large replies at once.
    max_reply_backlog: int = 256 << 10


#: The bytes of one read, for every connection: a read is handled (copied into that
#: connection's decoder) before the loop reads anything else, so one buffer serves all,
#: and an idle connection costs no read buffer of its own.
_READ_BUFFER = bytearray(protocol.MAX_MESSAGE_BYTES)
_READ_VIEW = memoryview(_READ_BUFFER)


@dataclass(slots=True, eq=False)
class Connection(asyncio.BufferedProtocol):
    server: Any  # the Server: handle_frame, admit, forget and the turn-end queue
    number: int
    transport: asyncio.Transport | None = None
    peer: Holder | None = None
    greeted: bool = False
    counted_uid: int | None = None  # the uid whose connection count includes this one
    pending: dict[Any, Any] = field(default_factory=dict)  # call id -> its waiting acquire
    _out: list[bytes] = field(default_factory=list)  # frames queued this loop turn
    _out_bytes: int = 0  # their size
    _backlog: tuple[list[Any], Any] | None = None  # (frames, too_large) held back
    _writing_paused: bool = False  # the transport's buffer is over its high-water mark
    _handshake_timer: asyncio.TimerHandle | None = None

    owner: Owner = field(init=False)  # ("conn", number): the allocator's key for us
    decoder: protocol.FrameDecoder = field(init=False)  # the agent's codec, its size limit

    def __post_init__(self) -> None:
        self.owner = ("conn", self.number)
        self.decoder = protocol.FrameDecoder(
            self.server.limits.max_message_bytes, codec.decode_frame
        )

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            self.peer = peer_credentials(sock)
        except OSError:
            self.peer = Holder(-1, -1, -1)
        if not self.server.admit(self):
            return
        loop = asyncio.get_running_loop()
        self._handshake_timer = loop.call_later(
            self.server.limits.handshake_timeout, self._handshake_expired
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

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
            frames = self.decoder.feed(_READ_BUFFER[:nbytes])  # a copy: the buffer is shared
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
        self.send_bytes(codec.encode_frame(message))

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

    def replace_frame(self, old: bytes, new: bytes) -> None:
        """Send `new` instead of the queued frame `old` (the very object), if still queued:
        a grant whose journal line could not be written is answered with an error."""
        for i, frame in enumerate(self._out):
            if frame is old:
                self._out[i] = new
                self._out_bytes += len(new) - len(old)
                return

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
                asyncio.get_running_loop().call_soon(self._resume_backlog)
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
