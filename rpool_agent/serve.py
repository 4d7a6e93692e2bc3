"""`rpool-agent serve`: turn configuration into a running `Server`.

Kept apart from server.py so the server stays a shell around the allocator, and apart
from the command line so tests and embedders can start an agent without it.
"""

from __future__ import annotations

import grp
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .errors import ConfigError, RpoolAgentError
from .pool import Pool


def load_pool(cfg: Any, *, reloading: bool = False) -> Pool:
    """The pool file when one is configured, else what the probes find on this node.

    NVML installed but failing does not stop the agent: it serves the CPUs, logs why, and
    the pool's `gpus_unavailable` property carries the reason to `status`. A node with
    no NVIDIA GPU at all is said once, at start, not again on every reload."""
    if cfg.pool:
        from .formats import load_file

        return load_file(cfg.pool)
    from .detect import detect_pool
    from .probes.nvidia import probe_gpus

    report = probe_gpus("/")
    notes: list[str] = []
    pool = detect_pool(
        "/",
        hyperthreads=cfg.hyperthreads,
        slots_per_gpu=cfg.slots_per_gpu,
        mig=cfg.mig,
        gpu_report=report,
        notes=notes,
    )
    if report.failed:
        pool.additional_properties["gpus_unavailable"] = report.problem
        notes.append("serving the CPUs only")
    said = None if reloading and report.source == "none" else report.problem
    for line in [said, *notes] if said else notes:
        print(f"rpool-agent: {line}", file=sys.stderr)
    return pool


def group_id(name: str | None, what: str) -> int | None:
    if name is None:
        return None
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{what} {name!r}: no such group") from None


def build_server(
    cfg: Any, reload_config: Callable[[], Any] | None = None, *, forget_leases: bool = False
) -> Any:
    """A configured, not yet started `Server` (pool loaded, limits, state store).

    `reload_config` gives the configuration a reload (SIGHUP, `reload`) loads the pool
    from: `serve` re-reads its config file there, so an edited file takes effect.
    """
    from . import systemd
    from .server import Limits, Server
    from .state import StateStore

    pool = load_pool(cfg)
    server = Server(
        pool,
        socket_path=cfg.socket,
        limits=Limits(
            max_message_bytes=cfg.max_message_bytes,
            max_pending_per_connection=cfg.max_pending_per_connection,
            max_connections_per_uid=cfg.max_connections_per_uid,
            max_connections_root=cfg.max_connections_root,
            max_leases_per_uid=cfg.max_leases_per_uid,
            max_waiting_per_uid=cfg.max_waiting_per_uid,
            handshake_timeout=cfg.handshake_timeout,
        ),
        admin_gid=group_id(cfg.admin_group, "admin group"),
        socket_gid=group_id(cfg.socket_group, "socket group"),
        socket_mode=cfg.socket_mode,
        notify=systemd.notify if os.environ.get("NOTIFY_SOCKET") else None,
        pool_loader=lambda: load_pool(reload_config() if reload_config else cfg, reloading=True),
        watchdog_interval=systemd.watchdog_interval(),
        state=StateStore(cfg.state_dir, forget=forget_leases) if cfg.state_dir else None,
        log_events=cfg.log_level in ("debug", "info"),
        gpu_health=gpu_health(cfg),
    )
    server.monitor.configure(
        metrics_file=cfg.metrics_file,
        metrics_interval=cfg.metrics_interval,
        audit_interval=cfg.audit_interval or None,
    )
    return server


def gpu_health(cfg: Any) -> Any:
    """The GPU health poller: every 30 s for a detected pool, never for a pool file,
    unless `gpu_health_interval` says otherwise (0: off)."""
    interval = cfg.gpu_health_interval
    if interval is None:
        from .gpu_health import DEFAULT_INTERVAL

        interval = None if cfg.pool else DEFAULT_INTERVAL
    if not interval:
        return None
    from .gpu_health import GpuHealth

    return GpuHealth(interval)


def serve_main(
    config_path: str | None, given: dict[str, Any], *, forget_leases: bool = False
) -> None:
    from . import systemd
    from .config import load_serve_config
    from .server import run_server

    inherited = systemd.listen_fds()
    if len(inherited) > 1:
        raise RpoolAgentError(f"expected one inherited socket, systemd passed {len(inherited)}")
    sock = inherited[0] if inherited else None
    if config_path is not None:  # re-read on reload: name the same file then, and in errors
        config_path = os.path.abspath(config_path)
    cfg = load_serve_config(config_path, given)
    if sock is not None:
        # The socket systemd made is where clients are, and per-lease files go beside
        # it; a configured path (or the default, which may not even resolve) is moot.
        cfg = replace(cfg, socket=inherited_path(sock) or cfg.socket)
    server = build_server(
        cfg.resolved(),
        lambda: load_serve_config(config_path, given),
        forget_leases=forget_leases,
    )
    run_server(server, sock)


def inherited_path(sock: socket.socket) -> str | None:
    """The filesystem path of an inherited listening socket; None for an abstract one.

    Raises ConfigError for anything but a Unix stream socket (a `ListenStream=` port or
    a `ListenDatagram=` in the .socket unit), which the agent cannot serve on.
    """
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigError(
            f"the inherited socket is {sock.family.name}/{sock.type.name}; "
            "the agent needs a Unix stream socket (ListenStream=/PATH)"
        )
    name = sock.getsockname()
    return name if isinstance(name, str) and name.startswith("/") else None
