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
from ..pool import Pool
from .validate import Problems, at, kind, read_resources

TYPE_CHECKING = False  # not typing's: `detect` does not import typing (see probes/record.py)
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


def ctest_reads(text: str) -> bool:
    """Whether ctest itself can read this text: JSON with `version` and `local` a list.
    The seed's YAML shape is a valid pool to us, not to ctest (`validate` says so)."""
    import json

    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "version" in doc and isinstance(doc.get("local"), list)


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
