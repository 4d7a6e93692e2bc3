"""NUMA probe against recorded /sys + /proc trees; each test states its expected counts."""

from __future__ import annotations

import os
from pathlib import Path

from rpool_agent.probes import numa

GIB = 1024**3


def test_two_sockets_two_nodes_each(trees: Path) -> None:
    t = numa.probe_numa(trees / "two_socket_ht")
    assert t.source == "sysfs"
    assert [n.id for n in t.nodes] == [0, 1, 2, 3]  # 4 nodes
    assert t.nodes[0].cpus == (0, 1, 8, 9)
    assert all(n.memory_bytes == 64 * GIB for n in t.nodes)
    assert t.distance(0, 1) == 11 and t.distance(0, 2) == 21 and t.distance(3, 3) == 10
    assert t.node_of(13) == 2


def test_memory_only_node_with_sparse_numbers(trees: Path) -> None:
    t = numa.probe_numa(trees / "memory_only_node")
    assert [n.id for n in t.nodes] == [0, 1, 4]  # 3 nodes, sparse
    assert t.nodes[2].cpus == ()  # node 4 holds memory only
    assert t.nodes[2].memory_bytes == 128 * GIB
    # distance rows are in online-node order: column 2 is node 4, not node 2
    assert t.distance(1, 4) == 40 and t.distance(0, 1) == 20
    assert t.distance(0, 2) is None  # no node 2


def test_no_node_folder_is_one_node_with_every_cpu(trees: Path) -> None:
    t = numa.probe_numa(trees / "no_node_dir")
    assert t.source == "none"
    assert len(t.nodes) == 1
    assert t.nodes[0].id == 0 and t.nodes[0].cpus == (0, 1, 2, 3)
    assert t.nodes[0].memory_bytes == 4 * GIB  # from /proc/meminfo
    assert t.distance(0, 0) == 10


def test_old_kernel_cpumap_without_online_file(trees: Path) -> None:
    t = numa.probe_numa(trees / "old_kernel_hex")
    assert [n.id for n in t.nodes] == [0, 1]  # listed by folder: no node/online
    assert t.nodes[1].cpus == (2, 3, 6)  # from the hex cpumap
    assert t.distance(0, 1) == 20


def test_single_node_machine_with_offline_cpus(trees: Path) -> None:
    t = numa.probe_numa(trees / "offline_cpus")
    assert len(t.nodes) == 1 and t.nodes[0].cpus == (0, 1, 2, 4, 6)


def test_live_machine_nodes_cover_online_cpus() -> None:
    t = numa.probe_numa("/")
    assert len(t.nodes) >= 1
    covered = {c for n in t.nodes for c in n.cpus}
    assert os.sched_getaffinity(0) <= covered
