"""GPU health while serving: drain a GPU that stops answering NVML, undrain it when it answers.

A GPU can fall off the bus, be lost or need a reset after the agent started; a pool that
keeps offering it hands every new job a GPU that fails. So the agent asks NVML about each
pool GPU every `interval` seconds (probes/nvml_check.py, one cheap query per device) and:

- drains a GPU that fails, with the reason (`health: <call>: <NVML's words>`): no new
  grant lands on it, its current holder keeps the lease, and `status` lists the drain;
- undrains it by itself once it answers again, but only a drain it made: an admin's drain
  (`rpool-agent drain`) is the admin's to lift.

The NVML pass blocks (nvmlInit can take seconds without persistence mode), so it runs in
the loop's default thread pool; only the drain/undrain decisions run on the loop. Which
devices: each pool GPU instance with an NVML UUID (`GPU-...`, `MIG-...`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UnknownResourceType

#: Seconds between polls for a detected pool when the configuration does not say.
DEFAULT_INTERVAL = 30.0
PREFIX = "health: "


def default_check(uuids: list[str]) -> dict[str, str]:
    from .probes.nvml_check import check_devices

    return check_devices(uuids)


def gpu_uuids(pool: Any) -> dict[tuple[str, str], str]:
    """(type, id) -> NVML UUID of every GPU or MIG device in the pool that has one."""
    out: dict[tuple[str, str], str] = {}
    for node in pool.nodes[:1]:
        for inst in node.resources.get("gpus", ()):
            uuid = inst.properties.get("uuid")
            if isinstance(uuid, str) and uuid[:4] in ("GPU-", "MIG-"):
                out["gpus", inst.id] = uuid
    return out


class GpuHealth:
    """The poller; `start(server)` once the loop runs, `stop()` at close."""

    def __init__(
        self,
        interval: float,
        check: Callable[[list[str]], Mapping[str, str]] = default_check,
    ) -> None:
        self.interval = interval
        self.check = check
        self.drained: set[tuple[str, str]] = set()  # drains this poller made
        self._task: asyncio.Task[None] | None = None

    def start(self, server: Any) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(server))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self, server: Any) -> None:
        from .probes.nvml_check import NvmlUnavailable

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            targets = gpu_uuids(server.pool)
            if not targets and not self.drained:
                continue
            try:
                failed = await loop.run_in_executor(None, self.check, sorted(set(targets.values())))
            except NvmlUnavailable as exc:
                server.log(f"GPU health: not polling ({exc})")
                return
            except Exception as exc:  # a poll that breaks must not end the polling
                server.log(f"GPU health: poll failed ({type(exc).__name__}: {exc})")
                continue
            self.apply(server, targets, failed)

    def apply(
        self, server: Any, targets: Mapping[tuple[str, str], str], failed: Mapping[str, str]
    ) -> None:
        """Drain what fails, undrain what this poller drained and answers again."""
        allocator = server.allocator
        for key, uuid in targets.items():
            why = failed.get(uuid)
            current = allocator.drained.get(key)
            if why is not None and current is None:
                with contextlib.suppress(UnknownResourceType):  # gone in a reload meanwhile
                    allocator.drain(*key, f"{PREFIX}{why}")
                    self.drained.add(key)
                    server.log(f"drain {key[0]}:{key[1]} ({PREFIX}{why})")
            elif why is None and key in self.drained:
                self.drained.discard(key)
                if current is not None and current.startswith(PREFIX):
                    server.dispatch(allocator.undrain(*key))
                    server.log(f"undrain {key[0]}:{key[1]} (health: answers again)")
        self.drained &= set(targets)
