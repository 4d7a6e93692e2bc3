"""The systemd service protocol, client side: sd_notify, the watchdog, socket activation.

Written here (about a hundred lines) rather than taken from a library: the protocol is a
datagram of `KEY=VALUE` lines to `$NOTIFY_SOCKET` and a few environment variables, and the
maintained bindings (python-systemd) need libsystemd and a compiler. Nothing here raises
because systemd is absent: outside a service every call is a cheap no-op, so the server
can call them unconditionally. No asyncio: the server calls these from its loop, they
never block (a datagram send to a local socket).

References: sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3
"""The first inherited descriptor (after stdin, stdout, stderr)."""


def _notify_address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):  # abstract namespace: a leading NUL byte on the wire
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # unset, empty, or a kind we do not speak (vsock:, relative paths)


def notify(state: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send `state` (newline-separated `KEY=VALUE` lines) to the service manager.

    True when the datagram was sent. False when there is no manager to tell (NOTIFY_SOCKET
    unset) or the send failed (socket gone, manager restarting): a notification is advice
    to systemd, and losing one must never take the agent down.
    """
    addr = _notify_address(env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the datagram.
    return " ".join(text.split())


def ready(status: str | None = None, *, env: Mapping[str, str] = os.environ) -> bool:
    """READY=1: the socket accepts connections and the pool is loaded (Type=notify)."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""), env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """STATUS=: the one-line summary `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def reloading(*, env: Mapping[str, str] = os.environ) -> bool:
    """RELOADING=1 (on SIGHUP); send `ready()` when the reload is done.

    MONOTONIC_USEC goes with it because Type=notify-reload (systemd 253+) requires it and
    older managers ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", env=env)


def stopping(*, env: Mapping[str, str] = os.environ) -> bool:
    """STOPPING=1: shutdown has begun (SIGTERM), so systemd does not read silence as a hang."""
    return notify("STOPPING=1", env=env)


def watchdog_ping(*, env: Mapping[str, str] = os.environ) -> bool:
    """WATCHDOG=1: the event loop is alive. Send every `watchdog_interval()` seconds."""
    return notify("WATCHDOG=1", env=env)


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings, or None when systemd asked for none.

    Half of WATCHDOG_USEC (what sd_watchdog_enabled(3) recommends), and only when
    WATCHDOG_PID is unset or names this process: a child that inherited the variables
    must not ping on its parent's behalf.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds_with_names(
    env: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, each with its name (FileDescriptorName=).

    Only when LISTEN_PID is this process (the variables may be inherited from a parent
    they were meant for). Descriptors that are not sockets are skipped. Each descriptor is
    made close-on-exec, so a command the agent might spawn never holds the listening socket.
    With `unset`, the variables are removed from `env` in every case (as sd_listen_fds(3)
    does), so no child mistakes them for its own.
    """
    try:
        pid_ok = int(env.get("LISTEN_PID", "")) == os.getpid()
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        pid_ok, count = False, 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    if unset:
        for key in _LISTEN_VARS:
            env.pop(key, None)
    if not pid_ok or count <= 0:
        return []
    found: list[tuple[str, socket.socket]] = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        except OSError:  # closed meanwhile, or not a socket (ListenFIFO=): not ours to use
            continue
        found.append((names[i] if i < len(names) and names[i] else "unknown", sock))
    return found


def listen_fds(
    env: MutableMapping[str, str] = os.environ, *, unset: bool = True
) -> list[socket.socket]:
    """The sockets systemd passed to this process (socket activation); [] when none."""
    return [sock for _, sock in listen_fds_with_names(env, unset=unset)]
