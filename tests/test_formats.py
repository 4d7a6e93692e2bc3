"""Pool formats: round trips between the three forms, and what each reader rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rpool_agent import formats
from rpool_agent.errors import PoolFormatError
from rpool_agent.pool import Instance, Node, Pool

FLAT = """\
resource_pool:
  additional_properties: {site: lab}
  resources:
    cpus:
    - {id: "0", slots: 1}
    - {id: "1", slots: 1}
    - {id: "2", slots: 2}
    gpus:
    - {id: "0", slots: 1}
    - {id: "1", slots: 4}
"""

GPU0 = {"vendor": "NVIDIA", "uuid": "GPU-1a2b", "name": "NVIDIA H200", "numa_node": 0}


def model() -> Pool:
    """A pool with everything the node form can hold: properties, node id and metadata."""
    pool = formats.parse_text(FLAT)
    node = pool.local
    node.id = "node-a"
    node.additional_properties = {"rack": 7}
    node.resources["cpus"][2].properties = {"numa_node": 1, "threads": [2, 6]}
    node.resources["gpus"][0].properties = dict(GPU0)
    pool.additional_properties["allow_multinode"] = False
    return pool


def ids_and_slots(pool: Pool) -> dict[str, list[tuple[str, int]]]:
    return {t: [(i.id, i.slots) for _, i in pool.instances(t)] for t in pool.types}


# --- round trips ------------------------------------------------------------------------


def test_flat_nodes_ctest_flat_keeps_ids_and_slots() -> None:
    start = formats.parse_text(FLAT, source="flat.yaml")
    nodes = formats.parse_text(formats.dumps(start, "canary-nodes"))
    spec = formats.parse_text(formats.dumps(nodes, "ctest"))
    back = formats.parse_text(formats.dumps(spec, "canary"))
    assert formats.detect_format(yaml.safe_load(formats.dumps(start, "canary-nodes"))) == (
        "canary-nodes"
    )
    expected = {"cpus": [("0", 1), ("1", 1), ("2", 2)], "gpus": [("0", 1), ("1", 4)]}
    for pool in (start, nodes, spec, back):
        assert ids_and_slots(pool) == expected


@pytest.mark.parametrize("first", ["canary", "canary-nodes"])
def test_properties_survive_flat_and_nodes(first: str) -> None:
    pool = model()
    second = "canary-nodes" if first == "canary" else "canary"
    once = formats.parse_text(formats.dumps(pool, first))
    twice = formats.parse_text(formats.dumps(once, second))
    assert once == pool
    assert twice == pool
    assert twice.local.resources["cpus"][2].properties["threads"] == [2, 6]


def test_flat_keeps_per_instance_properties_under_additional_properties() -> None:
    doc, notes = formats.to_document(model(), "canary")
    assert notes == []
    rp = doc["resource_pool"]
    # canary <= 26.4 rejects any instance key but id and slots
    assert all(set(i) == {"id", "slots"} for insts in rp["resources"].values() for i in insts)
    ap = rp["additional_properties"]
    assert ap["instances"]["gpus"]["0"]["uuid"] == "GPU-1a2b"
    assert ap["host"] == "node-a"
    assert ap["node_properties"] == {"rack": 7}
    assert ap["site"] == "lab"


def test_ctest_output_notes_what_it_dropped() -> None:
    doc, notes = formats.to_document(model(), "ctest")
    assert doc["version"] == {"major": 1, "minor": 0}
    assert doc["local"][0]["gpus"] == [{"id": "0", "slots": 1}, {"id": "1", "slots": 4}]
    text = "\n".join(notes)
    assert "dropped properties of 1 gpus instance (vendor, uuid, name, numa_node)" in text
    assert "numa_node, threads" in text
    assert "node id 'node-a'" in text
    assert "additional_properties (site, allow_multinode)" in text
    assert "node additional_properties (rack)" in text


def test_ctest_never_writes_an_instance_with_0_slots_and_refuses_reading_one() -> None:
    """ctest reads `slots: 0`, but such an id can never be given out: its manual (and
    the reference) say an emitter must not write one and a validator should refuse it."""
    pool = Pool.single({"gpus": [Instance("0", 0), Instance("1", 1)]})
    doc, notes = formats.to_document(pool, "ctest")
    assert doc["local"][0]["gpus"] == [{"id": "1", "slots": 1}]
    assert "dropped 1 instance(s) with 0 slots (gpus:0)" in notes
    zero = {**doc, "local": [{"gpus": [{"id": "0", "slots": 0}]}]}
    checked = formats.check_text(json.dumps(zero))
    assert [(e.where, "slots 0" in e.what) for e in checked.errors] == [("local[0].gpus[0]", True)]


def test_dumps_ctest_is_json_and_canary_is_yaml_with_string_ids() -> None:
    pool = model()
    spec = json.loads(formats.dumps(pool, "ctest"))
    assert spec["local"][0]["cpus"][0] == {"id": "0", "slots": 1}
    for form in ("canary", "canary-nodes"):
        text = formats.dumps(pool, form)
        assert 'id: "0"' in text
        assert yaml.safe_load(text) == formats.to_document(pool, form)[0]


def test_node_form_gpus_get_canarys_vendor() -> None:
    pool = model()
    del pool.local.resources["gpus"][0].properties["vendor"]
    doc, _ = formats.to_document(pool, "canary-nodes")
    props = doc["resource_pool"]["nodes"][0]["resources"]["gpus"][0]["properties"]
    assert list(props)[:3] == ["vendor", "uuid", "name"]
    assert props["vendor"] == "NVIDIA"
    assert "properties" not in doc["resource_pool"]["nodes"][0]["resources"]["gpus"][1]
    assert doc["resource_pool"]["allow_multinode"] is False


def test_node_form_says_nvidia_only_for_nvml_uuids() -> None:
    """canary >= 26.9 sets CUDA_VISIBLE_DEVICES for `vendor: NVIDIA` GPUs; a GPU whose
    uuid is not NVML's (`GPU-`/`MIG-`) must not be labelled NVIDIA on the way."""
    gpus = [Instance("0", 1, {"uuid": "GPU-1234"}), Instance("1", 1, {"uuid": "58a7-amd"})]
    pool = Pool.single({"gpus": gpus, "cpus": [Instance("0", 1)]})
    doc, _ = formats.to_document(pool, "canary-nodes")
    props = [g["properties"] for g in doc["resource_pool"]["nodes"][0]["resources"]["gpus"]]
    assert props == [{"vendor": "NVIDIA", "uuid": "GPU-1234"}, {"uuid": "58a7-amd"}]


def test_node_form_output_passes_canarys_own_schema() -> None:
    schemas = pytest.importorskip("_canary.resource_pool.schemas")
    rpool = pytest.importorskip("_canary.resource_pool.rpool")
    text = formats.dumps(model(), "canary-nodes")
    payload = yaml.safe_load(text)["resource_pool"]
    schemas.resource_pool_schema.validate(payload)
    payload.pop("allow_multinode")  # canary's make_resource_pool pops it before fill
    pool = rpool.ResourcePool(payload)
    assert pool.node_ids() == ["node-a"]
    assert pool.types == ["cpus", "gpus"]
    gpu = pool.nodes[0].resources["gpus"][0]
    assert gpu["properties"]["vendor"] == "NVIDIA"


def test_parse_document_copies_callers_data() -> None:
    doc = yaml.safe_load(formats.dumps(model(), "canary-nodes"))
    pool = formats.parse_document(doc)
    pool.local.resources["gpus"][0].properties["uuid"] = "changed"
    assert doc["resource_pool"]["nodes"][0]["resources"]["gpus"][0]["properties"]["uuid"] == (
        "GPU-1a2b"
    )


@pytest.mark.parametrize("form", ["canary", "canary-nodes"])
def test_written_documents_share_nothing_with_the_pool(form: str) -> None:
    """Writers copy nested properties (pool.copy_data, not copy.deepcopy) all the way down."""
    pool = model()
    odd = {(1, 2): {3}}  # not document data: copied by deepcopy, still equal
    pool.local.resources["cpus"][2].properties["nested"] = [{"a": [1]}, odd]
    pool.additional_properties["site"] = {"room": ["b"]}
    doc, _ = formats.to_document(pool, form)
    pool.local.resources["cpus"][2].properties["nested"][0]["a"].append(2)
    pool.local.resources["cpus"][2].properties["nested"][1][(1, 2)].add(4)
    pool.additional_properties["site"]["room"].append("c")
    again = formats.parse_document(doc, format=form)
    assert again.local.instance("cpus", "2").properties["nested"] == [{"a": [1]}, {(1, 2): {3}}]
    assert again.additional_properties["site"] == {"room": ["b"]}


# --- accepted shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "form", "expected"),
    [
        ("cpus: 2\ngpus: 1\n", "canary", {"cpus": ["0", "1"], "gpus": ["0"]}),
        ("resources: {gpus: 2, cpus: [{id: 0}]}\n", "canary", {"gpus": ["0", "1"], "cpus": ["0"]}),
        ("resource_pool: {resources: {cpus: 1}}\n", "canary", {"cpus": ["0"]}),
        # the seed's CTest-like YAML shape; ids as the seed documents them
        ('local:\n  gpus:\n  - id: "01"\n    slots: 1\n', "ctest", {"gpus": ["01"]}),
        ('{"version": {"major": 1, "minor": 0}, "local": []}', "ctest", {}),
        ("nodes: [{id: n1, resources: {cpus: [{id: 3}]}}]\n", "canary-nodes", {"cpus": ["3"]}),
    ],
)
def test_accepted_shapes(text: str, form: str, expected: dict[str, list[str]]) -> None:
    checked = formats.check_text(text)
    assert checked.errors == []
    assert checked.format == form
    assert checked.pool is not None
    assert {t: [i.id for _, i in checked.pool.instances(t)] for t in checked.pool.types} == expected
    assert all(i.slots == 1 for t in expected for _, i in checked.pool.instances(t))


def test_flat_host_names_the_node() -> None:
    pool = formats.parse_text(
        "resource_pool:\n  additional_properties: {host: n7}\n  resources: {cpus: 1}\n"
    )
    assert pool.local.id == "n7"
    assert pool.additional_properties == {}


def test_load_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.json"
    path.write_text('{"version": {"major": 1, "minor": 0}, "local": [{"gpus": [{"id": "X"}]}]}')
    with pytest.raises(PoolFormatError) as err:
        formats.load_file(path)
    assert err.value.source == str(path)
    assert err.value.where == "local[0].gpus[0].id"
    assert str(err.value).startswith(f"{path}: local[0].gpus[0].id: id 'X' must match")


# --- rejected documents -------------------------------------------------------------------


def spec(local: str) -> str:
    """A CTest spec (version 1.0) around the given `local` JSON."""
    return '{"version": {"major": 1, "minor": 0}, "local": ' + local + "}"


INVALID = [
    # (text, forced format or "auto", where, message fragment)
    # CTest spec
    ('{"local": []}', "auto", "", "missing 'version'"),
    (
        '{"version": {"major": 1, "minor": 1}, "local": []}',
        "auto",
        "version.minor",
        "unsupported version minor 1",
    ),
    (
        '{"version": {"major": "1", "minor": 0}, "local": []}',
        "auto",
        "version.major",
        "must be an integer, not a string",
    ),
    (
        '{"version": {"major": true, "minor": 0}, "local": []}',
        "auto",
        "version.major",
        "must be an integer, not a boolean",
    ),
    ('{"version": 1, "local": []}', "auto", "version", "must be a mapping"),
    ('{"version": {"major": 1, "minor": 0}}', "auto", "", "missing 'local'"),
    (spec('{"gpus": 1}'), "auto", "local.gpus", "must be a list of instances"),
    (spec("[{}, {}]"), "auto", "local", "at most one element, not 2"),
    (spec("[[]]"), "auto", "local[0]", "must be a mapping of resource types"),
    (spec('[{"GPUs": []}]'), "auto", "local[0].GPUs", "resource type name 'GPUs'"),
    (spec('[{"gpu-s": []}]'), "auto", "local[0].gpu-s", "must match"),
    (
        spec('[{"gpus": [{"id": 0}]}]'),
        "auto",
        "local[0].gpus[0].id",
        "id must be a string, not an integer",
    ),
    (
        spec('[{"gpus": [{"id": "GPU-1a"}]}]'),
        "auto",
        "local[0].gpus[0].id",
        "id 'GPU-1a' must match",
    ),
    (
        spec('[{"gpus": [{"id": "0000:3b:00.0"}]}]'),
        "auto",
        "local[0].gpus[0].id",
        "must match",
    ),
    (spec('[{"gpus": [{"id": ""}]}]'), "auto", "local[0].gpus[0].id", "must match"),
    (spec('[{"gpus": [{"slots": 1}]}]'), "auto", "local[0].gpus[0]", "has no id"),
    (
        spec('[{"gpus": [{"id": "0"}, {"id": "0"}]}]'),
        "auto",
        "local[0].gpus[1].id",
        "duplicate id '0' (first at local[0].gpus[0])",
    ),
    (
        spec('[{"gpus": [{"id": "0", "slots": -1}]}]'),
        "auto",
        "local[0].gpus[0].slots",
        "out of range 0..4294967295",
    ),
    (
        spec('[{"gpus": [{"id": "0", "slots": 4294967296}]}]'),
        "auto",
        "local[0].gpus[0].slots",
        "out of range",
    ),
    (
        spec('[{"gpus": [{"id": "0", "slots": 1.5}]}]'),
        "auto",
        "local[0].gpus[0].slots",
        "whole number, not 1.5",
    ),
    (
        spec('[{"gpus": [{"id": "0", "slots": true}]}]'),
        "auto",
        "local[0].gpus[0].slots",
        "whole number, not a boolean",
    ),
    (
        spec('[{"gpus": [{"id": "0", "slots": "2"}]}]'),
        "auto",
        "local[0].gpus[0].slots",
        "whole number, not a string",
    ),
    (spec('[{"gpus": ["0"]}]'), "auto", "local[0].gpus[0]", "must be a mapping"),
    # canary flat
    (
        "resources: {cpus: [{id: 0, slots: 1, properties: {}}]}\n",
        "auto",
        "resources.cpus[0]",
        "unknown key 'properties'",
    ),
    (
        "resource_pool: {resources: {cpus: [{id: 1.5}]}}\n",
        "auto",
        "resource_pool.resources.cpus[0].id",
        "id must be a string (or an integer), not a number",
    ),
    (
        "resource_pool: {resources: {cpus: [{id: true}]}}\n",
        "auto",
        "resource_pool.resources.cpus[0].id",
        "not a boolean",
    ),
    (
        "resource_pool: {resources: {cpus: [{id: Core0}]}}\n",
        "auto",
        "resource_pool.resources.cpus[0].id",
        "id 'Core0' must match",
    ),
    (
        "resource_pool: {resources: {cpus: -1}}\n",
        "auto",
        "resource_pool.resources.cpus",
        "count -1 out of range",
    ),
    (
        "resource_pool: {resources: {cpus: yes}}\n",
        "auto",
        "resource_pool.resources.cpus",
        "must be a list of instances or a count, not a boolean",
    ),
    (
        "resource_pool: {resources: {CPUs: 2}}\n",
        "auto",
        "resource_pool.resources.CPUs",
        "resource type name 'CPUs'",
    ),
    (
        "resource_pool: {additional_properties: {}}\n",
        "auto",
        "resource_pool",
        "missing 'resources'",
    ),
    ("resource_pool: {resources: {}, extra: 1}\n", "auto", "resource_pool", "unknown key 'extra'"),
    (
        "resource_pool: {resources: {}, additional_properties: []}\n",
        "auto",
        "resource_pool.additional_properties",
        "must be a mapping, not a list",
    ),
    ("resource_pool: [1]\n", "auto", "resource_pool", "must be a mapping, not a list"),
    (
        "resource_pool:\n  additional_properties: {instances: {gpus: {'0': {a: 1}}}}\n"
        "  resources: {cpus: 1}\n",
        "auto",
        "resource_pool.additional_properties.instances.gpus",
        "resource type 'gpus', which the pool lacks",
    ),
    (
        "resource_pool:\n  additional_properties: {instances: {cpus: {7: {a: 1}}}}\n"
        "  resources: {cpus: 1}\n",
        "auto",
        "resource_pool.additional_properties.instances.cpus.7",
        "cpus id 7, which the pool lacks",
    ),
    (
        "resource_pool:\n  additional_properties: {host: [a]}\n  resources: {cpus: 1}\n",
        "auto",
        "resource_pool.additional_properties.host",
        "host (the node id) must be a non-empty string",
    ),
    ("resource_pool: {resources: {cpus: 1}}\n", "ctest", "", "this is the canary form, not ctest"),
    # canary node form
    (
        "resource_pool: {nodes: [{id: a, resources: {gpus: []}}]}\n",
        "auto",
        "resource_pool.nodes[0].resources",
        "node 'a' has no cpus",
    ),
    (
        "resource_pool: {nodes: [{id: a, resources: {cpus: []}}]}\n",
        "auto",
        "resource_pool.nodes[0].resources",
        "has no cpus",
    ),
    (
        "resource_pool: {nodes: [{id: a, resources: {cpus: 4}}]}\n",
        "auto",
        "resource_pool.nodes[0].resources.cpus",
        "must be a list of instances, not an integer",
    ),
    ("nodes: [{resources: {cpus: [{id: 0}]}}]\n", "auto", "nodes[0]", "node has no id"),
    ("nodes: [{id: a}]\n", "auto", "nodes[0]", "node has no resources"),
    (
        "nodes: [{id: a, resources: {cpus: [{id: 0}]}}, {id: a, resources: {cpus: [{id: 0}]}}]\n",
        "auto",
        "nodes[1].id",
        "duplicate node id 'a' (first at nodes[0])",
    ),
    (
        "nodes: [{id: a, resources: {cpus: [{id: 0, properties: [1]}]}}]\n",
        "auto",
        "nodes[0].resources.cpus[0].properties",
        "must be a mapping, not a list",
    ),
    (
        "nodes: [{id: a, resources: {cpus: [{id: 0, uuid: x}]}}]\n",
        "auto",
        "nodes[0].resources.cpus[0]",
        "unknown key 'uuid'",
    ),
    (
        "nodes: [{id: a, host: b, resources: {cpus: [{id: 0}]}}]\n",
        "auto",
        "nodes[0]",
        "unknown key 'host'",
    ),
    ("nodes: {a: 1}\n", "auto", "nodes", "must be a list of nodes, not a mapping"),
    ("allow_multinode: 1\nnodes: []\n", "auto", "allow_multinode", "must be true or false"),
    ("nodes: []\nresources: {}\n", "auto", "", "unknown key 'resources'"),
    ("cpus: 1\n", "canary-nodes", "", "this is the canary form, not canary-nodes"),
    # any form
    ("- cpus\n", "auto", "", "a pool document is a mapping, not a list"),
]


@pytest.mark.parametrize(("text", "form", "where", "fragment"), INVALID)
def test_invalid_documents(text: str, form: str, where: str, fragment: str) -> None:
    checked = formats.check_text(text, format=form, source="pool.doc")
    assert checked.pool is None
    match = [e for e in checked.errors if e.where == where and fragment in e.what]
    assert match, [str(e) for e in checked.errors]
    assert str(match[0]).startswith("pool.doc: ")
    with pytest.raises(PoolFormatError):
        formats.parse_text(text, format=form, source="pool.doc")


def test_all_problems_are_collected_and_the_first_is_raised() -> None:
    text = spec('[{"gpus": [{"id": "A"}, {"id": "b", "slots": -2}, {"id": 3}]}]')
    checked = formats.check_text(text)
    assert [e.where for e in checked.errors] == [
        "local[0].gpus[0].id",
        "local[0].gpus[1].slots",
        "local[0].gpus[2].id",
    ]
    with pytest.raises(PoolFormatError, match=r"local\[0\]\.gpus\[0\]\.id: .*\(and 2 more"):
        formats.parse_text(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty document"),
        ("a: [\n", "not valid YAML (did not find expected node content, line 2 column 1)"),
        ('{"version": 1', "not valid JSON (Expecting ',' delimiter, line 1 column 14) nor YAML"),
        ("d: 2024-13-01\n", "not valid YAML"),
    ],
)
def test_unreadable_text(text: str, fragment: str) -> None:
    with pytest.raises(PoolFormatError) as err:
        formats.parse_text(text, source="f")
    assert fragment in str(err.value)


def test_missing_file_is_a_pool_format_error(tmp_path: Path) -> None:
    with pytest.raises(PoolFormatError, match="cannot read: No such file"):
        formats.load_file(tmp_path / "nope.yaml")


# --- what cannot be written -------------------------------------------------------------


def two_nodes() -> Pool:
    return Pool(nodes=[Node("a", {"cpus": [Instance("0")]}), Node("b", {"cpus": [Instance("0")]})])


@pytest.mark.parametrize(
    ("pool", "form", "fragment"),
    [
        (two_nodes(), "canary", "the flat canary form holds one node, this pool has 2"),
        (two_nodes(), "ctest", "a CTest spec holds one node, this pool has 2"),
        (
            Pool.single({"gpus": [Instance("GPU-1a")], "cpus": [Instance("0")]}),
            "ctest",
            "cannot write ctest: local[0].gpus[0].id: id 'GPU-1a' must match",
        ),
        (
            Pool.single({"gpus": [Instance("0")]}),
            "canary-nodes",
            "cannot write canary-nodes: resource_pool.nodes[0].resources: node 'localhost' "
            "has no cpus",
        ),
        (
            Pool.single({"cpus": [Instance("0")]}, additional_properties={"instances": 1}),
            "canary",
            "additional_properties.instances is reserved by the flat canary form",
        ),
        (
            Pool.single({"cpus": [Instance("0", 1, {"when": object()})]}),
            "canary",
            "cannot write a object in YAML",
        ),
        (Pool.single({}), "toml", "unknown format 'toml'"),
    ],
)
def test_unwritable_pools(pool: Pool, form: str, fragment: str) -> None:
    with pytest.raises(PoolFormatError) as err:
        formats.dumps(pool, form)
    assert fragment in str(err.value)


def test_two_nodes_write_fine_in_node_form() -> None:
    back = formats.parse_text(formats.dumps(two_nodes(), "canary-nodes"))
    assert [n.id for n in back.nodes] == ["a", "b"]
