"""Durable leases: the state journal, recycled pids, corrupt files, crash consistency.

Real agent processes, real files, real SIGKILLs. State files are faked only to put the
agent in situations a test cannot wait for (a recycled pid, an earlier boot, a lost reply).
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import answer_within, gpu_pool, running_agent, wait_until

from rpool_agent.errors import NotRecorded, RpoolAgentError
from rpool_agent.holders import process_starttime
from rpool_agent.journal import boot_id, frame, load_records, unframe
from rpool_agent.state import FILE_NAME

PY = sys.executable


def header(boot: str | None = None) -> dict[str, Any]:
    return {"format": "rpool-agent-state", "version": 2, "boot_id": boot or boot_id()}


def grant(lid: str, gpu: str, pid: int, start: int | None, token: str = "t" * 32) -> dict:
    """A grant line as the agent writes it."""
    return {
        "grant": {
            "id": lid,
            "owner": ["conn", 1],
            "request": {"gpus": 1},
            "groups": [[["gpus", gpu, 1]]],
            "resources": {"gpus": [{"id": gpu, "slots": 1}]},
            "label": lid,
            "holder": {"pid": pid, "uid": os.getuid(), "gid": os.getgid(), "starttime": start},
            "granted_at": time.monotonic(),
            "token": token,
        }
    }


def write_state(tmp_path: Path, *lines: dict[str, Any], name: str = "agent") -> Path:
    """A state dir as `running_agent(name=...)` uses it, holding these journal lines."""
    d = tmp_path / f"{name}-state"
    d.mkdir(mode=0o700)
    d.chmod(0o700)
    path = d / FILE_NAME
    path.write_bytes(b"".join(frame(x) for x in lines))
    return path


def held(agent: Any) -> dict[str, list[str]]:
    return {
        le["id"]: [g["id"] for g in le["resources"].get("gpus", [])]
        for le in agent.status()["leases"]
    }


# --- the agent and its state dir -----------------------------------------------------------


def test_state_is_private_and_records_every_grant_and_release(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent, agent.client() as c:
        state = tmp_path / "agent-state"
        lease = c.acquire(gpus=1, cpus=2, label="mine")
        _, leases = load_records(state / FILE_NAME)  # written before the reply came
        rec = leases[lease.id]
        assert rec["resources"] == lease.resources
        assert rec["token"] == lease.token and rec["label"] == "mine"
        assert rec["holder"] == {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "gid": os.getgid(),
            "starttime": process_starttime(os.getpid()),
        }
        assert rec["request"] == {"gpus": 1, "cpus": 2}
        lease.release()
        assert load_records(state / FILE_NAME)[1] == {}
        assert state.stat().st_mode & 0o777 == 0o700
        assert (state / FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_a_lone_surrogate_label_from_an_older_agent_is_restored_as_text(
    tmp_path: Path,
) -> None:
    """JSON lets a client send a lone surrogate ("\\ud800"), which is no text. Agents
    before codec.py took it and journalled it escaped; this one refuses it as malformed.
    A journal an older agent wrote still restores: the label comes back with U+FFFD in
    place of the surrogate, `status` answers, and compaction rewrites the journal."""
    with running_agent(tmp_path) as agent:
        c = agent.client().connect()
        with pytest.raises(RpoolAgentError, match="malformed"):
            c.call("acquire", request={"gpus": 1}, label="odd \ud800 label")
        lease = c.acquire(gpus=1, label="odd SURROGATE label")
        other = c.acquire(gpus=1, label="plain")
        assert agent.stop() == 0
        state = tmp_path / "agent-state" / FILE_NAME
        lines = []
        for line in state.read_bytes().splitlines():  # as the older agent wrote it
            text = unframe(line)[0].replace(b"SURROGATE", b"\\ud800")
            lines.append(b"%s\t%d:%08x\n" % (text, len(text), zlib.crc32(text)))
        state.write_bytes(b"".join(lines))
        assert load_records(state)[1][lease.id]["label"] == "odd \ufffd label"
        agent.restart()  # re-adopts both, compacting the journal (the other writer)
        labels = {le["id"]: le["label"] for le in agent.status()["leases"]}
        assert labels == {lease.id: "odd \ufffd label", other.id: "plain"}
        c.release(other.id)
        assert set(load_records(state)[1]) == {lease.id}
        c.close()


def test_a_grant_whose_journal_write_fails_is_refused_not_forgotten(tmp_path: Path) -> None:
    """A full disk, for real: the agent's RLIMIT_FSIZE is lowered under it (a write past
    it fails with EFBIG; Python ignores SIGXFSZ). A grant that cannot be recorded would be
    forgotten by a restart while its holder runs, so the client gets an error instead;
    the log says so once; once writes work again, grants do too and survive a restart."""
    config = tmp_path / "agent.yaml"
    config.write_text("log_level: warning\n")  # only the lines this test reads
    with running_agent(tmp_path, None, "--config", str(config)) as agent:
        journal = tmp_path / "agent-state" / FILE_NAME
        c = agent.client().connect()
        held_before = [c.acquire(gpus=1, label=f"{i}" * 256) for i in range(3)]
        # The limit applies to every file the agent writes: it sits below the journal's
        # size (no record fits, nor a snapshot of the same three leases) and far above
        # what the log file will hold.
        limit = journal.stat().st_size - 50
        assert limit > 1500
        hard = resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE, (limit, hard))  # soft limit
        with answer_within(20):  # the failure this guards against is a reply never sent
            for _ in range(2):
                with pytest.raises(NotRecorded, match="could not record"):
                    c.acquire(gpus=1, label="x" * 200, timeout=5)
        before = {le.id: [le.gpus[0].id] for le in held_before}
        assert held(agent) == before  # nothing else was given
        wait_until(lambda: agent.log().count("withdrawn") == 2)  # logged after the replies
        log = agent.log()
        assert log.count("STATE WRITE FAILED") == 1 and "Traceback" not in log
        resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        after = c.acquire(gpus=1, label="after")
        wait_until(lambda: "is written again" in agent.log())
        wait_until(lambda: set(load_records(journal)[1]) == {*before, after.id})
        assert agent.stop() == 0
        agent.restart()
        assert held(agent) == {**before, after.id: [after.gpus[0].id]}
        c.close()


def test_unsafe_or_shared_state_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(gpu_pool()))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)

    def serve_fails(sock: str, state_dir: Path) -> str:
        cmd = [PY, "-m", "rpool_agent.cli", "serve", "--pool", str(pool), "--socket", sock]
        r = subprocess.run(
            [*cmd, "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=30
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr
        return r.stderr

    assert "writable by it alone" in serve_fails(str(tmp_path / "x.sock"), shared)
    with running_agent(tmp_path) as agent:
        said = serve_fails(str(tmp_path / "y.sock"), tmp_path / "agent-state")
        assert f"another agent (pid {agent.proc.pid}) keeps its leases in " in said
        assert "to run a second agent, give it a --state-dir and a --socket of its own" in said
        assert len(said.splitlines()) == 1
        assert agent.status()["leases"] == []  # the first one is unharmed


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Any:
    """A directory on a file system mounted read-only (a tmpfs: mounting needs root)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        (mnt / "state").mkdir(mode=0o700)  # an agent's dir from before the remount
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_state_dir_on_a_read_only_file_system_is_one_line(
    tmp_path: Path, read_only_dir: Path
) -> None:
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps(gpu_pool()))
    for state_dir in (read_only_dir / "state", read_only_dir / "new"):
        cmd = [PY, "-m", "rpool_agent.cli", "serve", "--pool", str(pool)]
        cmd += ["--socket", str(tmp_path / "a.sock"), "--state-dir", str(state_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert r.stderr.startswith(f"rpool-agent: state dir {state_dir}")
        assert r.stderr.endswith(": Read-only file system\n")
        assert len(r.stderr.splitlines()) == 1


def test_recycled_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        start = process_starttime(sleeper.pid)
        assert start is not None
        write_state(
            tmp_path,
            header(),
            grant("recycled", "0", sleeper.pid, start + 1),  # same pid, another process
            grant("unknown-start", "1", sleeper.pid, None),  # cannot be told apart: dropped
            grant("alive", "2", sleeper.pid, start, token="s" * 32),
        )
        with running_agent(tmp_path) as agent:
            assert held(agent) == {"alive": ["2"]}
            assert "restored 1 lease(s)" in agent.log() and "dropped 2" in agent.log()
            with agent.client() as c:  # GPU 0 is free again: the recycled pid holds nothing
                assert c.acquire({"gpus": 3}, timeout=0).resources["gpus"] == [
                    {"id": "0", "slots": 1},
                    {"id": "1", "slots": 1},
                    {"id": "3", "slots": 1},
                ]
                sleeper.kill()
                sleeper.wait()
                t0 = time.monotonic()
                wait_until(lambda: "alive" not in held(agent), timeout=5)
                assert time.monotonic() - t0 < 1.0  # a pidfd, no polling interval
    finally:
        sleeper.kill()
        sleeper.wait()


def test_state_of_an_earlier_boot_is_dropped(tmp_path: Path) -> None:
    me = process_starttime(os.getpid())
    write_state(tmp_path, header("another-boot"), grant("old", "0", os.getpid(), me))
    with running_agent(tmp_path) as agent:
        assert held(agent) == {}
        assert "earlier boot" in agent.log()


def test_clean_stop_keeps_leases_for_the_next_agent(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        c = agent.client().connect()
        lease = c.acquire(gpus=1, files=True)
        files = lease.files
        assert agent.stop() == 0  # SIGTERM: an upgrade, `systemctl restart`
        assert os.path.exists(files.pool)  # the lease's files outlive the agent with it
        agent.restart()
        assert held(agent) == {lease.id: ["0"]}
        lease.release()  # reconnects, re-claims, releases
        assert held(agent) == {}
        assert not os.path.exists(files.pool)
        c.close()


def test_retried_acquire_gets_the_lease_whose_reply_a_crash_cut_off(tmp_path: Path) -> None:
    """The agent journaled a grant and died before its reply left; the client's retry of
    the same acquire (same token) is answered with that lease, not a second one."""
    me = process_starttime(os.getpid())
    token = "f" * 32
    write_state(tmp_path, header(), grant("lost-reply", "0", os.getpid(), me, token=token))
    with running_agent(tmp_path) as agent:
        with agent.client() as c:
            doc = c.call("acquire", request={"gpus": 1}, token=token)
            assert doc["id"] == "lost-reply" and doc["token"] == token
            (le,) = agent.status()["leases"]
            assert le["id"] == "lost-reply" and le["holder"]["pid"] == os.getpid()
            other = c.call("acquire", request={"gpus": 1}, token="e" * 32)  # new token: new lease
            assert other["id"] != "lost-reply" and other["resources"]["gpus"][0]["id"] == "1"
        # the retry bound the lease to the connection: closing it ends both leases
        wait_until(lambda: agent.status()["leases"] == [])


# --- crash consistency ---------------------------------------------------------------------

BURST = r"""
import json, os, random, socket, sys
path, log_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(seed)
log = open(log_path, "a", buffering=1)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
f = s.makefile("rb")
n = 0
def call(op, **args):
    global n
    n += 1
    s.sendall(json.dumps({"id": n, "op": op, **args}).encode() + b"\n")
    line = f.readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("agent gone")
    return json.loads(line)
held = []
try:
    call("hello", version=1)
    log.write("UP\n")
    while True:
        if held and (len(held) >= 3 or rnd.random() < 0.5):
            lid = held.pop(rnd.randrange(len(held)))
            log.write(f"R- {lid}\n")
            r = call("release", lease=lid)
            assert r["ok"], r
            log.write(f"R+ {lid}\n")
        else:
            r = call("acquire", request={"cpus": 1}, timeout=0)
            if r.get("ok"):
                held.append(r["result"]["id"])
                log.write(f"G {r['result']['id']}\n")
except (ConnectionError, OSError):
    log.write("LOST\n")
"""


def check_told_matches_file(state_file: Path, logs: dict[int, list[str]]) -> tuple[int, int, int]:
    """The invariant, for a file left by a SIGKILLed agent and what each client logged:

    - every lease a client was told it got (G) and had not started to release (R-) is in
      the file;
    - no lease whose release a client saw confirmed (R+) is in it (one whose release was
      in flight at the kill, R- without R+, may be either);
    - a lease in the file that no client was told about is a grant whose reply the kill
      cut off: its holder is one of the clients, and each client has at most one, since a
      client has one request in flight. The agent restarted with this file re-adopts such
      a lease while its holder runs, and the holder's retry with the same token gets it.
    - no two leases in the file share a cpu.
    """
    _, leases = load_records(state_file)  # must load: the file is never half-written
    told, released, unsure = set(), set(), set()
    for lines in logs.values():
        for line in lines:
            kind, _, lid = line.partition(" ")
            {"G": told, "R+": released, "R-": unsure}.get(kind, set()).add(lid)
    must_hold = told - unsure
    assert must_hold <= leases.keys(), f"told but missing: {must_hold - leases.keys()}"
    assert not (released & leases.keys()), f"released but in the file: {released & leases.keys()}"
    untold = [leases[lid] for lid in leases.keys() - told]
    per_pid: dict[int, int] = {}
    for rec in untold:
        pid = rec["holder"]["pid"]
        assert pid in logs, f"lease {rec['id']} held by {pid}, which is no client"
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert all(n <= 1 for n in per_pid.values()), per_pid
    cpus = [g["id"] for rec in leases.values() for g in rec["resources"]["cpus"]]
    assert len(cpus) == len(set(cpus)), "two leases on one cpu"
    return len(must_hold), len(released), len(untold)


def test_sigkill_at_random_points_leaves_a_file_that_agrees_with_what_clients_were_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rnd = random.Random(int(os.environ.get("RPOOL_CRASH_SEED", "1234")))
    pool = gpu_pool(n_gpus=1, n_cpus=8)
    state_file = tmp_path / "agent-state" / FILE_NAME
    iterations, totals = 12, [0, 0, 0]
    monkeypatch.setenv("RPOOL_AGENT_COMPACT_SLACK", "64")  # compactions amid the bursts too
    with running_agent(tmp_path, pool) as agent:
        for it in range(iterations):
            if it:
                agent.restart()  # restores from the file the kill left: holders gone
                assert "CORRUPT" not in agent.log()
                assert held(agent) == {}
            logs_paths = [tmp_path / f"it{it}-c{k}.log" for k in range(3)]
            clients = [
                subprocess.Popen(
                    [PY, "-c", BURST, agent.socket, str(p), str(rnd.randrange(1 << 30))]
                )
                for p in logs_paths
            ]
            wait_until(lambda ps=logs_paths: all(p.exists() and p.read_text() for p in ps))
            time.sleep(rnd.uniform(0.0, 0.25))
            agent.kill()
            for proc in clients:
                assert proc.wait(10) == 0
            logs = {
                proc.pid: p.read_text().splitlines()
                for proc, p in zip(clients, logs_paths, strict=True)
            }
            assert all(lines[-1] == "LOST" for lines in logs.values())
            for k, n in enumerate(check_told_matches_file(state_file, logs)):
                totals[k] += n
    print(f"held/released/reply-lost leases checked: {totals}")
    assert totals[0] > 0 and totals[1] > 0  # the kills did land amid traffic
