"""MIG capability device minors: which `/dev/nvidia-caps/nvidia-capN` grants a MIG device.

Access to a MIG device is two capability files, one for its GPU instance and one for its
compute instance; the driver lists their minor numbers in
`/proc/driver/nvidia-caps/mig-minors` ("gpu0/gi1/access 12", "gpu0/gi1/ci0/access 13"),
keyed by the parent's minor number (N of /dev/nvidiaN). Slurm's gres.conf and cgroup
device rules need them; CUDA does not. Read through a `Root`, like every probe.
"""

from __future__ import annotations

from .sysfs import Root, as_root

MIG_MINORS = "proc/driver/nvidia-caps/mig-minors"


def parse_mig_minors(text: str) -> dict[str, int]:
    """`name minor` lines -> {name: minor}; lines that are not that are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) == 2 and words[1].isdigit():
            out[words[0]] = int(words[1])
    return out


def mig_minors(root: Root | str, wanted: list[tuple[int, int, int]]) -> dict[str, int]:
    """The GPU- and compute-instance access minors of each (GPU minor, GI id, CI id) in
    `wanted`; the file holds every possible instance, so only those are kept. Empty when
    the file is missing (no MIG-capable driver) or `wanted` is."""
    if not wanted:
        return {}
    text = as_root(root).read(MIG_MINORS, default=None)
    if text is None:
        return {}
    table = parse_mig_minors(text)
    keys = [
        k for g, gi, ci in wanted for k in (f"gpu{g}/gi{gi}/access", f"gpu{g}/gi{gi}/ci{ci}/access")
    ]
    return {k: table[k] for k in keys if k in table}
