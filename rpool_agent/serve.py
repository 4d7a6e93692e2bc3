"""`rpool-agent serve`: turn configuration into a running `Server`.

Kept apart from server.py so the server stays a shell around the allocator, and apart
from cli.py so tests and embedders can start an agent without typer.
"""

from __future__ import annotations

import grp
import os
import sys
from typing import Any

from .errors import ConfigError, RpoolAgentError
from .pool import Pool


def load_pool(cfg: Any) -> Pool:
    """The pool file when one is configured, else what the probes find on this node."""
    if cfg.pool:
        from .formats import load_file

        return load_file(cfg.pool)
    from .detect import detect_pool
    from .probes.nvidia import probe_gpus

    report = probe_gpus("/")
    if report.problem:
        print(f"rpool-agent: {report.problem}", file=sys.stderr)
    return detect_pool(
        "/",
        hyperthreads=cfg.hyperthreads,
        slots_per_gpu=cfg.slots_per_gpu,
        mig=cfg.mig,
        gpu_report=report,
    )


def group_id(name: str | None, what: str) -> int | None:
    if name is None:
        return None
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{what} {name!r}: no such group") from None


def build_server(cfg: Any) -> Any:
    """A configured, not yet started `Server` (pool loaded, limits, state store)."""
    from . import systemd
    from .server import Limits, Server

    pool = load_pool(cfg)
    return Server(
        pool,
        socket_path=cfg.socket,
        limits=Limits(
            max_message_bytes=cfg.max_message_bytes,
            max_pending_per_connection=cfg.max_pending_per_connection,
            max_connections_per_uid=cfg.max_connections_per_uid,
            handshake_timeout=cfg.handshake_timeout,
        ),
        admin_gid=group_id(cfg.admin_group, "admin group"),
        socket_gid=group_id(cfg.socket_group, "socket group"),
        socket_mode=cfg.socket_mode,
        notify=systemd.notify if os.environ.get("NOTIFY_SOCKET") else None,
        pool_loader=lambda: load_pool(cfg),
        watchdog_interval=systemd.watchdog_interval(),
    )


def serve_main(config_path: str | None, given: dict[str, Any]) -> None:
    from . import systemd
    from .config import load_serve_config
    from .server import run_server

    cfg = load_serve_config(config_path, given).resolved()
    server = build_server(cfg)
    inherited = systemd.listen_fds()
    if len(inherited) > 1:
        raise RpoolAgentError(f"expected one inherited socket, systemd passed {len(inherited)}")
    sock = inherited[0] if inherited else None
    if sock is not None:
        server.socket_path = sock.getsockname() or server.socket_path
    run_server(server, sock)
