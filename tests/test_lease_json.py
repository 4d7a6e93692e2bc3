"""The grant reply and the grant journal line are built by concatenation (the hot path,
`Server._grant_texts`): byte for byte what the generic encoders write for the same lease,
for many lease shapes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from rpool_agent import protocol
from rpool_agent.holders import Holder
from rpool_agent.lease import Granted
from rpool_agent.pool import Instance, Pool
from rpool_agent.requests import parse_request
from rpool_agent.server import Connection, LeaseExtras, Server
from rpool_agent.state import _encode, grant_line, lease_record


def make_server(tmp: Any) -> Server:
    gpus = [Instance(str(i), 2, {"uuid": f"GPU-{i}", "memory": 80 << 30}) for i in range(4)]
    cpus = [Instance(str(i), 1, {"numa": i % 2}) for i in range(8)] + [Instance('c"é', 1)]
    return Server(
        Pool.single({"gpus": gpus, "cpus": cpus, "nics": [Instance("n\u2603", 4)]}),
        socket_path=str(tmp / "a.sock"),
        log=lambda line: None,
    )


REQUESTS: list[Any] = [
    {"cpus": 1},
    {"gpus": 2, "cpus": 3},
    [{"type": "gpus", "slots": 2}, {"type": "cpus", "slots": 1}],
    [[{"type": "gpus", "slots": 1}], [{"type": "cpus", "slots": 1}, {"type": "nics", "slots": 3}]],
    "2,gpus:1,nics:2",
]
LABELS = [None, "", "bench", 'q"uote\\ é \u2603 \n\t', "x" * 256]
OWNERS: list[tuple[Any, ...]] = [("conn", 7), ("pid", 4242, 123456789)]
HOLDERS = [Holder(10, 1000, 1000, None), Holder(4242, 0, 0, 123456789)]


@pytest.mark.parametrize("request_value", REQUESTS)
def test_grant_reply_and_line_equal_the_generic_encoding(tmp_path: Any, request_value: Any) -> None:
    server = make_server(tmp_path)
    n = 0
    for label in LABELS:
        for owner in OWNERS:
            for holder in HOLDERS:
                for rid in (1, "req-é", None, -(10**20)):
                    n += 1
                    events = server.allocator.submit(
                        owner,
                        ("k", n),
                        parse_request(request_value),
                        now=1234.5 + n / 7,
                        timeout=None,
                        label=label,
                        holder=holder.to_dict(),
                    )
                    (ev,) = [e for e in events if isinstance(e, Granted)]
                    lease = ev.lease
                    token = f"tok-{n}-é" * 2
                    extras = LeaseExtras(token=token, holder=holder)
                    server.extras[lease.id] = extras
                    doc = server.lease_document(lease, with_token=True)
                    expected = protocol.encode(protocol.ok(rid, doc))
                    assert json.loads(expected)["result"]["properties"] == doc["properties"]
                    line = grant_line(lease, extras)
                    assert line == _encode({"grant": lease_record(lease, extras)})
                    # the server's hot path: both from one set of pieces, holder JSON
                    # made afresh, then cached on the connection the holder is peer of
                    conn = Connection(server, n)
                    conn.peer = holder
                    for via in (None, conn, conn):
                        assert server._grant_texts(rid, lease, extras, via) == (expected, line)
                    assert conn.holder_json is not None
                    server.allocator.release(owner, lease.id)


def test_a_lone_surrogate_in_a_label_falls_back_to_escaping(tmp_path: Any) -> None:
    server = make_server(tmp_path)
    holder = Holder(10, 1000, 1000, 5)
    events = server.allocator.submit(
        ("conn", 1), ("k", 1), parse_request({"gpus": 1}), now=1.0, timeout=None,
        label="bad \ud800", holder=holder.to_dict(),
    )  # fmt: skip
    lease = events[-1].lease
    server.extras[lease.id] = LeaseExtras(token="t" * 32, holder=holder)
    assert server._grant_texts(3, lease, server.extras[lease.id], None) is None
    # so the server sends the generic encoding, which escapes what UTF-8 cannot hold
    reply = protocol.encode(protocol.ok(3, server.lease_document(lease, with_token=True)))
    assert b"\\ud800" in reply
    assert json.loads(reply)["result"]["label"] == "bad \ud800"


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
