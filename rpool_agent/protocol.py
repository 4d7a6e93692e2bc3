"""The wire protocol, sans I/O: newline-delimited JSON frames, at most 64 KiB each.

The server and the client both feed received bytes into a `FrameDecoder` and get whole
messages back; they encode with `encode`. Nothing here touches a socket, so the codec is
tested with bare calls and the same rules hold on both ends. docs/protocol.md is the
reference for every operation and error code.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring
from typing import Any, NamedTuple

from .errors import (
    MessageTooLarge,
    ProtocolError,
    RpoolAgentError,
    UnknownOperation,
    VersionMismatch,
)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024

#: Every operation, with the argument names it takes (anything else is refused).
OPERATIONS: dict[str, frozenset[str]] = {
    "hello": frozenset({"version", "client"}),
    "acquire": frozenset({"request", "timeout", "label", "holder_pid", "files", "token"}),
    "release": frozenset({"lease"}),
    "cancel": frozenset({"request_id"}),
    "reclaim": frozenset({"lease", "token"}),
    "status": frozenset(),
    "pool": frozenset({"format"}),
    "drain": frozenset({"resource", "reason"}),
    "undrain": frozenset({"resource"}),
    "reload": frozenset(),
}

# No circular check: every message is a tree built here from JSON-able values.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)

#: A str as `encode` writes it (quoted, escaped, non-ASCII kept): lets the hot replies be
#: built by concatenation, byte for byte what `encode` would write (tests check it).
json_str = encode_basestring
json_value = _encoder.encode


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
    """One frame: compact JSON and a newline."""
    text = _encoder.encode(message) + "\n"
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate a peer sent us ("\ud800"): escape it
        return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class FrameDecoder:
    """Splits a byte stream into JSON frames; bounded memory whatever the peer sends.

    `feed` returns each complete frame as a decoded object, or as a `ProtocolError`
    instance when that frame is not valid JSON (the connection can go on). A frame longer
    than `limit` raises `MessageTooLarge`, whose `frames` holds the whole frames that came
    before it in the same read (to be answered still); then the caller must close the
    connection, since the stream can no longer be trusted to resynchronise.
    """

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.limit = limit
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Any]:
        # The usual read: one whole object frame and nothing else (JSON allows the
        # trailing newline, so the frame is decoded as it came).
        if (
            not self._buf
            and data[:1] == b"{"
            and data.find(b"\n") == len(data) - 1
            and len(data) <= self.limit
        ):
            return [decode_frame(data)]
        buf = self._buf + data if self._buf else data
        *lines, rest = buf.split(b"\n")
        self._buf = b""
        out: list[Any] = []
        for line in lines:
            if len(line) > self.limit:
                raise self._too_large(out)
            if line.strip():
                out.append(decode_frame(line))
        if len(rest) > self.limit:
            raise self._too_large(out)
        self._buf = rest
        return out

    def _too_large(self, frames: list[Any]) -> MessageTooLarge:
        exc = MessageTooLarge(f"message exceeds {self.limit} bytes")
        exc.frames = frames  # type: ignore[attr-defined]
        return exc


_scan_once = _decoder.scan_once


def decode_frame(line: bytes) -> Any:
    # Fast path: the C scanner on its own, accepted when the value spans the whole frame
    # (a trailing newline allowed). Anything else, errors included, goes the full way, so
    # every message and every refusal is what `_decode` says.
    try:
        text = line.decode()
        obj, end = _scan_once(text, 0)
    except (ValueError, StopIteration, RecursionError):
        pass
    else:
        n = len(text)
        if end == n or (end == n - 1 and text[end] == "\n"):
            return obj
    try:
        return _decode(line.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        return ProtocolError(f"malformed message: {detail[:200]}")


class Call(NamedTuple):
    """A validated client request: `{"id": ..., "op": ..., **args}`. A named tuple, not a
    frozen dataclass: one is built per message, and a tuple is built in a third the time."""

    id: int | str | None
    op: str
    args: dict[str, Any]


# An int id is "short" when its decimal text has at most 64 characters (sign included).
_ID_MIN, _ID_LIMIT = -(10**63), 10**64


def parse_call(frame: Any) -> Call:
    """Check a decoded frame's shape; raise a `ProtocolError` subclass naming the problem."""
    # The fast path: a well-formed call of the usual kind, checked with exact types only;
    # everything else (errors, "hello", odd types) takes the full path below.
    if type(frame) is dict:
        rid = frame.get("id")
        kind = type(rid)
        if (
            rid is None
            or (kind is int and _ID_MIN < rid < _ID_LIMIT)
            or (kind is str and len(rid) <= 64)
        ):
            op = frame.get("op")
            allowed = OPERATIONS.get(op) if type(op) is str and op != "hello" else None
            if allowed is not None:
                args = frame.copy()
                del args["op"]
                args.pop("id", None)
                if allowed.issuperset(args):
                    return Call(rid, op, args)
    return _parse_call(frame)


def _parse_call(frame: Any) -> Call:
    if isinstance(frame, ProtocolError):
        raise frame
    if not isinstance(frame, dict):
        raise ProtocolError("a message must be a JSON object")
    rid = frame.get("id")
    if rid is not None and (
        isinstance(rid, bool) or not isinstance(rid, (int, str)) or len(str(rid)) > 64
    ):
        raise ProtocolError("'id' must be an integer or a short string")
    op = frame.get("op")
    if not isinstance(op, str):
        raise _tagged(ProtocolError("'op' must be a string"), rid)
    allowed = OPERATIONS.get(op)
    if allowed is None:
        raise _tagged(UnknownOperation(f"unknown operation {op[:40]!r}"), rid)
    args = {k: v for k, v in frame.items() if k not in ("id", "op")}
    extra = sorted(set(args) - allowed)
    if extra:
        raise _tagged(ProtocolError(f"{op}: unexpected field {extra[0][:40]!r}"), rid)
    if op == "hello":
        version = args.get("version")
        if version != PROTOCOL_VERSION:
            msg = f"protocol version {str(version)[:20]} not supported"
            msg += f" (server speaks {PROTOCOL_VERSION})"
            raise _tagged(VersionMismatch(msg), rid)
    return Call(rid, op, args)


def _tagged(exc: RpoolAgentError, rid: Any) -> RpoolAgentError:
    exc.request_id = rid  # type: ignore[attr-defined]
    return exc


def request_id_of(exc: BaseException) -> Any:
    """The id of the frame a `parse_call` error is about, so the reply can carry it."""
    return getattr(exc, "request_id", None)


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


def id_json(rid: Any) -> str:
    """A call id (`parse_call` let through None, an int or a short str) as JSON."""
    kind = type(rid)
    if kind is int:
        return str(rid)
    if kind is str:
        return json_str(rid)
    return json_value(rid)


def ok_json(rid: Any, result_json: str) -> bytes:
    """`encode(ok(rid, result))` for a result already in JSON (ASCII or valid UTF-8)."""
    return f'{{"id":{id_json(rid)},"ok":true,"result":{result_json}}}\n'.encode()
