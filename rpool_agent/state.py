"""The lease journal's writer, the one the server records into (journal.py: its format).

What the file must survive is the agent's own death (SIGKILL, a crash, an upgrade). A
`write()` that returned is in the page cache, where the next agent reads it whatever
happened to the writer, so nothing here fsyncs: a kernel crash or a power loss also kills
every lease holder, and the header's boot id makes the next agent drop the old leases.

Ordering, the one rule: nothing a client is told may be ahead of the file. The server
records a change (`record_grant`, `record_end`) before it answers; at the end of the loop
turn `flush` writes the pending lines in one `write()`, before any reply of that turn
leaves. If that write fails, each grant of the batch is undone (its `undo` runs), so the
client is told the grant failed instead of holding a lease a restart would forget.

Compaction rewrites the journal as a snapshot of the live leases in a worker thread (a
temporary file renamed over the journal); the loop only hands over the lines it already
holds and, at the end, appends what was written meanwhile and renames.

Restoring the leases (re-adopting live holders) is `restore.py`'s job, not this module's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .drains import DrainStore
from .errors import ConfigError
from .journal import StateCorrupt, boot_id, frame, header_record, read_journal
from .statedir import (
    exists,
    lock_dir,
    open_private_dir,
    open_regular,
    read_all,
    stamp,
    write_all,
    write_new_file,
)

FILE_NAME = "leases.jsonl"
LOCK_NAME = "lock"
#: An admin creates this file in the state dir to start with no leases (`docs/durability.md`).
FORGET_NAME = "forget-leases"

#: A snapshot of fewer bytes than this (about 250 leases) is written on the loop: no
#: fsync, so it costs about what a burst of appends does; a larger one, in a thread.
INLINE_SNAPSHOT_BYTES = 128 << 10

#: Compact once the journal holds this many lines more than twice the live leases
#: (`RPOOL_AGENT_COMPACT_SLACK` overrides it: tests and the bench compact often).
COMPACT_SLACK = 2048

_TMP_PREFIX = f".{FILE_NAME}."


# --- the writer ---------------------------------------------------------------------------


class StateStore:
    """The server's journal: `open` once at start, `start` with the kept leases, then a
    `record_*` per change and `flush` at the end of each loop turn."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        compact_slack: int | None = None,
        *,
        forget: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.forget = forget  # `serve --forget-leases`: as if FORGET_NAME were there
        env = os.environ.get("RPOOL_AGENT_COMPACT_SLACK", "")
        self.compact_slack = compact_slack or (int(env) if env.isdigit() else COMPACT_SLACK)
        self.path = self.directory / FILE_NAME
        self._dir_fd: int | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._pending: list[tuple[bytes, Callable[[], None] | None]] = []
        self._live: dict[str, bytes] = {}  # lease id -> its framed grant line
        self._read_lines: dict[str, bytes] = {}  # what `open` read, until `start`
        self.drains: DrainStore | None = None  # the admin's drains (drains.py), from `open`
        self._lines = 0
        self._closed = False
        self._failing = False  # the last write failed; said so once
        self._dirty = False  # a write failed: the file needs a snapshot
        self._compact_failing = False  # the last compaction failed; said so once
        self._retry_at = 0  # after a failed compaction: not before this many lines
        self._compacting: list[bytes] | None = None  # lines written since the snapshot
        self._job: Any = None  # the snapshot being written (a concurrent.futures.Future)
        self._pool: Any = None  # its one worker thread, started at the first compaction
        self._by_token: dict[str, str] = {}  # restored leases not yet re-claimed
        self._token_of: dict[str, str] = {}
        self._at_turn_end: Callable[[Callable[[], None]], None] = lambda fn: None
        self._log: Callable[[str], None] = lambda line: None

    @property
    def pending(self) -> bool:
        """Whether lines wait to be written (the server flushes them before replies)."""
        return bool(self._pending)

    # --- start ----------------------------------------------------------------------------

    def open(self, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
        """Lock the state dir and read the journal: the lease records to try to re-adopt.

        Fails closed (ConfigError) when the leases of an earlier agent are lost as a whole
        (journal missing, or nothing in it readable) and no admin said to forget them.
        """
        self._log = log
        dir_fd = self._dir_fd = open_private_dir(self.directory)
        self._lock_fd, existed = lock_dir(dir_fd, self.directory, LOCK_NAME)
        self.drains = DrainStore(dir_fd, log)
        for name in os.listdir(dir_fd):  # a snapshot an earlier agent did not finish
            if name.startswith(_TMP_PREFIX) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)
        forget = self.forget or exists(FORGET_NAME, dir_fd)
        try:
            fd = open_regular(FILE_NAME, dir_fd, os.O_RDONLY)
        except FileNotFoundError:
            data = None
        except OSError as exc:
            raise ConfigError(f"{self.path}: {exc.strerror or exc}") from None
        else:
            try:
                data = read_all(fd)
            finally:
                os.close(fd)
        if forget:
            self._forget(data, log)
            return {}
        if data is None:
            if existed:
                raise self._lost("an earlier agent used it, but it has no " + FILE_NAME)
            return {}
        try:
            journal = read_journal(data)
        except StateCorrupt as exc:
            raise ConfigError(f"{self.path}: {exc}; refusing to start") from None
        if journal.records == 0:
            raise self._lost(f"{FILE_NAME} holds no readable record")
        if journal.damaged:
            copy = f"{FILE_NAME}.damaged-{stamp()}"
            with contextlib.suppress(OSError):
                write_new_file(dir_fd, copy, data)
            shown = ", ".join(map(str, journal.damaged[:10])) + (
                ", ..." if len(journal.damaged) > 10 else ""
            )
            log(
                f"STATE FILE DAMAGED: {self.path}: {len(journal.damaged)} line(s) unreadable "
                f"(line {shown}), skipped; the {journal.records} intact record(s) are used. "
                f"A lease granted on a damaged line is NOT protected. Copy kept as {copy}."
            )
        here = boot_id()
        if journal.header is None:
            log("state: the journal's header is lost; its boot is unknown: holders are checked")
        elif here is not None and journal.header.get("boot_id") != here:
            if journal.leases:
                log(f"state: {len(journal.leases)} lease(s) from an earlier boot dropped")
            return {}
        self._read_lines = journal.lines
        return journal.leases

    def _lost(self, why: str) -> ConfigError:
        return ConfigError(
            f"state dir {self.directory}: {why}: the leases it recorded are lost, and their "
            f"jobs may still run. Refusing to start with no leases. Once those jobs are gone "
            f"(or to take the risk), create {self.directory / FORGET_NAME} and start again "
            "(or start once with `serve --forget-leases`)."
        )

    def _forget(self, data: bytes | None, log: Callable[[str], None]) -> None:
        """The admin said to start with no leases: keep the old journal aside, say so."""
        assert self._dir_fd is not None
        aside = f"{FILE_NAME}.forgotten-{stamp()}"
        if data is not None:
            os.rename(FILE_NAME, aside, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        with contextlib.suppress(FileNotFoundError):  # `--forget-leases` needs none
            os.unlink(FORGET_NAME, dir_fd=self._dir_fd)
        log(
            "state: starting with NO leases, as an admin asked"
            + (f" (the old journal is kept as {aside})" if data is not None else "")
        )

    def start(
        self,
        kept: Iterable[str],
        *,
        at_turn_end: Callable[[Callable[[], None]], None],
        log: Callable[[str], None],
    ) -> None:
        """Begin a new journal holding the records `open` read for the leases `kept`
        (re-adopted), before anyone can connect. `at_turn_end(fn)` runs fn once at the
        end of the loop turn; `log` reports write failures (important lines)."""
        self._at_turn_end = at_turn_end
        self._log = log
        read, self._read_lines = self._read_lines, {}
        self._live = {lease_id: read[lease_id] for lease_id in kept}
        try:
            fd, tmp = _snapshot(self._dir_fd, list(self._live.values()))
            self._install(fd, tmp)
        except (OSError, ConfigError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"state dir {self.directory}: {why}") from None

    def note_restored(self, token: str, lease_id: str) -> None:
        """A re-adopted lease: an acquire retried with its token gets it back."""
        self._by_token[token] = lease_id
        self._token_of[lease_id] = token

    def restored_lease(self, token: str) -> str | None:
        """The id of a restored lease with this token: an acquire whose reply the agent's
        death cut off, retried by its client, gets that lease back, not a second one."""
        return self._by_token.get(token)

    # --- changes --------------------------------------------------------------------------

    def record_grant(
        self, lease_id: str, record: dict[str, Any], undo: Callable[[], None] | None = None
    ) -> None:
        """Lease `lease_id` was granted or re-bound (`record` from `lease_record`). If its
        line cannot be written, `undo` runs (at the flush) instead of the reply leaving."""
        if self._closed:
            return
        line = frame({"grant": record})
        self._live.pop(lease_id, None)  # a re-grant moves to the end, as in the file
        self._live[lease_id] = line
        self._queue(line, undo)

    def record_end(self, lease_id: str) -> None:
        """Lease `lease_id` ended (released, reaped, or its grant undone)."""
        if self._closed:
            return
        self._live.pop(lease_id, None)
        token = self._token_of.pop(lease_id, None)
        if token is not None:
            del self._by_token[token]
        self._queue(frame({"end": lease_id}), None)

    def _queue(self, line: bytes, undo: Callable[[], None] | None) -> None:
        self._pending.append((line, undo))
        if len(self._pending) == 1:
            self._at_turn_end(self._end_of_turn)

    def flush(self) -> None:
        """Write every pending line in one `write()`, before any reply of the turn leaves.
        On failure each grant of the batch is undone."""
        if not self._pending or self._fd is None:
            return
        batch, self._pending = self._pending, []
        data = b"".join(line for line, _ in batch)
        if self._compacting is not None:
            self._compacting.append(data)
        try:
            write_all(self._fd, data)
        except OSError as exc:
            self._write_failed(exc)
            for _, undo in batch:
                if undo is not None:
                    try:
                        undo()
                    except Exception as err:  # a bug: the other grants are still undone
                        self._log(f"state: undoing a grant failed: {err!r}")
            return
        self._lines += len(batch)
        if self._failing:
            self._failing = False
            self._log(f"state: {self.path} is written again")

    def _write_failed(self, exc: OSError) -> None:
        """A full disk, a quota, a read-only remount: say so loudly once; the grants of
        the batch are undone; the journal gets a snapshot once writes work again."""
        self._dirty = True
        if not self._failing:
            self._failing = True
            self._log(
                f"STATE WRITE FAILED: {self.path}: {exc.strerror or exc}. Acquires that would "
                "be granted are refused until the journal can be written again."
            )

    def _compact_failed(self, exc: Exception) -> None:
        """A snapshot could not be written (a disk nearly full takes an append, not a
        snapshot): appending goes on; retried after `compact_slack` more records."""
        self._dirty = True
        self._retry_at = self._lines + self.compact_slack
        if not self._compact_failing:
            self._compact_failing = True
            why = getattr(exc, "strerror", None) or exc
            self._log(f"state: compacting {self.path} failed: {why}; records are still appended")

    def _end_of_turn(self) -> None:
        self.flush()
        if self._pending:  # an undo recorded more: the server calls us again
            self._at_turn_end(self._end_of_turn)
        elif (
            self._fd is not None
            and self._compacting is None
            and (self._dirty or self._lines > self.compact_slack + 2 * len(self._live))
            and self._lines >= self._retry_at
        ):
            self._compact()

    # --- compaction -----------------------------------------------------------------------

    def _compact(self) -> None:
        """Snapshot the live leases: a large snapshot in a worker thread (`_compacted`
        finishes on the loop), a small one right here, where writing it to the page cache
        costs less than handing it to a thread (bench/lease.py --compact-slack)."""
        import asyncio

        lines = list(self._live.values())
        self._compacting = []
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving a store alone)
            loop = None
        if loop is None or len(lines) * 512 < INLINE_SNAPSHOT_BYTES:  # lines: ~300-500 B
            self._compacted(None, lambda: _snapshot(self._dir_fd, lines))
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rpool-journal")
        job = self._job = self._pool.submit(_snapshot, self._dir_fd, lines)
        asyncio.wrap_future(job, loop=loop).add_done_callback(
            lambda done: self._compacted(job, done.result)
        )

    def _compacted(self, job: Any, result: Callable[[], tuple[int, str]]) -> None:
        """Append what was written since the snapshot, then rename it over the journal."""
        if job is not self._job:  # `close` has dealt with it
            return
        self._job = None
        since, self._compacting = self._compacting or [], None
        try:
            fd, tmp = result()
        except (OSError, ConfigError) as exc:
            self._compact_failed(exc)
            return
        try:
            write_all(fd, b"".join(since))
            self._install(fd, tmp)
        except OSError as exc:
            _discard(fd, tmp, self._dir_fd)
            self._compact_failed(exc)
            return
        self._dirty = self._compact_failing = False
        if self._failing:
            self._failing = False
            self._log(f"state: {self.path} is written again")

    def _install(self, fd: int, tmp: str) -> None:
        """Rename the snapshot `tmp` (open as `fd`) over the journal and append to it."""
        os.replace(tmp, FILE_NAME, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        old, self._fd = self._fd, fd
        if old is not None:
            with contextlib.suppress(OSError):  # EIO from close(): the number is freed anyway
                os.close(old)
        self._lines = len(self._live) + 1

    def close(self) -> None:
        """Write what is pending, then record nothing more (the agent is stopping)."""
        if self._fd is not None:
            self.flush()
        self._closed = True
        if self.drains is not None:
            self.drains.close()
        job, self._job = self._job, None
        if job is not None:  # wait for the snapshot thread: it uses the dir's descriptor
            with contextlib.suppress(Exception):
                _discard(*job.result(timeout=60), self._dir_fd)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for fd in (self._fd, self._lock_fd, self._dir_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = self._dir_fd = None


def _snapshot(dir_fd: int | None, lines: list[bytes]) -> tuple[int, str]:
    """Write a header and `lines` to a new temporary file in the state dir; (its open
    descriptor, its name). Runs in a worker thread: no fsync (see the module doc)."""
    assert dir_fd is not None
    tmp = f"{_TMP_PREFIX}{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = open_regular(tmp, dir_fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
    try:
        write_all(fd, frame(header_record()) + b"".join(lines))
    except BaseException:
        _discard(fd, tmp, dir_fd)
        raise
    return fd, tmp


def _discard(fd: int, tmp: str, dir_fd: int | None) -> None:
    """Close and remove an unfinished snapshot."""
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp, dir_fd=dir_fd)
