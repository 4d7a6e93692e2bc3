"""Resource requests: the three forms a client may send, read into one value type.

- canary's item list `[{"type": "gpus", "slots": 1}, ...]` (one group), or canary's list of
  groups `[[items...], [items...]]`;
- a mapping `{"gpus": 2, "cpus": 4}`: one group of 1-slot units, each on a DIFFERENT
  instance (`distinct`), because whoever asks for `--gpus 2` wants two GPUs, not two slots
  of one;
- a CTest `RESOURCE_GROUPS` string `2,gpus:1;cpus:4`, read with CTest's own grammar (the
  flex lexer `cmCTestResourceGroupsLexer.in.l`, mirrored below as a transition table), so
  a string ctest accepts means the same here and one it rejects is rejected here.

A `Unit` is one `type:slots` item: it is served by ONE instance. Units (and groups) may
share an instance that has the slots, as in CTest and canary, unless `distinct`.

`parse_request` remembers what it read for small, plainly typed wire values (a bounded
cache keyed on their exact form): the same few shapes arrive again and again, and a
Request is immutable, so one value can be handed out to every caller.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import RequestError
from .pool import MAX_SLOTS, TYPE_NAME_RE

#: Most units one request may expand to (`{"cpus": N}`, `N,gpus:1`): bounds memory and
#: planning time whatever a client sends; far above any real node's instance count.
MAX_UNITS = 65536

#: The parse cache: how many wire values it remembers, and the largest it remembers (in
#: units, items, characters), so that its memory stays small whatever clients send.
_CACHE_MAX = 1024
_CACHE_UNITS = 256
_CACHE_ITEMS = 32
_CACHE_CHARS = 256


@dataclass(frozen=True)
class Unit:
    """One `type:slots` item, served by a single instance."""

    type: str
    slots: int = 1

    def __post_init__(self) -> None:
        _check_type(self.type)
        _check_slots(self.slots, f"slots of {self.type!r}")


@dataclass(frozen=True)
class Request:
    """What a client asks for: CTest groups of units, all granted or none.

    `groups` is CTest's list after expanding `N,`; the item-list and mapping forms give one
    group. `distinct` (the mapping form) puts every unit on a different instance; it only
    exists for one group of 1-slot units, which keeps `to_wire` exact.
    """

    groups: tuple[tuple[Unit, ...], ...] = ()
    distinct: bool = False

    def __post_init__(self) -> None:
        groups = tuple(tuple(g) for g in self.groups)
        for g in groups:
            for u in g:
                if not isinstance(u, Unit):
                    raise RequestError(f"a request group holds Units, not {type(u).__name__}")
        if sum(len(g) for g in groups) > MAX_UNITS:
            raise RequestError(f"a request may hold at most {MAX_UNITS} units")
        distinct = bool(self.distinct) and any(groups)
        if distinct:
            if len(groups) != 1 or any(u.slots != 1 for u in groups[0]):
                raise RequestError("a distinct request is one group of 1-slot units")
            # canonical order: units grouped by type, first appearance first (= mapping order)
            order = list(dict.fromkeys(u.type for u in groups[0]))
            groups = (tuple(sorted(groups[0], key=lambda u: order.index(u.type))),)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "distinct", distinct)
        # derived once: the allocator asks for these on every grant decision
        units = tuple(u for g in groups for u in g)
        object.__setattr__(self, "_units", units)
        object.__setattr__(self, "_types", frozenset(u.type for u in units))

    def __hash__(self) -> int:
        # Requests key the allocator's caches: hash the units once, not on every lookup.
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.groups, self.distinct))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict[str, Any]:
        # str hashes differ between processes: a pickled Request hashes itself anew
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def types(self) -> frozenset[str]:
        return self._types  # type: ignore[attr-defined, no-any-return]

    def units(self) -> tuple[Unit, ...]:
        """All units, group after group, in request order."""
        return self._units  # type: ignore[attr-defined, no-any-return]

    def totals(self) -> dict[str, int]:
        """Slots asked for per type (first appearance order)."""
        out: dict[str, int] = {}
        for g in self.groups:
            for u in g:
                out[u.type] = out.get(u.type, 0) + u.slots
        return out

    def to_wire(self) -> Any:
        """A JSON-able form that `parse_request` reads back into an equal Request."""
        if self.distinct:
            counts: dict[str, int] = {}
            for u in self.groups[0]:
                counts[u.type] = counts.get(u.type, 0) + 1
            return counts
        items = [[{"type": u.type, "slots": u.slots} for u in g] for g in self.groups]
        if len(items) == 1 and items[0]:
            return items[0]
        return items

    def __str__(self) -> str:
        if self.distinct:
            return ", ".join(f"{t}={n}" for t, n in self.to_wire().items())
        return format_resource_groups(self) or "nothing"


# --- parsing ---------------------------------------------------------------------------


def parse_request(value: object) -> Request:
    """Read any of the three request forms (or a Request); raise RequestError if bad."""
    key = _cache_key(value)
    if key is not None:
        got = _cache.get(key)
        if got is not None:
            return got
    request = _parse(value)
    if key is not None and len(request.units()) <= _CACHE_UNITS:
        if len(_cache) >= _CACHE_MAX:
            with contextlib.suppress(RuntimeError):  # another thread changed it: no matter
                _cache.pop(next(iter(_cache), None), None)  # the oldest entry
        _cache[key] = request
    return request


#: wire form key -> Request; see `_cache_key`
_cache: dict[Any, Request] = {}


def _cache_key(value: object) -> Any:
    """A hashable key that equals another value's key only when both read the same, or None.

    Only exact built-in types take part (`True == 1` and `1.0 == 1` as dict values, but they
    are errors as counts), and only small values. The tag (0, 1, 2) keeps the forms apart.
    """
    kind = type(value)
    if kind is str:
        return value if len(value) <= _CACHE_CHARS else None  # type: ignore[arg-type]
    if kind is dict:
        if len(value) > _CACHE_ITEMS:  # type: ignore[arg-type]
            return None
        for k, v in value.items():  # type: ignore[attr-defined]
            if type(k) is not str or type(v) is not int or len(k) > _CACHE_CHARS:
                return None
        return (0, tuple(value.items()))  # type: ignore[attr-defined]
    if kind is list:
        if not value or len(value) > _CACHE_ITEMS:  # type: ignore[arg-type]
            return None
        if type(value[0]) is list:  # type: ignore[index]
            groups = []
            for g in value:  # type: ignore[attr-defined]
                if type(g) is not list:
                    return None
                items = _items_key(g)
                if items is None:
                    return None
                groups.append(items)
            return (2, tuple(groups))
        items = _items_key(value)  # type: ignore[arg-type]
        return None if items is None else (1, items)
    return None


def _items_key(items: list[Any]) -> tuple[tuple[str, int], ...] | None:
    if len(items) > _CACHE_ITEMS:
        return None
    out = []
    for item in items:
        if type(item) is not dict:
            return None
        rtype, slots = item.get("type"), item.get("slots", 1)
        if len(item) != 1 + ("slots" in item) or type(rtype) is not str or type(slots) is not int:
            return None
        if len(rtype) > _CACHE_CHARS:
            return None
        out.append((rtype, slots))
    return tuple(out)


def _parse(value: object) -> Request:
    if isinstance(value, Request):
        return value
    if isinstance(value, str):
        return _parse_resource_groups(value)
    if isinstance(value, Mapping):
        return _parse_mapping(value)
    if isinstance(value, (list, tuple)):
        return _parse_items(value)
    raise RequestError(
        "a request is an item list, a {type: count} mapping or a RESOURCE_GROUPS string, "
        f"not {_kind(value)}"
    )


def _parse_mapping(value: Mapping[Any, Any]) -> Request:
    units: list[Unit] = []
    for rtype, count in value.items():
        if not isinstance(rtype, str):
            raise RequestError(f"resource type must be a string, not {_kind(rtype)}")
        _check_type(rtype)
        if not _is_int(count):
            raise RequestError(f"count of {rtype!r} must be a whole number, not {_kind(count)}")
        if count < 0:
            raise RequestError(f"count of {rtype!r} must be >= 0, not {count}")
        if count > MAX_UNITS or len(units) + count > MAX_UNITS:
            raise RequestError(f"a request may hold at most {MAX_UNITS} units")
        units.extend([Unit(rtype, 1)] * count)
    return Request((tuple(units),) if units else (), distinct=True)


def _parse_items(value: list[Any] | tuple[Any, ...]) -> Request:
    if all(isinstance(x, (list, tuple)) for x in value) and value:
        groups = [_parse_group(g, f"group {i}: ") for i, g in enumerate(value)]
        if sum(len(g) for g in groups) > MAX_UNITS:
            raise RequestError(f"a request may hold at most {MAX_UNITS} units")
        return Request(tuple(groups))
    group = _parse_group(value, "")
    return Request((group,) if group else ())


def _parse_group(value: Any, where: str) -> tuple[Unit, ...]:
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{where}expected a list of items, not {_kind(value)}")
    if len(value) > MAX_UNITS:
        raise RequestError(f"a request may hold at most {MAX_UNITS} units")
    units = []
    for i, item in enumerate(value):
        at = f"{where}item {i}"
        if not isinstance(item, Mapping):
            raise RequestError(f"{at}: expected {{'type': ..., 'slots': ...}}, not {_kind(item)}")
        extra = sorted(str(k) for k in item if k not in ("type", "slots"))
        if extra:
            raise RequestError(f"{at}: unknown key {extra[0]!r} (items have 'type' and 'slots')")
        if "type" not in item:
            raise RequestError(f"{at}: missing 'type'")
        rtype, slots = item["type"], item.get("slots", 1)
        if not isinstance(rtype, str):
            raise RequestError(f"{at}: 'type' must be a string, not {_kind(rtype)}")
        _check_type(rtype)
        _check_slots(slots, f"{at}: 'slots'")
        units.append(Unit(rtype, slots))
    return tuple(units)


# --- CTest RESOURCE_GROUPS ---------------------------------------------------------------
#
# The lexer's start conditions and rules, as data: (state, token) -> (next state, action).
# A pair missing from the table is a syntax error, as `.|\n { return 1; }` is in CTest.
# Actions: "type" remembers the type, "count" the group repeat count, "unit" writes one
# unit into the current group, "group" writes the current group `count` times (then the
# count resets to 1). EOF_OK says which states may end the string, and whether ending
# there writes the current group.

_INITIAL, _GROUPS_START, _GROUPS_END, _RES_START, _RES_COUNT, _RES_END = (
    "initial",
    "groups_start",
    "groups_end",
    "resource_start",
    "resource_count",
    "resource_end",
)

_TRANSITIONS: dict[tuple[str, str], tuple[str, str | None]] = {
    (_INITIAL, "ident"): (_RES_COUNT, "type"),
    (_GROUPS_START, "ident"): (_RES_COUNT, "type"),
    (_RES_START, "ident"): (_RES_COUNT, "type"),
    (_INITIAL, "number"): (_GROUPS_END, "count"),
    (_GROUPS_START, "number"): (_GROUPS_END, "count"),
    (_RES_COUNT, "number"): (_RES_END, "unit"),
    (_GROUPS_END, "commas"): (_RES_START, None),
    (_RES_END, "commas"): (_RES_START, None),
    (_INITIAL, "semis"): (_GROUPS_START, None),
    (_GROUPS_START, "semis"): (_GROUPS_START, None),
    (_RES_START, "semis"): (_GROUPS_START, None),  # CTest: no group written here
    (_GROUPS_END, "semis"): (_GROUPS_START, "group"),
    (_RES_END, "semis"): (_GROUPS_START, "group"),
}

#: state -> whether EOF there writes the pending group (absent: EOF is an error).
_EOF_OK: dict[str, bool] = {
    _INITIAL: False,
    _GROUPS_START: False,
    _GROUPS_END: True,
    _RES_START: True,
    _RES_END: True,
}

_EXPECTED: dict[str, str] = {
    _INITIAL: "a group count or type:slots",
    _GROUPS_START: "a group count or type:slots",
    _GROUPS_END: "',' or ';'",
    _RES_START: "type:slots",
    _RES_COUNT: "a slot count (digits, no spaces)",
    _RES_END: "',' or ';'",
}

_TOKEN_RE = re.compile(
    r"(?P<ident>[a-z_][a-z0-9_]*):|(?P<number>[0-9]+)|(?P<commas>,+)|(?P<semis>;+)"
)


def _parse_resource_groups(text: str) -> Request:
    def fail(pos: int, why: str) -> RequestError:
        return RequestError(f"bad RESOURCE_GROUPS {text!r}: {why} at offset {pos}")

    state, pos = _INITIAL, 0
    rtype, count = "", 1
    current: list[Unit] = []
    groups: list[tuple[Unit, ...]] = []
    n_units = 0

    def write_group() -> None:
        nonlocal count, n_units
        n_units += count * len(current)
        if n_units > MAX_UNITS or count > MAX_UNITS:
            raise RequestError(f"bad RESOURCE_GROUPS {text!r}: more than {MAX_UNITS} units")
        groups.extend([tuple(current)] * count)
        current.clear()
        count = 1

    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        kind = m.lastgroup if m else None
        step = _TRANSITIONS.get((state, kind)) if kind else None
        if m is None or step is None:
            raise fail(pos, _unexpected(text, pos, state))
        state, action = step
        token = m.group(kind)
        if kind == "number" and len(token) > 12:  # also keeps int() far from its digit limit
            raise fail(pos, f"number {token[:20]}... is too large")
        if action == "type":
            rtype = token
        elif action == "count":
            count = int(token)
            if count > MAX_UNITS:
                raise fail(pos, f"group count {token} is too large")
        elif action == "unit":
            slots = int(token)
            if slots > MAX_SLOTS:
                raise fail(pos, f"{slots} slots is more than {MAX_SLOTS}")
            current.append(Unit(rtype, slots))
        elif action == "group":
            write_group()
        pos = m.end()
    if state not in _EOF_OK:
        raise fail(pos, f"string ends, expected {_EXPECTED[state]}")
    if _EOF_OK[state]:
        write_group()
    return Request(tuple(groups))


_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _unexpected(text: str, pos: int, state: str) -> str:
    word = _WORD_RE.match(text, pos)
    if word and state in (_INITIAL, _GROUPS_START, _RES_START):
        name = word.group(0)
        if not TYPE_NAME_RE.fullmatch(name):
            return f"invalid type name {name!r} (lowercase [a-z_][a-z0-9_]*)"
        return f"type {name!r} needs ':slots'"
    return f"unexpected {text[pos]!r}, expected {_EXPECTED[state]}"


def format_resource_groups(request: Request) -> str:
    """The CTest `RESOURCE_GROUPS` string for `request` (`distinct` is not expressible).

    Runs of equal groups are written once with CTest's `N,` prefix; an empty group is a
    bare count (`1`), which CTest reads as a group without units.
    """
    parts: list[str] = []
    groups = request.groups
    i = 0
    while i < len(groups):
        j = i
        while j < len(groups) and groups[j] == groups[i]:
            j += 1
        body = ",".join(f"{u.type}:{u.slots}" for u in groups[i])
        n = j - i
        if not body:
            parts.append(str(n))
        elif n > 1:
            parts.append(f"{n},{body}")
        else:
            parts.append(body)
        i = j
    return ";".join(parts)


# --- checks ------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(rtype: object) -> None:
    if not isinstance(rtype, str):
        raise RequestError(f"resource type must be a string, not {_kind(rtype)}")
    if not TYPE_NAME_RE.fullmatch(rtype):
        shown = rtype if len(rtype) <= 40 else rtype[:40] + "..."
        raise RequestError(
            f"invalid resource type {shown!r}: must match [a-z_][a-z0-9_]* (like 'gpus')"
        )


def _check_slots(slots: object, what: str) -> None:
    if not _is_int(slots):
        raise RequestError(f"{what} must be a whole number, not {_kind(slots)}")
    assert isinstance(slots, int)
    if slots < 0:
        raise RequestError(f"{what} must be >= 0, not {slots}")
    if slots > MAX_SLOTS:
        raise RequestError(f"{what} must be at most {MAX_SLOTS}")
