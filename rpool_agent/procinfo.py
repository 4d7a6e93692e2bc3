"""Who a pid is, for people: user name and command (psutil), and whose descendant it is.

`status` names each lease holder and waiter, and `audit` names each process on a GPU, by
user and command rather than by numeric uid. Lookups are cached per (pid, start time), so
a `status` of a busy node reads /proc once per holder, not once per call; a recycled pid
has another start time and is looked up afresh. psutil is imported on first use: the
`detect` and `run` paths never load it.
"""

from __future__ import annotations

import pwd
from collections.abc import Iterable
from typing import Any

from .protocol import valid_text

#: Cached descriptions kept at most; a busy node has far fewer live holders.
_MAX_CACHED = 4096


def user_name(uid: int | None) -> str | None:
    """The account name of `uid`; its number as text when the account has no name."""
    if uid is None or uid < 0:
        return None
    try:
        return valid_text(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return str(uid)


class ProcessNames:
    """pid -> {"user", "command"}; the user is cached while the same process (pid + start
    time) lives, the command is read afresh each time: `rpool-agent run` holds its lease
    before it execs the command, and an exec keeps both the pid and the start time."""

    def __init__(self) -> None:
        self._users: dict[tuple[int, Any], str | None] = {}

    def describe(self, pid: int, uid: int | None = None, starttime: Any = None) -> dict[str, Any]:
        """`{"pid", "user", "command"}`; user and command None where the process is gone.

        `command` is the process name (`ctest`, `python3`), as `ps -o comm` shows it: the
        full command line of another user's process may hold secrets, and the name is what
        tells a person which tool holds a GPU.
        """
        key = (pid, starttime)
        known = key in self._users
        command, real_uid = _lookup(pid, want_uid=uid is None and not known)
        if not known:
            if len(self._users) >= _MAX_CACHED:
                self._users.clear()
            self._users[key] = user_name(uid if uid is not None else real_uid)
        return {"pid": pid, "user": self._users[key], "command": command}

    def forget_all_but(self, pids: Iterable[int]) -> None:
        """Drop what is cached for pids no longer of interest (leases ended)."""
        keep = set(pids)
        self._users = {k: v for k, v in self._users.items() if k[0] in keep}


def _lookup(pid: int, *, want_uid: bool) -> tuple[str | None, int | None]:
    """The process's name and (if wanted) real uid; None for what cannot be read."""
    command: str | None = None
    uid: int | None = None
    try:
        import psutil
    except (ImportError, OSError):  # at the descriptor limit even an import fails (EMFILE):
        return None, None  # status still answers
    try:
        proc = psutil.Process(pid)
        command = valid_text(proc.name()) or None  # a process may name itself any bytes
        if want_uid:
            uid = proc.uids().real
    except (psutil.Error, OSError):  # gone, or a pid this process may not look at
        pass
    return command, uid


def ancestors(pid: int) -> list[int] | None:
    """pids of `pid`'s parent, grandparent, ... up to init; None if `pid` has exited."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).parents()]
    except (psutil.Error, OSError):
        return None
