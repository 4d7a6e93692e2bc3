"""`status`: the documented schema (docs/status.md) and the human view, from a real agent.

Holders and waiters are real `rpool-agent run` processes; their user names and commands
come from psutil in the agent, and are checked against what this test knows of them.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, keys_anywhere, running_agent, wait_until

from rpool_agent.errors import RequestError
from rpool_agent.status_text import format_age, render_status, short_uuid

RPOOL = [sys.executable, "-m", "rpool_agent.cli"]
ME = pwd.getpwuid(os.getuid()).pw_name

# The schema's objects and their keys, as docs/status.md lists them: a key added or
# dropped here without the docs (and a schema bump for a dropped one) is a break.
TOP = {"schema", "agent", "connections", "types", "instances", "leases", "waiters", "drained"}
TOP |= {"vanished", "audit", "gpus_unavailable", "idle", "complete", "more"}
HOLDER = {"pid", "uid", "gid", "starttime", "user", "command"}
LEASE = {"id", "label", "holder", "age_s", "resources", "stale"}
WAITER = {"position", "holder", "label", "request", "request_text", "waited_s", "timeout_s"}
INSTANCE = {"id", "slots", "used", "leases", "drained", "vanished"}
INTERNAL = {"owner", "req_id", "granted_at", "since", "deadline", "token", "waiting_s"}


@contextmanager
def busy_agent(tmp_path: Path) -> Iterator[tuple[Agent, subprocess.Popen[bytes], Any]]:
    """4 GPUs: two held by `sleep` (label with a terminal escape), gpus:3 drained, and
    a `run --gpus 2` waiting (one GPU is free, the request needs two)."""
    with running_agent(tmp_path) as agent:
        holder = subprocess.Popen(
            [*RPOOL, "run", "--gpus", "2", "--label", "train\x1b[2J", "--", "sleep", "60"],
            env=agent.env,
        )
        waiter = None
        try:
            # `run` holds the lease before it execs `sleep`: a status asked in between
            # names the holder `rpool-agent`; once exec'd, every later status must say
            # `sleep` (a command cached by pid and start time, which exec keeps, did not).
            wait_until(lambda: len(agent.status()["leases"]) == 1)
            wait_until(lambda: agent.status()["leases"][0]["holder"]["command"] == "sleep")
            with agent.client() as c:
                c.drain("gpus:3", "bad fan")
            waiter = subprocess.Popen(
                [*RPOOL, "run", "--gpus", "2", "--", "true"],
                env=agent.env,
                stderr=subprocess.DEVNULL,
            )
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            yield agent, holder, waiter
        finally:
            for p in (holder, waiter):
                if p is not None:
                    p.kill()
                    p.wait()


def test_status_json_names_holders_and_waiters_and_leaks_nothing(tmp_path: Path) -> None:
    with busy_agent(tmp_path) as (agent, holder, waiter):
        doc = agent.status()
    assert set(doc) == TOP and doc["schema"] == 2
    assert doc["complete"] and doc["more"] == {"leases": 0, "waiters": 0}
    assert doc["idle"] == {"cpus": "0-3"}  # GPUs are listed whole, never summed up
    assert not keys_anywhere(doc) & INTERNAL
    assert doc["agent"]["pid"] == agent.proc.pid
    assert doc["types"]["gpus"] == {"total": 4, "free": 1, "used": 2, "drained": 1, "stale": 0}

    (lease,) = doc["leases"]
    assert set(lease) == LEASE and set(lease["holder"]) == HOLDER
    assert lease["holder"]["pid"] == holder.pid  # run execs: the command holds the lease
    assert (lease["holder"]["user"], lease["holder"]["command"]) == (ME, "sleep")
    assert lease["label"] == "train\x1b[2J" and lease["age_s"] >= 0
    held = [g["id"] for g in lease["resources"]["gpus"]]

    gpus = doc["instances"]["gpus"]
    assert [g["id"] for g in gpus] == ["0", "1", "2", "3"]
    for g in gpus:
        assert set(g) >= INSTANCE
        assert g["index"] == int(g["id"])
        assert g["uuid"] == f"GPU-{int(g['id']):08x}-0000-0000-0000-000000000000"
        assert g["leases"] == ([lease["id"]] if g["id"] in held else [])
        assert g["used"] == (1 if g["id"] in held else 0)
    assert [g["drained"] for g in gpus] == [None, None, None, "bad fan"]
    assert doc["drained"] == [{"type": "gpus", "id": "3", "reason": "bad fan"}]

    (w,) = doc["waiters"]
    assert set(w) == WAITER and set(w["holder"]) == HOLDER
    assert w["position"] == 1 and w["holder"]["pid"] == waiter.pid
    assert w["holder"]["user"] == ME and w["holder"]["command"]  # python, before its exec
    assert (w["request"], w["request_text"]) == ({"gpus": 2}, "gpus=2")
    assert w["waited_s"] >= 0 and w["timeout_s"] is None
    assert w["label"] == "true"


def test_status_human_view_has_a_table_per_type(tmp_path: Path) -> None:
    with busy_agent(tmp_path) as (agent, holder, waiter):
        text = render_status(agent.status())
    lines = text.splitlines()
    assert lines[0] == "gpus: 1 of 4 slots free (2 used, 1 drained)"  # GPUs first
    assert lines[1].split() == ["ID", "UUID", "STATE", "PID", "USER", "COMMAND", "LABEL", "AGE"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:6]}
    assert rows["3"][:3] == ["3", "GPU-00000003", "drained:"] and "bad fan" in lines[5]
    held = [r for r in rows.values() if r[2] == "held"]
    assert len(held) == 2
    for r in held:
        assert r[3:7] == [str(holder.pid), ME, "sleep", "train?[2J"]  # the escape defused
    assert "\x1b" not in text
    assert "  waiting:" in lines
    at = lines.index("  waiting:")
    assert lines[at + 1].split() == ["POS", "PID", "USER", "COMMAND", "REQUEST", "LABEL", "WAITED"]
    assert lines[at + 2].split()[:2] == ["1", str(waiter.pid)]
    assert "gpus=2" in lines[at + 2]
    assert "cpus: 4 of 4 slots free" in lines and "  free: 0-3" in lines
    assert lines[-1].startswith("GPU audit")
    for bad in ("{'", "label=", "uid=", "('pid'", "('conn'"):  # no Python reprs, no uids
        assert bad not in text


def test_status_of_an_idle_agent_and_the_formatting_helpers(tmp_path: Path) -> None:
    with running_agent(tmp_path, gpu_pool(2, 2)) as agent:
        doc = agent.status()
    assert doc["leases"] == [] and doc["waiters"] == [] and doc["drained"] == []
    text = render_status(doc)
    assert "gpus: 2 of 2 slots free" in text and "waiting" not in text
    assert [format_age(s) for s in (0.4, 59, 61, 3600 * 3 + 420, 86400 * 2 + 3600 * 4)] == [
        "0s",
        "59s",
        "1m01s",
        "3h07m",
        "2d04h",
    ]
    assert short_uuid("GPU-8a1b2c3d-0000-0000-0000-000000000000") == "GPU-8a1b2c3d"
    assert short_uuid(None) == "-"


def test_status_lists_a_bounded_page_unless_asked_for_all(tmp_path: Path) -> None:
    """5 one-cpu leases and a GPU lease granted last: a page of 2 lists 2 cpu leases,
    the GPU lease anyway (the audit needs every GPU holder), counts the rest in `more`,
    has cpu rows only for what it lists and sums the idle cpus up as ranges."""
    with running_agent(tmp_path, gpu_pool(2, 8)) as agent, agent.client() as c:
        cpu_leases = [c.acquire(cpus=1, label=f"job{n}") for n in range(5)]
        gpu_lease = c.acquire(gpus=1)
        c.drain("cpus:7", "hot")
        page = c.status(limit=2)
        everything = c.status(all=True)
        default = c.status()
        with pytest.raises(RequestError, match="limit"):
            c.status(limit=-2)
        with pytest.raises(RequestError, match="all"):
            c.call("status", all="yes")
        cli = subprocess.run(
            [*RPOOL, "status", "--all", "--json"], env=agent.env, capture_output=True, check=True
        )
    ids = [le["id"] for le in page["leases"]]
    assert ids == [cpu_leases[0].id, cpu_leases[1].id, gpu_lease.id]
    assert page["more"] == {"leases": 3, "waiters": 0} and not page["complete"]
    held = {r["id"]: r["leases"] for r in page["instances"]["cpus"]}
    assert held == {"0": [ids[0]], "1": [ids[1]], "7": []}  # listed leases' cpus, drained
    assert page["instances"]["cpus"][-1]["drained"] == "hot"
    assert page["idle"] == {"cpus": "5-6"} and page["types"]["cpus"]["free"] == 2
    assert [g["leases"] for g in page["instances"]["gpus"]] == [[gpu_lease.id], []]
    text = render_status(page)
    assert "  free: 5-6" in text and "and 3 more leases not listed" in text

    assert everything["complete"] and everything["more"] == {"leases": 0, "waiters": 0}
    assert len(everything["leases"]) == 6 and len(everything["instances"]["cpus"]) == 8
    assert "more leases" not in render_status(everything)
    assert len(default["leases"]) == 6  # under the default page of 100
    assert json.loads(cli.stdout)["complete"]


def test_a_holder_is_named_by_its_command_after_it_execs() -> None:
    """`rpool-agent run` leases, then execs the command; an exec keeps the pid and start
    time, so a name cached under them would name the holder `python3` for ever."""
    from rpool_agent.procinfo import ProcessNames

    code = "import os, sys; sys.stdin.readline(); os.execvp('sleep', ['sleep', '60'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        names = ProcessNames()
        before = names.describe(proc.pid, starttime=1)
        assert before["command"] and before["command"].startswith("python")
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        comm = Path(f"/proc/{proc.pid}/comm")
        wait_until(lambda: comm.read_text().strip() == "sleep")
        assert names.describe(proc.pid, starttime=1) == {**before, "command": "sleep"}
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_named_with_bytes_that_are_no_text_is_named_with_u_fffd(tmp_path: Path) -> None:
    """A process may give itself any bytes for a name (here: `sleep` copied to a file
    named with byte 0xff). psutil decodes such a name with surrogateescape; the agent's
    codec writes UTF-8 only, so the name is made valid where it is read, and `status`,
    which every user asks, still answers for everyone. The label `run` makes of that
    command is made valid by the client: the agent refuses a lone surrogate."""
    odd = os.path.join(os.fsencode(tmp_path), b"sl\xffeep")
    with open("/bin/sleep", "rb") as src, open(odd, "wb") as dst:
        dst.write(src.read())
    os.chmod(odd, 0o755)
    with running_agent(tmp_path) as agent:
        holder = subprocess.Popen(
            [*(os.fsencode(a) for a in RPOOL), b"run", b"--gpus", b"1", b"--", odd, b"60"],
            env=agent.env,
        )
        try:
            wait_until(lambda: len(agent.status()["leases"]) == 1)
            wait_until(lambda: agent.status()["leases"][0]["holder"]["command"] != "rpool-agent")
            (lease,) = agent.status()["leases"]
            assert lease["holder"]["pid"] == holder.pid
            assert lease["holder"]["command"] == "sl\ufffdeep"
            assert lease["label"].endswith("/sl\ufffdeep' 60")  # shlex quoted it
        finally:
            holder.kill()
            holder.wait()
