"""rpool-agent: detect a test node's CPUs and GPUs and lease them to concurrent harnesses.

Importing the package is cheap on purpose: the client (`Client`) is loaded on first use,
so `import rpool_agent` costs nothing the caller did not ask for.
"""

from __future__ import annotations

from ._version import __version__

TYPE_CHECKING = False  # not typing's: every command would pay for importing typing
if TYPE_CHECKING:
    from typing import Any

    from .client import Client, Lease

__all__ = ["Client", "Lease", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "Lease"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'rpool_agent' has no attribute {name!r}")
