"""The small YAML emitter: whatever it writes, PyYAML's safe_load reads back as the same data."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rpool_agent.errors import PoolFormatError
from rpool_agent.formats.yaml_emit import dumps

# Strings YAML 1.1 would turn into something else, or that need quoting or escaping.
TRICKY = [
    "",
    "yes",
    "No",
    "ON",
    "off",
    "TRUE",
    "null",
    "Null",
    "~",
    "y",
    "n",
    "0",
    "01",
    "010",
    "-1",
    "+1",
    "1e3",
    "1.5",
    "1_000",
    "0x1F",
    "0o7",
    "0b101",
    "1:20",
    "1:20.5",
    ".inf",
    "-.inf",
    ".nan",
    ".NaN",
    "=",
    "<<",
    "-",
    "- a",
    "a: b",
    "a:b",
    "#x",
    "a #b",
    "@x",
    "`x",
    "!x",
    "&a",
    "*a",
    "|",
    ">",
    "%x",
    "?",
    "? a",
    "'",
    '"',
    "\\",
    "a\\b",
    "{a}",
    "[a]",
    "a,b",
    " lead",
    "trail ",
    "\t",
    "\n",
    "a\nb",
    "\r\n",
    "\x00",
    "\x07",
    "\x7f",
    "\x85",
    "\xa0",
    "\u2028",
    "\ufeff",
    "\ufffe",
    "\ud800",
    "é",
    "😀",
    "2001-12-14",
    "2001-12-14 21:59:43.10 -5",
    "GPU-8a1b2c3d-0000",
    "00000000:3B:00.0",
    "MIG-1a/2/0",
    "NVIDIA H200",
    "k" * 1500,
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text()
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=5)
    | st.sampled_from(TRICKY)
    | st.dates()
)
keys = st.text(max_size=12) | st.sampled_from(TRICKY) | st.integers() | st.booleans()
data = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN and a bool is not an int."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, data, max_size=5))
def test_safe_load_reads_back_what_was_written(doc: dict[Any, Any]) -> None:
    text = dumps(doc)
    assert same(yaml.safe_load(text), doc), text


@pytest.mark.parametrize("s", TRICKY)
def test_tricky_strings_stay_strings(s: str) -> None:
    text = dumps({"id": s, s: [s], "nested": {"list": [{"id": s, "slots": 1}]}})
    assert yaml.safe_load(text) == {"id": s, s: [s], "nested": {"list": [{"id": s, "slots": 1}]}}


def test_layout_is_readable_block_style() -> None:
    doc = {
        "resource_pool": {
            "additional_properties": {},
            "resources": {
                "gpus": [
                    {"id": "0", "slots": 1, "properties": {"uuid": "GPU-1a", "threads": [0, 4]}}
                ]
            },
        }
    }
    assert dumps(doc) == (
        "resource_pool:\n"
        "  additional_properties: {}\n"
        "  resources:\n"
        "    gpus:\n"
        '      - id: "0"\n'
        "        slots: 1\n"
        "        properties:\n"
        "          uuid: GPU-1a\n"
        "          threads: [0, 4]\n"
    )


def test_datetimes_round_trip() -> None:
    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    assert yaml.safe_load(dumps({"t": when}))["t"] == when


def test_unwritable_value_names_its_place() -> None:
    with pytest.raises(PoolFormatError, match=r"^a\.b\[1\]: cannot write a set in YAML$"):
        dumps({"a": {"b": [1, {2}]}})
