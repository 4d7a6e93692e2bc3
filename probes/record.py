"""Value types without `dataclasses`: the probe results and the pool model.

`import dataclasses` imports `inspect` (and with it `ast`, `dis`, `tokenize`...), about
10 ms, and every decorated class costs more to create; `rpool-agent detect` is budgeted at
6x hwloc's `lstopo`, about 50 ms in all. So the value classes on the detect path are plain
classes on these two bases, each with a hand-written `__init__` (the signature a type
checker sees), its fields declared as class annotations, in order. They behave as the
dataclasses they replace: field-wise `==` between instances of the same class, the same
`repr`, `Frozen` ones immutable and hashable; and they still pass for dataclasses:
`dataclasses.fields`, `asdict`, `astuple`, `replace` and `is_dataclass` work on them (the
field table is built, importing `dataclasses`, only when something asks for it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs ~3 ms
if TYPE_CHECKING:
    from typing import Any, TypeVar

    R = TypeVar("R", bound="Record")


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a `Frozen` value (as `dataclasses.FrozenInstanceError`)."""


class _DataclassFields:
    """`__dataclass_fields__`, made on first use from a twin built by `make_dataclass`, so
    the real `dataclasses` functions find real `Field`s (and the detect path never asks)."""

    def __get__(self, obj: object, owner: type[Record]) -> dict[str, Any]:
        import dataclasses

        notes = owner.__annotations__
        twin = dataclasses.make_dataclass(
            owner.__name__,
            [(name, notes.get(name, "Any")) for name in owner._fields],
            frozen=issubclass(owner, Frozen),
        )
        table: dict[str, Any] = twin.__dataclass_fields__  # type: ignore[attr-defined]
        type.__setattr__(owner, "__dataclass_fields__", table)  # built once per class
        return table


class Record:
    """A mutable value: `==` compares the fields of two instances of the same class (no
    hash, as a dataclass with `eq=True`), `repr` shows them."""

    _fields: tuple[str, ...] = ()  # the subclass's own annotated names, in order
    __match_args__: tuple[str, ...] = ()
    __dataclass_fields__ = _DataclassFields()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A class's own annotations only (Python 3.10+ does not inherit them here).
        cls._fields = cls.__match_args__ = tuple(cls.__annotations__)

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        body = ", ".join([f"{name}={getattr(self, name)!r}" for name in self._fields])
        return f"{self.__class__.__qualname__}({body})"


class Frozen(Record):
    """An immutable, hashable value (as `@dataclass(frozen=True)`). `__init__` fills the
    instance `__dict__` directly: `self.__dict__.update(a=a, b=b)`."""

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:
        return hash(self._values())


def replace(obj: R, /, **changes: Any) -> R:
    """A copy of `obj` with some fields changed (as `dataclasses.replace`)."""
    for name in obj._fields:
        if name not in changes:
            changes[name] = getattr(obj, name)
    return obj.__class__(**changes)


def plain(value: Any) -> Any:
    """Records as dicts of their fields, tuples and lists as lists, all the way down: what
    `dataclasses.asdict` gives, ready for JSON and YAML."""
    if isinstance(value, Record):
        return {name: plain(getattr(value, name)) for name in value._fields}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
