"""rpool_agent.handoff: lease document -> environment, CPU list, per-lease pool files.

Real files, real `ctest` (a tiny CMake project per test); no GPU is needed because
nothing here talks to CUDA: the tests check the names handed to it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rpool_agent.errors import PermissionDenied, PoolFormatError
from rpool_agent.formats import parse_text
from rpool_agent.handoff import (
    NO_GPUS,
    LeasedGpu,
    LeaseFiles,
    ctest_group_env,
    lease_env,
    leased_cpus,
    leased_gpus,
    remove_lease_files,
    request_form,
    substitute_args,
    write_lease_files,
)
from rpool_agent.requests import parse_request

TOKEN = "s3cret-token-never-exported"
UUID1 = "GPU-11111111-2222-3333-4444-555555555555"
UUID3 = "GPU-33333333-2222-3333-4444-555555555555"
MIG_A = "MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
MIG_B = "MIG-bbbbbbbb-bbbb-cccc-dddd-eeeeeeeeeeee"


def _gpu_props(index: int, uuid: str) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": uuid,
        "name": "NVIDIA H100",
        "pci_bus_id": f"0000:{index:02x}:00.0",
        "numa_node": 0,
        "vendor": "NVIDIA",
        "memory_bytes": 85899345920,
    }


def unit(rtype: str, rid: str, slots: int = 1) -> dict[str, Any]:
    return {"type": rtype, "id": rid, "slots": slots}


def lease(
    gpus: list[tuple[str, int]] = (),  # type: ignore[assignment]
    cpus: list[tuple[str, int]] = (),  # type: ignore[assignment]
    *,
    properties: dict[str, Any] | None = None,
    groups: list[list[dict[str, Any]]] | None = None,
    request: Any = None,
) -> dict[str, Any]:
    """A lease document as the server sends it (one group unless told otherwise)."""
    resources: dict[str, list[dict[str, Any]]] = {}
    if gpus:
        resources["gpus"] = [{"id": i, "slots": s} for i, s in gpus]
    if cpus:
        resources["cpus"] = [{"id": i, "slots": s} for i, s in cpus]
    if groups is None:
        groups = [[unit(t, e["id"], e["slots"]) for t, items in resources.items() for e in items]]
    doc: dict[str, Any] = {
        "id": "3f9c2a",
        "token": TOKEN,
        "label": "test_foo",
        "resources": resources,
        "groups": groups,
        "request": request if request is not None else {t: len(v) for t, v in resources.items()},
        "holder": {"pid": 1234, "uid": 0, "gid": 0},
        "granted_at": 1700000000.0,
    }
    if properties is not None:
        doc["properties"] = properties
    return doc


#: The brief's example: GPUs 1 and 3, cores 0 and 2 with their hyperthread siblings.
GPU_LEASE = lease(
    [("1", 1), ("3", 1)],
    [("0", 1), ("2", 1)],
    properties={
        "gpus": {"1": _gpu_props(1, UUID1), "3": _gpu_props(3, UUID3)},
        "cpus": {"0": {"threads": [0, 64], "numa_node": 0}, "2": {"threads": [2, 66]}},
    },
)
MIG_LEASE = lease(
    [("0_1", 1), ("0_2", 1)],
    [("5", 1)],
    properties={
        "gpus": {
            "0_1": {"uuid": MIG_A, "parent_index": 0, "parent_uuid": UUID1, "name": "1g.10gb"},
            "0_2": {"uuid": MIG_B, "parent_index": 0, "parent_uuid": UUID1},
        },
    },
)
BASE = {"PATH": "/usr/bin:/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}


# --- reading the lease -------------------------------------------------------------------------


def test_leased_gpus_carry_index_and_uuid() -> None:
    gpus = leased_gpus(GPU_LEASE)
    assert [(g.id, g.index, g.uuid, g.mig) for g in gpus] == [
        ("1", 1, UUID1, False),
        ("3", 3, UUID3, False),
    ]
    assert gpus[0].properties["pci_bus_id"] == "0000:01:00.0"
    assert [g.cuda_name for g in gpus] == ["1", "3"]


def test_leased_gpus_come_in_pci_order_whatever_the_grant_order() -> None:
    doc = copy.deepcopy(GPU_LEASE)
    doc["resources"]["gpus"].reverse()
    assert [g.id for g in leased_gpus(doc)] == ["1", "3"]


def test_hand_written_pool_without_properties_uses_numeric_ids() -> None:
    doc = lease([("2", 1), ("0", 1)], [("7", 1), ("3", 2)])
    assert [(g.id, g.index, g.uuid) for g in leased_gpus(doc)] == [("0", 0, None), ("2", 2, None)]
    assert leased_cpus(doc) == [3, 7]
    env = lease_env(doc, BASE)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,2"
    assert env["RPOOL_GPU_UUIDS"] == ","  # position-aligned with RPOOL_GPU_IDS, unknown
    assert env["OMP_NUM_THREADS"] == "3"  # leased cpu slots


def test_gpu_without_index_or_uuid_never_names_another_gpu() -> None:
    # CUDA stops at an entry it cannot parse, so the pool id is a safe last resort.
    doc = lease([("gpu_a", 1)])
    (gpu,) = leased_gpus(doc)
    assert gpu.index is None
    assert lease_env(doc, {})["CUDA_VISIBLE_DEVICES"] == "gpu_a"


def test_leased_cpus_include_hyperthread_siblings_sorted() -> None:
    assert leased_cpus(GPU_LEASE) == [0, 2, 64, 66]
    assert leased_cpus(lease([("1", 1)])) == []
    assert leased_cpus(lease(cpus=[("core_a", 1)])) == []  # no threads, not numeric


@pytest.mark.parametrize(
    ("request_", "form"),
    [
        # requests.Request.to_wire(): lists for groups, a mapping for {type: n}
        ([[{"type": "gpus", "slots": 1}], [{"type": "gpus", "slots": 1}]], "groups"),
        ([{"type": "gpus", "slots": 1}, {"type": "cpus", "slots": 4}], "groups"),
        ([], "groups"),  # `0,gpus:1`: no group at all
        ("2,gpus:1;cpus:4", "groups"),  # a raw RESOURCE_GROUPS string
        ({"gpus": 2, "cpus": 4}, "mapping"),
        ('{"gpus": 2}', "mapping"),
        (None, "mapping"),
    ],
)
def test_request_form(request_: Any, form: str) -> None:
    assert request_form({"request": request_}) == form


# --- environment -------------------------------------------------------------------------------


def test_env_for_a_gpu_lease() -> None:
    base = dict(BASE)
    env = lease_env(GPU_LEASE, base)
    assert base == BASE  # a new mapping; the base is untouched
    assert env["PATH"] == "/usr/bin:/bin" and env["HOME"] == "/root"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert env["RPOOL_LEASE_ID"] == "3f9c2a"
    assert env["RPOOL_GPU_IDS"] == "1,3"
    assert env["RPOOL_GPU_UUIDS"] == f"{UUID1},{UUID3}"
    assert env["RPOOL_CPU_IDS"] == "0,2,64,66"
    # canary >= 26.9 / canary_flux: CANARY_GPU_IDS names what CUDA_VISIBLE_DEVICES names
    assert env["CANARY_GPU_IDS"] == "1,3"
    assert env["CANARY_CPU_IDS"] == "0,2"
    assert env["OMP_NUM_THREADS"] == "2"
    assert not any(k.startswith("CTEST_RESOURCE_GROUP_") for k in env)  # a mapping request
    assert not any(k.endswith("_FILE") and k.startswith("RPOOL_") for k in env)
    assert TOKEN not in "".join(env.values())


def test_env_for_a_lease_without_gpus_hides_every_gpu() -> None:
    env = lease_env(lease(cpus=[("4", 1)]), {**BASE, "OMP_NUM_THREADS": "64"})
    assert env["CUDA_VISIBLE_DEVICES"] == NO_GPUS == "-1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["RPOOL_GPU_IDS"] == env["RPOOL_GPU_UUIDS"] == env["CANARY_GPU_IDS"] == ""
    assert env["CANARY_CPU_IDS"] == "4" and env["RPOOL_CPU_IDS"] == "4"
    assert env["OMP_NUM_THREADS"] == "1"


def test_env_for_a_lease_without_cpus_keeps_omp_num_threads() -> None:
    env = lease_env(lease([("0", 1)]), {"OMP_NUM_THREADS": "8"})
    assert env["OMP_NUM_THREADS"] == "8"
    assert env["RPOOL_CPU_IDS"] == env["CANARY_CPU_IDS"] == ""


def test_env_for_mig_devices_uses_full_mig_uuids() -> None:
    gpus = leased_gpus(MIG_LEASE)
    assert [(g.id, g.mig, g.index, g.uuid) for g in gpus] == [
        ("0_1", True, None, MIG_A),
        ("0_2", True, None, MIG_B),
    ]
    env = lease_env(MIG_LEASE, BASE)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{MIG_A},{MIG_B}"
    assert env["RPOOL_GPU_IDS"] == "0_1,0_2"
    assert env["RPOOL_GPU_UUIDS"] == f"{MIG_A},{MIG_B}"


def test_env_other_resource_types_get_canary_variables() -> None:
    doc = lease([("0", 1)])
    doc["resources"]["fpgas"] = [{"id": "f0", "slots": 1}, {"id": "f1", "slots": 1}]
    assert lease_env(doc, {})["CANARY_FPGA_IDS"] == "f0,f1"


def test_stale_ctest_and_file_variables_are_removed() -> None:
    stale = {
        "CTEST_RESOURCE_GROUP_COUNT": "2",
        "CTEST_RESOURCE_GROUP_0": "gpus",
        "CTEST_RESOURCE_GROUP_0_GPUS": "id:7,slots:1",
        "CTEST_RESOURCE_GROUP_5_CPUS": "id:9,slots:1",
        "RPOOL_POOL_FILE": "/old/lease/pool.yaml",
        "RPOOL_CTEST_SPEC_FILE": "/old/lease/ctest-spec.json",
        "CTEST_PARALLEL_LEVEL": "4",  # not a resource-group variable: kept
    }
    env = lease_env(GPU_LEASE, {**BASE, **stale})
    assert not [k for k in env if k.startswith("CTEST_RESOURCE_GROUP_")]
    assert "RPOOL_POOL_FILE" not in env and "RPOOL_CTEST_SPEC_FILE" not in env
    assert env["CTEST_PARALLEL_LEVEL"] == "4"


def test_ctest_groups_match_ctests_format() -> None:
    # ctest.md's example request `2,gpus:1;cpus:2,gpus:1`, granted on GPUs 0 (1 slot) and
    # 2 (2 slots): inside the lease they are "0" and "1"; cpus keep their ids.
    doc = lease(
        [("2", 2), ("0", 1)],
        [("0", 2)],
        groups=[
            [unit("gpus", "2")],
            [unit("gpus", "2")],
            [unit("cpus", "0", 2), unit("gpus", "0")],
        ],
        request=parse_request("2,gpus:1;cpus:2,gpus:1").to_wire(),
    )
    env = lease_env(doc, {"CTEST_RESOURCE_GROUP_9_GPUS": "stale"})
    groups = {k: v for k, v in env.items() if k.startswith("CTEST_RESOURCE_GROUP_")}
    assert groups == {
        "CTEST_RESOURCE_GROUP_COUNT": "3",
        "CTEST_RESOURCE_GROUP_0": "gpus",
        "CTEST_RESOURCE_GROUP_0_GPUS": "id:1,slots:1",
        "CTEST_RESOURCE_GROUP_1": "gpus",
        "CTEST_RESOURCE_GROUP_1_GPUS": "id:1,slots:1",
        "CTEST_RESOURCE_GROUP_2": "cpus,gpus",
        "CTEST_RESOURCE_GROUP_2_CPUS": "id:0,slots:2",
        "CTEST_RESOURCE_GROUP_2_GPUS": "id:0,slots:1",
    }


def test_canary_items_are_one_group_with_lease_local_ids() -> None:
    doc = copy.deepcopy(GPU_LEASE)
    doc["request"] = parse_request([{"type": "gpus", "slots": 1}] * 2).to_wire()
    env = lease_env(doc, {})
    assert env["CTEST_RESOURCE_GROUP_COUNT"] == "1"
    assert env["CTEST_RESOURCE_GROUP_0"] == "cpus,gpus"
    assert env["CTEST_RESOURCE_GROUP_0_GPUS"] == "id:0,slots:1;id:1,slots:1"
    assert env["CTEST_RESOURCE_GROUP_0_CPUS"] == "id:0,slots:1;id:2,slots:1"


def test_ctest_group_with_zero_groups_sets_count_zero() -> None:
    doc = lease(groups=[], request=parse_request("0,gpus:1").to_wire())
    assert lease_env(doc, {})["CTEST_RESOURCE_GROUP_COUNT"] == "0"
    assert ctest_group_env(doc) == {"CTEST_RESOURCE_GROUP_COUNT": "0"}


# --- real ctest ----------------------------------------------------------------------------------

needs_ctest = pytest.mark.skipif(
    not (shutil.which("ctest") and shutil.which("cmake")), reason="cmake/ctest not installed"
)

_RECORD = (
    "import json, os, sys\n"
    "env = {k: v for k, v in os.environ.items()\n"
    "       if k.startswith(('CTEST_RESOURCE_GROUP', 'CUDA_', 'RPOOL_'))}\n"
    "open(sys.argv[1], 'w').write(json.dumps(env))\n"
)


def _ctest_project(tmp_path: Path, tests: dict[str, str]) -> Path:
    """A CMake project whose tests (name -> RESOURCE_GROUPS) record their env as JSON."""
    src, build = tmp_path / "src", tmp_path / "build"
    src.mkdir()
    (src / "record.py").write_text(_RECORD)
    lines = ["cmake_minimum_required(VERSION 3.16)", "project(leased NONE)", "enable_testing()"]
    for name, groups in tests.items():
        out = tmp_path / f"{name}.json"
        lines.append(f'add_test(NAME {name} COMMAND "{sys.executable}" record.py "{out}")')
        lines.append(
            f'set_tests_properties({name} PROPERTIES RESOURCE_GROUPS "{groups}"'
            f' WORKING_DIRECTORY "{src}")'
        )
    (src / "CMakeLists.txt").write_text("\n".join(lines) + "\n")
    subprocess.run(["cmake", "-S", str(src), "-B", str(build)], check=True, capture_output=True)
    return build


def _ctest(build: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=build, env=env, capture_output=True, text=True, timeout=60, check=False
    )


@needs_ctest
def test_real_ctest_accepts_the_lease_spec_and_hands_out_lease_local_ids(tmp_path: Path) -> None:
    files = write_lease_files(GPU_LEASE, str(tmp_path / "lease"))
    build = _ctest_project(tmp_path, {"t1": "gpus:1", "t2": "gpus:1", "t3": "gpus:1,cpus:1"})
    base = {**os.environ, "CTEST_RESOURCE_GROUP_3_GPUS": "id:3,slots:1"}  # stale: must go
    paths = {"ctest_spec": files.ctest_spec, "pool": files.pool, "pool_nodes": files.pool_nodes}
    env = lease_env({**GPU_LEASE, "files": paths}, base)  # the grant carries its files
    args = substitute_args(["ctest", "--resource-spec-file", "{ctest_spec}", "-j3"], paths)
    assert args[2] == files.ctest_spec
    proc = _ctest(build, args, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("t1", "t2", "t3"):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert got["CTEST_RESOURCE_GROUP_COUNT"] == "1"
        gid = got["CTEST_RESOURCE_GROUP_0_GPUS"].removeprefix("id:").split(",")[0]
        assert gid in {"0", "1"}, got  # CUDA's numbering inside CUDA_VISIBLE_DEVICES=1,3
        assert got["CUDA_VISIBLE_DEVICES"] == "1,3"
        assert got["RPOOL_CTEST_SPEC_FILE"] == files.ctest_spec
        assert "CTEST_RESOURCE_GROUP_3_GPUS" not in got
    t3 = json.loads((tmp_path / "t3.json").read_text())
    assert t3["CTEST_RESOURCE_GROUP_0_CPUS"] in {"id:0,slots:1", "id:2,slots:1"}


@needs_ctest
@pytest.mark.parametrize(
    ("gpus", "groups", "count"),
    [
        ([("0", 2), ("1", 3)], "2,gpus:1;cpus:2,gpus:1;gpus:1,gpus:1", 4),
        ([("0", 2)], "gpus:1,gpus:1,cpus:1", 1),  # two units on one id: two entries
    ],
)
def test_group_variables_are_byte_identical_to_ctests_own(
    tmp_path: Path, gpus: list[tuple[str, int]], groups: str, count: int
) -> None:
    # Let the real ctest allocate, turn its answer into a lease's groups, and check we
    # format that allocation exactly as ctest did (ids here need no renumbering).
    spec = lease(
        gpus,
        [("0", 2), ("1", 1)],
        properties={"gpus": {rid: {"index": int(rid)} for rid, _ in gpus}},
    )
    files = write_lease_files(spec, str(tmp_path / "lease"))
    build = _ctest_project(tmp_path, {"t": groups})
    proc = _ctest(build, ["ctest", "--resource-spec-file", files.ctest_spec], dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = {
        k: v
        for k, v in json.loads((tmp_path / "t.json").read_text()).items()
        if k.startswith("CTEST_RESOURCE_GROUP_")
    }
    units = []
    for n in range(int(theirs["CTEST_RESOURCE_GROUP_COUNT"])):
        group = []
        for rtype in theirs[f"CTEST_RESOURCE_GROUP_{n}"].split(","):
            for entry in theirs[f"CTEST_RESOURCE_GROUP_{n}_{rtype.upper()}"].split(";"):
                rid, slots = (part.split(":")[1] for part in entry.split(","))
                group.append(unit(rtype, rid, int(slots)))
        units.append(group)
    assert len(units) == count
    ours = ctest_group_env({**spec, "groups": units, "request": parse_request(groups).to_wire()})
    assert ours == theirs
    if len(gpus) == 1:
        assert theirs["CTEST_RESOURCE_GROUP_0_GPUS"] == "id:0,slots:1;id:0,slots:1"


# --- per-lease files ---------------------------------------------------------------------------


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_files_hold_only_the_lease_and_parse_back(tmp_path: Path) -> None:
    files = write_lease_files(GPU_LEASE, str(tmp_path / "leases" / "3f9c2a"))
    assert isinstance(files, LeaseFiles)
    assert _mode(files.directory) == 0o700
    assert sorted(os.listdir(files.directory)) == [
        "ctest-spec.json",
        "pool-nodes.yaml",
        "pool.yaml",
    ]
    for path in (files.ctest_spec, files.pool, files.pool_nodes):
        assert _mode(path) == 0o600
        assert TOKEN not in Path(path).read_text()

    def ids(pool: Any, rtype: str) -> list[tuple[str, int]]:
        return [(i.id, i.slots) for i in pool.local.resources[rtype]]

    ctest = parse_text(Path(files.ctest_spec).read_text(), format="ctest")
    flat = parse_text(Path(files.pool).read_text(), format="canary")
    for pool in (ctest, flat):  # GPUs as CUDA numbers them inside the lease; cpus kept
        assert ids(pool, "gpus") == [("0", 1), ("1", 1)]
        assert ids(pool, "cpus") == [("0", 1), ("2", 1)]
    nodes = parse_text(Path(files.pool_nodes).read_text(), format="canary-nodes")
    assert nodes.local.id == os.uname().nodename
    assert ids(nodes, "gpus") == [("1", 1), ("3", 1)]  # physical NVML indices
    assert ids(nodes, "cpus") == [("0", 1), ("2", 1)]
    props = nodes.local.instance("gpus", "3").properties
    assert props["vendor"] == "NVIDIA" and props["uuid"] == UUID3 and props["name"] == "NVIDIA H100"


def test_canary_reads_the_node_form_and_exports_leased_physical_gpus(tmp_path: Path) -> None:
    # The real canary-wm (>= 26.9, a test dependency): its schema, its allocator, and its
    # NVIDIA plugin's per-test hook, which replaces CUDA_VISIBLE_DEVICES with the ids.
    rpool = pytest.importorskip("_canary.resource_pool.rpool")
    schemas = pytest.importorskip("_canary.resource_pool.schemas")
    canary_nvidia = pytest.importorskip("canary_nvidia")
    import yaml

    files = write_lease_files(GPU_LEASE, str(tmp_path / "c"))
    doc = yaml.safe_load(Path(files.pool_nodes).read_text())["resource_pool"]
    pool = rpool.ResourcePool(schemas.resource_pool_schema.validate(doc))
    req = rpool.NodeRequest()
    req.add("gpus", 1)
    req.add("cpus", 1)
    seen = set()
    for _ in range(2):
        job = SimpleNamespace(resources=pool.checkout([req])["resources"], variables={})
        canary_nvidia.canary_runteststart(job)
        seen.add(job.variables["CUDA_VISIBLE_DEVICES"])
    assert seen == {"1", "3"}  # the leased NVML indices, one each


def test_files_for_mig_keep_ctest_valid_ids_and_mig_uuids(tmp_path: Path) -> None:
    files = write_lease_files(MIG_LEASE, str(tmp_path / "mig"))
    ctest = parse_text(Path(files.ctest_spec).read_text())
    assert [i.id for i in ctest.local.resources["gpus"]] == ["0", "1"]
    nodes = parse_text(Path(files.pool_nodes).read_text())
    gpus = nodes.local.resources["gpus"]
    assert [i.id for i in gpus] == ["0_1", "0_2"]
    assert [i.properties["uuid"] for i in gpus] == [MIG_A, MIG_B]
    assert gpus[0].properties["parent_uuid"] == UUID1


def test_files_for_a_gpu_only_lease(tmp_path: Path) -> None:
    doc = lease([("1", 1)], properties={"gpus": {"1": _gpu_props(1, UUID1)}})
    files = write_lease_files(doc, str(tmp_path / "g"))
    assert [
        i.id for i in parse_text(Path(files.ctest_spec).read_text()).local.resources["gpus"]
    ] == ["0"]
    # The node form says what the lease holds, though canary (every test takes a cpu)
    # can run nothing on it and our own validator says so.
    text = Path(files.pool_nodes).read_text()
    assert 'id: "1"' in text and "cpus" not in text
    with pytest.raises(PoolFormatError, match="no cpus"):
        parse_text(text)


def test_directory_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        files = write_lease_files(GPU_LEASE, str(tmp_path / "u"))
    finally:
        os.umask(old)
    assert _mode(files.directory) == 0o700
    # Rewriting into the same directory (same lease) replaces the files whole.
    again = write_lease_files(GPU_LEASE, files.directory)
    assert again == files
    assert not [n for n in os.listdir(files.directory) if ".tmp" in n]


def test_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(PermissionDenied, match="not a directory owned by"):
        write_lease_files(GPU_LEASE, str(tmp_path / "link"))
    assert os.listdir(target) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a directory to another uid")
def test_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 54321, 54321)
    with pytest.raises(PermissionDenied):
        write_lease_files(GPU_LEASE, str(theirs))


def test_remove_lease_files(tmp_path: Path) -> None:
    files = write_lease_files(GPU_LEASE, str(tmp_path / "r"))
    remove_lease_files(files)
    assert not os.path.exists(files.directory)
    remove_lease_files(files)  # twice is fine
    # A file the program left behind is not ours to delete: it and the directory stay.
    files = write_lease_files(GPU_LEASE, str(tmp_path / "r"))
    Path(files.directory, "results.txt").write_text("keep")
    remove_lease_files(files)
    assert os.listdir(files.directory) == ["results.txt"]


# --- arguments ---------------------------------------------------------------------------------


def test_substitute_args() -> None:
    files = {
        "ctest_spec": "/l/ctest-spec.json",
        "pool": "/l/pool.yaml",
        "pool_nodes": "/l/pool-nodes.yaml",
    }
    args = [
        "ctest",
        "--resource-spec-file",
        "{ctest_spec}",
        "--pool={pool}",
        "-f{pool_nodes}",
        "{pool}:{pool_nodes}",
        "{}",
        "{poolx}",
        "{POOL}",
        "{ pool }",
        "pool",
    ]
    assert substitute_args(args, files) == [
        "ctest",
        "--resource-spec-file",
        "/l/ctest-spec.json",
        "--pool=/l/pool.yaml",
        "-f/l/pool-nodes.yaml",
        "/l/pool.yaml:/l/pool-nodes.yaml",
        "{}",
        "{poolx}",
        "{POOL}",
        "{ pool }",
        "pool",
    ]


def test_leased_gpu_is_frozen() -> None:
    gpu = LeasedGpu("1", 1, UUID1, False, {})
    with pytest.raises(AttributeError):
        gpu.index = 2  # type: ignore[misc]
