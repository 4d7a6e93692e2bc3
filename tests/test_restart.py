"""Agent restarts while leases are held: SIGKILL + restart, pool changes, `--holder` leases.

Every holder and waiter is a separate process using the client library, as users' jobs
do; the agent is killed with SIGKILL and started again on the same socket and state dir.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fixture import Agent, gpu_pool, running_agent, wait_until

from rpool_agent.client import Client
from rpool_agent.errors import PermissionDenied, ProtocolError, ResourceUnavailable
from rpool_agent.holders import Holder, process_starttime

PY = sys.executable

#: A job: acquires and releases what its stdin says, answers one JSON line per command.
JOB = r"""
import json, os, sys
from rpool_agent.client import Client
c = Client(sys.argv[1], reconnect_timeout=30)
leases = {}
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "acquire":
            lease = c.acquire(cmd["request"], timeout=cmd.get("timeout"))
            leases[lease.id] = lease
            out = {"id": lease.id, "gpus": [g["id"] for g in lease.resources["gpus"]]}
        else:
            leases.pop(cmd["id"]).release()
            out = {"released": cmd["id"]}
    except Exception as exc:
        out = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


class Job:
    """A client process holding leases through the client library."""

    def __init__(self, agent: Agent) -> None:
        self.proc = subprocess.Popen(
            [PY, "-c", JOB, agent.socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.reply(10)["pid"]

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "no answer from the job in time"
        return json.loads(self.proc.stdout.readline())

    def acquire(self, gpus: int) -> dict[str, Any]:
        self.send(op="acquire", request={"gpus": gpus})
        return self.reply()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def held(agent: Agent) -> dict[str, list[str]]:
    return {
        le["id"]: [g["id"] for g in le["resources"].get("gpus", [])]
        for le in agent.status()["leases"]
    }


def cli_acquire(agent: Agent, *args: str) -> dict[str, str]:
    """`rpool-agent acquire ARGS`: the exported variables it prints."""
    r = subprocess.run(
        [PY, "-m", "rpool_agent.cli", "acquire", *args],
        env=agent.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value.strip("'")
    return out


def test_sigkill_restart_keeps_live_holders_frees_dead_ones_and_waiters_resubmit(
    tmp_path: Path,
) -> None:
    jobs: list[Job] = []
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        with running_agent(tmp_path) as agent:
            a, b, dies = Job(agent), Job(agent), Job(agent)
            jobs += [a, b, dies]
            ga, gb, gd = a.acquire(1), b.acquire(1), dies.acquire(1)
            script = cli_acquire(agent, "--gpus", "1", "--holder", str(sleeper.pid))
            gs = script["RPOOL_GPU_IDS"]
            waiter = Job(agent)
            jobs.append(waiter)
            waiter.send(op="acquire", request={"gpus": 2})  # all 4 GPUs are held: it waits
            wait_until(lambda: len(agent.status()["waiters"]) == 1)

            agent.kill()
            dies.kill()  # its holder dies while the agent is down
            agent.restart()

            assert held(agent) == {
                ga["id"]: ga["gpus"],
                gb["id"]: gb["gpus"],
                script["RPOOL_LEASE_ID"]: [gs],
            }
            log = agent.log()
            assert "restored 3 lease(s)" in log and f"dropped 1 ({gd['id']})" in log
            # The waiter's client reconnected and submitted again; one GPU is free, it wants 2.
            wait_until(lambda: len(agent.status()["waiters"]) == 1)
            assert agent.status()["types"]["gpus"]["free"] == 1
            # A job releases through its client: reconnect, re-claim by token, release.
            a.send(op="release", id=ga["id"])
            assert a.reply() == {"released": ga["id"]}
            got = waiter.reply()
            assert sorted(got["gpus"]) == sorted(ga["gpus"] + gd["gpus"])  # never b's, never s's
            # Re-adopted leases end with their holder, learned from a pidfd.
            sleeper.kill()
            sleeper.wait()
            wait_until(lambda: script["RPOOL_LEASE_ID"] not in held(agent), timeout=5)
            b.kill()
            wait_until(lambda: gb["id"] not in held(agent), timeout=5)
            waiter.send(op="release", id=got["id"])
            assert waiter.reply() == {"released": got["id"]}
            snap = agent.status()
            assert snap["leases"] == [] and snap["types"]["gpus"]["free"] == 4
    finally:
        sleeper.kill()
        sleeper.wait()
        for job in jobs:
            job.kill()


def test_a_gpu_gone_at_restart_stays_leased_until_released_but_is_never_granted(
    tmp_path: Path,
) -> None:
    with running_agent(tmp_path) as agent, agent.client() as c:
        leases = [c.acquire(gpus=1) for _ in range(4)]
        on3 = next(le for le in leases if le.resources["gpus"][0]["id"] == "3")
        agent.kill()
        agent.restart(gpu_pool(n_gpus=3))  # GPU 3 is gone from the pool
        snap = agent.status()
        assert snap["types"]["gpus"]["stale"] == 1
        assert {le["id"]: le["stale"] for le in snap["leases"]} == {
            le.id: le is on3 for le in leases
        }
        assert snap["vanished"] == [{"type": "gpus", "id": "3", "held": 1}]
        for le in leases:
            if le is not on3:
                le.release()
        with agent.client() as other:
            with pytest.raises(ResourceUnavailable):  # 3 GPUs now: never GPU 3
                other.acquire(gpus=4, timeout=0)
            got = other.acquire(gpus=3, timeout=0)
            assert sorted(g["id"] for g in got.resources["gpus"]) == ["0", "1", "2"]
        on3.release()
        snap = agent.status()
        assert snap["vanished"] == [] and snap["types"]["gpus"]["stale"] == 0


def test_sighup_reload_keeps_a_lease_on_a_vanished_gpu_as_stale(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent, agent.client() as c:
        lease = c.acquire({"gpus": 4})
        assert agent.pool_file is not None
        agent.pool_file.write_text(json.dumps(gpu_pool(n_gpus=2)))
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: agent.status()["types"]["gpus"]["total"] == 2)
        snap = agent.status()
        assert snap["types"]["gpus"]["stale"] == 2 and snap["leases"][0]["stale"]
        lease.release()
        snap = agent.status()
        assert snap["types"]["gpus"] == {**snap["types"]["gpus"], "free": 2, "stale": 0}


def test_acquire_for_a_script_follows_the_holder_process(tmp_path: Path) -> None:
    with running_agent(tmp_path) as agent:
        # Default holder: the calling shell; the lease lasts as long as it runs.
        shell = subprocess.Popen(
            [
                "bash",
                "-c",
                f'eval "$({PY} -m rpool_agent.cli acquire --gpus 2 --label script)"; '
                'echo "$RPOOL_LEASE_ID $RPOOL_GPU_IDS"; read -r _',
            ],
            env=agent.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert shell.stdout is not None and shell.stdin is not None
        lease_id, gpus = shell.stdout.readline().split()
        (le,) = agent.status()["leases"]
        assert le["id"] == lease_id and le["holder"]["pid"] == shell.pid
        assert le["holder"]["starttime"] == process_starttime(shell.pid)
        assert ",".join(g["id"] for g in le["resources"]["gpus"]) == gpus
        agent.kill()  # and it survives an agent restart, bound to the same process
        agent.restart()
        assert held(agent) == {lease_id: gpus.split(",")}
        shell.stdin.close()  # the script ends
        shell.wait()
        wait_until(lambda: held(agent) == {}, timeout=5)
        with agent.client() as c, pytest.raises(ProtocolError, match="no process"):
            c.acquire(gpus=1, holder_pid=2**22 + 12345)


def test_a_holder_pid_must_belong_to_the_same_user_unless_root(tmp_path: Path) -> None:
    """The server's check itself, called directly: a real other-uid client is the
    security tests' business (they drop a child to `nobody`)."""
    from rpool_agent.pool import Pool
    from rpool_agent.server import Server

    server = Server(Pool([]), socket_path=str(tmp_path / "unused.sock"))
    me = os.getpid()
    nobody = Holder(pid=1, uid=65534, gid=65534)
    if os.getuid() != 65534:
        with pytest.raises(PermissionDenied, match="another user"):
            server._pid_holder(nobody, me)
    mine = Holder(pid=1, uid=os.getuid(), gid=os.getgid())
    holder, owner = server._pid_holder(mine, me)
    assert owner == ("pid", me, process_starttime(me)) and holder.uid == os.getuid()
    root = Holder(pid=1, uid=0, gid=0)
    assert server._pid_holder(root, me)[1] == owner
    with pytest.raises(ProtocolError):
        server._pid_holder(mine, True)


def test_a_waiter_that_waited_longer_than_reconnect_timeout_still_reconnects(
    tmp_path: Path,
) -> None:
    """reconnect_timeout counts from the lost connection, not from the call: an acquire
    that had waited longer once gave up at the first failed connect of a restart."""
    with running_agent(tmp_path, gpu_pool(1)) as agent:
        holder = Client(agent.socket, reconnect_timeout=3).connect()
        lease = holder.acquire(gpus=1)
        got: dict[str, Any] = {}

        def wait() -> None:
            try:
                with Client(agent.socket, reconnect_timeout=3) as c:
                    got["lease"] = c.acquire(gpus=1, label="patient").id
            except Exception as exc:
                got["error"] = repr(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(lambda: len(agent.status()["waiters"]) == 1)
        time.sleep(3.5)  # longer than reconnect_timeout
        assert agent.stop() == 0
        agent.restart()
        holder.release(lease.id)  # re-claims after the restart, then releases
        waiter.join(15)
        assert "lease" in got, got.get("error")
        holder.close()
