"""Shared fixtures. Helpers that many test files need live here; nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def trees() -> Path:
    """Recorded /sys + /proc trees, one folder per machine."""
    return TESTS / "trees"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A root-owned 0755 directory another user can reach (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rpool-public-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


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
