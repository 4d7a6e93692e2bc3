"""`Lease`: the client's handle on a granted lease (client.py's `Client.acquire`).

In a module of its own so that `rpool-agent run`, which builds the environment from the
grant document, imports no dataclasses (tests/test_run_cli.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import AgentUnavailable

TYPE_CHECKING = False  # not typing's, as in client.py
if TYPE_CHECKING:
    from typing import Any


@dataclass(slots=True)
class Lease:
    """A granted lease: what was leased, with the hardware behind each id."""

    document: dict[str, Any]
    client: Any = None  # the `Client` whose connection holds it (client.py imports this)
    released: bool = False

    def __repr__(self) -> str:  # the client is not part of what a lease is
        return f"Lease(document={self.document!r}, released={self.released!r})"

    @property
    def id(self) -> str:
        return str(self.document["id"])

    @property
    def token(self) -> str | None:
        return self.document.get("token")

    @property
    def label(self) -> str | None:
        return self.document.get("label")

    @property
    def resources(self) -> dict[str, list[dict[str, Any]]]:
        """Seed-shaped: `{type: [{"id": ..., "slots": ...}]}`."""
        return self.document["resources"]

    @property
    def cpus(self) -> list[int]:
        """Hardware CPU numbers, hyperthread siblings included."""
        from .handoff import leased_cpus

        return leased_cpus(self.document)

    @property
    def gpus(self) -> list[Any]:
        """`LeasedGpu`s (index, uuid, MIG or not) in PCI order."""
        from .handoff import leased_gpus

        return leased_gpus(self.document)

    @property
    def files(self) -> Any:
        """`LeaseFiles` (ctest_spec, pool, pool_nodes) when acquired with `files=True`."""
        f = self.document.get("files")
        if not f:
            return None
        from .handoff import LeaseFiles

        return LeaseFiles(**f)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for a program run inside this lease."""
        from .handoff import lease_env

        return lease_env(self.document, os.environ if base is None else base)

    def release(self) -> None:
        if not self.released and self.client is not None:
            self.client.release(self.id)
        self.released = True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        # If the agent is gone, our connection closing reaps the lease anyway.
        with contextlib.suppress(AgentUnavailable, OSError):
            self.release()
