"""The canary-compatible in-process resource pool (`rpool`), a drop-in for canary-wm's seed API.

canary-wm (up to 26.4.x) builds one `ResourcePool` per run, asks `accommodates` once per
test ("could this machine ever run it?"), then `checkout`s and `checkin`s resources as tests
start and finish. This module keeps canary's names, signatures, return shapes and
allocation order (best fit: fewest free slots first, file order on ties), so a harness
written against canary's module works unchanged. Where it differs, it is stricter in ways
canary's callers never trip: a failing `checkin` (unknown id, or more slots than the
instance was configured with) raises `ValueError` and changes nothing; `Outcome(False)`
without a reason raises; duplicate ids in a pool are rejected.

`resources` is canary's flat form, `{type: [{"id": str, "slots": int}]}`, and the pool
mutates those dicts in place. Node-form and CTest documents are read through
`rpool_agent.formats` and flattened (per-instance `properties` do not fit the flat form).
"""

from __future__ import annotations

import copy
import io
from collections import Counter
from collections.abc import Mapping
from os import PathLike
from typing import IO, TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    EmptyResourcePoolError,
    PoolFormatError,
    RequestError,
    ResourceUnavailable,
    UnknownResourceType,
)

if TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "AllocationTransaction",
    "Allocator",
    "EmptyResourcePoolError",
    "Inventory",
    "Outcome",
    "ResourcePool",
    "ResourceUnavailable",
    "make_resource_pool",
    "resource_pool_schema",
]

ResourceSpec = list[dict[str, Any]]
Request = list[dict[str, Any]]

#: Top-level keys of a flat pool mapping that are not shorthand counts.
_FLAT_KEYS = ("resources", "additional_properties")


class Outcome:
    """The answer to "can this be done?": truthy when ok, else with a `reason` saying why not.

    `Outcome()` and `Outcome(True)` are ok; `Outcome(None, why)` and `Outcome(False, why)`
    fail. A failure must say why, so `Outcome(False)` raises `ValueError`.
    """

    __slots__ = ("ok", "reason")

    def __init__(self, ok: bool | None = None, reason: str | None = None) -> None:
        if ok is None:
            ok = not reason
        elif not ok and not reason:
            raise ValueError(f"{type(self).__name__}(False) requires a reason")
        self.ok: bool = bool(ok)
        self.reason: str | None = reason

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        state = "ok" if self.ok else "fail"
        reason = f": {self.reason}" if self.reason else ""
        return f"<{type(self).__name__} {state}{reason}>"


class Inventory:
    """A view of a pool's flat `resources` that the `Allocator` takes slots from in place."""

    __slots__ = ("resources",)

    def __init__(self, resources: dict[str, ResourceSpec]) -> None:
        self.resources = resources

    def slots_available(self, rtype: str) -> int:
        """Free slots of `rtype` right now (0 for a type the inventory lacks)."""
        return sum(int(inst["slots"]) for inst in self.resources.get(rtype, ()))


class AllocationTransaction:
    """Records what was taken so a failed multi-item checkout can give it all back.

    Used as a context manager, an exception inside the `with` block rolls back every
    recorded delta and then propagates.
    """

    __slots__ = ("deltas", "inventory")

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.deltas: list[tuple[str, str, int]] = []

    def record(self, rtype: str, rid: str, slots: int) -> None:
        self.deltas.append((rtype, rid, slots))

    def rollback(self) -> None:
        """Return every recorded slot to its instance; a second rollback is a no-op."""
        for rtype, rid, slots in reversed(self.deltas):
            for inst in self.inventory.resources[rtype]:
                if inst["id"] == rid:
                    inst["slots"] += slots
                    break
        self.deltas.clear()

    def __enter__(self) -> AllocationTransaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        if exc_type is not None:
            self.rollback()
        return False


class Allocator:
    """Best fit: the instance with the fewest free slots that still has enough wins.

    Ties keep file order (the sort is stable). Packing small requests into the fullest
    instances keeps roomy instances whole for later, larger requests.
    """

    def acquire(self, inventory: Inventory, rtype: str, slots: int) -> dict[str, Any]:
        """Take `slots` from one instance of `rtype` in place; return `{"id", "slots"}`."""
        if rtype not in inventory.resources:
            raise UnknownResourceType(f"Unknown resource requirement type {rtype!r}")
        for inst in sorted(inventory.resources[rtype], key=lambda i: i["slots"]):
            if slots <= inst["slots"]:
                inst["slots"] -= slots
                return {"id": inst["id"], "slots": slots}
        raise ResourceUnavailable(f"no {rtype} instance has {slots} free slot(s)")


class ResourcePool:
    """Class representing resources available on the computer

    Args:
      pool: The resource pool specification, canary's flat form (below), with or without
        shorthand counts (`{"cpus": 8, "gpus": 2}`); node-form and CTest documents are
        flattened through `rpool_agent.formats`.

    canary's layout (the CTest spec's `local:` entry, inside a `resource_pool:` section)::

        resource_pool:
          additional_properties: {}
          resources:
            <resource name>:
            - id: str
              slots: int

    `slots_per_resource_type` is the configured capacity per type: `fill`, `populate`,
    `pop` and `clear` set it; `checkout` and `checkin` leave it alone.
    """

    __slots__ = ("_capacity", "additional_properties", "resources", "slots_per_resource_type")

    def __init__(self, pool: dict[str, Any] | None = None) -> None:
        self.additional_properties: dict[str, Any] = {}
        self.resources: dict[str, ResourceSpec] = {}
        self.slots_per_resource_type: Counter[str] = Counter()
        # configured slots per (type, id): the ceiling `checkin` may fill an instance back to
        self._capacity: dict[str, dict[str, int]] = {}
        if pool:
            self.fill(pool)

    def __repr__(self) -> str:
        file = io.StringIO()
        self.dump(file)
        return file.getvalue()

    def __contains__(self, type: str) -> bool:
        return type in self.resources

    # --- configuration ------------------------------------------------------------------

    def dump(self, file: IO[Any]) -> None:
        """Write the pool as canary YAML, `{resource_pool: {additional_properties, resources}}`."""
        import yaml

        yaml.safe_dump({"resource_pool": self.getstate()}, file, default_flow_style=False)

    @property
    def types(self) -> list[str]:
        return sorted(self.resources)

    def empty(self) -> bool:
        """True when the pool has no resource types at all (never after `fill`)."""
        return len(self.resources) == 0

    def count(self, type: str) -> int:
        """Instances of `type` ("gpu" and "gpus" both work); "nodes" is the node count."""
        if type in ("node", "nodes"):
            nodes = self.additional_properties.get("nodes", {})
            count = nodes.get("count", 1) if isinstance(nodes, Mapping) else nodes
            return int(count)
        for name in (type, f"{type}s"):
            if name in self.resources:
                return len(self.resources[name])
        raise ResourceUnavailable(f"unknown resource type {type!r}")

    def fill(self, pool: dict[str, Any]) -> None:
        """Replace the whole pool with `pool` (see the class docstring for what it takes).

        The document is copied, so checkouts never write into the caller's dicts. A pool
        always lists `gpus`, empty if it has none: canary reads `count("gpus")` unguarded.
        """
        resources, additional = _flat_document(pool)
        resources.setdefault("gpus", [])
        self.clear()
        self.additional_properties.update(additional)
        self.resources.update(resources)
        self._recount()

    def pop(self, type: str) -> ResourceSpec | None:
        """Remove and return a type's instances (None if the pool lacks it)."""
        if type not in self.resources:
            return None
        self._capacity.pop(type, None)
        del self.slots_per_resource_type[type]
        return self.resources.pop(type)

    def getstate(self) -> dict[str, Any]:
        """A deep copy, `{additional_properties, resources}`, that `fill` accepts back."""
        return {
            "additional_properties": copy.deepcopy(self.additional_properties),
            "resources": copy.deepcopy(self.resources),
        }

    def clear(self) -> None:
        self.resources.clear()
        self.additional_properties.clear()
        self.slots_per_resource_type.clear()
        self._capacity.clear()

    def populate(self, **kwds: int) -> None:
        """`populate(cpus=8, gpus=2)`: ids "0".."N-1", one slot each.

        cpus default to this machine's physical core count (canary's default), gpus to 0.
        """
        if "cpus" not in kwds:
            kwds["cpus"] = _physical_cores()
        kwds.setdefault("gpus", 0)
        self.fill(dict(kwds))

    def _recount(self) -> None:
        self._capacity = {
            t: {inst["id"]: inst["slots"] for inst in insts} for t, insts in self.resources.items()
        }
        self.slots_per_resource_type.clear()
        for rtype, by_id in self._capacity.items():
            self.slots_per_resource_type[rtype] = sum(by_id.values())

    # --- allocation ---------------------------------------------------------------------

    def accommodates(self, request: list[dict[str, Any]]) -> Outcome:
        """determine if the resources for this test are available

        Against the configured capacity, not what is free now: canary asks once per test
        whether it can ever run here, and `checkout`s later.
        """
        if self.empty():
            raise EmptyResourcePoolError("the resource pool is empty")
        needed: Counter[str] = Counter()
        missing: set[str] = set()
        for rtype, slots in _request_items(request):
            if rtype in self.resources:
                needed[rtype] += slots
            else:
                missing.add(rtype)
        if missing:
            key = "Resources" if len(missing) > 1 else "Resource"
            return Outcome(False, f"{key} unavailable: {','.join(sorted(missing))}")
        short = [
            f"{t} (requested {n}, available {self.slots_per_resource_type[t]})"
            for t, n in sorted(needed.items())
            if n > self.slots_per_resource_type[t]
        ]
        if short:
            return Outcome(False, f"insufficient slots of {', '.join(short)}")
        return Outcome(True)

    def checkout(self, request: list[dict[str, Any]], **kwds: Any) -> dict[str, list[dict]]:
        """Returns resources available to the test

        local[i] = {<type>: [{'id': <id>, 'slots': <slots>}, ...], ... }

        Each request item is served by one instance (best fit). All or nothing: if any item
        cannot be served, `ResourceUnavailable` is raised and the pool is as before.
        `kwds` are accepted for canary's signature and ignored.
        """
        if self.empty():
            raise EmptyResourcePoolError("the resource pool is empty")
        items = _request_items(request)
        for rtype, _ in items:
            if rtype not in self.resources:
                raise UnknownResourceType(f"Unknown resource requirement type {rtype!r}")
        acquired: dict[str, list[dict]] = {}
        inventory = Inventory(self.resources)
        allocator = Allocator()
        with AllocationTransaction(inventory) as transaction:
            for rtype, slots in items:
                rspec = allocator.acquire(inventory, rtype, slots)
                transaction.record(rtype, rspec["id"], slots)
                acquired.setdefault(rtype, []).append(rspec)
        return acquired

    def checkin(self, resources: dict[str, list[dict]]) -> None:
        """Give back what `checkout` returned, by (type, id).

        Unlike canary, the whole checkin is validated first: an unknown type or id, a
        negative count, or more slots than an instance was configured with raises
        `ValueError` and changes nothing.
        """
        returning: Counter[tuple[str, str]] = Counter()
        for rtype, rspecs in resources.items():
            by_id = self._capacity.get(rtype)
            if by_id is None:
                raise ValueError(f"Attempting to checkin a resource of unknown type {rtype!r}")
            for rspec in rspecs:
                if not isinstance(rspec, Mapping):
                    raise ValueError(f"Attempting to checkin a malformed resource: {rspec!r}")
                rid, slots = rspec.get("id"), rspec.get("slots")
                if not isinstance(rid, str) or rid not in by_id:
                    raise ValueError(f"Attempting to checkin a resource with unknown ID: {rspec!r}")
                if not _is_count(slots):
                    raise ValueError(f"checkin slots must be a whole number >= 0: {rspec!r}")
                returning[rtype, rid] += slots
        current = {(t, i["id"]): i for t, insts in self.resources.items() for i in insts}
        for (rtype, rid), slots in returning.items():
            inst, capacity = current[rtype, rid], self._capacity[rtype][rid]
            if inst["slots"] + slots > capacity:
                raise ValueError(
                    f"checkin would overfill {rtype} {rid!r}: {inst['slots']} free + "
                    f"{slots} returned > {capacity} configured"
                )
        for (rtype, rid), slots in returning.items():
            current[rtype, rid]["slots"] += slots


class PoolSchema:
    """canary's `resource_pool_schema` (canary-wm <= 26.4, `_canary/resource_pool/schemas.py`):
    `validate(data)` returns the flat document canary works with, shorthand counts
    (`{"cpus": 2}`) expanded, ids as strings, `slots` defaulted, `additional_properties`
    present. A document without resources, or malformed, raises `PoolFormatError` (a
    ValueError; canary's raises the `schema` library's SchemaError, a dependency we do not
    take for one class)."""

    def validate(self, data: Any) -> dict[str, Any]:
        if isinstance(data, Mapping) and not set(data) - {"additional_properties"}:
            raise PoolFormatError("missing key: resources")
        resources, additional = _flat_document(data)
        return {"additional_properties": additional, "resources": resources}


resource_pool_schema = PoolSchema()


def make_resource_pool(config: Any) -> ResourcePool:
    """Build a `ResourcePool` from a configuration, as canary's `make_resource_pool` does.

    `config` may be:
    - a path (`str` or `os.PathLike`) to a pool file in any form `rpool_agent.formats`
      reads (canary flat or node-form YAML, CTest JSON);
    - a mapping with a `resource_pool` section, or an object with a `resource_pool`
      attribute (canary's config, a parsed YAML document);
    - a bare pool mapping: flat (`{"resources": ..., "additional_properties": ...}`),
      shorthand (`{"cpus": 8, "gpus": 2}`), node form (`{"nodes": [...]}`) or CTest
      (`{"version": ..., "local": [...]}`).
    A section may itself be a path. A missing or empty section (`None`, `{}`) gives this
    machine's defaults, like canary: `populate()`, cpus = physical cores, no gpus.
    Anything else raises `ConfigError`; a bad document raises `PoolFormatError`.
    """
    section: Any
    if isinstance(config, Mapping):
        section = config.get("resource_pool", config)
    elif isinstance(config, (str, PathLike)):
        section = config
    elif hasattr(config, "resource_pool"):
        section = config.resource_pool
    else:
        raise ConfigError(
            "make_resource_pool: expected a pool file path, a mapping or an object with a "
            f"resource_pool section, got {type(config).__name__}"
        )
    pool = ResourcePool()
    if isinstance(section, (str, PathLike)):
        from .formats import load_file

        resources, additional = _flatten(load_file(section))
        pool.fill({"resources": resources, "additional_properties": additional})
    elif section is None or (isinstance(section, Mapping) and not section):
        pool.populate()
    elif isinstance(section, Mapping):
        pool.fill(dict(section))
    else:
        raise ConfigError(
            f"make_resource_pool: resource_pool must be a mapping or a path, "
            f"got {type(section).__name__}"
        )
    return pool


# --- helpers --------------------------------------------------------------------------------


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _physical_cores() -> int:
    """This machine's physical core count (canary's default), logical CPUs as a fallback."""
    import os

    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a dependency; guard anyway, it is only a default
        cores = None
    return cores or os.cpu_count() or 1


def _request_items(request: Request) -> list[tuple[str, int]]:
    """canary's request items as (type, slots); malformed items raise `RequestError`."""
    items = []
    for n, item in enumerate(request):
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            raise RequestError(
                f"request[{n}]: expected {{'type': str, 'slots': int}}, got {item!r}"
            )
        slots = item.get("slots", 1)
        if not _is_count(slots):
            raise RequestError(f"request[{n}].slots: expected a whole number >= 0, got {slots!r}")
        items.append((item["type"], slots))
    return items


def _flat_document(doc: Any) -> tuple[dict[str, ResourceSpec], dict[str, Any]]:
    """A copy of a pool mapping as flat `(resources, additional_properties)`.

    Accepts what canary's schema does (flat form, shorthand counts, ids coerced to `str`,
    `slots` defaulting to 1), with or without the `resource_pool:` wrapper. Node-form and
    CTest documents go through `rpool_agent.formats`.
    """
    if not isinstance(doc, Mapping):
        raise PoolFormatError(f"expected a mapping, got {type(doc).__name__}")
    if "resource_pool" in doc and len(doc) == 1:
        doc = doc["resource_pool"]
        if not isinstance(doc, Mapping):
            raise PoolFormatError("expected a mapping", where="resource_pool")
    if isinstance(doc.get("nodes"), list) or isinstance(doc.get("local"), (list, Mapping)):
        from .formats import parse_document

        return _flatten(parse_document(dict(doc)))

    additional = doc.get("additional_properties", {})
    if not isinstance(additional, Mapping):
        raise PoolFormatError("expected a mapping", where="additional_properties")
    raw = doc.get("resources", {})
    if not isinstance(raw, Mapping):
        raise PoolFormatError("expected a mapping of type -> instances", where="resources")
    resources: dict[str, ResourceSpec] = {}
    for rtype, insts in raw.items():
        resources[str(rtype)] = _instances(insts, f"resources.{rtype}")
    for key, count in doc.items():
        if key in _FLAT_KEYS:
            continue
        if not _is_count(count):
            raise PoolFormatError(f"expected a count (whole number >= 0), got {count!r}", where=key)
        resources[str(key)] = [{"id": str(j), "slots": 1} for j in range(count)]
    return resources, copy.deepcopy(dict(additional))


def _instances(insts: Any, where: str) -> ResourceSpec:
    if not isinstance(insts, list):
        raise PoolFormatError("expected a list of {id, slots}", where=where)
    out: ResourceSpec = []
    seen: set[str] = set()
    for n, inst in enumerate(insts):
        here = f"{where}[{n}]"
        if not isinstance(inst, Mapping) or "id" not in inst:
            raise PoolFormatError("expected a mapping with an id", where=here)
        extra = sorted(set(inst) - {"id", "slots"})
        if extra:
            raise PoolFormatError(
                f"unexpected key(s) {', '.join(map(str, extra))} (the flat form holds only "
                "id and slots; keep metadata in additional_properties)",
                where=here,
            )
        rid, slots = str(inst["id"]), inst.get("slots", 1)
        if not _is_count(slots):
            raise PoolFormatError(
                f"expected a whole number >= 0, got {slots!r}", where=f"{here}.slots"
            )
        if rid in seen:
            raise PoolFormatError(f"duplicate id {rid!r}", where=f"{here}.id")
        seen.add(rid)
        out.append({"id": rid, "slots": slots})
    return out


def _flatten(pool: Pool) -> tuple[dict[str, ResourceSpec], dict[str, Any]]:
    """A one-node `Pool` as flat `(resources, additional_properties)`; properties are dropped.
    No node at all (a CTest spec's `local: []`) is an empty pool."""
    if not pool.nodes:
        return {}, copy.deepcopy(pool.additional_properties)
    node = pool.local
    resources = {t: [inst.to_seed() for inst in insts] for t, insts in node.resources.items()}
    return resources, copy.deepcopy(pool.additional_properties)
