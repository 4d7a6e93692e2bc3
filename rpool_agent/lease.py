"""Leases and the events the allocator returns: plain values, no behaviour beyond I/O shape.

A `Lease` is what a grant hands out and what the durable state file records
(`to_dict`/`from_dict`); the events (`Granted`, `Queued`, `Denied`, `Released`, `Reaped`)
are what every allocator input returns for the server to deliver, in order.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import ConfigError, RpoolAgentError
from .requests import Request, parse_request

#: Who holds a lease: ("conn", n) for a connection, ("pid", pid, starttime) for a process.
OwnerKey = Hashable

# --- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Slots of one instance given out by a lease."""

    type: str
    id: str
    slots: int


@dataclass(frozen=True)
class Lease:
    """A grant: per request group, per unit (request order), the slice serving it.

    `held` is the same slots summed per instance, in pool order within each type; the
    allocator fills it in, and it defaults to first-appearance order when built by hand.
    """

    id: str
    owner: OwnerKey
    request: Request
    groups: tuple[tuple[Slice, ...], ...]
    label: str | None = None
    holder: Mapping[str, Any] = field(default_factory=dict, hash=False)
    granted_at: float = 0.0
    held: tuple[Slice, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "holder", dict(self.holder or {}))
        if not self.held and any(self.groups):
            summed: dict[tuple[str, str], int] = {}
            for g in self.groups:
                for s in g:
                    summed[s.type, s.id] = summed.get((s.type, s.id), 0) + s.slots
            held = tuple(Slice(t, i, n) for (t, i), n in summed.items())
            object.__setattr__(self, "held", held)

    def resources(self) -> dict[str, list[dict[str, Any]]]:
        """The seed shape `{type: [{"id", "slots"}]}`: slots summed per id, pool order."""
        out: dict[str, list[dict[str, Any]]] = {}
        for s in self.held:
            out.setdefault(s.type, []).append({"id": s.id, "slots": s.slots})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record for the durable state file (`from_dict` reads it back)."""
        return {
            "id": self.id,
            "owner": _jsonable(self.owner),
            "request": self.request.to_wire(),
            "groups": [[[s.type, s.id, s.slots] for s in g] for g in self.groups],
            "resources": self.resources(),
            "label": self.label,
            "holder": dict(self.holder),
            "granted_at": self.granted_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Lease:
        """Read a `to_dict` record; raise ConfigError (a ValueError) if it is malformed."""
        try:
            return cls._from_dict(d)
        except ConfigError:
            raise
        except (RpoolAgentError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad lease record: {exc}") from None

    @classmethod
    def _from_dict(cls, d: Any) -> Lease:
        if not isinstance(d, Mapping):
            raise ConfigError(f"bad lease record: expected an object, not {type(d).__name__}")
        lid = d["id"]
        if not isinstance(lid, str) or not lid:
            raise ConfigError("bad lease record: 'id' must be a non-empty string")
        request = parse_request(d["request"])
        groups = tuple(tuple(_slice(x) for x in g) for g in d["groups"])
        if [len(g) for g in groups] != [len(g) for g in request.groups] or any(
            s.type != u.type or s.slots != u.slots
            for g, rg in zip(groups, request.groups, strict=False)
            for s, u in zip(g, rg, strict=False)
        ):
            raise ConfigError(f"bad lease record {lid!r}: groups do not match the request")
        held = tuple(
            _slice([t, e["id"], e["slots"]]) for t, lst in d["resources"].items() for e in lst
        )
        label = d.get("label")
        holder = d.get("holder") or {}
        granted_at = d.get("granted_at", 0.0)
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"bad lease record {lid!r}: 'label' must be a string")
        if not isinstance(holder, Mapping):
            raise ConfigError(f"bad lease record {lid!r}: 'holder' must be an object")
        if not isinstance(granted_at, (int, float)) or isinstance(granted_at, bool):
            raise ConfigError(f"bad lease record {lid!r}: 'granted_at' must be a number")
        return cls(
            id=lid,
            owner=_hashable(d["owner"]),
            request=request,
            groups=groups,
            label=label,
            holder=holder,
            granted_at=float(granted_at),
            held=held,
        )


def _slice(x: Any) -> Slice:
    t, i, n = x
    if not isinstance(t, str) or not isinstance(i, str):
        raise ConfigError("bad lease record: slice type and id must be strings")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError("bad lease record: slice slots must be a whole number >= 0")
    return Slice(t, i, n)


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granted:
    owner: OwnerKey
    req_id: Any
    lease: Lease


@dataclass(frozen=True)
class Queued:
    owner: OwnerKey
    req_id: Any
    position: int  # 1 = next in line


@dataclass(frozen=True)
class Denied:
    owner: OwnerKey
    req_id: Any
    error: RpoolAgentError


@dataclass(frozen=True)
class Released:
    owner: OwnerKey
    lease_id: str


@dataclass(frozen=True)
class Reaped:
    owner: OwnerKey
    lease_ids: tuple[str, ...]


Event = Union[Granted, Queued, Denied, Released, Reaped]  # noqa: UP007 - runtime alias
