"""Admin drains that outlive an agent restart and a reboot: `drains.json` in the state dir.

A drained GPU is one an admin took out of service (ECC errors, a ticket): handing it out
again after an upgrade or a reboot would undo that. Unlike the lease journal (whose
leases die with their holders at a reboot), this file must survive a power loss, so it is
written the durable way: a temporary file, fsync, rename, fsync of the directory. That
runs in a worker thread, never on the event loop; saves run one after another, in order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from .statedir import open_regular, read_all, replace_file

NAME = "drains.json"


class DrainStore:
    """The admin's drains of one state dir: `load` at start, `save` after each change."""

    def __init__(self, dir_fd: int, log: Callable[[str], None]) -> None:
        self._dir_fd = dir_fd
        self._log = log
        self._pool: Any = None  # one worker thread: saves keep their order

    def load(self) -> list[tuple[str, str, str]]:
        """(type, id, reason) of each saved drain; [] if none (or, loudly, unreadable)."""
        try:
            fd = open_regular(NAME, self._dir_fd, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            data = read_all(fd)
        finally:
            os.close(fd)
        try:
            items = json.loads(data)
            drains = [(t, i, r) for t, i, r in items]
            if all(isinstance(x, str) for d in drains for x in d):
                return drains
        except (ValueError, TypeError):
            pass
        self._log(f"DRAINS FILE DAMAGED: {NAME} in the state dir is unreadable; no drain restored")
        return []

    def save(self, drained: Mapping[tuple[str, str], str]) -> None:
        """Write these drains durably, in the worker thread; a failure is logged."""
        data = json.dumps([[t, i, r] for (t, i), r in sorted(drained.items())]).encode()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rpool-drains")
        job = self._pool.submit(replace_file, self._dir_fd, NAME, data, durable=True)
        job.add_done_callback(self._saved)

    def _saved(self, job: Any) -> None:
        exc = job.exception()
        if exc is not None:  # from the worker thread: the log is a plain write
            why = getattr(exc, "strerror", None) or exc
            self._log(f"DRAINS NOT SAVED: {NAME}: {why}; they hold until the agent restarts")

    def close(self) -> None:
        """Wait for the saves under way (they use the dir's descriptor)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
