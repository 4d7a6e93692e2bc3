"""A client's call as the server reads it: `parse_call` checks a decoded frame's shape
and gives a `Call`, or raises a `ProtocolError` subclass that carries the frame's id.

Apart from protocol.py (the codec both ends share) so that the client, and with it every
`rpool-agent run`, imports no dataclasses (tests/test_run_cli.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ProtocolError, RpoolAgentError, UnknownOperation, VersionMismatch
from .protocol import OPERATIONS, PROTOCOL_VERSION

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


@dataclass(frozen=True, slots=True)
class Call:
    """A validated client request: `{"id": ..., "op": ..., **args}`."""

    id: int | str | None
    op: str
    args: dict[str, Any]


def parse_call(frame: Any) -> Call:
    """Check a decoded frame's shape; raise a `ProtocolError` subclass naming the problem."""
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
    args = frame.copy()
    del args["op"]
    args.pop("id", None)
    if not args.keys() <= allowed:
        extra = min(args.keys() - allowed)
        raise _tagged(ProtocolError(f"{op}: unexpected field {extra[:40]!r}"), rid)
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
