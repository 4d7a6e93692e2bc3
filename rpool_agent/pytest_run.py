"""The pytest plugin's part in one process: settings, agent, lease, and their undoing.

`ProcessRun` is what the hooks in pytest_plugin.py drive: the lone pytest process or an
xdist worker takes its process lease here; the controller chooses the agent and, with a
shared agent, leases all its workers' share at once and serves it to them. Only the
standard library and pytest's public objects: the client and handoff are imported when a
run is really asked for.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

#: "<controller pid> <socket>": where the controller's workers (and no other process) take
#: their process leases: the run's private agent, or the agent the controller chose.
CONTROLLER_ENV = "RPOOL_PYTEST_CONTROLLER"
PRIVATE = "private"


class UsageProblem(Exception):
    """A setting or an agent answer that makes the run impossible: one line, exit 4."""


# --- options ----------------------------------------------------------------------------------


class Settings:
    """What the options and ini keys ask for (options win)."""

    def __init__(self, config: pytest.Config) -> None:
        ns = config.known_args_namespace
        self.gpus = _count(config, ns.rpool_gpus, "rpool_gpus") or 0
        self.cpus = _count(config, ns.rpool_cpus, "rpool_cpus") or 0
        self.slots = _count(config, ns.rpool_slots_per_gpu, "rpool_slots_per_gpu")
        self.agent: str | None = ns.rpool_agent or config.getini("rpool_agent") or None
        if self.slots is not None and self.slots < 1:
            raise UsageProblem("--rpool-slots-per-gpu must be at least 1")

    @property
    def request(self) -> dict[str, int]:
        return {k: v for k, v in (("gpus", self.gpus), ("cpus", self.cpus)) if v}

    @property
    def active(self) -> bool:
        return bool(self.request or self.agent or self.slots)


def _count(config: pytest.Config, given: int | None, ini: str) -> int | None:
    """The option's value, else the ini key's; None when neither is given."""
    if given is None:
        text = str(config.getini(ini) or "").strip()
        if not text:
            return None
        if not text.isdigit():
            raise UsageProblem(f"{ini} = {text!r}: expected a whole number")
        given = int(text)
    if given < 0:
        raise UsageProblem(f"--{ini.replace('_', '-')} must be 0 or more, not {given}")
    return given


# --- which process is what --------------------------------------------------------------------


def my_controller() -> str | None:
    """The agent socket our xdist controller chose, when this process is its worker.

    Only a direct child of that controller counts: a pytest that a test starts inherits
    the same environment but is a run of its own.
    """
    value = os.environ.get(CONTROLLER_ENV, "")
    pid, _, socket_path = value.partition(" ")
    if os.environ.get("PYTEST_XDIST_WORKER") and pid == str(os.getppid()) and socket_path:
        return socket_path
    return None


def _distributing(ns: Any) -> bool:
    """Whether pytest-xdist will start workers (its own rule, read before it applies it)."""
    n = getattr(ns, "numprocesses", None)
    if n in ("auto", "logical"):
        return not getattr(ns, "usepdb", False)
    if n is not None:
        return n > 0
    return getattr(ns, "dist", "no") != "no" and bool(getattr(ns, "tx", None))


# --- one pytest process's part ------------------------------------------------------------------


class ProcessRun:
    """This process's agent, connection and lease, and how to undo what they changed.

    Under xdist with a shared agent, the controller leases the GPUs and cpus of ALL its
    workers at once (one all-or-nothing request: two runs that each took part of what they
    need and waited for the rest would wait forever) and serves that lease to its workers
    through a private agent; each worker leases its share from there.
    """

    def __init__(self, config: pytest.Config, settings: Settings | None) -> None:
        self.config = config
        self.settings = settings
        self.lease_socket = my_controller()  # a worker's: where its process lease comes from
        self.worker = os.environ.get("PYTEST_XDIST_WORKER") if self.lease_socket else None
        self.socket: str | None = None  # the agent: markers, RPOOL_AGENT_SOCKET
        self.how = ""
        self.agent: Any = None  # PrivateAgent on the detected pool
        self.client: Any = None
        self.lease: Any = None
        self.controller = False
        self.serving: Any = None  # controller: PrivateAgent serving the run lease to workers
        self.workers_client: Any = None  # to the agent the workers lease from
        self.notes: list[str] = []  # a private agent's complaints at start
        self.broken = ""  # a worker that could not take its lease: why
        self._saved_env: dict[str, str] | None = None
        self._saved_affinity: set[int] | None = None

    # --- the agent

    def connect(self, *, may_start: bool) -> Any:
        if self.client is None:
            from .client import Client

            if self.socket is None:
                self._choose(may_start=may_start)
            self.client = Client(self.socket).connect()
        return self.client

    def _choose(self, *, may_start: bool) -> None:
        if self.worker is not None:  # the controller chose, and exported it
            self.socket = os.environ.get("RPOOL_AGENT_SOCKET") or self.lease_socket
            self.how = f"agent at {self.socket}"
            return
        wanted = self.settings.agent if self.settings else None
        if wanted and wanted != PRIVATE:
            if not _listens(wanted):
                raise UsageProblem(f"no agent answers at {wanted} (--rpool-agent)")
            self.socket, self.how = wanted, f"agent at {wanted}"
            return
        if wanted == PRIVATE:
            why = "asked for (--rpool-agent private)"
        elif os.environ.get("RPOOL_LEASE_ID"):
            why = f"inside lease {os.environ['RPOOL_LEASE_ID']}: it serves what that lease holds"
        elif "CUDA_VISIBLE_DEVICES" in os.environ and not _job_agent_serves_these_gpus():
            # Someone gave this process its GPUs (Slurm, Flux, a CI executor): the node's
            # agent does not know which; detection here does. (Unless `rpool-agent job`
            # started RPOOL_AGENT_SOCKET's agent on these very GPUs: the job's other
            # harnesses lease from it, so this run must too, below.)
            cvd = os.environ["CUDA_VISIBLE_DEVICES"]
            why = f"CUDA_VISIBLE_DEVICES={cvd} is inherited: it serves those GPUs only"
        else:
            from .paths import client_socket_path

            path = client_socket_path()
            if _listens(path):
                self.socket, self.how = path, f"agent at {path}"
                return
            why = f"no agent answers at {path}"
        if not may_start:
            raise UsageProblem(
                f"{why}; under pytest-xdist a private agent is started by the controller "
                "only when asked: pass --rpool-agent private (or --rpool-gpus/--rpool-cpus)"
            )
        from . import private_agent

        slots = self.settings.slots if self.settings else None
        self.agent = private_agent.start(slots_per_gpu=slots or None)
        self.socket = self.agent.socket
        self.how = f"private agent (pid {self.agent.pid}) on the detected pool: {why}"
        # What detection had to say (GPUs left out, and why) is what explains a refusal.
        prefix = "rpool-agent: "
        self.notes = [
            ln[len(prefix) :] for ln in self.agent.log().splitlines() if ln.startswith(prefix)
        ]

    def failure(self, exc: BaseException) -> str:
        """One line for a run that cannot go on, with what the private agent said."""
        said = "".join(f" (the private agent says: {n})" for n in self.notes)
        return f"rpool: {one_line(exc)}{said}"

    # --- roles

    def start(self) -> None:
        """Before conftest.py is imported: the lone process's or worker's lease; the
        controller's agent (its workers' leases wait for their count, in configure)."""
        assert self.settings is not None
        if self.worker is not None:  # the agent for markers is connected when one is met
            if self.settings.request:
                self._take_process_lease()
            return
        if _distributing(self.config.known_args_namespace):
            self.controller = True
            self.connect(may_start=True)
            self._save_env()
            os.environ["RPOOL_AGENT_SOCKET"] = str(self.socket)
            if self.settings.gpus:
                # The controller runs no test and holds no GPU, but imports conftest.py:
                # a CUDA context made there would sit on GPUs the workers hold. (Set after
                # the private agent started: it must see the GPUs to offer them.)
                from .handoff import NO_GPUS

                os.environ["CUDA_VISIBLE_DEVICES"] = NO_GPUS
            return
        self.connect(may_start=True)
        self._save_env()  # the agent a test's own `rpool-agent run` should ask too:
        os.environ["RPOOL_AGENT_SOCKET"] = str(self.socket)
        if self.settings.request:
            self._take_process_lease()

    def _take_process_lease(self) -> None:
        from .client import Client
        from .lease_wait import acquire_visibly
        from .runner import set_affinity

        assert self.settings is not None
        client = self.client
        if self.worker is not None:  # from where the controller said
            client = self.workers_client = Client(self.lease_socket).connect()
        owner = f"pytest[{os.getppid()}] {self.worker}" if self.worker else f"pytest[{os.getpid()}]"
        with Terminal(self.config) as say:
            self.lease = acquire_visibly(
                client, self.settings.request, say, label=owner, files=True
            )
        self._save_env()
        env = self.lease.env()
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        os.environ.update(env)
        self._saved_affinity = os.sched_getaffinity(0)
        set_affinity(self.lease.cpus)

    def prepare_workers(self, workers: int) -> None:
        """The controller, once xdist knows how many workers it starts: make sure all of
        them can hold their leases at once (xdist waits for every worker to collect before
        any runs a test, so one left waiting for a sibling's GPU would block the run), and
        tell them where to lease."""
        from .errors import Unsatisfiable

        assert self.settings is not None
        request, lease_socket = self.settings.request, self.socket
        if request and workers > 0:
            if self.agent is not None:
                self._check_room(workers)
            else:
                from . import private_agent
                from .lease_wait import acquire_visibly

                items = [{"type": t, "slots": 1} for t, n in request.items() for _ in range(n)]
                label = f"pytest[{os.getpid()}] {workers} workers"
                try:
                    with Terminal(self.config) as say:
                        run_lease = acquire_visibly(
                            self.client,
                            items * workers,
                            say,
                            label=label,
                            what=f"{_req(request)} for each of {workers} workers",
                        )
                except Unsatisfiable as exc:
                    raise UsageProblem(self._too_many(workers) or str(exc)) from None
                self.lease = run_lease
                self.serving = private_agent.start(
                    pool=private_agent.lease_pool(run_lease.document),
                    hold_fd=self.client.fileno(),  # the run lease lasts while it serves
                )
                lease_socket = self.serving.socket
        os.environ[CONTROLLER_ENV] = f"{os.getpid()} {lease_socket}"
        from .client import Client

        self.workers_client = Client(lease_socket).connect()

    def _check_room(self, workers: int) -> None:
        from .errors import ResourceUnavailable, Unsatisfiable

        assert self.settings is not None
        request = self.settings.request
        try:
            self.client.acquire(request, timeout=0, label="pytest capacity check").release()
        except Unsatisfiable as exc:
            raise UsageProblem(f"each worker's request {_req(request)}: {exc}") from None
        except ResourceUnavailable:
            pass  # held now: the workers will wait, and say so
        problem = self._too_many(workers)
        if problem:
            raise UsageProblem(problem)

    def _rooms(self) -> dict[str, int]:
        """Per requested type: the slots the pool has, less drained ones."""
        assert self.settings is not None
        types = self.client.status().get("types") or {}
        out = {}
        for rtype in self.settings.request:
            t = types.get(rtype) or {}
            out[rtype] = t.get("total", 0) - t.get("drained", 0)
        return out

    def auto_workers(self) -> int | None:
        """`-n auto`: as many workers as the pool can hold leases for at once (GPU tests
        are bound by GPUs, not by the cpu count xdist would use); None without a request."""
        assert self.settings is not None
        request = self.settings.request
        if not request:
            return None
        return max(1, min(room // request[rtype] for rtype, room in self._rooms().items()))

    def _too_many(self, workers: int) -> str:
        """Why `workers` leases of the request cannot all be held at once ("" if they can)."""
        assert self.settings is not None
        for rtype, room in self._rooms().items():
            n = self.settings.request[rtype]
            if workers * n > room:
                return (
                    f"{workers} workers x {rtype}:{n} need {workers * n} {rtype} slots at once "
                    f"and the pool has {room}: use -n {room // n} or fewer, or give each GPU "
                    "more slots so that workers share (--rpool-slots-per-gpu K for a private "
                    "agent, slots_per_gpu in the agent's config)"
                )
        return ""

    def header(self) -> list[str]:
        if self.socket is None:
            return []
        lines = [f"rpool: {self.how}"]
        lines += [f"rpool: the private agent says: {note}" for note in self.notes]
        req = _req(self.settings.request) if self.settings else ""
        if self.controller and req:
            if self.serving is not None:
                lines.append(
                    f"rpool: the run holds {describe_lease(self.lease.document)}; a private "
                    f"agent (pid {self.serving.pid}) shares it out to the workers"
                )
            lines.append(f"rpool: each worker leases {req} for its life (-v: which)")
        elif self.lease is not None:
            lines.append(f"rpool: this process holds {describe_lease(self.lease.document)}")
        if self.settings and self.settings.slots and self.agent is None:
            lines.append("rpool: --rpool-slots-per-gpu applies to a private agent only")
        return lines

    def close(self) -> None:
        if self._saved_affinity is not None:
            os.sched_setaffinity(0, self._saved_affinity)
            self._saved_affinity = None
        if self._saved_env is not None:
            os.environ.clear()
            os.environ.update(self._saved_env)
            self._saved_env = None
        for client in (self.workers_client, self.client):
            if client is not None:
                client.close()  # ends this process's leases, a left-over test lease too
        self.workers_client = self.client = None
        for agent in (self.serving, self.agent):
            if agent is not None:
                agent.stop()
        self.serving = self.agent = None

    def _save_env(self) -> None:
        if self._saved_env is None:
            self._saved_env = dict(os.environ)


def _job_agent_serves_these_gpus() -> bool:
    """`rpool-agent job` started the agent at RPOOL_AGENT_SOCKET inside this allocation,
    with this very CUDA_VISIBLE_DEVICES (docs/cluster.md)."""
    from .job_agent import JOB_DEVICES_ENV

    job = os.environ.get(JOB_DEVICES_ENV)
    return (
        job is not None
        and job == os.environ.get("CUDA_VISIBLE_DEVICES")
        and bool(os.environ.get("RPOOL_AGENT_SOCKET"))
    )


def _listens(path: str) -> bool:
    """Whether something listens at `path`; "nobody" only for a missing file or a refusal,
    so a socket this user may not open is an error, never a silent private agent."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return False
    except OSError as exc:
        raise UsageProblem(f"cannot reach the agent at {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return True


def _req(request: Any) -> str:
    from .lease_wait import describe_request

    return describe_request(request)


def describe_lease(doc: dict[str, Any]) -> str:
    """`lease 3f9c-2: CUDA_VISIBLE_DEVICES=1 (GPU-...), cpus 0,64`: one line for reports."""
    from .handoff import NO_GPUS, leased_cpus, leased_gpus

    gpus = leased_gpus(doc)
    cvd = ",".join(g.cuda_name for g in gpus) or NO_GPUS
    uuids = ",".join(g.uuid for g in gpus if g.uuid)
    cpus = ",".join(map(str, leased_cpus(doc))) or "any (no cpus leased)"
    return (
        f"lease {doc['id']}: CUDA_VISIBLE_DEVICES={cvd}"
        + (f" ({uuids})" if uuids else "")
        + f", cpus {cpus}"
    )


class Terminal:
    """`with Terminal(config) as say:` lines on the real terminal while capture is on.

    An xdist worker's stderr is the controller's, so a worker's line reaches the user too.
    Capture stays suspended for the whole block (a wait), so reminders from another thread
    get through as well.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.capman = config.pluginmanager.getplugin("capturemanager")
        worker = getattr(config, "workerinput", {}).get("workerid")
        if worker is None and my_controller():  # a worker, before xdist set workerinput
            worker = os.environ.get("PYTEST_XDIST_WORKER")
        self.prefix = f"[{worker}] rpool: " if worker else "rpool: "
        self._cm: Any = None

    def say(self, text: str) -> None:
        sys.stderr.write(f"{self.prefix}{text}\n")
        sys.stderr.flush()

    def __enter__(self) -> Any:
        if self.capman is not None:
            self._cm = self.capman.global_and_fixture_disabled()
            self._cm.__enter__()
        return self.say

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
