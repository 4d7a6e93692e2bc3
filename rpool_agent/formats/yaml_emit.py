"""A small YAML emitter for pool documents, so writing one never imports PyYAML.

`import yaml` costs about as much as Python's own start-up (docs/detect.md), and
`rpool-agent detect` writes a canary pool on every call. Pool documents are plain data (mappings,
lists, strings, numbers, booleans, null), so block style plus two scalar styles cover
them: a string is written plain only when it starts with a letter, holds only
`[A-Za-z0-9_./-]` and is none of YAML 1.1's boolean/null words; everything else is
double-quoted with escapes. The output reads back identically with `yaml.safe_load`
(tests/test_formats_yaml.py checks that against PyYAML with hypothesis).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from ..errors import PoolFormatError

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

#: What a plain scalar may hold, checked with str methods (faster than `re`, and nothing to
#: compile when `detect` starts).
_PLAIN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-"
#: YAML 1.1 words PyYAML resolves to bool or null (checked lower-cased: stricter than needed).
_WORDS = frozenset({"yes", "no", "true", "false", "on", "off", "null"})
#: A simple (implicit) key may be at most 1024 characters in YAML; longer ones use `? key`.
_MAX_KEY = 1000
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def dumps(doc: Any) -> str:
    """`doc` as block-style YAML text ending in a newline."""
    try:
        inline = _inline(doc)
        if inline is not None:
            return inline + "\n"
        return "\n".join(_block(doc, "")) + "\n"
    except _Unwritable as exc:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in exc.path)
        raise PoolFormatError(
            f"cannot write a {type(exc.value).__name__} in YAML", where=where.lstrip(".")
        ) from None


class _Unwritable(Exception):
    """A value the emitter has no form for; collects its path on the way out."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.path: list[Any] = []


def _quote(s: str) -> str:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:  # [\x20-\x7e]*
        return f'"{s}"'
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        c = ord(ch)
        # YAML's printable set, less BOM and 0x2028/0x2029 (line breaks to YAML 1.1)
        if (
            0x20 <= c <= 0x7E
            or 0xA0 <= c <= 0x2027
            or 0x202A <= c <= 0xD7FF
            or (0xE000 <= c <= 0xFFFD and c != 0xFEFF)
            or c >= 0x10000
        ):
            out.append(ch)
        elif c <= 0xFF:
            out.append(f"\\x{c:02x}")
        else:
            out.append(f"\\u{c:04x}")
    out.append('"')
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _str(s: str) -> str:
    # [A-Za-z][A-Za-z0-9_./-]*: a letter first, all ASCII, nothing outside _PLAIN_CHARS
    if s[:1].isalpha() and s.isascii() and not s.strip(_PLAIN_CHARS) and s.lower() not in _WORDS:
        return s
    return _quote(s)


def _float(x: float) -> str:
    if math.isnan(x):
        return ".nan"
    if math.isinf(x):
        return ".inf" if x > 0 else "-.inf"
    text = repr(x)
    if "." not in text:  # YAML 1.1 floats need a dot: 1e+20 -> 1.0e+20
        mantissa, _, exp = text.partition("e")
        text = f"{mantissa}.0e{exp}" if exp else f"{mantissa}.0"
    return text


def _scalar(value: Any) -> str:
    t = type(value)
    if t is str:
        return _str(value)
    if t is int:
        return str(value)
    if value is None:
        return "null"
    if t is bool:
        return "true" if value else "false"
    if isinstance(value, str):
        return _str(str(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _float(value)
    if t.__name__ in ("date", "datetime") and t.__module__ == "datetime":
        return str(value.isoformat())  # safe_load gives dates; they read back the same
    raise _Unwritable(value)


def _inline(value: Any) -> str | None:
    """The one-line form of a scalar, an empty container or a list of scalars; else None."""
    if isinstance(value, (str, int)):
        return _scalar(value)
    if isinstance(value, Mapping):
        return "{}" if not value else None
    if isinstance(value, (list, tuple)):
        if not value:
            return "[]"
        if any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return None
        parts = []
        for i, v in enumerate(value):
            try:
                parts.append(_scalar(v))
            except _Unwritable as exc:
                exc.path.insert(0, i)
                raise
        return "[" + ", ".join(parts) + "]"
    return _scalar(value)


def _block(value: Any, indent: str) -> list[str]:
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            try:
                if isinstance(key, (Mapping, list, tuple)):
                    raise _Unwritable(key)
                k = _scalar(key)
                inline = _inline(item)
                if len(k) > _MAX_KEY:
                    lines.append(f"{indent}? {k}")
                    k = ""
                if inline is not None:
                    lines.append(f"{indent}{k}: {inline}")
                else:
                    lines.append(f"{indent}{k}:")
                    lines.extend(_block(item, indent + "  "))
            except _Unwritable as exc:
                exc.path.insert(0, key)
                raise
        return lines
    for i, item in enumerate(value):
        try:
            inline = _inline(item)
            if inline is not None:
                lines.append(f"{indent}- {inline}")
                continue
            sub = _block(item, indent + "  ")
        except _Unwritable as exc:
            exc.path.insert(0, i)
            raise
        lines.append(f"{indent}- {sub[0][len(indent) + 2 :]}")
        lines.extend(sub[1:])
    return lines
