"""Where the agent's socket and state live by default: root vs. user paths, environment.

Apart from config.py because every client needs these and nothing else of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import ConfigError

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    from typing import Any

SYSTEM_SOCKET = "/run/rpool-agent/agent.sock"
SYSTEM_STATE_DIR = "/var/lib/rpool-agent"
SYSTEM_CONFIG = "/etc/rpool-agent/agent.yaml"
SOCKET_ENV = "RPOOL_AGENT_SOCKET"


def _uid(uid: int | None) -> int:
    return os.getuid() if uid is None else uid


def user_socket_path(env: Mapping[str, str] = os.environ) -> str | None:
    """`$XDG_RUNTIME_DIR/rpool-agent/agent.sock`, or None without XDG_RUNTIME_DIR."""
    runtime = env.get("XDG_RUNTIME_DIR", "")
    return os.path.join(runtime, "rpool-agent", "agent.sock") if runtime else None


def default_socket_path(env: Mapping[str, str] = os.environ, uid: int | None = None) -> str:
    """Where a server listens: $RPOOL_AGENT_SOCKET, else the system path as root, else the
    per-user runtime path.

    Raises ConfigError for a user without XDG_RUNTIME_DIR rather than guessing a shared
    directory such as /tmp, where another user could squat the path.
    """
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    if _uid(uid) == 0:
        return SYSTEM_SOCKET
    path = user_socket_path(env)
    if path is None:
        raise ConfigError(f"XDG_RUNTIME_DIR is not set: pass --socket PATH or set {SOCKET_ENV}")
    return path


def client_socket_path(
    env: Mapping[str, str] = os.environ,
    uid: int | None = None,
    *,
    exists: Any = os.path.exists,
) -> str:
    """Where a client connects: $RPOOL_AGENT_SOCKET, else the server default for this user
    when a socket is there, else the system agent's socket.

    The fallback is what makes a node's systemd agent reach every user (members of the
    socket's group) without each setting RPOOL_AGENT_SOCKET, while a user's own agent,
    if one runs, still wins.
    """
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    if _uid(uid) != 0:
        path = user_socket_path(env)
        if path is not None and exists(path):
            return path
    return SYSTEM_SOCKET


def default_state_dir(env: Mapping[str, str] = os.environ, uid: int | None = None) -> str:
    """Where durable leases live: $STATE_DIRECTORY (set by systemd's StateDirectory=), else
    /var/lib/rpool-agent as root, else $XDG_STATE_HOME/rpool-agent or
    ~/.local/state/rpool-agent."""
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    if _uid(uid) == 0:
        return SYSTEM_STATE_DIR
    base = env.get("XDG_STATE_HOME") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "rpool-agent")
