"""Every command answers --help, and the root --version, without touching an agent."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from rpool_agent._version import __version__
from rpool_agent.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_the_command_set() -> None:
    expected = {"detect", "validate", "convert", "serve", "run", "acquire", "release"}
    expected |= {"status", "drain", "undrain", "reload", "install-units"}
    assert set(COMMANDS) == expected


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert command in result.output


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"rpool-agent {__version__}"
