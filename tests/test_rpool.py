"""The canary-compatible seed API (`rpool_agent.rpool`): every method and its failure paths."""

from __future__ import annotations

import io
import json
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from rpool_agent import errors
from rpool_agent.rpool import (
    AllocationTransaction,
    Allocator,
    EmptyResourcePoolError,
    Inventory,
    Outcome,
    ResourcePool,
    ResourceUnavailable,
    make_resource_pool,
)


def items(rtype: str, n: int, slots: int = 1) -> list[dict[str, Any]]:
    """canary's request shape: one item per unit."""
    return [{"type": rtype, "slots": slots} for _ in range(n)]


def pool_of(**types_: list[tuple[str, int]]) -> ResourcePool:
    return ResourcePool(
        {"resources": {t: [{"id": i, "slots": s} for i, s in insts] for t, insts in types_.items()}}
    )


@pytest.fixture
def abc() -> ResourcePool:
    """The issue's example: gpus a:4, b:1, c:2 (plus two cpus)."""
    return pool_of(gpus=[("a", 4), ("b", 1), ("c", 2)], cpus=[("0", 1), ("1", 1)])


# --- Outcome --------------------------------------------------------------------------------


def test_outcome_ok_forms() -> None:
    for outcome in (Outcome(), Outcome(True), Outcome(None, "")):
        assert outcome and outcome.ok is True
    assert Outcome().reason is None
    assert repr(Outcome()) == "<Outcome ok>"


@pytest.mark.parametrize("ok", [None, False])
def test_outcome_with_reason_fails(ok: bool | None) -> None:
    outcome = Outcome(ok, "why")
    assert not outcome
    assert outcome.ok is False
    assert outcome.reason == "why"
    assert repr(outcome) == "<Outcome fail: why>"


@pytest.mark.parametrize("reason", [None, ""])
def test_outcome_false_without_reason_raises(reason: str | None) -> None:
    with pytest.raises(ValueError, match="requires a reason"):
        Outcome(False, reason)


# --- checkout: best fit, shapes, all-or-nothing -------------------------------------------------


def test_best_fit_order_from_the_issue(abc: ResourcePool) -> None:
    assert abc.checkout(items("gpus", 1)) == {"gpus": [{"id": "b", "slots": 1}]}
    assert abc.checkout(items("gpus", 1, slots=2)) == {"gpus": [{"id": "c", "slots": 2}]}
    assert abc.checkout(items("gpus", 1)) == {"gpus": [{"id": "a", "slots": 1}]}
    # decremented in place; instances at 0 free slots stay listed, in file order
    assert abc.resources["gpus"] == [
        {"id": "a", "slots": 3},
        {"id": "b", "slots": 0},
        {"id": "c", "slots": 0},
    ]


def test_best_fit_within_one_request_and_ties_keep_file_order(abc: ResourcePool) -> None:
    got = abc.checkout(items("gpus", 3) + items("cpus", 1))
    # b (1 free) -> c (2 free) -> c again (1 free beats a's 4); cpus tie -> file order
    assert got == {
        "gpus": [{"id": "b", "slots": 1}, {"id": "c", "slots": 1}, {"id": "c", "slots": 1}],
        "cpus": [{"id": "0", "slots": 1}],
    }


def test_an_item_is_served_by_one_instance_only(abc: ResourcePool) -> None:
    # 5 free gpu slots in total, but no single instance has 5
    before = abc.getstate()
    with pytest.raises(ResourceUnavailable):
        abc.checkout(items("gpus", 1, slots=5))
    assert abc.getstate() == before


def test_partial_checkout_is_rolled_back(abc: ResourcePool) -> None:
    abc.checkout(items("gpus", 1, slots=4))  # a is now empty; b:1, c:2 free
    before = abc.getstate()
    # the cpus and the first gpus items succeed before the last gpus item fails
    with pytest.raises(ResourceUnavailable):
        abc.checkout(items("cpus", 2) + items("gpus", 3) + items("gpus", 1))
    assert abc.getstate() == before


def test_unknown_type_raises_type_error_and_changes_nothing(abc: ResourcePool) -> None:
    before = abc.getstate()
    with pytest.raises(TypeError, match="fpgas"):
        abc.checkout(items("gpus", 1) + items("fpgas", 1))
    with pytest.raises(errors.UnknownResourceType):
        abc.checkout(items("gpu", 1))  # canary matches request types exactly
    assert abc.getstate() == before


@pytest.mark.parametrize(
    "request_",
    [[{"type": "gpus", "slots": -1}], [{"type": "gpus", "slots": 1.5}], [{"slots": 1}], ["gpus"]],
)
def test_malformed_request_items_are_rejected(abc: ResourcePool, request_: list[Any]) -> None:
    before = abc.getstate()
    with pytest.raises(errors.RequestError, match=r"request\[0\]"):
        abc.checkout(request_)
    with pytest.raises(ValueError):
        abc.accommodates(request_)
    assert abc.getstate() == before


def test_empty_pool_raises() -> None:
    for pool in (ResourcePool(), ResourcePool({}), ResourcePool(None)):
        assert pool.empty()
        with pytest.raises(EmptyResourcePoolError):
            pool.checkout(items("cpus", 1))
        with pytest.raises(EmptyResourcePoolError):
            pool.accommodates(items("cpus", 1))


def test_cleared_pool_is_empty(abc: ResourcePool) -> None:
    abc.clear()
    assert abc.empty()
    assert abc.resources == {} and abc.additional_properties == {}
    assert abc.slots_per_resource_type == {}
    with pytest.raises(EmptyResourcePoolError):
        abc.checkout(items("gpus", 1))


# --- checkin ----------------------------------------------------------------------------------


def test_checkin_returns_slots_by_type_and_id(abc: ResourcePool) -> None:
    before = abc.getstate()
    got = abc.checkout(items("gpus", 3) + items("cpus", 2))
    assert abc.getstate() != before
    abc.checkin(got)
    assert abc.getstate() == before


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"gpus": [{"id": "z", "slots": 1}]}, "unknown ID"),
        ({"fpgas": [{"id": "a", "slots": 1}]}, "unknown type"),
        ({"gpus": [{"id": "b", "slots": 2}]}, "overfill gpus 'b': 0 free"),  # capacity 1
        # each entry fits alone, together they overfill a (1 free + 4 > 4)
        ({"gpus": [{"id": "a", "slots": 2}, {"id": "a", "slots": 2}]}, "overfill gpus 'a'"),
        ({"gpus": [{"id": "a", "slots": -1}]}, "whole number"),
        ({"gpus": ["a"]}, "malformed"),
    ],
)
def test_failing_checkin_changes_nothing(
    abc: ResourcePool, returned: dict[str, list[Any]], message: str
) -> None:
    abc.checkout(items("gpus", 1))  # takes b
    abc.checkout(items("gpus", 1))  # takes c (2 free) -> c:1
    abc.checkout(items("gpus", 1, slots=3))  # a: 1 free of 4
    abc.checkout(items("cpus", 1))
    before = abc.getstate()
    # a valid entry first, so a half-applied checkin would show
    with pytest.raises(ValueError, match=message):
        abc.checkin({"cpus": [{"id": "0", "slots": 1}], **returned})
    assert abc.getstate() == before


def test_checking_in_the_same_allocation_twice_is_rejected(abc: ResourcePool) -> None:
    got = abc.checkout(items("gpus", 1))
    abc.checkin(got)
    full = abc.getstate()
    with pytest.raises(ValueError, match="overfill"):
        abc.checkin(got)
    assert abc.getstate() == full


# --- capacity and accommodates ----------------------------------------------------------------


def test_slots_per_resource_type_is_configured_capacity(abc: ResourcePool) -> None:
    assert abc.slots_per_resource_type == {"gpus": 7, "cpus": 2}
    got = abc.checkout(items("gpus", 3) + items("cpus", 1))
    assert abc.slots_per_resource_type == {"gpus": 7, "cpus": 2}
    abc.checkin(got)
    assert abc.slots_per_resource_type == {"gpus": 7, "cpus": 2}
    assert abc.pop("cpus") == [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}]
    assert abc.slots_per_resource_type == {"gpus": 7}
    assert abc.pop("cpus") is None
    abc.populate(cpus=3, gpus=1)
    assert abc.slots_per_resource_type == {"cpus": 3, "gpus": 1}


def test_accommodates_answers_against_capacity_not_free_slots(abc: ResourcePool) -> None:
    abc.checkout(items("gpus", 1, slots=4) + items("gpus", 1, slots=2) + items("gpus", 1))
    assert abc.accommodates(items("gpus", 7))  # could run here, once the gpus come back
    with pytest.raises(ResourceUnavailable):
        abc.checkout(items("gpus", 1))


def test_accommodates_names_missing_types(abc: ResourcePool) -> None:
    one = abc.accommodates(items("fpgas", 1) + items("gpus", 1))
    assert not one
    assert one.reason == "Resource unavailable: fpgas"
    two = abc.accommodates(items("tpus", 1) + items("fpgas", 2))
    assert two.reason == "Resources unavailable: fpgas,tpus"


def test_accommodates_names_short_types_with_requested_and_available(abc: ResourcePool) -> None:
    outcome = abc.accommodates(items("gpus", 8) + items("cpus", 3))
    assert not outcome
    assert outcome.reason == (
        "insufficient slots of cpus (requested 3, available 2), gpus (requested 8, available 7)"
    )
    assert abc.accommodates(items("gpus", 7) + items("cpus", 2))
    assert abc.accommodates([])


# --- configuration: count, populate, fill, types, getstate, dump ------------------------------


def test_count_singular_plural_nodes_and_unknown(abc: ResourcePool) -> None:
    assert abc.count("gpus") == abc.count("gpu") == 3
    assert abc.count("cpu") == 2
    assert abc.count("nodes") == abc.count("node") == 1
    assert "nodes" not in abc.additional_properties  # asking does not write into the pool
    with pytest.raises(ResourceUnavailable, match="fpga"):
        abc.count("fpga")
    multi = ResourcePool({"cpus": 1, "additional_properties": {"nodes": {"count": 4}}})
    assert multi.count("nodes") == 4


def test_populate_builds_ids_with_one_slot() -> None:
    pool = ResourcePool()
    pool.populate(cpus=8, gpus=2)
    assert pool.resources["cpus"] == [{"id": str(i), "slots": 1} for i in range(8)]
    assert [g["id"] for g in pool.resources["gpus"]] == ["0", "1"]
    assert pool.types == ["cpus", "gpus"]


def test_populate_defaults_to_physical_cores_and_no_gpus() -> None:
    pool = ResourcePool()
    pool.populate()
    assert pool.count("cpus") == psutil.cpu_count(logical=False)
    assert pool.resources["gpus"] == []


def test_shorthand_and_fill_adds_empty_gpus() -> None:
    assert ResourcePool({"gpus": 2}).resources == {
        "gpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}]
    }
    cpus_only = ResourcePool({"cpus": 2})
    assert cpus_only.resources["gpus"] == []
    assert cpus_only.slots_per_resource_type["gpus"] == 0
    assert not cpus_only.accommodates(items("gpus", 1))


def test_fill_coerces_ids_defaults_slots_and_copies_its_input() -> None:
    doc = {"resources": {"gpus": [{"id": 7}, {"id": "x", "slots": 3}]}, "cpus": 1}
    pool = ResourcePool(doc)
    assert pool.resources == {
        "gpus": [{"id": "7", "slots": 1}, {"id": "x", "slots": 3}],
        "cpus": [{"id": "0", "slots": 1}],
    }
    pool.checkout(items("gpus", 1, slots=3))
    assert doc["resources"]["gpus"][1]["slots"] == 3  # the caller's dicts are untouched


def test_fill_replaces_everything() -> None:
    pool = ResourcePool({"cpus": 4, "additional_properties": {"site": "a"}})
    pool.fill({"fpgas": 1})
    assert pool.types == ["fpgas", "gpus"]
    assert pool.additional_properties == {}
    assert pool.slots_per_resource_type == {"fpgas": 1, "gpus": 0}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"resources": {"gpus": [{"id": "0", "slots": -1}]}},
            r"resources.gpus\[0\].slots: .* got -1",
        ),
        (
            {"resources": {"gpus": [{"id": "0", "slots": True}]}},
            r"resources.gpus\[0\].slots: .* got True",
        ),
        ({"resources": {"gpus": [{"slots": 1}]}}, r"resources.gpus\[0\]: expected a mapping"),
        ({"resources": {"gpus": [{"id": "0", "uuid": "GPU-1"}]}}, "unexpected key.*uuid"),
        ({"resources": {"gpus": [{"id": "0"}, {"id": 0}]}}, r"gpus\[1\].id: duplicate id '0'"),
        ({"resources": {"gpus": {"id": "0"}}}, "resources.gpus: expected a list"),
        ({"resources": ["gpus"]}, "resources: expected a mapping"),
        ({"gpus": "two"}, "gpus: expected a count"),
        ({"gpus": -2}, "gpus: expected a count"),
        ({"additional_properties": []}, "additional_properties: expected a mapping"),
        ({"resource_pool": 3}, "resource_pool: expected a mapping"),
    ],
)
def test_fill_rejects_bad_documents(doc: dict[str, Any], message: str) -> None:
    pool = ResourcePool({"cpus": 1})
    before = pool.getstate()
    with pytest.raises(errors.PoolFormatError, match=message):
        pool.fill(doc)
    assert pool.getstate() == before  # a rejected document leaves the old pool in place


def test_types_are_sorted() -> None:
    pool = ResourcePool({"resources": {"zeta": [{"id": "0"}]}, "cpus": 1, "alpha": 1})
    assert pool.types == ["alpha", "cpus", "gpus", "zeta"]
    assert "zeta" in pool and "beta" not in pool


def test_getstate_is_a_deep_copy(abc: ResourcePool) -> None:
    abc.additional_properties["site"] = {"rack": 1}
    state = abc.getstate()
    assert set(state) == {"additional_properties", "resources"}
    state["resources"]["gpus"][0]["slots"] = 99
    state["additional_properties"]["site"]["rack"] = 2
    assert abc.resources["gpus"][0]["slots"] == 4
    assert abc.additional_properties["site"]["rack"] == 1
    assert ResourcePool(abc.getstate()).getstate() == abc.getstate()


def test_dump_writes_resource_pool_yaml_that_reads_back(abc: ResourcePool) -> None:
    abc.additional_properties["nodes"] = {"count": 2}
    file = io.StringIO()
    abc.dump(file)
    doc = yaml.safe_load(file.getvalue())
    assert doc == {"resource_pool": abc.getstate()}
    assert ResourcePool(doc["resource_pool"]).getstate() == abc.getstate()
    assert repr(abc) == file.getvalue()


# --- the building blocks ------------------------------------------------------------------------


def test_transaction_rolls_back_on_exception_inside_with() -> None:
    resources = {"gpus": [{"id": "0", "slots": 2}, {"id": "1", "slots": 1}]}
    inventory = Inventory(resources)
    assert inventory.slots_available("gpus") == 3
    assert inventory.slots_available("cpus") == 0
    with pytest.raises(ResourceUnavailable), AllocationTransaction(inventory) as tx:
        for _ in range(4):
            got = Allocator().acquire(inventory, "gpus", 1)
            tx.record("gpus", got["id"], 1)
    assert tx.deltas == []
    assert resources == {"gpus": [{"id": "0", "slots": 2}, {"id": "1", "slots": 1}]}


def test_transaction_explicit_rollback_once() -> None:
    resources = {"gpus": [{"id": "0", "slots": 2}]}
    inventory = Inventory(resources)
    with AllocationTransaction(inventory) as tx:
        got = Allocator().acquire(inventory, "gpus", 2)
        tx.record("gpus", got["id"], 2)
    assert got == {"id": "0", "slots": 2}
    assert tx.deltas == [("gpus", "0", 2)]  # a clean exit keeps the allocation
    assert inventory.slots_available("gpus") == 0
    tx.rollback()
    tx.rollback()
    assert resources["gpus"][0]["slots"] == 2


def test_allocator_unknown_type() -> None:
    with pytest.raises(TypeError):
        Allocator().acquire(Inventory({}), "gpus", 1)


def test_exceptions_are_the_package_errors() -> None:
    assert ResourceUnavailable is errors.ResourceUnavailable
    assert EmptyResourcePoolError is errors.EmptyResourcePoolError
    assert issubclass(ResourceUnavailable, Exception)


# --- make_resource_pool -------------------------------------------------------------------------

FLAT = {"additional_properties": {"site": "x"}, "resources": {"gpus": [{"id": "0", "slots": 2}]}}


@pytest.mark.parametrize(
    "config",
    [
        {"resource_pool": FLAT},
        FLAT,
        types.SimpleNamespace(resource_pool=FLAT),
        {"resource_pool": FLAT, "other_section": {"ignored": True}},
    ],
    ids=["mapping-section", "bare", "attribute", "with-other-sections"],
)
def test_make_resource_pool_from_mappings_and_objects(config: Any) -> None:
    pool = make_resource_pool(config)
    assert pool.getstate() == FLAT
    pool.checkout(items("gpus", 1, slots=2))
    assert FLAT["resources"]["gpus"][0]["slots"] == 2


def test_make_resource_pool_from_an_empty_ctest_spec(tmp_path: Path) -> None:
    """`local: []` is a spec ctest reads; it once failed with "expected exactly one node"."""
    path = tmp_path / "spec.json"
    path.write_text('{"version": {"major": 1, "minor": 0}, "local": []}')
    pool = make_resource_pool(str(path))
    assert pool.count("gpus") == 0 and not pool.accommodates([{"type": "gpus", "slots": 1}])


def test_make_resource_pool_shorthand_and_defaults() -> None:
    assert make_resource_pool({"resource_pool": {"cpus": 3}}).slots_per_resource_type == {
        "cpus": 3,
        "gpus": 0,
    }
    cores = psutil.cpu_count(logical=False)
    for config in ({"resource_pool": None}, {}, types.SimpleNamespace(resource_pool=None)):
        assert make_resource_pool(config).count("cpus") == cores


@pytest.mark.parametrize("config", [42, {"resource_pool": 42}, types.SimpleNamespace()])
def test_make_resource_pool_rejects_other_things(config: Any) -> None:
    with pytest.raises(errors.ConfigError, match="make_resource_pool"):
        make_resource_pool(config)


NODE_FORM = {
    "resource_pool": {
        "additional_properties": {"site": "x"},
        "nodes": [
            {
                "id": "n0",
                "resources": {
                    "cpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}],
                    "gpus": [{"id": "0", "slots": 1, "properties": {"vendor": "NVIDIA"}}],
                },
            }
        ],
    }
}
CTEST = {"version": {"major": 1, "minor": 0}, "local": [{"gpus": [{"id": "0", "slots": 2}]}]}
NODE_FLAT = {
    "additional_properties": {"site": "x"},
    "resources": {
        "cpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}],
        "gpus": [{"id": "0", "slots": 1}],
    },
}
CTEST_FLAT = {"additional_properties": {}, "resources": {"gpus": [{"id": "0", "slots": 2}]}}


@pytest.mark.parametrize(
    ("doc", "flat"),
    [(NODE_FORM, NODE_FLAT), (NODE_FORM["resource_pool"], NODE_FLAT), (CTEST, CTEST_FLAT)],
    ids=["node-form", "node-form-bare", "ctest"],
)
def test_node_form_and_ctest_mappings_are_flattened(doc: Any, flat: dict[str, Any]) -> None:
    assert make_resource_pool(doc).getstate() == flat
    assert ResourcePool(doc).getstate() == flat


def test_a_pool_of_several_nodes_cannot_be_flattened() -> None:
    two = {"nodes": [{"id": n, "resources": {"cpus": [{"id": "0", "slots": 1}]}} for n in "ab"]}
    with pytest.raises(errors.PoolFormatError, match="exactly one node, found 2"):
        make_resource_pool(two)


def test_make_resource_pool_from_files(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"resource_pool": FLAT}))
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump(NODE_FORM))
    ctest = tmp_path / "spec.json"
    ctest.write_text(json.dumps(CTEST))
    assert make_resource_pool(flat).getstate() == FLAT
    assert make_resource_pool(str(nodes)).getstate() == NODE_FLAT
    assert make_resource_pool({"resource_pool": ctest}).getstate() == CTEST_FLAT


def test_make_resource_pool_bad_file_is_a_pool_format_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"resource_pool": {"resources": {"gpus": [{"slots": -1}]}}}))
    with pytest.raises(errors.RpoolAgentError, match=r"bad\.yaml"):
        make_resource_pool(bad)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, "missing key: resources"),
        ({"additional_properties": {}}, "missing key: resources"),
        ({"cpus": -1}, "cpus: expected a count"),
        ({"resources": {"gpus": [{"slots": 1}]}}, "expected a mapping with an id"),
        ([], "expected a mapping"),
    ],
)
def test_resource_pool_schema_refuses_what_canarys_refuses(data: object, says: str) -> None:
    """canary's own test of the schema's happy path runs in tests/canary; these are the
    documents its schema refuses (with SchemaError; ours with PoolFormatError)."""
    from rpool_agent.rpool import resource_pool_schema

    with pytest.raises(errors.PoolFormatError, match=says):
        resource_pool_schema.validate(data)
