"""Shared fixtures. Helpers that many test files need live here; nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def trees() -> Path:
    """Recorded /sys + /proc trees, one folder per machine."""
    return TESTS / "trees"
