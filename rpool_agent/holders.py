"""Who holds a lease, as the kernel tells it: SO_PEERCRED, process start time, pidfd.

Identity never comes from what a client claims. A pid alone is not an identity (pids are
recycled), so a holder is (pid, start time): field 22 of `/proc/<pid>/stat`, in clock
ticks since boot, which a recycled pid cannot share with the process it replaced.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Holder:
    pid: int
    uid: int
    gid: int
    starttime: int | None = None

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: this runs on every grant and asdict deep-copies slowly.
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "starttime": self.starttime}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Holder:
        return cls(int(d["pid"]), int(d["uid"]), int(d["gid"]), d.get("starttime"))


def peer_credentials(sock: socket.socket) -> Holder:
    """The connected peer's pid/uid/gid from the kernel (Linux SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Holder(pid, uid, gid, process_starttime(pid))


def process_starttime(pid: int, proc: str = "/proc", *, strict: bool = False) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it does not exist.

    With `strict`, only a process that is gone gives None; any other failure (EMFILE,
    ENOMEM...) raises OSError: running out of descriptors is not evidence of death.
    """
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        if strict:
            raise
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def process_uid(pid: int, proc: str = "/proc") -> int | None:
    """Real uid of a process (from /proc/<pid>/status), or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def is_alive(holder_pid: int, starttime: int | None) -> bool:
    """True if the same process (pid and start time) still runs."""
    now = process_starttime(holder_pid)
    return now is not None and (starttime is None or now == starttime)


def open_pidfd(pid: int, starttime: int | None) -> int | None:
    """A pidfd for the holder, or None if it has exited (or the pid was recycled).

    The start time is checked after opening: a pidfd pins the process, so a match then
    means this fd really refers to the holder and its readability means its exit. Only
    ESRCH (or no /proc entry) and a start-time mismatch mean "exited": any other failure
    (EMFILE: the agent is out of descriptors) raises OSError, since it says nothing about
    the holder.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        now = process_starttime(pid, strict=True)
    except BaseException:
        os.close(fd)
        raise
    if now is None or (starttime is not None and now != starttime):
        os.close(fd)
        return None
    return fd


@dataclass(slots=True)
class LeaseExtras:
    """What the shell keeps beside an allocator lease: secret token, files, requester."""

    token: str
    holder: Holder
    files: Any = None  # handoff.LeaseFiles once written
    pidfd: int | None = None  # its holder process's pidfd (PidWatch), shared, counted
    counted_uid: int | None = None  # the uid whose lease count includes this lease
