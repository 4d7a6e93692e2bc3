"""The journal's format: framed records, how a journal's bytes are read, and the records.

Each line is one framed record: `JSON<TAB>LENGTH:CRC32\\n`, the length and the CRC-32
(hex) being those of the JSON bytes. The trailer is read from the end of the line, so a
record survives whatever precedes it on its line (a torn record, zeros, garbage), and a
record that is itself damaged loses only itself (`read_journal`).

Records are written by the agent's codec (codec.py, UTF-8) and read with the stdlib's
`json`, which reads whatever any version of the agent wrote (version 1 wrote ASCII).
Pure functions: state.py's `StateStore` writes with them, and the tests read files with
them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from . import codec
from .errors import RpoolAgentError
from .protocol import valid_text

FORMAT = "rpool-agent-state"
VERSION = 2


class StateCorrupt(RpoolAgentError):
    """The state file cannot be trusted as a whole."""


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


# --- the format ---------------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    """One journal line: the JSON, a tab, its length and CRC-32, a newline."""
    data = codec.encode(obj)
    return b"%s\t%d:%08x\n" % (data, len(data), zlib.crc32(data))


def unframe(line: bytes) -> tuple[bytes, int]:
    """(the record's JSON in one framed line without its newline, where the record
    starts: 0 unless bytes that are not part of it precede it); ValueError if damaged."""
    tab = line.rfind(b"\t")
    if tab < 0:
        raise ValueError("no frame trailer")
    length, _, crc = line[tab + 1 :].partition(b":")
    n = int(length)
    data = line[tab - n : tab]
    if n <= 0 or len(data) != n or len(crc) != 8 or int(crc, 16) != zlib.crc32(data):
        raise ValueError("checksum mismatch")
    return data, tab - n


def lease_record(lease: Any, extras: Any) -> dict[str, Any]:
    """What the file keeps per lease: the allocator's record, the current holder (pid,
    start time, uid, gid), the secret token and the per-lease files."""
    rec = lease.to_dict()
    rec["holder"] = extras.holder.to_dict()
    rec["token"] = extras.token
    if extras.files is not None:
        rec["files"] = asdict(extras.files)
    return rec


def header_record() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "boot_id": boot_id(),
        "agent_pid": os.getpid(),
        "written": time.time(),
    }


@dataclass
class Journal:
    """What a journal says: its header (None if lost), the live lease records in grant
    order, and the 1-based numbers of the lines that could not be used."""

    header: dict[str, Any] | None
    leases: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: dict[str, bytes] = field(default_factory=dict)  # each live lease's framed line
    damaged: list[int] = field(default_factory=list)
    records: int = 0  # intact records, the header included


def read_journal(data: bytes) -> Journal:
    """Replay a journal's bytes. Pure: the tests check files with it too.

    A line that is not an intact record of the right shape is noted in `damaged` and
    skipped; every other record counts. What follows the last newline is a write cut
    short (never acknowledged: replies leave after the write returns) and is ignored.
    Raises StateCorrupt only for a file from a format this agent cannot read.
    """
    lines = data.split(b"\n")[:-1]
    legacy = False
    if lines and lines[0].endswith(b"}"):  # version 1 had no frames
        with contextlib.suppress(ValueError):
            first = json.loads(lines[0])
            legacy = isinstance(first, dict) and first.get("version") == 1
    out = Journal(header=None)
    found: list[tuple[int, bytes, int]] = []  # (line number, line, where its record starts)
    texts: list[bytes] = []
    for n, raw in enumerate(lines, 1):
        try:
            text, start = (raw, 0) if legacy else unframe(raw)
        except ValueError:
            out.damaged.append(n)
            continue
        found.append((n, raw, start))
        texts.append(text)
    entries = _decode_all(texts, legacy)
    for i, text in enumerate(texts):
        if b"\\ud" in text:  # an escaped surrogate, written by an agent before codec.py
            entries[i] = _valid_strings(entries[i])
    for (n, raw, start), entry in zip(found, entries, strict=True):
        if start:  # what is left of a damaged record, then an intact one
            out.damaged.append(n)
        if isinstance(entry, dict) and entry.get("format") == FORMAT:
            if entry.get("version") not in (1, VERSION):
                raise StateCorrupt(f"state format version {entry.get('version')!r}")
            out.header = entry
            out.records += 1
        elif _apply(entry, frame(entry) if legacy else raw[start:] + b"\n", out):
            out.records += 1
        elif not start:
            out.damaged.append(n)
    out.damaged.sort()
    return out


def _decode_all(texts: list[bytes], legacy: bool) -> list[Any]:
    """The records' objects, decoded in one pass (each passed its checksum), else one by
    one (`_BAD` for a text that is no JSON: version 1 had no checksums)."""
    if not legacy:
        with contextlib.suppress(ValueError):
            entries = json.loads(b"[" + b",".join(texts) + b"]")
            if len(entries) == len(texts):
                return entries
    return [_loads(t) for t in texts]


def _valid_strings(obj: Any) -> Any:
    """`obj` with every string made valid UTF-8 (protocol.valid_text): older agents took
    any string in a label or token and escaped it; the codec cannot write a lone surrogate
    back (into a reply, a `status`, the next compaction)."""
    if isinstance(obj, str):
        return valid_text(obj)
    if isinstance(obj, list):
        return [_valid_strings(x) for x in obj]
    if isinstance(obj, dict):
        return {valid_text(k): _valid_strings(v) for k, v in obj.items()}
    return obj


def _loads(text: bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return _BAD


_BAD = object()


def _apply(entry: Any, line: bytes, out: Journal) -> bool:
    """Replay one `grant` or `end` entry; False for a wrong shape."""
    if not isinstance(entry, dict) or len(entry) != 1:
        return False
    if "end" in entry:
        lid = entry["end"]
        if not isinstance(lid, str):
            return False
        out.leases.pop(lid, None)
        out.lines.pop(lid, None)
        return True
    rec = entry.get("grant")
    if not check_record(rec):
        return False
    lid = rec["id"]
    out.leases.pop(lid, None)  # a re-grant moves to the end: keeps grant order
    out.leases[lid] = rec
    out.lines.pop(lid, None)
    out.lines[lid] = line
    return True


def check_record(rec: Any) -> bool:
    """Whether a grant record has the journal's own fields (id, holder, token, files) of
    the right types. The allocator's part is checked once, when the lease is re-adopted
    (`Lease.from_dict`, which says what is wrong). (`type(x) is int` excludes bools.)"""
    if type(rec) is not dict:
        return False
    h, files = rec.get("holder"), rec.get("files")
    return bool(
        type(rec.get("id")) is str
        and rec["id"]
        and type(h) is dict
        and type(h.get("pid")) is int
        and type(h.get("uid")) is int
        and type(h.get("gid")) is int
        and (h.get("starttime") is None or type(h["starttime"]) is int)
        and type(rec.get("token")) is str
        and rec["token"]
        and (files is None or (type(files) is dict and all(type(v) is str for v in files.values())))
    )


def load_records(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(header, {lease id: grant record}) of a journal file (for tests and tools)."""
    with open(path, "rb") as f:
        j = read_journal(f.read())
    return j.header, j.leases
