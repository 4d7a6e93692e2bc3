"""Acquire without waiting silently: say what a wait is for and who holds it.

A test process that blocks on a lease blocks its whole pytest-xdist run (the controller
waits for every worker to collect), so a wait must be visible: first a line naming what
is wanted and who holds it, then the same again every `every` seconds until the grant.
The reminders ask the agent on their own connection, so the waiting acquire keeps its
place in the queue (a new acquire would go to the back).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ResourceUnavailable, RpoolAgentError, Unsatisfiable

#: Seconds between reminders while a lease is waited for.
REMIND_EVERY = 30.0
_MAX_HOLDERS = 6  # holders named in one line; the rest are counted


def describe_request(request: Any) -> str:
    """`gpus:1 cpus:2` for a count mapping; any other form as given."""
    if isinstance(request, Mapping):
        return " ".join(f"{k}:{v}" for k, v in request.items())
    return str(request)


def describe_wait(snap: Mapping[str, Any], request: Any) -> str:
    """What is free of the wanted types, who holds them, how many wait: from `status`."""
    types = snap.get("types") or {}
    wanted = [t for t in _types(request) if t in types] or list(types)
    parts = []
    for rtype in wanted:
        t = types[rtype]
        drained = f", {t['drained']} drained" if t.get("drained") else ""
        parts.append(f"{rtype}: {t.get('free', 0)} of {t.get('total', 0)} free{drained}")
    holders = []
    for lease in snap.get("leases") or []:
        held = [
            f"{rtype} " + ",".join(str(i["id"]) for i in items)
            for rtype, items in sorted((lease.get("resources") or {}).items())
            if rtype in wanted and items
        ]
        if held:
            pid = (lease.get("holder") or {}).get("pid")
            label = f" {lease['label']!r}" if lease.get("label") else ""
            holders.append(f"pid {pid}{label} holds {' '.join(held)}")
    if len(holders) > _MAX_HOLDERS:
        holders[_MAX_HOLDERS:] = [f"{len(holders) - _MAX_HOLDERS} more"]
    if holders:
        parts.append("; ".join(holders))
    waiters = len(snap.get("waiters") or []) + (snap.get("more") or {}).get("waiters", 0)
    if waiters:
        parts.append(f"{waiters} request(s) waiting")
    return "; ".join(parts)


def _types(request: Any) -> list[str]:
    """The types a count mapping or canary item list names (none for a CTest string)."""
    if isinstance(request, Mapping):
        return list(request)
    if isinstance(request, list):
        return list(dict.fromkeys(i["type"] for i in request if isinstance(i, Mapping)))
    return []


def acquire_visibly(
    client: Any,
    request: Any,
    say: Callable[[str], None],
    *,
    timeout: float | None = None,
    every: float = REMIND_EVERY,
    what: str | None = None,
    **kwargs: Any,
) -> Any:
    """`client.acquire(request, ...)`, telling `say` when and why it has to wait (`what`
    is waited for: the request, unless told otherwise).

    Unsatisfiable and other refusals propagate at once, as from `acquire` itself.
    """
    try:
        return client.acquire(request, timeout=0, **kwargs)
    except Unsatisfiable:
        raise
    except ResourceUnavailable:
        if timeout == 0:
            raise
    wanted = what or describe_request(request)
    with contextlib.suppress(RpoolAgentError, OSError):
        say(f"waiting for {wanted}: {describe_wait(client.status(), request)}")
    stop = threading.Event()
    reminder = threading.Thread(
        target=_remind,
        args=(client.socket_path, request, wanted, say, stop, every),
        name="rpool-remind",
        daemon=True,
    )
    reminder.start()
    try:
        return client.acquire(request, timeout=timeout, **kwargs)
    finally:
        stop.set()
        reminder.join(5)


def _remind(
    socket_path: str,
    request: Any,
    wanted: str,
    say: Callable[[str], None],
    stop: threading.Event,
    every: float,
) -> None:
    from .client import Client

    waited = 0.0
    while not stop.wait(every):
        waited += every
        with contextlib.suppress(RpoolAgentError, OSError), Client(socket_path) as client:
            snap = client.status()
            if not stop.is_set():
                say(
                    f"still waiting for {wanted} after {waited:g} s: {describe_wait(snap, request)}"
                )
