"""Value types without `dataclasses`: the probe results and the pool model.

`import dataclasses` imports `inspect` (and with it `ast`, `dis`, `tokenize`...), about
10 ms, and every decorated class costs more to create; `rpool-agent detect` is budgeted at
6x hwloc's `lstopo`, about 50 ms in all. So the value classes on the detect path are plain
classes on these two bases: fields are declared as class annotations, in order, and
`Record.__init__` takes them by position or name as a dataclass's would (a class
attribute of the same name is the default; `dataclass_transform` tells type checkers so).
A class whose construction does more (pool.py's) writes its own `__init__`. They behave as the
dataclasses they replace: field-wise `==` between instances of the same class, the same
`repr`, `Frozen` ones immutable and hashable; and they still pass for dataclasses:
`dataclasses.fields`, `asdict`, `astuple`, `replace` and `is_dataclass` work on them (the
field table is built, importing `dataclasses`, only when something asks for it).
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs ~3 ms
if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    R = TypeVar("R", bound="Record")
else:

    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


class FrozenInstanceError(AttributeError):
    """Assigning to a field of a `Frozen` value (as `dataclasses.FrozenInstanceError`)."""


class _DataclassFields:
    """`__dataclass_fields__`, made on first use from a twin built by `make_dataclass`, so
    the real `dataclasses` functions find real `Field`s (and the detect path never asks)."""

    def __get__(self, obj: object, owner: type[Record]) -> dict[str, Any]:
        import dataclasses

        notes = owner.__annotations__
        spec: list[Any] = []
        for name in owner._fields:
            default = owner.__dict__.get(name, dataclasses.MISSING)
            spec.append((name, notes.get(name, "Any"), dataclasses.field(default=default)))
        twin = dataclasses.make_dataclass(owner.__name__, spec, frozen=issubclass(owner, Frozen))
        table: dict[str, Any] = twin.__dataclass_fields__  # type: ignore[attr-defined]
        type.__setattr__(owner, "__dataclass_fields__", table)  # built once per class
        return table


@dataclass_transform()
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Fields by position or name, in declaration order, as a dataclass's `__init__`
        (and the same TypeErrors); writes the instance `__dict__`, so `Frozen` works too."""
        cls, names = self.__class__, self._fields
        if len(args) > len(names):
            n = len(names) + 1
            raise TypeError(
                f"{cls.__name__}() takes {n} positional arguments but {len(args) + 1} were given"
            )
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {key!r}")
            if key in values:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {key!r}")
            values[key] = value
        if len(values) < len(names):
            for name in names:
                if name not in values:
                    if name not in cls.__dict__:
                        raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
                    values[name] = cls.__dict__[name]
        self.__dict__.update({name: values[name] for name in names})

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
    """An immutable, hashable value (as `@dataclass(frozen=True)`). An `__init__` of its
    own fills the instance `__dict__` directly: `self.__dict__.update(a=a, b=b)`."""

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
