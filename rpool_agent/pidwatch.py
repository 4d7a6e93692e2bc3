"""One pidfd per holder process, however many leases it holds.

A lease bound to a process (`holder_pid`, or re-adopted after a restart) ends when that
process exits; the agent learns it from the process's pidfd becoming readable in the event
loop, with no polling. A process holding 10,000 leases needs one descriptor, not 10,000:
the descriptor is shared by reference count, and closed with its last lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any

from .holders import open_pidfd


class PidWatch:
    """Watches holder processes; `on_exit(owner)` runs once a watched process exits."""

    def __init__(self, on_exit: Callable[[Any], None]) -> None:
        self._on_exit = on_exit
        self._fds: dict[tuple[int, int | None], int] = {}  # (pid, start time) -> pidfd
        self._procs: dict[int, tuple[int, int | None]] = {}  # pidfd -> (pid, start time)
        self._refs: dict[int, int] = {}  # pidfd -> leases watching it

    def watch(self, pid: int, starttime: int | None, owner: Any) -> int | None:
        """The pidfd watching this process (one more lease on it), or None if it has
        exited or its pid now names another process."""
        key = (pid, starttime)
        fd = self._fds.get(key)
        if fd is None:
            fd = open_pidfd(pid, starttime)
            if fd is None:
                return None
            asyncio.get_running_loop().add_reader(fd, self._on_exit, owner)
            self._fds[key] = fd
            self._procs[fd] = key
            self._refs[fd] = 0
        self._refs[fd] += 1
        return fd

    def release(self, fd: int) -> None:
        """One lease less on `fd`; the last one closes it."""
        refs = self._refs.get(fd)
        if refs is None:
            return
        if refs > 1:
            self._refs[fd] = refs - 1
            return
        del self._refs[fd]
        del self._fds[self._procs.pop(fd)]
        with contextlib.suppress(Exception):  # no loop any more (shutdown)
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    def __len__(self) -> int:
        return len(self._refs)
