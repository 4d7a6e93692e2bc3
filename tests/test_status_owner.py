"""`status` for everything is the agent's owners' alone (issue 11: every request is bounded).

The default page costs the same however much the agent holds; `all` (or a `limit` over
the page) costs what it holds, about 170 ms of the event loop at 10,000 leases, and a
group member asking for it in a loop would delay every other client's grants. So a
stranger gets `permission_denied` and the page stays open to it; root, the admin group
and the uid the agent runs as (a per-user or private agent) get everything.

The strangers are a real second user (created for the test) whose forked children
connect over the real socket; the agent learns who they are from SO_PEERCRED.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent_fixture import gpu_pool, running_agent, wait_for_socket
from other_user import AsUser, Report, as_user, second_user  # noqa: F401 (a fixture)

import rpool_agent.cli
import rpool_agent.cli.leases
import rpool_agent.handoff
import rpool_agent.runner
from rpool_agent.client import Client
from rpool_agent.errors import RpoolAgentError

ADMIN_GID = 4252  # --admin-group takes a number: no /etc/group entry needed
LEASES = 130  # more than the default page of 100


def _ask(c: Client, **args: Any) -> Any:
    """What a `status` call got, in short: the error code, or how much it listed."""
    try:
        doc = c.call("status", **args)
    except RpoolAgentError as exc:
        return {"error": exc.code, "message": str(exc)}
    listed, more = len(doc["leases"]), doc["more"]["leases"]
    return {"leases": listed, "more": more, "complete": doc["complete"]}


def _asks(sock: str) -> Any:
    def ask(report: Report) -> None:
        with Client(sock, reconnect_timeout=0) as c:
            calls: dict[str, dict[str, Any]] = {
                "all": {"all": True},
                "limit_101": {"limit": 101},
                "huge_limit": {"limit": 10**9},
                "page": {},
                "limit_100": {"limit": 100},
            }
            report({what: _ask(c, **args) for what, args in calls.items()})

    return ask


def _cli_status_all(sock: str) -> Any:
    """`rpool-agent status --all`, run by the CLI's own entry point in this process (the
    interpreter lives under root's 0700 home, which the second user cannot exec)."""

    def run(report: Report) -> None:
        os.environ["RPOOL_AGENT_SOCKET"] = sock
        out, err = io.StringIO(), io.StringIO()
        code: Any = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rpool_agent.cli.main(["status", "--all"])
            except SystemExit as exc:
                code = exc.code
        report({"code": code, "out": out.getvalue(), "err": err.getvalue()})

    return run


def test_a_stranger_gets_a_page_and_the_owners_get_everything(
    public_dir: Path,
    second_user: Any,  # noqa: F811
) -> None:
    group = ("--socket-group", str(second_user.pw_gid), "--admin-group", str(ADMIN_GID))
    with running_agent(public_dir, gpu_pool(1, LEASES), *group) as agent, agent.client() as root:
        for n in range(LEASES):
            root.acquire(cpus=1, label=f"job{n}")
        stranger = as_user(second_user, _asks(agent.socket))
        cli = as_user(second_user, _cli_status_all(agent.socket))
        admin = AsUser(second_user, _asks(agent.socket), (ADMIN_GID,))
        try:
            admin_got = admin.read()
        finally:
            admin.stop()
        root_got = _ask(root, all=True)
        assert "Traceback" not in agent.log()
    everything = {"leases": LEASES, "more": 0, "complete": True}
    page = {"leases": 100, "more": LEASES - 100, "complete": False}
    for what in ("all", "limit_101", "huge_limit"):
        assert stranger[what]["error"] == "permission_denied", (what, stranger[what])
        assert "admin group" in stranger[what]["message"]
    assert stranger["page"] == stranger["limit_100"] == page  # the page stays open
    assert admin_got["all"] == admin_got["huge_limit"] == everything
    assert admin_got["limit_101"] == {"leases": 101, "more": LEASES - 101, "complete": False}
    assert root_got == everything
    # The CLI says it in one line, with the error's exit code, and no traceback.
    assert cli["code"] not in (0, None) and cli["out"] == "", cli
    assert cli["err"].count("\n") == 1 and "permission_denied" not in cli["err"], cli
    assert cli["err"].startswith("rpool-agent: status: every lease at once"), cli
    assert "Traceback" not in cli["err"]


def _load_what_serve_imports() -> None:
    """Import every module the package names, lazily or not, before a child that serves
    drops to the second user: the interpreter's own library lives under root's 0700
    home, where that user cannot read, and the agent imports some modules as it needs
    them (a module it lacks would fail the call that needs it, and the test with it)."""
    import ast
    import importlib

    package = Path(rpool_agent.cli.__file__).parent.parent
    names: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        if rel.name != "__main__":
            names.add(".".join(p for p in rel.parts if p != "__init__"))
    for name in sorted(names):
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def test_a_per_user_agent_gives_its_own_user_everything(
    public_dir: Path,
    second_user: Any,  # noqa: F811
) -> None:
    """The pytest plugin's private agent runs as the user it serves and asks it for `all`:
    the uid the agent runs as is an owner, though it is neither root nor an admin."""
    home = public_dir / "own"
    home.mkdir(mode=0o700)
    os.chown(home, second_user.pw_uid, second_user.pw_gid)
    pool = public_dir / "pool.json"
    pool.write_text(json.dumps(gpu_pool(1, LEASES)))
    pool.chmod(0o644)
    sock = str(home / "agent.sock")
    serve = ["serve", "--pool", str(pool), "--socket", sock, "--state-dir", str(home / "state")]

    def agent_as_user(report: Report) -> None:
        # its own log: pytest's capture of this worker's output is not the child's to use
        sys.stdout = sys.stderr = open(home / "agent.log", "w", buffering=1)  # noqa: SIM115
        report("serving")
        rpool_agent.cli.main(serve)

    def hold_and_ask(report: Report) -> None:
        with Client(sock, reconnect_timeout=0) as c:
            for n in range(LEASES):
                c.acquire(cpus=1, label=f"job{n}")
            report({"all": _ask(c, all=True), "huge_limit": _ask(c, limit=10**9)})

    _load_what_serve_imports()
    agent = AsUser(second_user, agent_as_user, close_fds=True)
    try:
        assert agent.read() == "serving"
        wait_for_socket(sock, None)
        got = as_user(second_user, hold_and_ask)
    finally:
        os.kill(agent.pid, signal.SIGTERM)
        agent.stop()
        log = (home / "agent.log").read_text()
    everything = {"leases": LEASES, "more": 0, "complete": True}
    assert got == {"all": everything, "huge_limit": everything}, log
    assert "Traceback" not in log
