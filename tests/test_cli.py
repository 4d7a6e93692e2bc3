"""The command line's shape: every command and option has help, nothing in it is cut or
left as a placeholder, -h and -V work. Help is read from the real script, piped, as a user
piping it to `less` or a terminal of 80 columns sees it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rpool_agent import formats
from rpool_agent._version import __version__
from rpool_agent.cli.options import POOL_FORMATS
from rpool_agent.cli.pools import DETECT_FORMATS

SCRIPT = Path(sys.executable).with_name("rpool-agent")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rpool_agent.cli"]


def cli(*args: str, columns: str | None = "80") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60)


def entries(help_text: str, section: str) -> dict[str, str]:
    """A help section's entries: what is listed (`-o FILE, --output FILE`) -> its help."""
    found: dict[str, str] = {}
    if f"\n{section}:\n" not in help_text:
        return found
    body = help_text.split(f"\n{section}:\n", 1)[1].split("\n\n", 1)[0]
    last = ""
    for line in body.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent <= 4 and not line.lstrip().startswith("COMMAND"):  # a new entry
            last, _, text = line.strip().partition("  ")
            found[last] = text.strip()
        elif last:  # its help, on the next line(s)
            found[last] = f"{found[last]} {line.strip()}".strip()
    return found


def option_names(help_text: str) -> set[str]:
    listed = entries(help_text, "options")
    return {word.split()[0] for entry in listed for word in entry.split(", ")}


@functools.cache
def wide_help(*command: str) -> str:
    """Help as wide as it gets: nothing wrapped."""
    return cli(*command, "--help", columns="1000").stdout


WIDE = wide_help()
COMMANDS = sorted(entries(WIDE, "commands"))


def test_the_command_set() -> None:
    expected = {"detect", "validate", "convert", "serve", "run", "acquire", "release"}
    expected |= {"status", "audit", "drain", "undrain", "reload", "install-units", "export", "job"}
    assert set(COMMANDS) == expected


def test_the_cli_spells_the_pool_formats_as_the_formats_package_does() -> None:
    assert formats.FORMATS == POOL_FORMATS
    assert (*formats.FORMATS, "json") == DETECT_FORMATS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_a_readable_placeholder(command: str) -> None:
    wide = wide_help(command)
    listed = {**entries(wide, "options"), **entries(wide, "positional arguments")}
    assert "-h, --help" in listed
    for entry, text in listed.items():
        assert text, f"{command}: {entry} has no help"
        for word in entry.replace(",", " ").split():  # option names and METAVARS only
            word = word.strip("[.]")
            assert not word or word.startswith("-") or word.isupper(), entry
    usage = wide.split("\n\n", 1)[0]
    assert "{" not in usage and "<" not in usage  # no {a,b} choices, no <str>


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("flag", "columns"), [("-h", "80"), ("--help", None)])  # None: piped
def test_help_shows_every_option_name_whole(command: str, flag: str, columns: str | None) -> None:
    names = option_names(wide_help(command))
    assert {"-h", "--help"} <= names
    done = cli(command, flag, columns=columns)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: rpool-agent {command}")
    assert option_names(done.stdout) == names
    assert max(map(len, done.stdout.splitlines())) <= 80, done.stdout


def test_top_level_help_lists_every_command_with_its_summary() -> None:
    listed = entries(WIDE, "commands")
    for command, summary in listed.items():
        assert summary, command
        assert cli(command, "--help").stdout.split("\n\n")[1] == summary
    for flag in ("-h", "--help"):
        done = cli(flag, columns=None)
        assert done.returncode == 0
        assert entries(done.stdout, "commands").keys() == listed.keys()


def test_no_command_prints_the_help_as_a_usage_error() -> None:
    done = cli(columns=None)
    assert done.returncode == 2
    assert done.stdout == "" and "detect" in done.stderr and "usage:" in done.stderr


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    done = cli(flag)
    assert done.returncode == 0
    assert done.stdout == f"rpool-agent {__version__}\n"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["detect", "--hyper"], "unrecognized arguments: --hyper"),  # no abbreviations
        (["detect", "extra"], "unrecognized arguments: extra"),
        (["release"], "the following arguments are required: LEASE"),
        (["convert", "x.yaml"], "the following arguments are required: -t/--to"),
        (["serve", "--max-message-bytes", "0"], "expected a whole number >= 1, got '0'"),
        (["serve", "--handshake-timeout", "0"], "expected a number of seconds >= 0.001"),
    ],
)
def test_usage_errors_name_the_command_and_exit_2(args: list[str], says: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert says in done.stderr
    usage = f"usage: rpool-agent {args[0]}" if args[0] in COMMANDS else "usage: rpool-agent"
    assert done.stderr.startswith(usage)
