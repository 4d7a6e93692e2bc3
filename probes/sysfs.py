"""Reading through a system root, and the pure parsers for what /sys and /proc hold.

Every probe takes a `Root` instead of touching `/sys` or `/proc` by literal path, so a
test is just a recorded tree (psutil needs to patch `open` for the same; we do not).
A missing file is a choice made at the call site: `read(path, default=None)`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_MISSING: object = object()


class Root:
    """A system root: `/` on the live machine, or a recorded tree in tests."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str] = "/") -> None:
        self.path = Path(path)

    @property
    def is_live(self) -> bool:
        """True for the real `/`: only then do live syscalls (affinity) describe this tree."""
        return self.path.resolve() == Path("/")

    def join(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def read(self, rel: str, default: T | object = _MISSING) -> str | T:
        """The file's text, stripped of whitespace and NUL padding (`node/online` has some)."""
        try:
            with open(self.join(rel), encoding="ascii", errors="replace") as f:
                return f.read().strip().strip("\x00").strip()
        except OSError:
            if default is _MISSING:
                raise
            return default  # type: ignore[return-value]

    def exists(self, rel: str) -> bool:
        return self.join(rel).exists()

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root matching `pattern`, sorted."""
        base = str(self.path).rstrip("/")
        hits = glob.glob(str(self.join(pattern)))
        return sorted("/" + h[len(base) :].lstrip("/") for h in hits)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.join(rel)))
        except OSError:
            return []

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r})"


def as_root(root: Root | str | os.PathLike[str] | None) -> Root:
    return root if isinstance(root, Root) else Root(root or "/")


# --- pure parsers -------------------------------------------------------------------------


def parse_cpulist(text: str) -> list[int]:
    """`"0-3,8,10-11"` -> [0, 1, 2, 3, 8, 10, 11]. Empty text is the empty list."""
    out: set[int] = set()
    for part in text.strip().strip("\x00").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            hi, _, stride = hi.partition(":")  # "0-7:2" (stride) appears in some kernels' lists
            out.update(range(int(lo), int(hi) + 1, int(stride) if stride else 1))
        else:
            out.add(int(part))
    return sorted(out)


def parse_cpumask(text: str) -> list[int]:
    """Hex mask, comma-separated 32-bit words, most significant first -> CPU numbers."""
    words = [w.strip() for w in text.strip().strip("\x00").split(",") if w.strip()]
    value = 0
    for w in words:
        value = (value << 32) | int(w, 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def format_cpulist(cpus: list[int] | set[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's own notation)."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)
