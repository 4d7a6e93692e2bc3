"""Listening and peer identity: the socket nobody else can swap, and who is calling.

The socket is created where no other user can replace it (docs/security.md); who a peer
is comes from the kernel (SO_PEERCRED, SO_PEERGROUPS), never from what a client says.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from .errors import AgentUnavailable
from .holders import process_starttime


def bind_socket(socket_path: str, socket_gid: int | None, socket_mode: int) -> socket.socket:
    """Create the listening socket where nobody else can swap it (docs/security.md)."""
    path = Path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        check_socket_dir(path.parent)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise AgentUnavailable(f"{path} is a symlink; refusing to replace it")
            if not stat.S_ISSOCK(st.st_mode):
                raise AgentUnavailable(f"{path} exists and is not a socket; refusing")
            if _answers(str(path)):
                raise AgentUnavailable(f"another agent already listens on {path}")
            path.unlink()  # stale: left by an agent that died
        old_umask = os.umask(0o177)  # 0600 until chmod: never briefly too open
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if socket_gid is not None:
            os.chown(path, -1, socket_gid)
        os.chmod(path, socket_mode)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise AgentUnavailable(f"cannot listen on {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python lacks the name


def peer_groups(conn: Any) -> set[int]:
    """The peer's groups as the kernel recorded them at connect() (SO_PEERGROUPS).

    Not /proc/<pid>/status: that pid may have exited and been reused by a process of
    someone else since. Python caps getsockopt at 1024 bytes (256 groups); a peer in more
    groups falls back to /proc, trusted only while the process start time still matches.
    """
    peer = conn.peer
    if peer is None or conn.transport is None:
        return set()
    groups = {peer.gid}
    sock = conn.transport.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
        return groups | set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        with open(f"/proc/{peer.pid}/status", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return groups
    if peer.starttime is None or process_starttime(peer.pid) != peer.starttime:
        return groups
    for line in lines:
        if line.startswith(b"Groups:"):
            groups.update(int(g) for g in line.split()[1:])
    return groups


def check_socket_dir(directory: str | os.PathLike[str]) -> None:
    """Refuse a socket directory that someone else could use to swap our socket.

    The directory (symlinks resolved) must be owned by root or by us and writable by its
    owner alone: others-writable is refused even with the sticky bit, since in a /tmp-like
    directory anyone may create the name before we start or after we stop, and clients
    would then talk to an impostor. Each directory above it must be owned by root or us
    and, if others can write it, sticky (so /tmp/<ours>/agent.sock is fine).
    """
    real = Path(os.path.realpath(directory))
    me = os.geteuid()
    for n, d in enumerate([real, *real.parents]):
        st = d.stat()
        if st.st_uid not in (0, me):
            raise AgentUnavailable(f"{d} belongs to uid {st.st_uid}; refusing to listen under it")
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if n == 0 and writable:
            raise AgentUnavailable(
                f"{d} is writable by group or others; give the socket a directory of its own"
            )
        if writable and not st.st_mode & stat.S_ISVTX:
            raise AgentUnavailable(f"{d} is writable by group or others and not sticky; refusing")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()
