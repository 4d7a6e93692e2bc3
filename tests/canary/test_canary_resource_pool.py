# canary's own tests of its ResourcePool, run against rpool_agent.rpool unchanged but for
# the two imports below (theirs: `import _canary.resource_pool.schemas as schemas` and
# `from _canary.resource_pool import ResourcePool`).
#
# Provenance: github.com/sandialabs/canary, tests/resource_pool.py at commit
# 342422786c4ca78756327e57bee33931c9477f60 (2026-05-17), the last version of the flat-form
# ResourcePool that rpool_agent.rpool mirrors (canary-wm <= 26.4). canary is MIT-licensed:
# Copyright 2025 National Technology & Engineering Solutions of Sandia, LLC (NTESS).
#
# Copyright NTESS. See COPYRIGHT file for details.
#
# SPDX-License-Identifier: MIT


import rpool_agent.rpool as schemas
from rpool_agent.rpool import ResourcePool


def test_fill_simple():
    data = {"cpus": 2, "gpus": 1}
    validated = schemas.resource_pool_schema.validate(data)
    assert validated["resources"] == {
        "cpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}],
        "gpus": [{"id": "0", "slots": 1}],
    }


class Job:
    def required_resources(self) -> list[dict[str, object]]:
        group: list[dict[str, object]] = []
        group.extend([{"type": "cpus", "slots": 1} for _ in range(2)])
        group.extend([{"type": "gpus", "slots": 1} for _ in range(2)])
        # by default, only one resource group is returned
        return group


def test_resource_pool_checkout():
    job = Job()
    pool = ResourcePool()
    pool.populate(cpus=4, gpus=4)
    resources = pool.checkout(job.required_resources())
    expected = {
        "cpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}],
        "gpus": [{"id": "0", "slots": 1}, {"id": "1", "slots": 1}],
    }
    assert resources == expected
    assert pool.resources == {
        "cpus": [
            {"id": "0", "slots": 0},
            {"id": "1", "slots": 0},
            {"id": "2", "slots": 1},
            {"id": "3", "slots": 1},
        ],
        "gpus": [
            {"id": "0", "slots": 0},
            {"id": "1", "slots": 0},
            {"id": "2", "slots": 1},
            {"id": "3", "slots": 1},
        ],
    }


def test_resource_populate():
    rp = ResourcePool()
    rp.populate(cpus=1, gpus=1)
    assert rp.resources == {
        "cpus": [{"id": "0", "slots": 1}],
        "gpus": [{"id": "0", "slots": 1}],
    }


def test_resource_populate_nogpu():
    rp = ResourcePool()
    rp.populate(cpus=1, gpus=0)
    assert rp.resources == {"cpus": [{"id": "0", "slots": 1}], "gpus": []}


def test_resource_pool_fill():
    rp = ResourcePool()
    pool = {
        "additional_properties": {"baz": "spam"},
        "resources": {
            "cpus": [{"id": "01", "slots": 2}, {"id": "ab", "slots": 3}],
            "gpus": [{"id": "02", "slots": 4}, {"id": "cd", "slots": 3}],
        },
    }
    rp.fill(pool)


def test_resource_checkout():
    rp = ResourcePool()
    pool = {
        "additional_properties": {"baz": "spam"},
        "resources": {
            "cpus": [{"id": "01", "slots": 2}, {"id": "ab", "slots": 3}],
            "gpus": [{"id": "02", "slots": 3}, {"id": "cd", "slots": 5}],
        },
    }
    rp.fill(pool)
    x = rp.checkout([{"type": "cpus", "slots": 1}, {"type": "gpus", "slots": 1}])
    assert x == {"cpus": [{"id": "01", "slots": 1}], "gpus": [{"id": "02", "slots": 1}]}
    rp.checkin(x)
    x = rp.checkout([{"type": "cpus", "slots": 3}, {"type": "gpus", "slots": 3}])
    assert x == {"cpus": [{"id": "ab", "slots": 3}], "gpus": [{"id": "02", "slots": 3}]}
