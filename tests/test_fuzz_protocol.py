"""Hypothesis fuzzing of the wire protocol: the codec in-process, then one live agent.

Cases are frames, not Hypothesis examples: each example is a batch of frames (fed to one
decoder, or sent over one fresh connection), so a run covers well over 10,000 frames in a
few seconds. Each batch mixes random bytes, random JSON calls built from hostile values
(wrong types, huge numbers, deep nesting, lone surrogates), partial and oversized frames;
each connection then ends in one of several ways (read everything, close, reset, stop in
the middle of a frame). The agent must answer every frame it reads with a well-formed
reply, never hit an internal error, never die, and hold nothing once everyone is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, running_agent, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rpool_agent import calls, codec, protocol
from rpool_agent.errors import MessageTooLarge, RpoolAgentError, _all_error_classes
from rpool_agent.requests import parse_request

CODES = {cls.code for cls in _all_error_classes()} - {"error"}  # "error": an internal bug
HELLO = b'{"id":0,"op":"hello","version":1}\n'
OPS = [*protocol.OPERATIONS, "", "HELLO", "op_hello", "__init__", "_bind", "handle_frame"]
ARGS = [*sorted(set().union(*protocol.OPERATIONS.values())), "id", "op", "uid", "pid", "owner"]


def _deep(n: int, dict_form: bool = False) -> Any:
    value: Any = 1
    for _ in range(n):
        value = {"a": value} if dict_form else [value]
    return value


#: Values a hostile or broken client might put anywhere.
NASTY: list[Any] = [
    None, True, False, 0, 1, -1, 2, 2**31, -(2**63), 2**64, 10**100, 10**4000,
    0.5, -0.0, 1e308, 5e-324,
    "", "x", "gpus", "gpus:1", "2,gpus:1;cpus:1", "gpus:0", "0,gpus:1", ",", ";", ":",
    "gpus:99999999999999999999", "1,gpus:1,cpus:1", "\x00", "\ud800", "é" * 40, "a" * 300,
    "gpus:0", "cpus:1", "gpus:x", "nope:3", "../../etc/passwd", "%s%n",
    [], {}, [[]], [[[]]], [None], [1, 2], _deep(60), _deep(60, True), _deep(400),
    {"gpus": 1}, {"gpus": 0}, {"gpus": -1}, {"gpus": 10**20}, {"gpus": 65537},
    {"gpus": 1.0}, {"gpus": "1"}, {"gpus": None}, {"": 1}, {"GPUS": 1}, {"fpgas": 1},
    {"gpus": 1, "cpus": 2}, {"gpus": 5}, {"cpus": 4},
    [{"type": "gpus", "slots": 1}], [{"type": "gpus", "slots": 0}], [{"type": "gpus"}],
    [{"slots": 1}], [{"type": "gpus", "slots": 1, "extra": 1}], [{"type": 1, "slots": 1}],
    [[{"type": "gpus", "slots": 1}], [{"type": "cpus", "slots": 1}]], [[], []],
]  # fmt: skip
#: Process ids for `holder_pid`: none is a live process (a live one would hold its lease,
#: rightly, past the end of the run).
BAD_PIDS = [None, 0, -1, True, "1", 1.5, 2**22 + 1, 2**40, 2**64, []]
IDS = [None, 0, 1, 7, -5, "a", "x" * 64, "x" * 65, True, 1.5, [], {}, 2**70, "\ud800"]
#: Frames a well-behaved client sends, so the fuzz also grants, queues and reaps leases.
GOOD = [
    {"op": "acquire", "request": {"gpus": 1}, "timeout": 0},
    {"op": "acquire", "request": {"gpus": 2}, "timeout": 5, "label": "fuzz"},
    {"op": "acquire", "request": "gpus:1", "timeout": None},
    {"op": "acquire", "request": {"cpus": 1}, "files": True},
    {"op": "acquire", "request": [{"type": "gpus", "slots": 1}], "timeout": 0.01},
    {"op": "status"},
    {"op": "pool"},
    {"op": "pool", "format": "ctest"},
    {"op": "release", "lease": "nope"},
    {"op": "cancel", "request_id": 1},
    {"op": "reclaim", "lease": "x", "token": "y"},
    {"op": "drain", "resource": "gpus:0", "reason": "fuzz"},
    {"op": "undrain", "resource": "gpus:0"},
    {"op": "hello", "version": 1},
]
#: Raw fragments: deep nesting, numbers out of range, non-JSON constants, bad UTF-8.
RAW = [
    b"[" * 3000 + b"]" * 3000,
    b"{" * 2000,
    b'{"a":' * 1500 + b"1" + b"}" * 1500,
    b"9" * 5000,
    b'{"id":' + b"9" * 5000 + b',"op":"status"}',
    b'{"id":1,"op":"acquire","request":{"gpus":' + b"9" * 4500 + b"}}",
    b'{"id":1,"op":"acquire","request":{"gpus":1},"timeout":1e99999}',
    b'{"id":1,"op":"acquire","request":{"gpus":1},"timeout":NaN}',
    b'{"id":Infinity,"op":"status"}',
    b"-",
    b"\xff\xfe\x00",
    b'{"id":1,"op":"status"',
    b'{"id":1,"op":"status"}}',
    b'{"id":1,"id":2,"op":"status"}',
    b'"just a string"',
    b"null",
    b"\r",
    b"",
]
OVERSIZED = b"x" * (protocol.MAX_MESSAGE_BYTES + 10)


class Recipe:
    """Frames read off Hypothesis-drawn bytes, one small choice per byte.

    One `st.binary()` draw per batch instead of a dozen draws per frame keeps generation
    cheap enough for tens of thousands of frames a run, and still shrinks: shorter bytes
    mean fewer frames, and zero bytes mean the plainest choices (a good call first).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def pick(self, seq: list[Any]) -> Any:
        return seq[self.byte() % len(seq)]

    def raw(self) -> bytes:
        n = self.byte() % 48
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def _encode(obj: Any, ascii_only: bool) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def good_call(r: Recipe) -> bytes:
    return _encode({"id": r.byte() % 50, **r.pick(GOOD)}, True)


def json_call(r: Recipe) -> bytes:
    """A JSON object shaped like a call, with hostile values in its fields."""
    obj: dict[str, Any] = {}
    flags = r.byte()
    if not flags & 1:
        obj["id"] = r.pick(IDS)
    if not flags & 2:
        obj["op"] = r.pick(OPS)
    for _ in range((flags >> 2) % 4):
        key = r.pick(ARGS)
        obj[key] = r.pick(BAD_PIDS if key == "holder_pid" else NASTY)
    return _encode(obj, bool(flags & 64))


def mangled(r: Recipe) -> bytes:
    """A good call cut short, or with one byte changed."""
    data = good_call(r)
    at = r.byte() % len(data)
    if r.byte() & 1:
        return data[:at]
    return data[:at] + bytes([r.byte()]) + data[at + 1 :]


LINE_ENDS = [b"\n", b"\n", b"\n", b"\n", b"\r\n", b"\n\n", b""]
KINDS = [good_call, json_call, json_call, json_call, mangled, lambda r: r.pick(RAW), Recipe.raw]


def make_frames(data: bytes, *, oversized: bool = True) -> list[bytes]:
    """Every frame the bytes spell; now and then (1 in 256) one over the size limit."""
    r = Recipe(data)
    frames = []
    while r.left > 0:
        kind = r.byte()
        body = OVERSIZED if oversized and kind == 255 else KINDS[kind % len(KINDS)](r)
        frames.append(body + r.pick(LINE_ENDS))
    return frames


BATCH = st.binary(min_size=150, max_size=500)


# --- the codec, in-process ------------------------------------------------------------


def check_frame(frame: Any) -> None:
    """A decoded frame through parse_call (and parse_request): a reply always encodes."""
    try:
        call = calls.parse_call(frame)
        if call.op == "acquire":
            parse_request(call.args.get("request"))
        reply = protocol.ok(call.id, call.args)
    except RpoolAgentError as exc:
        assert exc.code in CODES
        reply = protocol.error(calls.request_id_of(exc), exc)
    [back] = protocol.FrameDecoder(1 << 20, codec.decode_frame).feed(codec.encode_frame(reply))
    assert isinstance(back, dict) and back["id"] == reply["id"]


def test_codec_never_raises_anything_but_its_own_errors() -> None:
    cases = [0]

    @settings(
        max_examples=1500,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        BATCH,
        st.lists(st.integers(0, 1 << 16), max_size=6),
        st.sampled_from([32, 1024, protocol.MAX_MESSAGE_BYTES]),
    )
    def run(recipe: bytes, cuts: list[int], limit: int) -> None:
        frames = make_frames(recipe)
        data = b"".join(frames)
        bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
        decoder = protocol.FrameDecoder(limit, codec.decode_frame)  # as the agent reads
        for lo, hi in itertools.pairwise(bounds):
            try:
                out = decoder.feed(data[lo:hi])
            except MessageTooLarge:
                decoder = protocol.FrameDecoder(limit, codec.decode_frame)  # the caller closes
                continue
            assert decoder.pending <= limit
            for f in out:
                check_frame(f)
        for f in frames:  # and every frame on its own, as a request value too
            try:
                parse_request(json.loads(f))
            except (ValueError, RecursionError):
                pass  # not JSON: nothing to hand parse_request
            except RpoolAgentError:
                pass
        cases[0] += len(frames)

    run()
    print(f"codec: {cases[0]} frames")
    assert cases[0] >= 10_000, cases[0]


# --- one live agent -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with running_agent(tmp_path_factory.mktemp("fuzz"), gpu_pool(4, 4)) as agent:
        yield agent


def session(path: str, payload: bytes, ending: str) -> list[dict[str, Any]]:
    """One connection: send `payload`, end it as `ending` says; the replies read."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    data = b""
    try:
        if ending == "half":  # stop in the middle of a frame
            payload += b'{"id":99,"op":"acq'
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The agent closed first (a frame over the limit) while we still sent: what
            # it sent before is still queued for us, and still counts.
            if ending != "read":
                return []
        if ending == "reset":  # RST instead of FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if ending != "read":
            return []
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass  # the queued replies were read; the reset came after them
    finally:
        s.close()
    assert data.endswith(b"\n") or not data
    return [json.loads(line) for line in data.splitlines()]


def check_reply(reply: Any) -> None:
    assert isinstance(reply, dict), reply
    if "event" in reply:
        assert reply["event"] == "queued" and isinstance(reply["position"], int)
        return
    assert isinstance(reply["ok"], bool)
    if not reply["ok"]:
        err = reply["error"]
        assert err["code"] in CODES, err  # "error" would be an internal bug
        assert isinstance(err["message"], str)


def test_live_agent_survives_fuzzing_and_leaks_nothing(agent: Agent) -> None:
    frames_sent = [0]
    watcher = agent.client().connect()

    @settings(
        max_examples=800,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.booleans(),
        BATCH,
        st.sampled_from(["read", "read", "read", "close", "reset", "half"]),
    )
    def run(greet: bool, recipe: bytes, ending: str) -> None:
        frames = make_frames(recipe)
        payload = (HELLO if greet else b"") + b"".join(frames)
        replies = session(agent.socket, payload, ending)
        for reply in replies:
            check_reply(reply)
        answers = [r for r in replies if "event" not in r]
        lines = [line for line in payload.split(b"\n") if line.strip()]
        assert len(answers) <= len(lines) + 1  # one per line, and maybe "too large"
        if ending == "read" and greet:
            # The hello is answered first, even if a frame over the limit follows it.
            assert answers[0]["ok"] and answers[0]["result"]["version"] == 1
        if ending == "read" and not greet and answers and b'"hello"' not in lines[0]:
            assert answers[0]["ok"] is False  # nothing before the handshake
        assert agent.proc.poll() is None, "the agent died"
        assert "types" in watcher.status()  # and it still answers others at once
        frames_sent[0] += len(frames)

    run()
    print(f"live agent: {frames_sent[0]} frames")
    assert frames_sent[0] >= 10_000, frames_sent[0]
    watcher.close()

    # Afterwards: nobody holds anything, nothing is left over, and it still works.
    with agent.client() as c:
        for d in c.status()["drained"]:
            c.undrain(f"{d['type']}:{d['id']}")
        wait_until(lambda: not c.status()["leases"] and not c.status()["waiters"])
        snap = c.status()
        for rtype, counts in snap["types"].items():
            assert counts["free"] == counts["total"] and counts["used"] == 0, rtype
        assert snap["connections"] == 1
        lease = c.acquire(gpus=4, cpus=2, timeout=5, files=True)
        assert len(lease.resources["gpus"]) == 4
        lease.release()
        assert c.status()["leases"] == []
    leases_dir = Path(agent.socket).parent / "leases"
    assert not leases_dir.exists() or list(leases_dir.iterdir()) == []
    assert agent.proc.poll() is None
    log = agent.log()
    assert "Traceback" not in log and "internal error" not in log
