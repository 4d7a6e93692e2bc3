"""The dataclass-free value types (probes/record.py) behave as the dataclasses they replace."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
from rpool_agent.probes.cpu import Core, probe_cpus
from rpool_agent.probes.numa import probe_numa
from rpool_agent.probes.nvidia import Gpu, GpuReport, MigDevice
from rpool_agent.probes.record import FrozenInstanceError, plain, replace
from rpool_agent.probes.sysfs import Mount

from rpool_agent.formats import Checked
from rpool_agent.pool import Instance, Node, Pool

TREE = Path(__file__).resolve().parent / "trees" / "two_socket_ht"


def gpu(**changes: object) -> Gpu:
    mig = MigDevice(0, "MIG-a", "1g.10gb", 10, 1, 0)
    fields = dict(
        index=0,
        uuid="GPU-a",
        name="H100",
        memory_bytes=80,
        pci_bus_id="0000:3b:00.0",
        minor_number=3,
        numa_node=None,
        cpu_affinity=(0, 1),
        compute_capability="9.0",
        mig_enabled=True,
        mig_devices=(mig,),
    )
    return Gpu(**{**fields, **changes})  # type: ignore[arg-type]


def test_frozen_values_compare_hash_and_refuse_changes() -> None:
    a, b = Core((0, 8), 0, 0), Core((0, 8), 0, 0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Core((0, 8), 1, 0)
    assert a != ((0, 8), 0, 0)  # another class is never equal, as with dataclasses
    with pytest.raises(FrozenInstanceError):
        a.package = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):  # FrozenInstanceError is one, as in dataclasses
        del a.cpus
    assert a.package == 0
    assert repr(a) == "Core(cpus=(0, 8), package=0, core_id=0)"
    assert repr(Mount("/", "ext4", frozenset())) == (
        "Mount(mountpoint='/', fstype='ext4', options=frozenset(), root='/')"
    )


def test_mutable_values_compare_but_do_not_hash() -> None:
    a = Instance("0")
    assert a == Instance("0", 1, {}) and a.properties == {}
    assert Instance("0").properties is not Instance("0").properties  # a fresh dict each
    a.slots = 2
    assert a != Instance("0") and repr(a) == "Instance(id='0', slots=2, properties={})"
    with pytest.raises(TypeError):
        hash(a)
    assert Node("n") == Node(id="n", resources={}, additional_properties={})
    assert Pool() == Pool(nodes=[], additional_properties={})
    assert Checked("ctest").errors == [] and Checked("ctest").pool is None


def test_they_still_pass_for_dataclasses() -> None:
    g = gpu()
    assert dataclasses.is_dataclass(g) and dataclasses.is_dataclass(Pool)
    assert [f.name for f in dataclasses.fields(g)] == list(Gpu._fields)
    assert dataclasses.replace(g, index=5) == replace(g, index=5) == gpu(index=5)
    assert dataclasses.asdict(g)["mig_devices"] == ({"index": 0, **_mig_rest()},)
    assert dataclasses.astuple(Core((1,), 0, None)) == ((1,), 0, None)
    inst = Instance("1", 2, {"numa_node": 0})
    assert dataclasses.replace(inst, slots=3) == Instance("1", 3, {"numa_node": 0})
    pool = Pool.single({"cpus": [inst]})
    assert dataclasses.asdict(pool)["nodes"][0]["resources"]["cpus"][0]["slots"] == 2


def _mig_rest() -> dict[str, object]:
    return {
        "uuid": "MIG-a",
        "name": "1g.10gb",
        "memory_bytes": 10,
        "gpu_instance_id": 1,
        "compute_instance_id": 0,
    }


def test_plain_is_asdict_with_lists() -> None:
    """`topology_report` used `asdict` plus tuples -> lists; `plain` must give the same."""

    def jsonable(value: object) -> object:
        if isinstance(value, dict):
            return {k: jsonable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [jsonable(v) for v in value]
        return value

    cpu = probe_cpus(TREE)
    for value in (cpu, probe_numa(TREE, cpu.online), GpuReport((gpu(),), "1", None, "x", None)):
        assert plain(value) == jsonable(dataclasses.asdict(value))


def test_copies_and_pickles() -> None:
    g = gpu()
    assert pickle.loads(pickle.dumps(g)) == g
    assert copy.deepcopy(g) == g and copy.copy(g) == g
    pool = Pool.single({"cpus": [Instance("0", 1, {"threads": [0]})]})
    again = pool.copy()
    assert again == pool and again.local.resources["cpus"][0].properties is not (
        pool.local.resources["cpus"][0].properties
    )
    assert pickle.loads(pickle.dumps(pool)) == pool


def test_the_shared_init_binds_like_a_dataclass_init() -> None:
    @dataclasses.dataclass(frozen=True)
    class Twin:
        mountpoint: str
        fstype: str
        options: frozenset[str]
        root: str = "/"

    opts = frozenset({"rw"})
    for args, kwargs in [
        (("/sys", "sysfs", opts), {}),
        (("/sys",), {"fstype": "sysfs", "options": opts, "root": "/x"}),
        ((), {"root": "/x", "options": opts, "fstype": "sysfs", "mountpoint": "/sys"}),
    ]:
        ours, twin = Mount(*args, **kwargs), Twin(*args, **kwargs)
        assert plain(ours) == dataclasses.asdict(twin)
    assert Mount("/sys", "sysfs", opts).root == "/"  # the class attribute is the default
    assert dataclasses.fields(Mount)[3].default == "/"
    for args, kwargs, says in [
        (("/sys",), {}, "missing required argument: 'fstype'"),
        (("/sys", "sysfs", opts, "/", "extra"), {}, "takes 5 positional arguments"),
        (("/sys", "sysfs", opts), {"flavour": 1}, "unexpected keyword argument 'flavour'"),
        (("/sys", "sysfs", opts), {"mountpoint": "/x"}, "multiple values for argument"),
    ]:
        with pytest.raises(TypeError, match=says):
            Mount(*args, **kwargs)
        with pytest.raises(TypeError):
            Twin(*args, **kwargs)
    with pytest.raises(FrozenInstanceError):
        Mount("/sys", "sysfs", opts).root = "/y"  # type: ignore[misc]
