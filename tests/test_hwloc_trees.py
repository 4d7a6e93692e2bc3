"""Each recorded tree read by hwloc (`lstopo-no-graphics --disallowed`, HWLOC_FSROOT) and
by `detect --sysroot`: the same online CPUs and NUMA nodes, and the same allowed sets
(issue 12, item 9), except where hwloc's reading is the very misreading we fix:

- cgroup_v2_cpuset: the process's cgroup (job42) has no cpuset controller enabled, so no
  `cpuset.*.effective` files; hwloc then takes no restriction at all, while the kernel
  confines job42 to its parent's effective set, which we read (nearest ancestor).
- cgroupns: /sys/fs/cgroup is the host's hierarchy mounted from outside our cgroup
  namespace; /proc/mounts has no root field, so hwloc reads the top folder, the host's
  root cpuset. mountinfo says the mount's root is `/../..`: we read /proc/self/status.

hwloc reads the mount table from /proc/mounts and the cgroup name from /proc/self/cpuset,
then /proc/self/cgroup (hwloc_read_linux_cgroup_name); the trees carry both files.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from rpool_agent.probes.nvidia import GpuReport
from rpool_agent.probes.sysfs import format_cpulist

from rpool_agent.detect import topology_report

TREES = Path(__file__).resolve().parent / "trees"
CPU_TREES = sorted(p.name for p in TREES.iterdir() if (p / "sys/devices/system/cpu/cpu0").is_dir())
NO_GPUS = GpuReport((), None, None, "none", None)
# tree -> hwloc's allowed CPUs there (the misreading; see the docstring)
HWLOC_MISREADS = {"cgroup_v2_cpuset": "0-15", "cgroupns": "0-5"}


def bits(mask: str) -> list[int]:
    """hwloc's bitmap text ("0x00000003,0xffffffff": 32-bit words, most significant
    first) -> the set bits."""
    value = int("".join(w.removeprefix("0x").rjust(8, "0") for w in mask.split(",")), 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


def hwloc_machine(lstopo: str, tree: Path) -> dict[str, str]:
    """The Machine object's sets as cpulists: cpuset, nodeset and their allowed_*."""
    env = {**os.environ, "HWLOC_FSROOT": str(tree), "HWLOC_COMPONENTS": "-x86"}
    done = subprocess.run(
        [lstopo, "--disallowed", "--of", "xml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    machine = re.search(r'<object type="Machine"[^>]*>', done.stdout)
    assert machine is not None, done.stdout[:500]
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', machine.group(0)))
    keys = ("cpuset", "nodeset", "allowed_cpuset", "allowed_nodeset")
    return {k: format_cpulist(bits(attrs[k])) for k in keys}


@pytest.mark.parametrize("name", CPU_TREES)
def test_allowed_sets_are_hwlocs(system_tool, name: str) -> None:  # type: ignore[no-untyped-def]
    theirs = hwloc_machine(system_tool("lstopo-no-graphics"), TREES / name)
    ours = topology_report(TREES / name, gpu_report=NO_GPUS)
    assert theirs["cpuset"] == format_cpulist(ours["cpu"]["online"])
    assert theirs["nodeset"] == format_cpulist([n["id"] for n in ours["numa"]["nodes"]])
    assert theirs["allowed_nodeset"] == ours["allowed_nodelist"]
    if name in HWLOC_MISREADS:
        assert theirs["allowed_cpuset"] == HWLOC_MISREADS[name] != ours["allowed_cpulist"]
    else:
        assert theirs["allowed_cpuset"] == ours["allowed_cpulist"]
