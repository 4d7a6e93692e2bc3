"""The journal's framing, damaged and missing journals, and how it is written.

Real files on disk and real agent processes: journals are damaged the way disks and
crashes damage them (a torn record, a flipped byte, zeros, garbage), a journal is deleted
or replaced by a FIFO, and compaction is watched from the thread it runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import gpu_pool, running_agent, wait_until
from test_state import grant, header, held, write_state

from rpool_agent import state as state_mod
from rpool_agent.errors import ConfigError, ResourceUnavailable
from rpool_agent.holders import process_starttime
from rpool_agent.journal import StateCorrupt, boot_id, frame, load_records, read_journal
from rpool_agent.state import FILE_NAME, FORGET_NAME, StateStore

ME = os.getpid()


def journal_lines() -> list[bytes]:
    """Header, three grants held by this process (GPUs 0-2), and an end of another."""
    start = process_starttime(ME)
    lines = [header(), *(grant(x, str(i), ME, start) for i, x in enumerate("abc"))]
    return [frame(x) for x in [*lines, {"end": "x"}]]


def damage(kind: str, lines: list[bytes]) -> tuple[bytes, set[str]]:
    """The journal with line 3 (lease b) damaged in one way; the leases that must survive."""
    b = lines[2]
    if kind == "torn":  # cut mid-record, its newline gone: c's record follows on its line
        bad = b[: len(b) // 2]
    elif kind == "flipped":  # one byte of the JSON changed
        i = b.index(b'"gpus"') + 2
        bad = b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]
    elif kind == "zeros":  # a block of zeros where the record (and its newline) was
        bad = b"\0" * len(b)
    elif kind == "wrong-shape":  # intact frame, but not a lease record
        bad = frame({"grant": {"id": "b", "resources": 3}})
    elif kind == "garbage":  # a garbage line inserted before b: nothing is lost
        return b"".join([*lines[:2], b"garbage \xff\n", *lines[2:]]), {"a", "b", "c"}
    else:
        raise AssertionError(kind)
    return b"".join([*lines[:2], bad, *lines[3:]]), {"a", "c"}


KINDS = ["torn", "flipped", "zeros", "wrong-shape", "garbage"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_record_loses_only_itself(kind: str) -> None:
    data, survivors = damage(kind, journal_lines())
    j = read_journal(data)
    assert set(j.leases) == survivors
    assert j.header is not None and j.header["boot_id"] == boot_id()
    assert j.damaged == [3]


def test_replay_order_re_grants_ends_and_a_torn_tail() -> None:
    lines = journal_lines()
    regrant = grant("b", "3", ME, 5)
    data = b"".join([*lines, frame({"end": "a"}), frame(regrant), frame(grant("d", "0", 1, 1))])
    j = read_journal(data[:-10])  # the last record cut short: never acknowledged
    assert list(j.leases) == ["c", "b"]  # a ended; b re-granted (moved to the end)
    assert j.leases["b"]["resources"] == {"gpus": [{"id": "3", "slots": 1}]}
    assert j.damaged == []


def test_a_record_without_holder_or_token_is_damaged_and_other_formats_are_refused(
    tmp_path: Path,
) -> None:
    no_pid, no_token = grant("a", "0", 1, 5), grant("b", "1", 1, 5)
    del no_pid["grant"]["holder"]["pid"]
    del no_token["grant"]["token"]
    j = read_journal(b"".join(frame(x) for x in [header(), no_pid, no_token]))
    assert j.leases == {} and j.damaged == [2, 3]
    with pytest.raises(StateCorrupt, match="version"):
        read_journal(frame({**header(), "version": 99}))
    # version 1 (no frames), as the previous release wrote it, still reads
    old = [{**header(), "version": 1}, grant("a", "0", 1, 5), {"end": "a"}, grant("b", "1", 1, 5)]
    path = tmp_path / FILE_NAME
    path.write_text("".join(json.dumps(x) + "\n" for x in old))
    assert list(load_records(path)[1]) == ["b"]


@pytest.mark.parametrize("kind", ["torn", "zeros"])
def test_the_agent_keeps_every_intact_lease_of_a_damaged_journal(kind: str, tmp_path: Path) -> None:
    data, survivors = damage(kind, journal_lines())
    path = write_state(tmp_path)
    path.write_bytes(data)
    with running_agent(tmp_path) as agent:
        assert set(held(agent)) == survivors
        log = agent.log()
        assert "STATE FILE DAMAGED" in log and "line 3" in log
        copies = list(path.parent.glob(f"{FILE_NAME}.damaged-*"))
        assert len(copies) == 1 and copies[0].read_bytes() == data
        with agent.client() as c:  # a stranger gets only what the survivors do not hold
            with pytest.raises(ResourceUnavailable):
                c.acquire(gpus=4, timeout=0)
            assert c.acquire(gpus=1, timeout=0).gpus[0].id == "1"
            assert set(load_records(path)[1]) == set(held(agent))


def serve_refuses(agent: Any) -> str:
    """Run the agent's command again; it must exit at once, non-zero, in one line."""
    r = subprocess.run(agent.cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_a_lost_journal_fails_closed_until_an_admin_says_to_forget(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        state_dir = tmp_path / "agent-state"
        c = agent.client().connect()
        lease = c.acquire(gpus=1)
        agent.kill()
        (state_dir / FILE_NAME).unlink()
        said = serve_refuses(agent)
        assert "Refusing to start with no leases" in said and FORGET_NAME in said
        (state_dir / FILE_NAME).write_bytes(b"\0" * 4096)  # zero-filled: nothing readable
        assert "no readable record" in serve_refuses(agent)
        (state_dir / FORGET_NAME).touch()
        agent.restart()
        assert held(agent) == {}
        assert "as an admin asked" in agent.log()
        assert not (state_dir / FORGET_NAME).exists()
        assert len(list(state_dir.glob(f"{FILE_NAME}.forgotten-*"))) == 1
        assert c.acquire(gpus=4, timeout=0).id != lease.id  # the admin's choice
        c.close()
        agent.kill()  # the same, said with the serve option instead of the file
        (state_dir / FILE_NAME).unlink()
        assert "--forget-leases" in serve_refuses(agent)
        agent.cmd = [*agent.cmd, "--forget-leases"]
        agent.restart()
        assert held(agent) == {} and agent.log().count("as an admin asked") == 2


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_journal_that_is_no_regular_file_is_refused_at_once(kind: str, tmp_path: Path) -> None:
    """A FIFO once hung start-up (and SIGTERM with it); a link is never followed."""
    path = write_state(tmp_path, header())
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        target = tmp_path / "elsewhere"
        target.write_bytes(frame(header()))
        path.symlink_to(target)
    with pytest.raises(RuntimeError, match="exited early"), running_agent(tmp_path):
        pass
    log = (tmp_path / "agent.log").read_text()
    assert FILE_NAME in log and "Traceback" not in log
    assert ("not a regular file" if kind == "fifo" else "symbolic links") in log


# --- the writer, in-process --------------------------------------------------------------


def test_compaction_runs_in_a_worker_thread_without_fsync_and_keeps_lines_written_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync is made to fail: nothing here may call it. The snapshot thread is held until
    more lines were written to the old journal: the new one must have them too."""

    def no_fsync(fd: int) -> None:
        raise AssertionError("fsync called")

    monkeypatch.setattr(os, "fsync", no_fsync)
    monkeypatch.setattr(os, "fdatasync", no_fsync)
    real_snapshot = state_mod._snapshot
    threads: list[int] = []
    go = threading.Event()

    def held_snapshot(dir_fd: int, lines: list[bytes]) -> Any:
        threads.append(threading.get_ident())
        if len(threads) == 1:
            go.wait(10)
        return real_snapshot(dir_fd, lines)

    monkeypatch.setattr(state_mod, "_snapshot", held_snapshot)
    monkeypatch.setattr(state_mod, "INLINE_SNAPSHOT_BYTES", 0)  # however small: the thread
    path = tmp_path / "state" / FILE_NAME
    log: list[str] = []

    async def main() -> None:
        store = StateStore(tmp_path / "state", compact_slack=4)
        assert store.open(log.append) == {}
        ends: list[Any] = []
        store.start([], at_turn_end=ends.append, log=log.append)  # synchronous: first snapshot
        threads.clear()
        for i in range(8):
            store.record_grant(f"l{i}", grant(f"l{i}", "0", ME, 5)["grant"])
        for i in range(6):
            store.record_end(f"l{i}")
        ends[-1]()  # the loop turn ends: flush, then compaction starts in a thread
        assert store._compacting is not None and len(threads) == 1
        assert threads[0] != threading.get_ident()
        store.record_grant("late", grant("late", "1", ME, 5)["grant"])
        store.record_end("l6")
        store.flush()  # to the old journal, while the snapshot is being written
        go.set()
        deadline = time.monotonic() + 10
        while store._compacting is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert list(load_records(path)[1]) == ["l7", "late"]
        assert len(path.read_bytes().splitlines()) == 3 + 2  # snapshot + the 2 lines since
        store.close()

    asyncio.run(main())
    assert log == []


def test_a_second_agent_cannot_share_the_dir_and_a_stale_snapshot_is_cleaned(
    tmp_path: Path,
) -> None:
    d = tmp_path / "state"
    first = StateStore(d)
    first.open(lambda line: None)
    first.start([], at_turn_end=lambda fn: None, log=lambda line: None)
    with pytest.raises(ConfigError, match="another agent"):
        StateStore(d).open(lambda line: None)
    first.close()
    (d / ".leases.jsonl.999.tmp").write_text("half a snapshot")
    again = StateStore(d)
    assert again.open(lambda line: None) == {}
    assert not (d / ".leases.jsonl.999.tmp").exists()
    again.close()


def test_one_pidfd_per_holder_process_after_a_restart(tmp_path: Path) -> None:
    start = process_starttime(ME)
    n = 12
    records = [grant(f"r{i}", str(i % 4), ME, start, token=f"{i:032d}") for i in range(n)]
    write_state(tmp_path, header())
    path = tmp_path / "agent-state" / FILE_NAME
    path.write_bytes(b"".join(frame(x) for x in [header(), *records]))
    pool = gpu_pool(slots_per_gpu=3)
    with running_agent(tmp_path, pool) as agent:
        assert len(held(agent)) == n
        pid = agent.proc.pid

        def pidfds() -> int:
            n = 0
            for f in Path(f"/proc/{pid}/fd").iterdir():
                # an fd closed since the listing (a socket, a temp file) is not a pidfd
                with contextlib.suppress(FileNotFoundError):
                    n += os.readlink(f) == "anon_inode:[pidfd]"
            return n

        assert pidfds() == 1
        with agent.client() as c:  # releasing them one by one keeps the shared one open
            for i in range(n - 1):
                c.call("reclaim", lease=f"r{i}", token=f"{i:032d}")
                c.call("release", lease=f"r{i}")
            assert pidfds() == 1
            c.call("reclaim", lease=f"r{n - 1}", token=f"{n - 1:032d}")
            wait_until(lambda: pidfds() == 0)


def test_ending_a_restored_lease_forgets_only_its_token(tmp_path: Path) -> None:
    """`record_end` drops the ended lease's token by the id -> token map (it once rebuilt
    the whole token map on every end while restored leases remained)."""
    store = StateStore(tmp_path / "state")
    store.open(lambda line: None)
    store.start([], at_turn_end=lambda fn: None, log=lambda line: None)
    for i in range(3):
        store.note_restored(f"token-{i}", f"lease-{i}")
    store.record_end("lease-1")
    store.record_end("not-restored")
    assert [store.restored_lease(f"token-{i}") for i in range(3)] == ["lease-0", None, "lease-2"]
    assert store._token_of == {"lease-0": "token-0", "lease-2": "token-2"}
    store.close()


def test_an_admin_drain_outlives_a_restart_written_durably_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "agent-state" / "drains.json"

    def saved() -> Any:
        return json.loads(path.read_text()) if path.exists() else None

    with running_agent(tmp_path, None, "--admin-group", str(os.getgid())) as agent:
        c = agent.client().connect()
        c.call("drain", resource="gpus:1", reason="ecc")
        wait_until(lambda: saved() == [["gpus", "1", "ecc"]])
        agent.kill()
        agent.restart()
        assert agent.status()["drained"] == [{"type": "gpus", "id": "1", "reason": "ecc"}]
        assert "gpus:1 drained again" in agent.log()
        with pytest.raises(ResourceUnavailable):
            c.acquire(gpus=4, timeout=0)
        c.call("undrain", resource="gpus:1")
        wait_until(lambda: saved() == [])
        agent.kill()
        agent.restart()
        assert agent.status()["drained"] == []
        c.close()


def test_a_snapshot_that_cannot_be_written_leaves_appending_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk nearly full takes a record but not a snapshot (made to fail here with
    ENOSPC, as no real disk can be filled to that point safely): records go on being
    appended, it is said once, and compaction is retried only after more records."""
    import errno

    attempts: list[int] = []

    def no_space(dir_fd: int, lines: list[bytes]) -> Any:
        attempts.append(len(lines))
        raise OSError(errno.ENOSPC, "No space left on device")

    log: list[str] = []
    store = StateStore(tmp_path / "state", compact_slack=4)
    store.open(log.append)
    ends: list[Any] = []
    store.start([], at_turn_end=ends.append, log=log.append)
    monkeypatch.setattr(state_mod, "_snapshot", no_space)
    for i in range(30):
        store.record_grant(f"l{i}", grant(f"l{i}", "0", ME, 5)["grant"])
        if i:
            store.record_end(f"l{i - 1}")
        ends[-1]()  # each loop turn: its records are appended, then maybe a compaction
    assert list(load_records(tmp_path / "state" / FILE_NAME)[1]) == ["l29"]
    assert sum("compacting" in line for line in log) == 1 and len(log) == 1
    assert 1 < len(attempts) <= 59 // 4  # retried, at most once per 4 (the slack) records
    store.close()
