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


@pytest.fixture
def system_tool():
    """`system_tool("systemd-analyze")`: the program's path. Skips where it is missing, but
    fails in CI (CI=true), where .ci/run installs it: a test that needs it must run there."""
    import os
    import shutil

    def find(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            message = f"{name} is not installed (Debian package: systemd)"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(message)
            pytest.skip(message)
        return path

    return find
