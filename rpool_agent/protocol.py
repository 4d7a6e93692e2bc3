"""The wire protocol, sans I/O: newline-delimited JSON frames, at most 64 KiB each.

The server and the client both feed received bytes into a `FrameDecoder` and get whole
messages back. The client encodes with `encode` and decodes with the stdlib's json; the
agent brings its own codec (codec.py) to the same decoder and rules. Nothing here touches
a socket, so the codec is tested with bare calls and the same rules hold on both ends.
docs/protocol.md is the reference for every operation and error code.
"""

from __future__ import annotations

import json

from .errors import MessageTooLarge, ProtocolError, RpoolAgentError

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

#: Every operation, with the argument names it takes (anything else is refused).
OPERATIONS: dict[str, frozenset[str]] = {
    "hello": frozenset({"version", "client"}),
    "acquire": frozenset({"request", "timeout", "label", "holder_pid", "files", "token"}),
    "release": frozenset({"lease"}),
    "cancel": frozenset({"request_id"}),
    "reclaim": frozenset({"lease", "token"}),
    "status": frozenset({"limit", "all"}),
    "pool": frozenset({"format"}),
    "drain": frozenset({"resource", "reason"}),
    "undrain": frozenset({"resource"}),
    "reload": frozenset(),
}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf or nan: 1e999 parses as inf
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# Strict JSON: NaN, Infinity and numbers that overflow to them are malformed, so no
# non-finite number ever reaches a deadline or an answer.
_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)
_decode = _decoder.decode


def encode(message: dict[str, Any]) -> bytes:
    """One frame: compact JSON and a newline.

    ASCII only (`\\uXXXX` escapes): always valid UTF-8, even for a lone surrogate a peer
    sent us in a label and gets back in a reply.
    """
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class FrameDecoder:
    """Splits a byte stream into JSON frames; bounded memory whatever the peer sends.

    `feed` returns each complete frame as a decoded object, or as a `ProtocolError`
    instance when that frame is not valid JSON (the connection can go on). A frame longer
    than `limit` raises `MessageTooLarge`, whose `frames` holds the whole frames that came
    before it in the same read (to be answered still); then the caller must close the
    connection, since the stream can no longer be trusted to resynchronise.
    """

    __slots__ = ("_buf", "_decode", "limit")

    def __init__(
        self, limit: int = MAX_MESSAGE_BYTES, decode: Callable[[bytes], Any] | None = None
    ) -> None:
        self.limit = limit
        self._decode = decode or decode_frame  # the agent passes codec.decode_frame
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        buf = self._buf + data if self._buf else data
        *lines, rest = buf.split(b"\n")
        self._buf = b""
        out: list[Any] = []
        decode = self._decode
        for line in lines:
            if len(line) > self.limit:
                raise self._too_large(out)
            if line.strip():
                out.append(decode(line))
        if len(rest) > self.limit:
            raise self._too_large(out)
        self._buf = rest
        return out

    def _too_large(self, frames: list[Any]) -> MessageTooLarge:
        exc = MessageTooLarge(f"message exceeds {self.limit} bytes")
        exc.frames = frames  # type: ignore[attr-defined]
        return exc


def decode_frame(line: bytes) -> Any:
    """One frame's object, or a `ProtocolError` saying why it is not one."""
    try:
        return _decode(line.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        return ProtocolError(f"malformed message: {detail[:200]}")


def valid_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD: the agent's codec writes UTF-8,
    and names read from the system (a process name of any bytes, decoded with
    surrogateescape) or from an older journal (which escaped any string) may hold them."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def ok(rid: Any, result: Any = None) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def error(rid: Any, exc: RpoolAgentError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": exc.code, "message": str(exc)}}


def raise_for_reply(reply: dict[str, Any]) -> Any:
    """Client side: the result of an ok reply, or the typed exception the server meant."""
    if reply.get("ok"):
        return reply.get("result")
    from .errors import error_for_code

    err = reply.get("error") or {}
    cls = error_for_code(str(err.get("code", "error")))
    raise cls(str(err.get("message", "unknown error")))
