"""What `serve` watches besides leases: the status document, the GPU audit, the metrics.

The server holds one `Monitor`. Its `status` builds the `status` reply (status_doc.py)
with the latest audit; its `tally` counts grants, releases, reaps and wait times from
hook lines in the server; its `run` task audits the GPUs and writes the metrics file
every so often. The slow parts (NVML, /proc walks, the file write) run in a worker
thread: the event loop only builds the status document, as it does for `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from .metrics import Tally
from .procinfo import ProcessNames


class Monitor:
    """Status document, audit result and metrics of one server."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.tally = Tally()
        self.names = ProcessNames()
        self.metrics_file: str | None = None
        self.metrics_interval = 15.0
        self.audit_interval: float | None = None  # None: no periodic audit
        self._audit: dict[str, Any] | None = None
        self._audit_at = 0.0
        self._reported: set[tuple[Any, ...]] = set()  # violations already logged
        self._task: asyncio.Task[None] | None = None
        self._write_failed = False

    def configure(
        self,
        *,
        metrics_file: str | None = None,
        metrics_interval: float = 15.0,
        audit_interval: float | None = None,
    ) -> None:
        self.metrics_file = metrics_file
        self.metrics_interval = metrics_interval
        self.audit_interval = audit_interval

    def status_call(self, conn: Any, args: dict[str, Any]) -> dict[str, Any]:
        """The reply to a client's `status` call (`args`: its `limit` and `all`).

        The default page costs the same however much the agent holds; `all`, or a
        `limit` over that page, costs what it holds (every lease and instance), and a
        client may ask again and again while every other client waits for the loop. So
        only the agent's owners may: root, the admin group, and the uid the agent runs
        as (a per-user or private agent serves its own user everything). Any other
        group member gets `permission_denied`, and the page stays open to all.
        """
        from .errors import RequestError
        from .status_doc import DEFAULT_LIMIT

        limit, whole = args.get("limit", -1), args.get("all", False)
        if type(whole) is not bool:
            raise RequestError("status: 'all' must be true or false")
        if limit != -1 and (type(limit) is not int or not 0 <= limit <= 10**9):
            raise RequestError("status: 'limit' must be a whole number >= 0")
        if (whole or limit > DEFAULT_LIMIT) and not self._owner(conn):
            from .errors import PermissionDenied

            raise PermissionDenied(
                f"status: every lease at once ('all', or a 'limit' over {DEFAULT_LIMIT}) is"
                " for root, the agent's admin group and its own user; others may ask for"
                f" a page of up to {DEFAULT_LIMIT} (the default)"
            )
        return self.status(limit=None if whole else limit)

    def _owner(self, conn: Any) -> bool:
        """The agent's own uid, or an admin (root, the admin group: as for drain)."""
        peer = conn.peer
        if peer is not None and peer.uid >= 0 and peer.uid == os.geteuid():
            return True
        return bool(self.service.is_admin(conn))

    def status(self, now: float | None = None, *, limit: int | None = -1) -> dict[str, Any]:
        """The `status` reply: the agent's state as the documented schema; `limit`: leases
        and waiters listed (-1: the default page, None: all)."""
        from .status_doc import DEFAULT_LIMIT, status_document

        now = time.monotonic() if now is None else now
        audit = None
        if self._audit is not None:
            audit = {**self._audit, "age_s": round(now - self._audit_at, 3)}
        if limit == -1:
            limit = DEFAULT_LIMIT
        return status_document(self.service, now=now, names=self.names, audit=audit, limit=limit)

    # --- periodic work --------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic audit and metrics task, if either is configured."""
        if self._task is None and (self.metrics_file or self.audit_interval):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Cancel the periodic task; write the metrics one last time."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if self.metrics_file:
                await self.write_metrics()

    async def _run(self) -> None:
        next_audit = next_metrics = time.monotonic()
        while True:
            now = time.monotonic()
            if self.audit_interval and now >= next_audit:
                await self.audit()
                next_audit = now + self.audit_interval
            if self.metrics_file and now >= next_metrics:
                await self.write_metrics()
                next_metrics = now + self.metrics_interval
            due = [
                t
                for t, on in ((next_audit, self.audit_interval), (next_metrics, self.metrics_file))
                if on
            ]
            await asyncio.sleep(max(0.0, min(due) - time.monotonic()))

    async def audit(self) -> dict[str, Any]:
        """Audit now (in a worker thread); log new violations; keep the result for status."""
        from .audit import audit_lines, run_audit

        doc = self.status()
        result = await asyncio.to_thread(run_audit, doc)
        self._audit, self._audit_at = result, time.monotonic()
        keys = {(v["pid"], v["type"], v["gpu"]) for v in result["violations"]}
        new = [
            v for v in result["violations"] if (v["pid"], v["type"], v["gpu"]) not in self._reported
        ]
        self._reported = keys
        for line in audit_lines({"violations": new}):
            self._say(line, important=True)  # kept at log_level warning
        if result.get("problem") and self._audit_problem_new(result["problem"]):
            self._say(f"audit: not possible: {result['problem']}")
        return result

    def _say(self, line: str, *, important: bool = False) -> None:
        """A log line through the server's log, which honours `log_level` (info lines
        are dropped at warning and above)."""
        say = getattr(self.service, "_log", None)
        if say is not None:
            say(line, important=important)

    def _audit_problem_new(self, problem: str) -> bool:
        new = problem != getattr(self, "_last_problem", None)
        self._last_problem = problem
        return new

    async def write_metrics(self) -> None:
        """Render and write the metrics file (in a worker thread); a failure is logged once."""
        from .metrics import render, write_textfile

        path = self.metrics_file
        if not path:
            return
        doc, tally = self.status(), self.tally.copy()
        try:
            await asyncio.to_thread(lambda: write_textfile(path, render(doc, tally)))
            self._write_failed = False
        except OSError as exc:
            if not self._write_failed:
                self._say(f"metrics: cannot write {path}: {exc.strerror or exc}", important=True)
            self._write_failed = True
