"""Durable leases: the lease table as an append-only journal in the state directory.

Why a journal and no fsync per grant: what the file must survive is the agent's own
death (SIGKILL, a crash, an upgrade), and a `write()` that returned is in the page cache,
where the next agent reads it, whatever happens to the writer. What an fsync would add is
survival of a kernel crash or power loss, and those kill every lease holder too: the file
records the boot id, and state from an earlier boot is dropped whole. An fsync costs
0.6-3 ms on this disk; the agent's whole acquire+release cycle costs ~0.1-0.4 ms.
Compaction (the journal rewritten as a snapshot: temp file, fsync, rename, fsync of the
directory) is rare, and after it the file is either the old or the new one.

Ordering, the one rule: nothing a client is told may be ahead of the file. The server
records every change (`record`) before it answers; replies are queued, and at the end of
the loop turn the journal's pending lines go out in one `write()` before any queued reply
does (`Server._flush_outbox`; `Connection.close` flushes the same way). A change no reply
follows (a reap) is flushed at the end of the loop turn too.

File: `leases.jsonl`, one JSON object per line: a header (format, version, boot id),
then `{"grant": RECORD}` (a lease granted, or re-bound: the last one for an id wins) and
`{"end": ID}`. Only the last line may be incomplete (a write cut short by SIGKILL, never
acknowledged); anything else unreadable means the file is corrupt: it is moved aside to
`leases.jsonl.corrupt-<time>` with a loud log line and the agent starts empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import ConfigError, RpoolAgentError
from .protocol import held_json, json_str, opt_str_json, slice_groups_json, wire_json

FORMAT = "rpool-agent-state"
VERSION = 1
FILE_NAME = "leases.jsonl"
LOCK_NAME = "lock"

#: Compact once the journal holds this many lines more than twice the live leases
#: (`RPOOL_AGENT_COMPACT_SLACK` overrides it: the crash test compacts often).
COMPACT_SLACK = 2048

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class StateCorrupt(RpoolAgentError):
    """The state file cannot be trusted (never raised past `StateStore.restore`)."""


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


# --- reading ------------------------------------------------------------------------------


def load_records(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(header, {lease id: grant record}) as the journal says now; StateCorrupt if bad.

    Pure reading, no side effects: the tests check the file with this too.
    """
    with open(path, "rb") as f:
        data = f.read()
    # What follows the last newline is empty, or a write cut short by SIGKILL, which
    # no one was told about (replies leave only after a write returns): not a record.
    lines = data.split(b"\n")[:-1]
    if not lines:
        raise StateCorrupt("the state file is empty")
    header = _json_line(lines[0], 1)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateCorrupt("line 1 is not an rpool-agent state header")
    if header.get("version") != VERSION:
        raise StateCorrupt(f"state format version {header.get('version')!r}, expected {VERSION}")
    leases: dict[str, dict[str, Any]] = {}
    for n, raw in enumerate(lines[1:], 2):
        entry = _json_line(raw, n)
        if not isinstance(entry, dict) or len(entry) != 1:
            raise StateCorrupt(f"line {n}: expected one 'grant' or 'end' entry")
        if "grant" in entry:
            rec = entry["grant"]
            _check_record(rec, n)
            leases.pop(rec["id"], None)  # a re-grant moves to the end: keeps grant order
            leases[rec["id"]] = rec
        elif "end" in entry and isinstance(entry["end"], str):
            leases.pop(entry["end"], None)
        else:
            raise StateCorrupt(f"line {n}: expected one 'grant' or 'end' entry")
    return header, leases


def _json_line(raw: bytes, n: int) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StateCorrupt(f"line {n} is not JSON ({exc})") from None


def _check_record(rec: Any, n: int) -> None:
    from .lease import Lease

    if not isinstance(rec, dict):
        raise StateCorrupt(f"line {n}: a grant must be an object")
    try:
        Lease.from_dict(rec)
    except ConfigError as exc:
        raise StateCorrupt(f"line {n}: {exc}") from None
    holder = rec.get("holder")
    if not isinstance(holder, dict) or not all(
        _is_int(holder.get(k)) for k in ("pid", "uid", "gid")
    ):
        raise StateCorrupt(f"line {n}: lease {rec['id']!r} has no holder pid/uid/gid")
    start = holder.get("starttime")
    if start is not None and not _is_int(start):
        raise StateCorrupt(f"line {n}: lease {rec['id']!r} has a bad holder start time")
    if not isinstance(rec.get("token"), str) or not rec["token"]:
        raise StateCorrupt(f"line {n}: lease {rec['id']!r} has no token")
    files = rec.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
    ):
        raise StateCorrupt(f"line {n}: lease {rec['id']!r} has bad 'files'")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def lease_record(lease: Any, extras: Any) -> dict[str, Any]:
    """What the file keeps per lease: the allocator's record, the current holder (pid,
    start time, uid, gid), the secret token and the per-lease files."""
    rec = lease.to_dict()
    rec["holder"] = extras.holder.to_dict()
    rec["token"] = extras.token
    if extras.files is not None:
        rec["files"] = asdict(extras.files)
    return rec


def grant_line(lease: Any, extras: Any) -> str:
    """`_encode({"grant": lease_record(lease, extras)})`, built from pre-encoded pieces: one
    is written per grant (tests/test_lease_json.py checks it byte for byte)."""
    h = extras.holder
    start = h.starttime
    owner = lease.owner
    if (
        extras.files is not None
        or type(lease.granted_at) is not float
        or not (start is None or type(start) is int)
        or not all(type(x) is str or type(x) is int for x in owner)
    ):
        return _encode({"grant": lease_record(lease, extras)})
    return grant_line_of(
        json_str(lease.id),
        ",".join(json_str(x) if type(x) is str else str(x) for x in owner),
        wire_json(lease.request),
        slice_groups_json(lease.groups, as_objects=False),
        held_json(lease.held),
        opt_str_json(lease.label),
        holder_json(h),
        lease.granted_at,
        json_str(extras.token),
    )


def holder_json(h: Any) -> str:
    """A holder as its journal line and the grant reply write it."""
    start = h.starttime
    return (
        f'{{"pid":{int(h.pid)},"uid":{int(h.uid)},"gid":{int(h.gid)},'
        f'"starttime":{"null" if start is None else start}}}'
    )


def grant_line_of(
    lid: str,
    owner: str,
    request: str,
    groups: str,
    resources: str,
    label: str,
    holder: str,
    granted_at: float,
    token: str,
) -> str:
    """The grant line from its pieces, each already JSON (the server's hot path builds
    them once for the line and the reply; `grant_line` builds them from a lease)."""
    return (
        f'{{"grant":{{"id":{lid},"owner":[{owner}],"request":{request},"groups":{groups},'
        f'"resources":{resources},"label":{label},"holder":{holder},'
        f'"granted_at":{granted_at!r},"token":{token}}}}}'
    )


# --- the store ----------------------------------------------------------------------------


class StateStore:
    """The server's journal: `restore` once at start, `record` per change, `flush`."""

    def __init__(self, directory: str | os.PathLike[str], compact_slack: int | None = None) -> None:
        self.directory = Path(directory)
        env = os.environ.get("RPOOL_AGENT_COMPACT_SLACK", "")
        self.compact_slack = compact_slack or (int(env) if env.isdigit() else COMPACT_SLACK)
        self.path = self.directory / FILE_NAME
        self.pending: list[str] = []
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._lines = 0
        self._closed = False
        self._failing = False  # the last write failed; said so once
        self._server: Any = None
        self._by_token: dict[str, str] = {}  # restored leases not yet re-claimed
        self._boot = boot_id()

    @classmethod
    def for_dir(cls, directory: str | os.PathLike[str]) -> StateStore:
        return cls(directory)

    # --- start ----------------------------------------------------------------------------

    def restore(self, server: Any) -> None:
        """Re-adopt the leases whose holder still runs; drop the rest; compact.

        A re-adopted lease is bound to its holder process (a pidfd: held until it exits)
        until a client re-claims it by id and token.
        """
        self._server = server
        self._open_dir()
        records = self._read(server.log)
        kept, dropped = [], []
        for rec in records.values():
            (kept if self._adopt(server, rec) else dropped).append(rec["id"])
        for rec in records.values():
            files = _lease_files(rec.get("files")) if rec["id"] in dropped else None
            if files is not None:
                from .handoff import remove_lease_files

                remove_lease_files(files)
        if records:
            server.log(
                f"state: restored {len(kept)} lease(s) whose holder still runs"
                + (f" ({', '.join(kept)})" if kept else "")
                + f", dropped {len(dropped)}"
                + (f" ({', '.join(dropped)})" if dropped else "")
            )
        try:
            self._compact()
        except OSError as exc:
            raise ConfigError(f"state dir {self.directory}: {exc.strerror or exc}") from None

    def _open_dir(self) -> None:
        d = self.directory
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.lstat()
        except OSError as exc:
            raise ConfigError(f"state dir {d}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"state dir {d} is not a directory")
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"state dir {d} must be owned by this user and writable by it alone "
                f"(mode {stat.S_IMODE(st.st_mode):04o})"
            )
        import fcntl

        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"another agent keeps its leases in {d}") from None
        self._lock_fd = fd

    def _read(self, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
        """The recorded leases; {} when there is no file, or (loudly) a bad one."""
        if not self.path.exists():
            return {}
        try:
            header, records = load_records(self.path)
        except (OSError, StateCorrupt) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            aside = self.path.with_name(
                f"{FILE_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            )
            try:
                os.replace(self.path, aside)
                where = f"moved to {aside}"
            except OSError as err:
                where = f"could not be moved aside ({err.strerror}); it will be replaced"
            log(
                f"STATE FILE CORRUPT: {self.path}: {why}; {where}. Starting with NO leases: "
                "GPUs leased before this restart are NOT protected until their jobs end."
            )
            return {}
        if self._boot is not None and header.get("boot_id") != self._boot:
            if records:
                log(f"state: {len(records)} lease(s) from an earlier boot dropped")
            return {}
        return records

    def _adopt(self, server: Any, rec: dict[str, Any]) -> bool:
        from .holders import Holder, LeaseExtras, open_pidfd
        from .lease import Lease

        h = rec["holder"]
        holder = Holder(h["pid"], h["uid"], h["gid"], h.get("starttime"))
        if holder.starttime is None or holder.pid == os.getpid():
            return False  # a holder we cannot tell from a recycled pid is not trusted
        fd = open_pidfd(holder.pid, holder.starttime)
        if fd is None:
            return False
        owner = ("pid", holder.pid, holder.starttime)
        try:
            lease = Lease.from_dict({**rec, "owner": list(owner)})
            server.allocator.adopt(lease)
        except RpoolAgentError as exc:
            os.close(fd)
            server.log(f"state: lease {rec['id']} not restored: {exc}")
            return False
        files = _lease_files(rec.get("files"))
        server.extras[lease.id] = LeaseExtras(rec["token"], holder, files, fd)
        import asyncio

        asyncio.get_running_loop().add_reader(fd, server._holder_exited, owner)
        self._by_token[rec["token"]] = lease.id
        return True

    def restored_lease(self, token: str) -> str | None:
        """The id of a restored lease with this token: an acquire whose reply the agent's
        death cut off, retried by its client, gets that lease back, not a second one."""
        return self._by_token.get(token) if self._by_token else None

    # --- changes --------------------------------------------------------------------------

    def record(self, server: Any, lease_id: str) -> None:
        """Lease `lease_id` was granted, re-bound or ended: queue its line (no I/O here)."""
        if self._closed:
            return
        lease = server.allocator.leases.get(lease_id)
        extras = server.extras.get(lease_id)
        if lease is not None and extras is not None:
            self.record_line(server, grant_line(lease, extras))
        else:
            self.record_end(server, lease_id)

    def record_end(self, server: Any, lease_id: str) -> None:
        """`record` for a lease that ended."""
        if self._closed:
            return
        self.pending.append('{"end":' + json_str(lease_id) + "}")
        if self._by_token:
            self._by_token = {t: i for t, i in self._by_token.items() if i != lease_id}
        server.at_turn_end(self._end_of_turn)

    def record_line(self, server: Any, line: str) -> None:
        """`record` for a grant whose line the server built (with its reply)."""
        if self._closed:
            return
        self.pending.append(line)
        server.at_turn_end(self._end_of_turn)

    def flush(self) -> None:
        """Write every pending line in one `write()`; before any reply leaves."""
        if not self.pending:
            return
        data = _utf8_lines(self.pending)
        self._lines += len(self.pending)
        self.pending = []
        try:
            if self._fd is None:  # after a failed write: the whole snapshot, not lines
                self._compact()
            else:
                _write_all(self._fd, data)
        except OSError as exc:
            self._write_failed(exc)
            return
        if self._failing:
            self._failing = False
            self._say(f"state: {self.path} is written again; the leases are durable again")

    def _write_failed(self, exc: OSError) -> None:
        """A full disk, a quota, a read-only remount: keep serving (a CI node with a full
        /var must not stop handing out GPUs), say so loudly once, and rewrite the whole
        snapshot at the next change, since the journal has missed lines by now."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # EIO from close(): the number is freed anyway
                os.close(fd)
        if not self._failing:
            self._failing = True
            self._say(
                f"STATE WRITE FAILED: {self.path}: {exc.strerror or exc}. Serving on; leases "
                "granted or ended from now on do NOT survive an agent restart until a "
                "write succeeds again (retried at every change)."
            )

    def _say(self, line: str) -> None:
        if self._server is not None:
            self._server._log(line, important=True)

    def _end_of_turn(self) -> None:
        self.flush()
        if (
            self._fd is not None
            and self._server is not None
            and self._lines > self.compact_slack + 2 * len(self._server.extras)
        ):
            try:
                self._compact()
            except OSError as exc:
                self._write_failed(exc)

    def _compact(self) -> None:
        """Rewrite the journal as a snapshot of the live leases: old file or new, never half."""
        server = self._server
        self.pending = []
        lines = [
            _encode(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "boot_id": self._boot,
                    "agent_pid": os.getpid(),
                    "written": time.time(),
                }
            )
        ]
        if server is not None:
            leases = server.allocator.leases
            lines += [
                _encode({"grant": lease_record(leases[i], ex)})
                for i, ex in server.extras.items()
                if i in leases
            ]
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, _utf8_lines(lines))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)
        old, self._fd = self._fd, None  # never keep a number that is closed (and reused)
        if old is not None:
            os.close(old)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(lines)

    def close(self) -> None:
        """Write what is pending, then record nothing more (the agent is stopping)."""
        self.flush()
        if self._failing:  # one more try to leave a file that matches the live leases
            try:
                self._compact()
            except OSError:
                self._say(f"state: {self.path} is still not writable; it is out of date")
        self._closed = True
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


def _utf8_lines(lines: list[str]) -> bytes:
    """JSON lines as UTF-8. A client's label or token may hold a lone surrogate, which
    UTF-8 cannot: such a line is written \\u-escaped (the same JSON), never refused, or one
    odd label would stop the journal and every reply behind it."""
    try:
        return ("\n".join(lines) + "\n").encode()
    except UnicodeEncodeError:
        dump = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode
        return "".join(dump(json.loads(line)) + "\n" for line in lines).encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lease_files(d: Any) -> Any:
    """The recorded per-lease files as `handoff.LeaseFiles` (None if none, or malformed)."""
    if not d:
        return None
    from .handoff import LeaseFiles

    try:
        return LeaseFiles(**d)
    except TypeError:
        return None
