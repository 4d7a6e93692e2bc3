"""The agent's JSON codec: every call it reads, every reply and journal record it writes.

msgspec rather than the stdlib's `json`: a lease cycle decodes two calls and encodes two
replies and two journal records, and with `json` those six steps were a large share of
the agent's work per cycle (bench/lease.py; docs/protocol.md has the figures). msgspec
is strict where the protocol wants strictness: NaN, Infinity and numbers that overflow to
them, invalid UTF-8 and lone surrogates are all malformed.

Only the agent imports it. Clients (`rpool-agent run`, the Python API) speak the same
newline-delimited JSON through the stdlib (protocol.py): importing msgspec would add to
the start-up of every `run`. Each message has one encoder: the client's calls are
encoded by the client, the agent's replies and records by this module.

Its output is UTF-8, not ASCII: every string the agent sends is valid UTF-8 because the
calls it decodes are, and what it reads from the system (process and user names, which
may hold any bytes) is made valid where it is read (procinfo.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import ProtocolError

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def encode_frame(message: Any) -> bytes:
    """One frame: compact JSON and a newline."""
    return _encode(message) + b"\n"


def encode(obj: Any) -> bytes:
    """Compact JSON, no newline (a journal record's body)."""
    return _encode(obj)


def decode_frame(line: bytes) -> Any:
    """One frame's object, or a `ProtocolError` saying why it is not one."""
    try:
        return _decode(line)
    except msgspec.DecodeError as exc:  # ValidationError (a number out of range) too
        return ProtocolError(f"malformed message: {str(exc)[:200]}")
    except RecursionError:
        return ProtocolError("malformed message: nested too deeply")
