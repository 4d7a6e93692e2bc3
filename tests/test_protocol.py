"""The codec with bare calls (no socket): frames in, objects or typed refusals out.

Tables of input -> outcome, like h11's tests: every refusal names its problem, and a
refused frame leaves the decoder able to go on (except a frame over the limit).
"""

from __future__ import annotations

from typing import Any

import pytest

from rpool_agent import calls, codec, protocol
from rpool_agent.errors import MessageTooLarge, ProtocolError, UnknownOperation, VersionMismatch

BAD = ProtocolError


LONE_SURROGATE = b'{"a":"\\ud800"}\n'
DECODE_CASES = [
    (b'{"a":1}\n', {"a": 1}),
    (b'{"a":1}', {"a": 1}),
    (b' {"a":1}\r\n', {"a": 1}),  # JSON whitespace around the value
    (b'{"a":1.5}\n', {"a": 1.5}),
    (b'"s"\n', "s"),  # an object is parse_call's business, not the decoder's
    (b"12 \n", 12),
    (b'{"a":"\\ud83d\\ude00"}\n', {"a": "\U0001f600"}),  # an escaped pair is one character
    (b'{"a":1} x\n', BAD),
    (b'{"a":1}{}\n', BAD),
    (b'{"a":NaN}\n', BAD),
    (b'{"a":1e999}\n', BAD),  # overflows to inf
    (b'{"a":' + b"9" * 5000 + b"}\n", BAD),  # past Python's 4,300-digit int limit
    (b"\xff{}\n", BAD),
    (b"[" * 5000 + b"\n", BAD),  # nested too deeply
    (b"", BAD),
    (b"\n", BAD),
]


@pytest.mark.parametrize(
    ("decode", "lone_surrogate"),
    [
        # the client's decoder (the stdlib's json): a lone surrogate is valid JSON to it
        pytest.param(protocol.decode_frame, {"a": "\ud800"}, id="client"),
        # the agent's codec: the same answers, and a lone surrogate, no text, is malformed
        pytest.param(codec.decode_frame, BAD, id="agent"),
    ],
)
@pytest.mark.parametrize(("line", "expected"), [*DECODE_CASES, (LONE_SURROGATE, None)])
def test_decode_frame(line: bytes, expected: Any, decode: Any, lone_surrogate: Any) -> None:
    expected = lone_surrogate if line is LONE_SURROGATE else expected
    got = decode(line)
    if expected is BAD:
        assert isinstance(got, ProtocolError) and str(got).startswith("malformed message: ")
    else:
        assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("label", ["plain", "é\u2603", "\U0001f600", 'q"\n\\'])
def test_the_agents_encode_writes_one_utf8_line_the_client_reads_back(label: str) -> None:
    message = protocol.ok(7, {"label": label, "n": 10**30, "f": 0.1})
    data = codec.encode_frame(message)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert protocol.FrameDecoder().feed(data) == [message]  # the client: stdlib json
    assert protocol.FrameDecoder(decode=codec.decode_frame).feed(data) == [message]


def test_valid_text_replaces_lone_surrogates_only() -> None:
    assert protocol.valid_text("sl\udcffeep \ud800") == "sl\ufffdeep \ufffd"
    assert protocol.valid_text("é\U0001f600") == "é\U0001f600"


def test_frames_split_and_joined_across_reads() -> None:
    d = protocol.FrameDecoder()
    assert d.feed(b'{"a":1}\n{"b"') == [{"a": 1}]
    assert d.pending == len(b'{"b"')
    assert d.feed(b":2}\n\n  \n") == [{"b": 2}]  # blank lines are skipped
    assert d.feed(b'{"c":') == [] and d.feed(b"3}\n") == [{"c": 3}]
    assert d.pending == 0


def test_a_bad_frame_is_answered_and_the_stream_goes_on() -> None:
    out = protocol.FrameDecoder().feed(b'nope\n{"a":1}\n')
    assert isinstance(out[0], ProtocolError) and out[1] == {"a": 1}


@pytest.mark.parametrize("tail", [b"x" * 11 + b"\n", b"x" * 11])
def test_a_frame_over_the_limit_keeps_the_frames_before_it(tail: bytes) -> None:
    d = protocol.FrameDecoder(limit=10)
    with pytest.raises(MessageTooLarge) as info:
        d.feed(b'{"a":1}\n' + tail)
    assert info.value.frames == [{"a": 1}]  # type: ignore[attr-defined]
    assert protocol.FrameDecoder(limit=10).feed(b"x" * 10) == []  # the limit itself is fine


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"id": 1, "op": "status"}, (1, "status", {})),
        ({"op": "release", "lease": "a"}, (None, "release", {"lease": "a"})),
        ({"id": "x" * 64, "op": "hello", "version": 1}, ("x" * 64, "hello", {"version": 1})),
        ({"id": -(10**62), "op": "status"}, (-(10**62), "status", {})),
        ([1], (ProtocolError, "a message must be a JSON object", None)),
        ({"id": True, "op": "status"}, (ProtocolError, "'id' must be", None)),
        ({"id": 1.5, "op": "status"}, (ProtocolError, "'id' must be", None)),
        ({"id": "x" * 65, "op": "status"}, (ProtocolError, "'id' must be", None)),
        ({"id": 10**64, "op": "status"}, (ProtocolError, "'id' must be", None)),
        ({"id": 2}, (ProtocolError, "'op' must be a string", 2)),
        ({"id": 3, "op": "nope"}, (UnknownOperation, "unknown operation 'nope'", 3)),
        ({"id": 4, "op": "status", "x": 1}, (ProtocolError, "status: unexpected field 'x'", 4)),
        ({"id": 5, "op": "hello", "version": 2}, (VersionMismatch, "protocol version 2", 5)),
        ({"id": 6, "op": "hello"}, (VersionMismatch, "protocol version None", 6)),
    ],
)
def test_parse_call(frame: Any, expected: tuple[Any, Any, Any]) -> None:
    if isinstance(expected[0], type):
        cls, message, rid = expected
        with pytest.raises(cls, match=message.replace("(", r"\(")) as info:
            calls.parse_call(frame)
        assert calls.request_id_of(info.value) == rid
    else:
        call = calls.parse_call(frame)
        assert (call.id, call.op, call.args) == expected


def test_a_decoding_error_is_raised_by_parse_call() -> None:
    (bad,) = protocol.FrameDecoder().feed(b"{\n")
    with pytest.raises(ProtocolError, match="malformed"):
        calls.parse_call(bad)


@pytest.mark.parametrize("label", ["plain", "é\u2603", "\ud800 lone", 'q"\n\\'])
def test_encode_writes_one_ascii_line_that_reads_back(label: str) -> None:
    message = protocol.ok(7, {"label": label})
    data = protocol.encode(message)
    assert data.endswith(b"\n") and data.count(b"\n") == 1 and data.isascii()
    assert protocol.FrameDecoder().feed(data) == [message]
