"""The state directory's files, opened so that nothing else can stand in for them.

The agent runs as root; its state dir must be its own (0700, not writable by others), and
each file in it is opened through the directory's descriptor, never through a link, and
only if it is a regular file: a FIFO or a device in a journal's place must not hang the
agent's start (an open() of a FIFO waits for a writer, and SIGTERM with it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path

from .errors import ConfigError


def open_private_dir(path: Path) -> int:
    """Create (0700) and open the state dir; ConfigError unless this user alone can write it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"state dir {path}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise ConfigError(
            f"state dir {path} must be owned by this user and writable by it alone "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return fd


def lock_dir(dir_fd: int, path: Path, name: str) -> tuple[int, bool]:
    """(the locked lock file, whether an earlier agent had created it); ConfigError if
    another agent holds it."""
    try:
        try:
            fd, existed = open_regular(name, dir_fd, os.O_RDWR | os.O_CREAT | os.O_EXCL), False
        except FileExistsError:
            fd, existed = open_regular(name, dir_fd, os.O_RDWR), True
    except OSError as exc:
        raise ConfigError(f"state dir {path}: {name}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise ConfigError(
            f"another agent{pid} keeps its leases in {path}; to run a second agent, give"
            " it a --state-dir and a --socket of its own"
        ) from None
    try:  # who holds it, for the next agent's message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # only the message loses the pid
    return fd, existed


def open_regular(name: str, dir_fd: int, flags: int, mode: int = 0o600) -> int:
    """Open a file of the dir only if it is a regular file: never through a link
    (O_NOFOLLOW), never waiting on a FIFO or device (O_NONBLOCK, then fstat)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{name} in the state dir is not a regular file; refusing to use it")
    os.set_blocking(fd, True)
    return fd


def read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_new_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = open_regular(name, dir_fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def replace_file(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    durable: bool = False,
) -> None:
    """Replace `name` in the directory with `data`, whole: a reader sees the old file or
    the new one, never half of one. The one way the agent does it (drains, metrics,
    per-lease files): a new temporary file of a name nobody can guess (O_EXCL |
    O_NOFOLLOW: never an existing file, never a link), its mode and owner set on the open
    descriptor (the umask and a path a client may change play no part), renamed over
    `name` relative to the directory's descriptor. `durable`: fsync the file and the
    directory, for what must outlive a power loss."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode, dir_fd=dir_fd)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def stamp() -> str:
    """A file-name suffix for copies kept aside: the time and this agent's pid."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
