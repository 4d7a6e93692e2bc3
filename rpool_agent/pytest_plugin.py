"""pytest plugin `rpool`: every test process, or every marked test, runs inside a lease.

Loaded through the `pytest11` entry point and idle unless asked: without `--rpool-gpus`,
`--rpool-cpus`, `--rpool-agent` (or their ini keys) and without `@pytest.mark.rpool`, it
only declares its options, marker and fixture, and imports nothing of the client.

- `--rpool-gpus N --rpool-cpus M`: each test process (the lone pytest, or each xdist
  worker) leases N GPUs and M cpus for its whole life. The lease is taken in
  `pytest_load_initial_conftests`, before any conftest or test module is imported (a
  session fixture is too late: CUDA reads `CUDA_VISIBLE_DEVICES` once, at its first use),
  and handed to the process as `rpool-agent run` hands it to a command (handoff.py).
- `@pytest.mark.rpool(gpus=1, cpus=0)`: a lease for one test, setup to teardown; the
  `rpool_lease` fixture gives it (or the process's lease).
- The agent: `--rpool-agent PATH`; else, inside a lease (`RPOOL_LEASE_ID`) or with an
  inherited `CUDA_VISIBLE_DEVICES`, a private agent on what this process was given
  (detection honours both); else `RPOOL_AGENT_SOCKET`, the user's or the system
  socket; else a private agent. The controller chooses once and tells its workers
  (`RPOOL_PYTEST_CONTROLLER`, read only by its own children).

docs/pytest.md tells the whole story.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from .pytest_run import ProcessRun, Settings, Terminal, UsageProblem, my_controller, one_line

_RUN = pytest.StashKey["ProcessRun"]()
_TEST_LEASE = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rpool", "rpool-agent leases (docs/pytest.md)")
    group.addoption(
        "--rpool-gpus",
        type=int,
        metavar="N",
        help="each test process (lone pytest or xdist worker) leases N GPUs for its life",
    )
    group.addoption(
        "--rpool-cpus", type=int, metavar="M", help="each test process leases M cpus (cores)"
    )
    group.addoption(
        "--rpool-agent",
        metavar="PATH",
        help="the agent's socket, or 'private' to start one for this run "
        "(default: RPOOL_AGENT_SOCKET or the system socket, else a private agent)",
    )
    group.addoption(
        "--rpool-slots-per-gpu",
        type=int,
        metavar="K",
        help="a private agent gives each GPU K slots, so K workers may share it",
    )
    parser.addini("rpool_gpus", "GPUs each test process leases (--rpool-gpus)")
    parser.addini("rpool_cpus", "cpus each test process leases (--rpool-cpus)")
    parser.addini("rpool_agent", "agent socket path, or 'private' (--rpool-agent)")
    parser.addini("rpool_slots_per_gpu", "a private agent's slots per GPU")


def _get_run(config: pytest.Config) -> ProcessRun:
    run = config.stash.get(_RUN, None)
    if run is None:
        run = config.stash[_RUN] = ProcessRun(config, None)
        config.add_cleanup(run.close)
    return run


# --- hooks --------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Before any conftest is imported: the process lease (or the controller's agent)."""
    ns = early_config.known_args_namespace
    if getattr(ns, "help", False) or getattr(ns, "version", False):
        return
    try:
        settings = Settings(early_config)
        if not settings.active:
            return
        run = ProcessRun(early_config, settings)
        early_config.stash[_RUN] = run
        early_config.add_cleanup(run.close)
        run.start()
    except Exception as exc:
        run = early_config.stash.get(_RUN, None)
        message = run.failure(exc) if run is not None else f"rpool: {one_line(exc)}"
        if run is None or run.worker is None:
            if run is not None:
                run.close()
            raise pytest.UsageError(message) from None
        # A worker that raises here dies with a traceback, and xdist starts another that
        # fails alike, up to its restart limit. Instead it stays up without a lease, says
        # why once, and fails each of its tests at setup with the reason.
        run.close()
        run.broken = message
        with Terminal(early_config) as say:
            say(message.removeprefix("rpool: "))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "rpool(gpus=1, cpus=0, timeout=None): run this test inside its own rpool-agent lease",
    )
    run = config.stash.get(_RUN, None)
    if run is not None and run.controller:
        config.pluginmanager.register(_ControllerReport(run), "rpool-controller")
        try:
            run.prepare_workers(len(config.getoption("tx", None) or []))
        except Exception as exc:
            raise pytest.UsageError(run.failure(exc)) from None


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto --rpool-gpus N`: as many workers as the pool has room for at once."""
    run = config.stash.get(_RUN, None)
    if run is None or not run.controller or os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own rule
    return run.auto_workers()


def pytest_report_header(config: pytest.Config) -> list[str]:
    run = config.stash.get(_RUN, None)
    return run.header() if run is not None else []


class _ControllerReport:
    """With -v, one line per worker (replacements too) naming its lease."""

    def __init__(self, run: ProcessRun) -> None:
        self.run = run

    def pytest_testnodeready(self, node: Any) -> None:
        config = self.run.config
        if config.option.verbose <= 0 or not self.run.settings or not self.run.settings.request:
            return
        wid = node.gateway.id
        label = f"pytest[{os.getpid()}] {wid}"
        try:
            leases = self.run.workers_client.status(all=True).get("leases") or []
        except Exception as exc:
            text = f"[{wid}] rpool: cannot ask the agent: {one_line(exc)}"
        else:
            mine = [le for le in leases if le.get("label") == label]
            text = f"[{wid}] rpool: " + (
                "; ".join(_status_lease(le) for le in mine) or "holds no lease"
            )
        reporter = config.pluginmanager.getplugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text)


def _status_lease(le: dict[str, Any]) -> str:
    res = " ".join(
        f"{t} " + ",".join(str(i["id"]) for i in items)
        for t, items in sorted((le.get("resources") or {}).items())
    )
    return f"lease {le.get('id')} (pid {(le.get('holder') or {}).get('pid')}): {res}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    broken = item.config.stash.get(_RUN, None)
    if broken is not None and broken.broken:
        pytest.fail(broken.broken, pytrace=False)
    marker = item.get_closest_marker("rpool")
    if marker is None:
        return
    from .errors import RpoolAgentError
    from .lease_wait import acquire_visibly

    run = _get_run(item.config)
    try:
        request, timeout = _marker_request(marker)
        client = run.connect(may_start=run.worker is None and not _in_foreign_worker())
        label = f"pytest[{os.getpid()}] {item.nodeid}"[:256]
        with Terminal(item.config) as say:
            lease = acquire_visibly(client, request, say, timeout=timeout, label=label, files=True)
    except (RpoolAgentError, UsageProblem, OSError) as exc:
        problem = one_line(exc)
    else:
        item.stash[_TEST_LEASE] = lease
        return
    pytest.fail(f"rpool: {problem}", pytrace=False)  # outside `except`: no chained report


def _in_foreign_worker() -> bool:
    """An xdist worker whose controller set up no agent: it must not start its own."""
    return bool(os.environ.get("PYTEST_XDIST_WORKER")) and my_controller() is None


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield
    lease = item.stash.get(_TEST_LEASE, None)
    if lease is not None:
        del item.stash[_TEST_LEASE]
        lease.__exit__(None, None, None)


def _marker_request(marker: pytest.Mark) -> tuple[Any, float | None]:
    kwargs = dict(marker.kwargs)
    timeout = kwargs.pop("timeout", None)
    if marker.args:
        if len(marker.args) != 1 or kwargs:
            raise UsageProblem("rpool marker: give one request, or counts (gpus=, cpus=)")
        return marker.args[0], timeout
    counts = {"gpus": kwargs.pop("gpus", 1), "cpus": kwargs.pop("cpus", 0), **kwargs}
    request = {k: v for k, v in counts.items() if v}
    if not request:
        raise UsageProblem("rpool marker asks for nothing")
    return request, timeout


@pytest.fixture
def rpool_lease(request: pytest.FixtureRequest) -> Any:
    """The test's own lease (`@pytest.mark.rpool`), else its process's (`--rpool-gpus`)."""
    lease = request.node.stash.get(_TEST_LEASE, None)
    if lease is None:
        run = request.config.stash.get(_RUN, None)
        lease = run.lease if run is not None else None
    if lease is None:
        pytest.fail(
            "rpool_lease: this test has no @pytest.mark.rpool and its process no lease "
            "(--rpool-gpus/--rpool-cpus)",
            pytrace=False,
        )
    return lease
