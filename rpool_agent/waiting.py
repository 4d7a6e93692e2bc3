"""`run` and `acquire` say that they wait: what for, their place in the queue, who holds it.

The agent tells a waiting client its queue position (a `queued` event); who holds the
resources comes from a `status` call on a second connection (the first one is busy
waiting for the grant). On a terminal the line on stderr is redrawn in place about once
a second and erased at the grant; off a terminal (a CI log) it is printed once, since a
log full of carriage returns helps nobody. Nothing is printed, and no second connection
is made, for an acquire that is granted at once.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not typing's: importing typing costs every `rpool-agent run`
if TYPE_CHECKING:
    import threading
    from typing import Any, TextIO

#: Seconds between redraws on a terminal.
REFRESH_S = 1.0


class WaitReport:
    """Give `Client.acquire(on_event=...)` this object's `event`; `close()` after it returns.

    `what` is the request as given to `acquire` (any of its forms)."""

    def __init__(
        self,
        socket_path: str,
        what: Any,
        *,
        holder_pid: int | None = None,
        stream: TextIO | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.socket_path = socket_path
        self.what = what
        self.pids = {os.getpid(), holder_pid} - {None}
        self.stream = stream or sys.stderr
        self.refresh_s = refresh_s
        self.started = time.monotonic()
        self.position: int | None = None
        self._stop: threading.Event | None = None  # made with the thread: `run` that is
        self._thread: threading.Thread | None = None  # granted at once imports no threading
        self._drawn = False

    def event(self, event: dict[str, Any]) -> None:
        """A frame about our pending acquire: `{"event": "queued", "position": n}`."""
        if event.get("event") != "queued" or self.position is not None:
            return
        position = event.get("position")
        self.position = position if isinstance(position, int) else 0
        if not _is_tty(self.stream):
            self._write(self.line(self._status()) + "\n")
            return
        import threading

        self._stop = threading.Event()
        self._draw()
        self._thread = threading.Thread(target=self._refresh, name="wait-report", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop redrawing and erase the line (the grant came, or the wait failed)."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def __enter__(self) -> WaitReport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- drawing -------------------------------------------------------------------------

    def _refresh(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.refresh_s):
            self._draw()

    def _draw(self) -> None:
        text = self.line(self._status())
        width = _columns(self.stream)
        if len(text) > width - 1:
            text = text[: width - 2] + "…"
        if self._stop is None or not self._stop.is_set():
            self._write("\r\x1b[K" + text)
            self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed: waiting goes on, silently
            pass

    def _status(self) -> dict[str, Any] | None:
        """The agent's status on a connection of our own; None if it cannot be had."""
        from .client import Client
        from .errors import RpoolAgentError

        try:
            with Client(self.socket_path, connect_timeout=1.0, reconnect_timeout=0) as c:
                return c.status()
        except (RpoolAgentError, OSError):
            return None

    def line(self, doc: dict[str, Any] | None) -> str:
        """`rpool-agent: waiting 12s for gpus=2: 1st in line; gpus held by ...`."""
        from .errors import RpoolAgentError
        from .requests import parse_request
        from .status_text import format_age, printable

        try:
            what = str(parse_request(self.what))
        except RpoolAgentError:
            what = str(self.what)
        mine = _my_waiter(doc, self.pids) if doc else None
        position = mine.get("position") if mine else self.position
        waited = format_age(time.monotonic() - self.started)
        text = f"rpool-agent: waiting {waited} for {printable(what, 60)}"
        if position:
            text += f": position {position} in the queue"
        held = _holders(doc, mine) if doc else ""
        return text + (f"; held by {held}" if held else "")


def _my_waiter(doc: dict[str, Any], pids: set[int]) -> dict[str, Any] | None:
    mine = [w for w in doc.get("waiters", []) if (w.get("holder") or {}).get("pid") in pids]
    return min(mine, key=lambda w: w.get("position", 0)) if mine else None


def _holders(doc: dict[str, Any], mine: dict[str, Any] | None) -> str:
    """`pid 4242 (alice, ctest) on gpus 0,1; ...` for the leases on the types we wait for."""
    from .status_text import printable, request_types

    types = request_types(mine) if mine is not None else None
    parts = []
    for le in doc.get("leases", []):
        held = {t: ids for t, ids in le.get("resources", {}).items() if not types or t in types}
        if not held:
            continue
        h = le.get("holder") or {}
        who = f"pid {h.get('pid')} ({printable(h.get('user') or '?', 16)}, "
        who += f"{printable(h.get('command') or '?', 20)})"
        on = " ".join(f"{t} " + ",".join(str(i["id"]) for i in ids) for t, ids in held.items())
        parts.append(f"{who} on {on}")
    if len(parts) > 3:
        parts = [*parts[:3], f"{len(parts) - 3} more"]
    return "; ".join(parts)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80  # 0: size never set
    except (AttributeError, ValueError, OSError):
        return 80
