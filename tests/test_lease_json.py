"""The small reply builders write byte for byte what the generic encoder writes."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from rpool_agent import protocol


@pytest.mark.parametrize("rid", [None, 0, -5, 10**40, "", "r-1", 'q"é\u2603\n'])
@pytest.mark.parametrize(
    "result",
    [
        {"released": "ab12-3f"},
        {"pid": 1, "uid": 0, "gid": 0, "starttime": None},
        {"pid": 1, "name": 'x"é', "n": -3},
        {"nested": {"a": 1}, "f": 1.5, "b": True},
    ],
)
def test_small_reply_builders_equal_encode(rid: Any, result: dict[str, Any]) -> None:
    assert protocol.id_json(rid) == protocol.json_value(rid)
    expected = protocol.encode(protocol.ok(rid, result))
    assert protocol.ok_json(rid, protocol.json_value(result)) == expected


def test_parse_call_fast_path_agrees_with_the_full_checks() -> None:
    """The fast path takes only well-formed calls; everything else must come out exactly
    as the full path says (same Call, or same error, message and tagged id)."""
    ids: list[Any] = [None, 0, -1, True, 1.5, "x", "x" * 64, "x" * 65, 10**64 - 1, 10**64]
    ids += [-(10**63) + 1, -(10**63), [1], {}]
    ops: list[Any] = [None, "acquire", "hello", "nope", 1, "status", "release"]
    extras: list[dict[str, Any]] = [{}, {"lease": "a"}, {"bogus": 1}, {"request": {"cpus": 1}}]

    def outcome(fn: Any, frame: Any) -> Any:
        try:
            call = fn(frame)
        except Exception as exc:
            return type(exc).__name__, str(exc), protocol.request_id_of(exc)
        return call.id, call.op, call.args

    for rid, op, extra in itertools.product(ids, ops, extras):
        for frame in ({"id": rid, "op": op, **extra}, {"op": op, **extra}):
            assert outcome(protocol.parse_call, frame) == outcome(protocol._parse_call, frame)


@pytest.mark.parametrize(
    "line",
    [
        *(b'{"a":1}\n', b'{"a":1}', b' {"a":1}\n', b'{"a":1}\r\n', b'{"a":1} x\n'),
        *(b'{"a":1}{}\n', b'{"a":NaN}\n', b'{"a":1e999}\n', b'{"a":1.5}\n', b"\xff{}\n"),
        *(b"[" * 5000 + b"\n", b"", b"\n", b'"s"\n', b"12 \n", b'{"a":"\\ud800"}\n'),
    ],
)
def test_decode_frame_fast_path_agrees_with_the_full_decoder(line: bytes) -> None:
    got = protocol.decode_frame(line)
    try:
        expected = protocol._decode(line.decode())
    except (ValueError, RecursionError):
        assert isinstance(got, protocol.ProtocolError)
    else:
        assert got == expected
