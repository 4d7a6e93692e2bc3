"""The one in-memory pool model that every format reads into and writes from.

A pool is a list of nodes (canary's node form); the flat canary form and the CTest spec
are single-node views of it. Each resource type maps to instances with an `id`, a slot
count and free-form `properties` (topology: NUMA node, hardware threads, GPU UUID...).

Well-known instance properties (all optional; writers keep whatever else is there):
- `numa_node` (int): the NUMA node the instance sits on; the allocator packs by it.
- `threads` (list[int]): for cpus, the hardware CPU numbers (hyperthread siblings) the
  instance stands for; without it the id is taken as the CPU number.
- `index` (int), `uuid` (str), `name` (str), `memory_bytes` (int), `pci_bus_id` (str),
  `vendor` (str): for gpus. A MIG device has its own `uuid` (`MIG-...`) and
  `parent_index`/`parent_uuid`.

This module does no I/O and imports nothing heavy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import PoolFormatError

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

#: CTest's rules (Help/manual/ctest.1.rst): type names and ids it accepts.
#: `\Z`, not `$`: Python's `$` also matches before a final newline, which CTest refuses.
TYPE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*\Z")
INSTANCE_ID_RE = re.compile(r"^[a-z0-9_]+\Z")
MAX_SLOTS = 4294967295


@dataclass(slots=True)
class Instance:
    """One allocatable thing: a core, a GPU, a MIG device... with `slots` units of capacity."""

    id: str
    slots: int = 1
    properties: dict[str, Any] = field(default_factory=dict)

    def to_seed(self) -> dict[str, str | int]:
        """The `{id, slots}` shape that canary and CTest use."""
        return {"id": self.id, "slots": self.slots}


@dataclass(slots=True)
class Node:
    """One machine's resources (this agent serves exactly one, but documents may hold more)."""

    id: str
    resources: dict[str, list[Instance]] = field(default_factory=dict)
    additional_properties: dict[str, Any] = field(default_factory=dict)

    def instance(self, rtype: str, rid: str) -> Instance | None:
        for inst in self.resources.get(rtype, ()):
            if inst.id == rid:
                return inst
        return None


@dataclass(slots=True)
class Pool:
    """A resource pool: pool-wide properties plus one or more nodes."""

    nodes: list[Node] = field(default_factory=list)
    additional_properties: dict[str, Any] = field(default_factory=dict)

    # --- construction -----------------------------------------------------------------

    @classmethod
    def single(
        cls,
        resources: dict[str, list[Instance]],
        *,
        node_id: str = "localhost",
        additional_properties: dict[str, Any] | None = None,
    ) -> Pool:
        return cls(
            nodes=[Node(id=node_id, resources=resources)],
            additional_properties=dict(additional_properties or {}),
        )

    # --- queries ----------------------------------------------------------------------

    @property
    def local(self) -> Node:
        """The single node of a one-node pool (every pool this agent serves)."""
        if len(self.nodes) != 1:
            raise PoolFormatError(f"expected exactly one node, found {len(self.nodes)}")
        return self.nodes[0]

    @property
    def types(self) -> list[str]:
        return sorted({t for n in self.nodes for t in n.resources})

    def instances(self, rtype: str) -> Iterator[tuple[Node, Instance]]:
        for node in self.nodes:
            for inst in node.resources.get(rtype, ()):
                yield node, inst

    def capacity(self, rtype: str) -> int:
        """Configured slots of a type over all nodes."""
        return sum(inst.slots for _, inst in self.instances(rtype))

    def copy(self) -> Pool:
        import copy

        return copy.deepcopy(self)

    def summary(self) -> str:
        """One line: types, instances, slots (what `validate` prints)."""
        parts = []
        for t in self.types:
            n = sum(1 for _ in self.instances(t))
            parts.append(f"{t}: {_plural(n, 'instance')}, {_plural(self.capacity(t), 'slot')}")
        return f"{_plural(len(self.nodes), 'node')}; " + ("; ".join(parts) or "no resources")


def copy_data(value: Any) -> Any:
    """A deep copy of document data (what writers put in a document from the model).

    Dicts, lists and scalars are copied here, anything else by `copy.deepcopy`. Unlike
    `deepcopy`, a list that appears twice comes out as two lists (no written form can tell).
    """
    t = type(value)
    if t is dict:
        return {k: copy_data(v) for k, v in value.items()}
    if t is list:
        return [copy_data(v) for v in value]
    if t is str or t is int or t is float or t is bool or value is None:
        return value
    import copy

    return copy.deepcopy(value)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
