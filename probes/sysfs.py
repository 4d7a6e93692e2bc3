"""Reading through a system root, and the pure parsers for what /sys and /proc hold.

Every probe takes a `Root` instead of touching `/sys` or `/proc` by literal path, so a
test is just a recorded tree (psutil needs to patch `open` for the same; we do not).
A missing file is a choice made at the call site: `read(path, default=None)`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from pathlib import Path
    from typing import TypeVar

    T = TypeVar("T")
_MISSING: object = object()


class Root:
    """A system root: `/` on the live machine, or a recorded tree in tests.

    Paths are joined as strings: `detect` runs in every job's prologue and does not import
    `pathlib` (docs/detect.md). `path` and `join` still give `Path`s to whoever asks.
    """

    __slots__ = ("_base", "dir")

    def __init__(self, path: str | os.PathLike[str] = "/") -> None:
        #: The root as a string, as given ("." for ""; `Path` would say the same).
        self.dir: str = os.fspath(path) or "."
        self._base = self.dir if self.dir.endswith("/") else self.dir + "/"

    @property
    def path(self) -> Path:
        from pathlib import Path

        return Path(self.dir)

    def __str__(self) -> str:
        """The root as `str(root.path)` writes it (`a//b/./` -> `a/b`), without pathlib."""
        rel = self.dir.lstrip("/")
        slashes = len(self.dir) - len(rel)
        lead = "//" if slashes == 2 else "/" if slashes else ""  # POSIX keeps exactly two
        parts = [p for p in rel.split("/") if p and p != "."]
        return lead + "/".join(parts) if lead or parts else "."

    @property
    def is_live(self) -> bool:
        """True for the real `/`: only then do live syscalls (affinity) describe this tree."""
        return os.path.realpath(self.dir) == "/"

    def join(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def file(self, rel: str) -> str:
        """`rel` under the root, as a string (what `join` gives as a `Path`)."""
        return self._base + rel.lstrip("/")

    def read(self, rel: str, default: T | object = _MISSING) -> str | T:
        """The file's text, stripped of whitespace and NUL padding (`node/online` has some)."""
        try:
            with open(self.file(rel), encoding="ascii", errors="replace") as f:
                return f.read().strip().strip("\x00").strip()
        except OSError:
            if default is _MISSING:
                raise
            return default  # type: ignore[return-value]

    def lines(self, rel: str) -> Iterator[str]:
        """The file's lines, read lazily: a caller may stop early (`/proc/cpuinfo` is built
        per CPU on each read, so reading only the first record is much cheaper). Empty if
        the file cannot be opened."""
        try:
            f = open(self.file(rel), encoding="ascii", errors="replace")  # noqa: SIM115
        except OSError:  # missing is a normal answer here; the `with` below closes it
            return
        with f:
            try:
                yield from f
            except OSError:  # opened but unreadable (EIO...): what was read is all, as read()
                return

    def read_int(self, rel: str) -> int | None:
        """An integer file (`core_id`, `numa_node`...), or None if missing or not a number."""
        text = self.read(rel, default=None)
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    def read_cpulist(self, rel: str) -> list[int] | None:
        """A cpulist file (`0-3,8`), or None when missing or unparsable."""
        return _parsed(self.read(rel, default=None), parse_cpulist)

    def read_cpumask(self, rel: str) -> list[int] | None:
        """A hex mask file (`thread_siblings`, `cpumap`), or None when missing or unparsable."""
        return _parsed(self.read(rel, default=None), parse_cpumask)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.file(rel))

    def glob(self, pattern: str) -> list[str]:
        """Paths relative to the root matching `pattern`, sorted."""
        import glob

        base = str(self.path).rstrip("/")
        hits = glob.glob(str(self.join(pattern)))
        return sorted("/" + h[len(base) :].lstrip("/") for h in hits)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.file(rel)))
        except OSError:
            return []

    def __repr__(self) -> str:
        return f"Root({str(self)!r})"


def _parsed(text: str | None, parse: Callable[[str], list[int]]) -> list[int] | None:
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError:
        return None


@dataclass(slots=True)
class Mount:
    """One line of `/proc/self/mountinfo` (or `/proc/mounts`, which lacks `root`)."""

    mountpoint: str
    fstype: str
    options: frozenset[str]  # mount and super-block options together ("cpuset", "rw"...)
    root: str = "/"  # the part of the filesystem mounted there (a cgroup path for cgroupfs)


def mounts(root: Root) -> list[Mount]:
    """The mounts the process sees. `mountinfo` first because it says which cgroup is the
    mount's root (inside a container that is not `/`); `mounts` as a fallback for trees
    recorded without it."""
    out: list[Mount] = []
    for line in root.lines("proc/self/mountinfo"):
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 1:
            continue
        opts = set(fields[5].split(",")) if len(fields) > 5 else set()
        opts.update(tail[2].split(",") if len(tail) > 2 else ())
        out.append(Mount(_unescape(fields[4]), tail[0], frozenset(opts), _unescape(fields[3])))
    if out:
        return out
    for rel in ("proc/self/mounts", "proc/mounts"):
        for line in root.lines(rel):
            fields = line.split()
            if len(fields) >= 4:
                opts = frozenset(fields[3].split(","))
                out.append(Mount(_unescape(fields[1]), fields[2], opts))
        if out:
            break
    return out


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mount paths as octal escapes."""
    if "\\" not in field:
        return field  # nearly every line: no need for `re`
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def as_root(root: Root | str | os.PathLike[str] | None) -> Root:
    return root if isinstance(root, Root) else Root(root or "/")


# --- pure parsers -------------------------------------------------------------------------


def parse_cpulist(text: str) -> list[int]:
    """`"0-3,8,10-11"` -> [0, 1, 2, 3, 8, 10, 11]. Empty text is the empty list.

    The kernel's list syntax (lib/bitmap.c, `bitmap_parselist`) also has grouped ranges,
    `A-B:U/G`: from A to B, in each group of G CPUs the first U, so `0-15:2/8` is 0, 1, 8,
    9. The kernel accepts them where lists are written (`isolcpus=`, `cpuset.cpus`) and
    never prints them (sysfs shows plain ranges), but a hand-written tree may hold one.
    """
    out: set[int] = set()
    for part in text.strip().strip("\x00").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            hi, _, groups = hi.partition(":")
            if groups:  # "0-1023:2/256": in each group of 256 from 0, the first 2 (see above)
                used, _, size = groups.partition("/")
                for start in range(int(lo), int(hi) + 1, int(size)):
                    out.update(range(start, min(start + int(used), int(hi) + 1)))
            else:
                out.update(range(int(lo), int(hi) + 1))
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
    """[0, 1, 2, 5] -> "0-2,5" (the kernel's own notation). One pass, a string per run
    rather than per cpu: `status` sums up 10,000 idle cpus with it on each call."""
    ordered = sorted(set(cpus))
    if not ordered:
        return ""
    runs: list[str] = []
    start = prev = ordered[0]
    for n in ordered[1:]:
        if n != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = n
        prev = n
    runs.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(runs)
