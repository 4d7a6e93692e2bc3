"""Checks of operation arguments beyond the frame's shape (calls.parse_call): values
that the allocator must never see wrong (a timeout no float can hold) or half-parsed."""

from __future__ import annotations

from typing import Any

from .errors import ProtocolError


def timeout_arg(value: Any) -> float | None:
    """Seconds >= 0 as a float, or None; a number no float can hold (401 digits) too is
    malformed, not an OverflowError deep in the allocator."""
    if value is None:
        return None
    bad = ProtocolError("'timeout' must be a number >= 0 or null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    try:
        seconds = float(value)
    except OverflowError:
        raise bad from None
    if not seconds >= 0 or seconds == float("inf"):
        raise bad
    return seconds


def resource_arg(value: Any) -> tuple[str, str]:
    if not isinstance(value, str) or ":" not in value:
        raise ProtocolError("'resource' must be 'TYPE:ID'")
    rtype, _, rid = value.partition(":")
    return rtype, rid
