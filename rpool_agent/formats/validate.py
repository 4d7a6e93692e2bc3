"""Checks every pool form shares: places, type names, ids, slots, one instance list.

A reader walks its document once and reports each problem to a `Problems` collector
instead of raising at the first, so `rpool-agent validate` can list them all. The rules
are CTest's (Help/manual/ctest.1.rst, see docs/formats.md): a canary file that breaks
them would be unusable as a CTest spec, and the agent hands out ids to both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import PoolFormatError
from ..pool import INSTANCE_ID_RE, MAX_SLOTS, TYPE_NAME_RE, Instance

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

#: More instances than this from one shorthand count is a typo, not a machine.
MAX_COUNT = 100_000

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")


def at(where: str, key: str | int) -> str:
    """The place of `key` inside `where`: `resources.gpus`, `local[0]`, `x['a b']`."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if not _PLAIN_KEY.match(key):
        return f"{where}[{key!r}]"
    return f"{where}.{key}" if where else key


def kind(value: Any) -> str:
    """A reader's word for a value's type: `a mapping`, `a list`, `a string`..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def first_error(errors: list[PoolFormatError]) -> PoolFormatError:
    """The first of `errors`, saying how many more there are (the one-line CLI message)."""
    first = errors[0]
    if len(errors) == 1:
        return first
    more = len(errors) - 1
    return PoolFormatError(
        f"{first.what} (and {more} more problem{'s' if more > 1 else ''})",
        where=first.where,
        source=first.source,
    )


class Problems:
    """Collects every `PoolFormatError` found in one document."""

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self.errors: list[PoolFormatError] = []

    def add(self, what: str, where: str = "") -> None:
        self.errors.append(PoolFormatError(what, where=where, source=self.source))

    def __bool__(self) -> bool:
        return bool(self.errors)

    # --- typed lookups that report instead of raising -----------------------------------

    def mapping(self, value: Any, where: str) -> Mapping[Any, Any] | None:
        if isinstance(value, Mapping):
            return value
        self.add(f"must be a mapping, not {kind(value)}", where)
        return None

    def unknown_keys(self, doc: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
        for key in doc:
            if key not in allowed:
                self.add(f"unknown key {key!r} (allowed: {', '.join(allowed)})", where)


def _shown(pattern: Any) -> str:
    """A rule as CTest's manual writes it (`$`, where the code needs `\\Z`)."""
    return str(pattern.pattern).replace("\\Z", "$")


def check_type_name(problems: Problems, name: Any, where: str) -> bool:
    if not isinstance(name, str):
        problems.add(f"resource type name must be a string, not {kind(name)} {name!r}", where)
        return False
    if not TYPE_NAME_RE.match(name):
        problems.add(
            f"resource type name {name!r} must match {_shown(TYPE_NAME_RE)} "
            "(lower-case letters, digits, '_'; CTest silently drops other names)",
            where,
        )
        return False
    return True


def check_id(problems: Problems, rid: Any, where: str, *, allow_int: bool) -> str | None:
    """An instance id as a string, or None after reporting why it is not one.

    canary converts ids with `str()`, so YAML's unquoted `0` is id "0" there; CTest
    wants JSON strings. Anything else (bool, float, null) is a mistake in both.
    """
    if allow_int and isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str):
        wanted = "a string (or an integer)" if allow_int else "a string"
        problems.add(f"id must be {wanted}, not {kind(rid)} {rid!r}", where)
        return None
    if not INSTANCE_ID_RE.match(rid):
        problems.add(
            f"id {rid!r} must match {_shown(INSTANCE_ID_RE)} "
            "(lower-case letters, digits, '_': CTest rejects anything else)",
            where,
        )
        return None
    return rid


def check_slots(problems: Problems, slots: Any, where: str) -> int | None:
    """Slots as an int: a whole number 0..4294967295 (a whole float like 2.0 is taken)."""
    if isinstance(slots, bool) or not isinstance(slots, (int, float)):
        problems.add(f"slots must be a whole number, not {kind(slots)} {slots!r}", where)
        return None
    if isinstance(slots, float):
        if not slots.is_integer():
            problems.add(f"slots must be a whole number, not {slots!r}", where)
            return None
        slots = int(slots)
    if not 0 <= slots <= MAX_SLOTS:
        problems.add(f"slots {slots} out of range 0..{MAX_SLOTS}", where)
        return None
    return slots


def read_instances(
    problems: Problems,
    items: Any,
    where: str,
    *,
    allowed: tuple[str, ...] | None,
    allow_int_ids: bool,
) -> list[Instance]:
    """One type's list of `{id, slots[, properties]}` entries, ids unique.

    `allowed` names the only keys an entry may have (None: ignore unknown keys, as
    CTest does). A `properties` key, when allowed, must be a mapping.
    """
    if not isinstance(items, list):
        problems.add(f"must be a list of instances, not {kind(items)}", where)
        return []
    out: list[Instance] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        here = at(where, i)
        if not isinstance(item, Mapping):
            problems.add(f"instance must be a mapping with id and slots, not {kind(item)}", here)
            continue
        if allowed is not None:
            problems.unknown_keys(item, allowed, here)
        if "id" not in item:
            problems.add("instance has no id", here)
            rid = None
        else:
            rid = check_id(problems, item["id"], at(here, "id"), allow_int=allow_int_ids)
        slots = check_slots(problems, item["slots"], at(here, "slots")) if "slots" in item else 1
        props: dict[str, Any] = {}
        if "properties" in item and allowed is not None and "properties" in allowed:
            got = problems.mapping(item["properties"], at(here, "properties"))
            props = dict(got) if got is not None else {}
        if rid is None or slots is None:
            continue
        if rid in seen:
            problems.add(f"duplicate id {rid!r} (first at {at(where, seen[rid])})", at(here, "id"))
            continue
        seen[rid] = i
        out.append(Instance(rid, slots, props))
    return out


def read_resources(
    problems: Problems,
    resources: Any,
    where: str,
    *,
    allowed: tuple[str, ...] | None,
    allow_int_ids: bool,
    allow_counts: bool = False,
) -> dict[str, list[Instance]]:
    """A `{type: [instances]}` mapping (with `{type: N}` shorthand when `allow_counts`)."""
    got = problems.mapping(resources, where)
    if got is None:
        return {}
    out: dict[str, list[Instance]] = {}
    for rtype, items in got.items():
        here = at(where, str(rtype))
        if not check_type_name(problems, rtype, here):
            continue
        if allow_counts and isinstance(items, int) and not isinstance(items, bool):
            if not 0 <= items <= MAX_COUNT:
                problems.add(f"count {items} out of range 0..{MAX_COUNT}", here)
                continue
            out[rtype] = [Instance(str(i), 1) for i in range(items)]
            continue
        if allow_counts and not isinstance(items, list):
            problems.add(f"must be a list of instances or a count, not {kind(items)}", here)
            continue
        out[rtype] = read_instances(
            problems, items, here, allowed=allowed, allow_int_ids=allow_int_ids
        )
    return out
