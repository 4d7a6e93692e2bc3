"""Requests: the three forms, the exact CTest RESOURCE_GROUPS grammar, clear errors."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpool_agent import requests as requests_module
from rpool_agent.errors import RequestError
from rpool_agent.requests import (
    MAX_UNITS,
    Request,
    Unit,
    format_resource_groups,
    parse_request,
)

G1, C1, C4 = Unit("gpus", 1), Unit("cpus", 1), Unit("cpus", 4)

# --- the three forms ---------------------------------------------------------------------


def test_item_list_is_one_group() -> None:
    r = parse_request([{"type": "gpus", "slots": 1}, {"type": "cpus", "slots": 4}])
    assert r == Request(((G1, C4),))
    assert not r.distinct
    assert r.types() == frozenset({"gpus", "cpus"})
    assert r.totals() == {"gpus": 1, "cpus": 4}


def test_item_slots_default_to_one_and_list_of_groups() -> None:
    assert parse_request([{"type": "gpus"}]) == Request(((G1,),))
    r = parse_request([[{"type": "gpus", "slots": 1}], [{"type": "cpus", "slots": 4}]])
    assert r.groups == ((G1,), (C4,))


def test_mapping_is_one_distinct_group_of_single_slots() -> None:
    r = parse_request({"gpus": 2, "cpus": 1, "licenses": 0})
    assert r.groups == ((G1, G1, C1),)
    assert r.distinct
    assert parse_request({}) == Request(())


def test_empty_forms_ask_for_nothing() -> None:
    for value in ([], {}, "", ";", "0,gpus:1", {"gpus": 0}):
        assert parse_request(value).groups == (), value


@pytest.mark.parametrize(
    ("text", "groups"),
    [
        ("gpus:1", ((G1,),)),
        ("2,gpus:1;cpus:4", ((G1,), (G1,), (C4,))),
        ("gpus:1,cpus:4", ((G1, C4),)),
        ("0,gpus:1", ()),  # a zero count: no group at all
        ("gpus:1;;cpus:1", ((G1,), (C1,))),  # empty items are skipped
        ("gpus:1,,cpus:1", ((G1, C1),)),
        ("gpus:1,;cpus:1", ((G1, C1),)),  # CTest's lexer: ",;" does not close the group
        ("2;gpus:1", ((), (), (G1,))),  # a bare count is that many empty groups
        ("gpus:0", ((Unit("gpus", 0),),)),
        ("gpus:01", ((G1,),)),
        (";gpus:1;", ((G1,),)),
        ("gpus:1,", ((G1,),)),
    ],
)
def test_resource_groups_grammar(text: str, groups: tuple[tuple[Unit, ...], ...]) -> None:
    assert parse_request(text).groups == groups


def test_singular_names_parse_as_given() -> None:
    # "gpu" is a valid type name; the allocator maps it to "gpus" when the pool has those
    assert parse_request("gpu:1").groups == ((Unit("gpu", 1),),)


# --- bad input: one clear message each ---------------------------------------------------

BAD = [
    ("gpus: 1", r"unexpected ' ', expected a slot count .* at offset 5"),
    ("GPUs:1", r"invalid type name 'GPUs'"),
    ("gpus", r"type 'gpus' needs ':slots'"),
    ("gpu-s:1", r"invalid type name 'gpu-s'"),
    (",gpus:1", r"unexpected ','"),
    ("gpus:-1", r"unexpected '-'"),
    ("gpus:1x", r"unexpected 'x', expected ',' or ';'"),
    ("2,2", r"unexpected '2', expected type:slots"),
    ("gpus:", r"string ends, expected a slot count"),
    ("gpus:1 ", r"unexpected ' '"),
    ("gpus:99999999999999999", r"too large"),
    ("gpus:4294967296", r"more than 4294967295"),
    ("99999999,gpus:1", r"group count 99999999 is too large"),
    ("70000,gpus:1", r"group count 70000 is too large"),
    ("60000,gpus:1,gpus:1", r"more than 65536 units"),
    ({"gpus": True}, r"count of 'gpus' must be a whole number, not bool"),
    ({"gpus": -1}, r"count of 'gpus' must be >= 0, not -1"),
    ({"gpus": 1.0}, r"whole number, not float"),
    ({"gpus": 10**30}, r"at most 65536 units"),
    ({"gpus": "2"}, r"whole number, not str"),
    ({"GPUs": 1}, r"invalid resource type 'GPUs'"),
    ({1: 1}, r"resource type must be a string, not int"),
    ({"gpus": None}, r"not null"),
    ([{"type": "gpus", "slots": True}], r"item 0: 'slots' must be a whole number, not bool"),
    ([{"type": "gpus", "slots": -2}], r"item 0: 'slots' must be >= 0"),
    ([{"type": "gpus", "slots": 2**40}], r"at most 4294967295"),
    ([{"slots": 1}], r"item 0: missing 'type'"),
    ([{"type": 5}], r"'type' must be a string, not int"),
    ([{"type": "gpus", "count": 1}], r"unknown key 'count'"),
    ([{"type": "gpus"}, "cpus"], r"item 1: expected \{'type'"),
    ([[{"type": "gpus"}], {"type": "cpus"}], r"item 0: expected \{'type'.*not list"),
    ([[{"type": "gpus"}], [7]], r"group 1: item 0"),
    ([{"type": "gpus\n"}], r"invalid resource type"),
    (None, r"not null"),
    (3, r"an item list, a \{type: count\} mapping or a RESOURCE_GROUPS string, not int"),
    (b"gpus:1", r"not bytes"),
]


@pytest.mark.parametrize(("value", "message"), BAD, ids=[repr(v)[:30] for v, _ in BAD])
def test_bad_requests_are_refused_clearly(value: object, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse_request(value)


def test_value_types_refuse_bad_fields() -> None:
    with pytest.raises(RequestError, match="whole number, not bool"):
        Unit("gpus", True)
    with pytest.raises(RequestError, match="invalid resource type"):
        Unit("GPU", 1)
    with pytest.raises(RequestError, match="one group of 1-slot units"):
        Request(((Unit("gpus", 2),),), distinct=True)
    with pytest.raises(RequestError, match="holds Units"):
        Request(((("gpus", 1),),))  # type: ignore[arg-type]


# --- round trips -------------------------------------------------------------------------

units = st.builds(Unit, st.sampled_from(["gpus", "cpus", "a_b"]), st.integers(0, 5))
requests = st.one_of(
    st.builds(Request, st.lists(st.lists(units, max_size=3).map(tuple), max_size=4).map(tuple)),
    st.dictionaries(st.sampled_from(["gpus", "cpus"]), st.integers(0, 3)).map(parse_request),
)


@given(requests)
def test_wire_round_trips(request: Request) -> None:
    wire = request.to_wire()
    assert parse_request(json.loads(json.dumps(wire))) == request


@given(requests)
def test_resource_groups_string_round_trips(request: Request) -> None:
    text = format_resource_groups(request)
    back = parse_request(text)
    assert back.groups == request.groups


def test_format_uses_ctest_repeat_counts() -> None:
    assert format_resource_groups(parse_request("gpus:1;gpus:1;cpus:4")) == "2,gpus:1;cpus:4"
    assert format_resource_groups(Request(((), (), (G1,)))) == "2;gpus:1"
    assert format_resource_groups(parse_request({"gpus": 2})) == "gpus:1,gpus:1"


def test_limit_is_large_enough_for_big_nodes() -> None:
    assert len(parse_request({"cpus": 1024}).units()) == 1024
    assert len(parse_request(f"{MAX_UNITS},gpus:1").units()) == MAX_UNITS


# --- the parse cache ---------------------------------------------------------------------

#: Wire values as a decoder hands them over, good and bad, with the look-alikes a cache
#: keyed on `==` would confuse (True == 1 == 1.0)
counts = st.one_of(st.integers(-1, 3), st.booleans(), st.just(1.0), st.just("1"), st.none())
names = st.sampled_from(["gpus", "cpus", "gpu", "GPUs", "a-b"])
items = st.dictionaries(st.sampled_from(["type", "slots", "count"]), st.one_of(names, counts))
wire_values = st.one_of(
    st.dictionaries(names, counts, max_size=3),
    st.lists(items, max_size=3),
    st.lists(st.lists(items, max_size=2), min_size=1, max_size=3),
    st.lists(st.one_of(items, st.lists(items, max_size=1)), max_size=3),
    st.text(alphabet="gpus:0123,; ", max_size=12),
)


def _outcome(parse: Any, value: object) -> object:
    try:
        return parse(value)
    except RequestError as exc:
        return str(exc)


@given(wire_values)
def test_cached_parse_reads_like_an_uncached_one(value: object) -> None:
    first = _outcome(parse_request, value)
    assert first == _outcome(requests_module._parse, value)
    again = _outcome(parse_request, json.loads(json.dumps(value)))  # an equal, fresh value
    assert again == first
    if isinstance(first, Request):
        assert again.distinct == first.distinct


def test_cache_keeps_look_alike_counts_apart() -> None:
    assert parse_request({"gpus": 1}).units() == (G1,)
    for bad in ({"gpus": True}, {"gpus": 1.0}, [{"type": "gpus", "slots": True}]):
        with pytest.raises(RequestError, match="whole number"):
            parse_request(bad)
    assert parse_request([{"type": "gpus", "slots": 1}]).distinct is False
    assert parse_request({"gpus": 1}).distinct is True
    # the same wire value, decoded twice: one Request, read once
    assert parse_request({"gpus": 2, "cpus": 1}) is parse_request({"gpus": 2, "cpus": 1})


def test_pickled_requests_hash_afresh() -> None:
    # string hashes are salted per process: a hash cached in one must not travel
    r = parse_request({"gpus": 2, "cpus": 1})
    hash(r)
    back = pickle.loads(pickle.dumps(r))
    assert "_hash" not in back.__dict__
    assert back == r and hash(back) == hash(r) and back.units() == r.units()


def test_cache_is_bounded() -> None:
    cache = requests_module._cache
    for n in range(requests_module._CACHE_MAX + 50):
        parse_request(f"{n},gpus:0")
    assert len(cache) <= requests_module._CACHE_MAX
    big = parse_request({"cpus": requests_module._CACHE_UNITS + 1})
    assert all(v is not big for v in cache.values())  # large requests are not remembered


# --- the real ctest agrees ---------------------------------------------------------------


def _ctest_strings(n: int) -> list[str]:
    """Grammar corner cases, plus random strings shaped like the grammar with typos mixed in."""
    rng = random.Random(1234)
    typos = [",", ";", ",,", ";;", " ", "G", "gpus", ":", "-1", ""]

    def piece() -> str:
        if rng.random() < 0.15:
            return rng.choice(typos)
        if rng.random() < 0.25:
            return f"{rng.randint(0, 2)},"
        return f"{rng.choice(['gpus', 'cpus', 'a_b'])}:{rng.randint(0, 2)}"

    def one() -> str:
        out = ""
        for _ in range(rng.randint(1, 5)):
            out += piece() + rng.choice([",", ";", ";", "", ",;", ";;"])
        return out.rstrip(",;") if rng.random() < 0.5 else out

    fixed = ["2,gpus:1;cpus:4", "gpus:1,;cpus:1", "2;gpus:1", "3", ";", "0,gpus:1", "gpus: 1"]
    return fixed + [one() for _ in range(n)]


def _ours(text: str) -> list[dict[str, list[int]]] | None:
    try:
        req = parse_request(text)
    except RequestError:
        return None
    out = []
    for g in req.groups:
        per: dict[str, list[int]] = {}
        for u in g:
            per.setdefault(u.type, []).append(u.slots)
        out.append({t: sorted(v) for t, v in per.items()})
    return out


def _run_ctest(where: Path, strings: list[str]) -> tuple[set[int], str]:
    """Run ctest over one test per string: (indices ctest rejects, the -V log)."""
    lines = ["cmake_minimum_required(VERSION 3.16)", "project(rg NONE)", "enable_testing()"]
    for i, s in enumerate(strings):
        lines.append(f"add_test(NAME t{i} COMMAND ${{CMAKE_COMMAND}} -E environment)")
        lines.append(f'set_tests_properties(t{i} PROPERTIES RESOURCE_GROUPS "{s}")')
    where.mkdir()
    (where / "CMakeLists.txt").write_text("\n".join(lines) + "\n")
    spec = {"version": {"major": 1, "minor": 0}, "local": [{}]}
    for t in ("gpus", "cpus", "a_b"):
        spec["local"][0][t] = [{"id": "0", "slots": 1000}]
    (where / "spec.json").write_text(json.dumps(spec))
    build = where / "b"
    subprocess.run(["cmake", "-S", where, "-B", build], check=True, capture_output=True)
    out = subprocess.run(
        ["ctest", "--resource-spec-file", where / "spec.json", "-V"],
        cwd=build,
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = out.stdout + out.stderr
    testfile = (build / "CTestTestfile.cmake").read_text().splitlines()
    rejected = set()
    for m in re.finditer(r"CTestTestfile\.cmake:(\d+) \(set_tests_properties\)", log):
        name = re.search(r"set_tests_properties\(t(\d+) ", testfile[int(m[1]) - 1])
        assert name is not None
        rejected.add(int(name[1]))
    return rejected, log


@pytest.mark.skipif(shutil.which("ctest") is None, reason="needs cmake/ctest")
def test_grammar_matches_real_ctest(tmp_path: Path) -> None:
    strings = [s for s in dict.fromkeys(_ctest_strings(60)) if s]
    # 1. which strings ctest refuses (a refused one stops the whole run: nothing runs)
    rejected, _ = _run_ctest(tmp_path / "all", strings)
    assert 10 <= len(rejected) <= len(strings) - 10  # both kinds are exercised
    for i, s in enumerate(strings):
        assert (_ours(s) is None) == (i in rejected), f"RESOURCE_GROUPS {s!r}"
    # 2. the groups ctest hands out for the accepted ones
    accepted = [s for i, s in enumerate(strings) if i not in rejected]
    none, log = _run_ctest(tmp_path / "ok", accepted)
    assert not none
    for i, s in enumerate(accepted):  # ctest numbers the tests 1.. in the order added
        env = dict(re.findall(rf"^{i + 1}: (CTEST_RESOURCE_GROUP_\w+)=(.*)$", log, re.M))
        groups = []
        for g in range(int(env["CTEST_RESOURCE_GROUP_COUNT"])):
            per = {}
            for t in filter(None, env[f"CTEST_RESOURCE_GROUP_{g}"].split(",")):
                entries = env[f"CTEST_RESOURCE_GROUP_{g}_{t.upper()}"].split(";")
                per[t] = sorted(int(e.split("slots:")[1]) for e in entries)
            groups.append(per)
        assert _ours(s) == groups, f"RESOURCE_GROUPS {s!r}"
