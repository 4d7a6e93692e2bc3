"""`rpool-agent status --watch`: the human view, redrawn in place as leases come and go.

Plain ANSI rather than rich: the view is already text (status_text.py), and redrawing it
needs three escape sequences (cursor home, clear to end of line, clear to end of screen),
not a 20 ms import and a dependency of our own now that typer no longer brings rich.
The screen is redrawn only when the view changes (ages tick once a second, so about once
a second), without clearing it first, so nothing flickers. Off a terminal each changed
view is printed whole, after a blank line, for a log to keep.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


def frame(text: str, *, interval: float, width: int, height: int) -> str:
    """One screen: a header like watch(1)'s, then the view cut to the terminal's size
    (a wrapped or scrolled line would shift every later redraw)."""
    header = f"Every {interval:g}s: rpool-agent status    {time.strftime('%H:%M:%S')}"
    lines = [header, "", *text.splitlines()][: max(1, height - 1)]
    cut = [ln if len(ln) <= width else ln[: max(0, width - 1)] + "…" for ln in lines]
    return HOME + "".join(ln + CLEAR_LINE + "\n" for ln in cut) + CLEAR_BELOW


def watch(client: Any, *, interval: float = 0.5, stream: TextIO | None = None) -> None:
    """Poll `client.status()` every `interval` seconds and show each new view until
    interrupted (Ctrl-C ends it: KeyboardInterrupt goes up to the command line)."""
    from .status_text import render_status

    out = stream or sys.stdout
    tty = out.isatty()
    shown = None
    if tty:
        out.write(HIDE_CURSOR)
    try:
        while True:
            text = render_status(client.status())
            if tty:
                size = _size(out)
                screen = frame(text, interval=interval, width=size.columns, height=size.lines)
                if screen != shown:
                    out.write(screen)
                    out.flush()
                    shown = screen
            elif text != shown:
                out.write(("\n" if shown is not None else "") + text + "\n")
                out.flush()
                shown = text
            time.sleep(interval)  # the poll period itself, not a wait for a condition
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()


def _size(stream: TextIO) -> os.terminal_size:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return os.terminal_size((80, 24))
    return os.terminal_size((size.columns or 80, size.lines or 24))
