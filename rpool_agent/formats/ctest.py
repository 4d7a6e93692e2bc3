"""The CTest resource spec (`ctest --resource-spec-file`), checked by CTest's own rules.

    {"version": {"major": 1, "minor": 0}, "local": [{"<type>": [{"id": "0", "slots": 1}]}]}

Read strictly (docs/formats.md, /work/shared/reference/ctest.md): version exactly 1.0 as
integers, `local` a list of at most one mapping, ids strings. Also rejected, although
ctest itself lets them through: type names it would silently drop and duplicate ids.
Unknown members are ignored, as ctest does. The seed's YAML shape (`local: {<type>: [...]}`,
version optional) is read too. The spec holds no properties and no node id: writing one
says what it dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import PoolFormatError
from ..pool import INSTANCE_ID_RE, MAX_SLOTS, TYPE_NAME_RE, Pool
from .validate import Problems, at, kind, read_resources

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

NAME = "ctest"
VERSION = {"major": 1, "minor": 0}


def read(doc: Mapping[Any, Any], problems: Problems, where: str = "") -> Pool:
    local = doc.get("local")
    seed_shape = isinstance(local, Mapping)
    if "version" in doc or not seed_shape:
        _check_version(problems, doc, where)
    local_where = at(where, "local")
    if "local" not in doc:
        problems.add("missing 'local'", where)
        return Pool()
    if seed_shape:
        groups: list[Any] = [local]
    elif isinstance(local, list):
        groups = local
        if len(local) > 1:
            problems.add(f"must hold at most one element, not {len(local)}", local_where)
    else:
        problems.add(f"must be a list, not {kind(local)}", local_where)
        return Pool()
    pool = Pool()
    for i, group in enumerate(groups[:1]):
        here = local_where if seed_shape else at(local_where, i)
        if not isinstance(group, Mapping):
            problems.add(f"must be a mapping of resource types, not {kind(group)}", here)
            continue
        resources = read_resources(problems, group, here, allowed=None, allow_int_ids=False)
        for rtype, instances in resources.items():
            for n, inst in enumerate(instances):
                if inst.slots == 0:  # ctest reads it; its manual and our reference do not
                    problems.add(
                        "slots 0: an id ctest can never give out (leave it out)",
                        at(at(here, rtype), n),
                    )
        pool = Pool.single(resources)
    return pool


def _check_version(problems: Problems, doc: Mapping[Any, Any], where: str) -> None:
    here = at(where, "version")
    if "version" not in doc:
        problems.add('missing \'version\' (ctest wants {"major": 1, "minor": 0})', where)
        return
    version = doc["version"]
    if not isinstance(version, Mapping):
        problems.add(f"must be a mapping with major and minor, not {kind(version)}", here)
        return
    for part in ("major", "minor"):
        value = version.get(part)
        if part not in version:
            problems.add(f"missing '{part}'", here)
        elif isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):  # ctest (jsoncpp's isInt) takes 1.0 for 1
            problems.add(f"must be an integer, not {kind(value)} {value!r}", at(here, part))
        elif value != VERSION[part]:
            problems.add(
                f"unsupported version {part} {value} (ctest reads exactly 1.0)", at(here, part)
            )


def ctest_refuses(text: str) -> str | None:
    """Why ctest itself would refuse this spec text, or None when it reads it.

    ctest's own rules (CMake's cmCTestResourceSpec.cxx, checked against the real ctest):
    JSON only; `version` an object whose `major` and `minor` (1 and 0 when left out) are
    integers, exactly 1.0; `local` a list of at most one object; in it, each type whose
    name matches ^[a-z_][a-z0-9_]*$ (others are dropped unread) a list of objects with a
    string `id` matching ^[a-z0-9_]+$ and an optional whole `slots` >= 0. Unknown members
    are ignored. What the reader above is stricter about (dropped types, duplicate ids,
    0 slots) ctest takes: `validate` warns of those."""
    import json

    try:  # as jsoncpp reads: a BOM, comments, trailing commas and text after are taken
        doc, _ = json.JSONDecoder().raw_decode(_as_strict_json(text.lstrip("\ufeff")).lstrip())
    except (ValueError, RecursionError) as exc:
        err = exc if isinstance(exc, json.JSONDecodeError) else None
        return f"not JSON ({err.msg}, line {err.lineno} column {err.colno})" if err else "not JSON"
    if not isinstance(doc, dict):
        return f"the top level must be an object, not {kind(doc)}"
    version = doc.get("version")
    if not isinstance(version, dict):
        return "missing 'version'" if version is None else "'version' must be an object"
    for part in VERSION:
        if part not in version:
            return f"missing 'version.{part}'"
        if not _json_int(version[part], signed=True):
            return f"version.{part} must be an integer, not {version[part]!r}"
    if {k: version[k] for k in VERSION} != VERSION:
        return f"unsupported version {version['major']}.{version['minor']} (ctest reads 1.0)"
    local = doc.get("local")
    if not isinstance(local, list):
        return "missing 'local'" if local is None else f"'local' must be a list, not {kind(local)}"
    if len(local) > 1:
        return f"'local' must hold at most one object, not {len(local)}"
    for group in local:
        if not isinstance(group, dict):
            return f"local[0] must be an object, not {kind(group)}"
        for rtype, items in group.items():
            if not TYPE_NAME_RE.match(rtype):
                continue  # dropped unread
            if not isinstance(items, list):
                return f"local[0].{rtype} must be a list, not {kind(items)}"
            for n, item in enumerate(items):
                here = f"local[0].{rtype}[{n}]"
                if not isinstance(item, dict):
                    return f"{here} must be an object, not {kind(item)}"
                rid = item.get("id")
                if not isinstance(rid, str) or not INSTANCE_ID_RE.match(rid):
                    return f"{here}.id must be a string matching ^[a-z0-9_]+$, not {rid!r}"
                if "slots" in item and not _json_int(item["slots"], signed=False):
                    return f"{here}.slots must be a whole number >= 0, not {item['slots']!r}"
    return None


def _as_strict_json(text: str) -> str:
    """`text` without what jsoncpp allows and JSON does not: `//` and `/* */` comments,
    then commas before a closing bracket, both outside strings. Anything else is left for
    the JSON parser to judge. (jsoncpp's odder corners, which it refuses, are not copied:
    `[,]`, a comment alone in `[]`, a comment between an array's last comma and `]`.)"""
    return _outside_strings(_outside_strings(text, _drop_comment), _drop_trailing_comma)


def _drop_comment(text: str, i: int) -> int | None:
    """Where the comment at `i` ends (None: no comment there)."""
    if text.startswith("//", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if text.startswith("/*", i):
        end = text.find("*/", i + 2)
        return len(text) if end < 0 else end + 2
    return None


def _drop_trailing_comma(text: str, i: int) -> int | None:
    if text[i] == "," and text[i + 1 :].lstrip()[:1] in ("]", "}"):
        return i + 1
    return None


def _outside_strings(text: str, drop: Any) -> str:
    """`text` less the spans `drop(text, i)` marks (it returns their end) outside strings."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':  # a string, escapes included, kept as is
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            continue
        end = drop(text, i)
        if end is None:
            out.append(text[i])
            i += 1
        else:
            i = end
    return "".join(out)


def _json_int(value: Any, *, signed: bool) -> bool:
    """jsoncpp's isInt/isUInt: an integral number in range (2.0 too), never a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not value.is_integer():
        return False
    low, high = (-(2**31), 2**31 - 1) if signed else (0, MAX_SLOTS)
    return low <= value <= high


def write(pool: Pool) -> tuple[dict[str, Any], list[str]]:
    if len(pool.nodes) > 1:
        raise PoolFormatError(
            f"a CTest spec holds one node, this pool has {len(pool.nodes)} "
            "(write canary-nodes instead)"
        )
    notes: list[str] = []
    if pool.additional_properties:
        notes.append(f"dropped additional_properties ({_keys(pool.additional_properties)})")
    local: list[dict[str, Any]] = []
    if pool.nodes:
        node = pool.nodes[0]
        if node.id != "localhost":
            notes.append(f"dropped node id {node.id!r}")
        if node.additional_properties:
            notes.append(
                f"dropped node additional_properties ({_keys(node.additional_properties)})"
            )
        for rtype, instances in node.resources.items():
            described = [inst for inst in instances if inst.properties]
            if described:
                keys: dict[str, None] = {}
                for inst in described:
                    keys.update(dict.fromkeys(map(str, inst.properties)))
                notes.append(
                    f"dropped properties of {len(described)} {rtype} instance"
                    f"{'s' if len(described) > 1 else ''} ({', '.join(keys)})"
                )
        empty = [f"{t}:{i.id}" for t, insts in node.resources.items() for i in insts if not i.slots]
        if empty:
            notes.append(f"dropped {len(empty)} instance(s) with 0 slots ({', '.join(empty)})")
        local.append(
            {
                rtype: [i.to_seed() for i in insts if i.slots]
                for rtype, insts in node.resources.items()
            }
        )
    return {"version": dict(VERSION), "local": local}, notes


def _keys(mapping: Mapping[Any, Any]) -> str:
    return ", ".join(map(str, mapping))
