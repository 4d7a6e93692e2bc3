"""The serve configuration: defaults < config file < command line, and broken files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpool_agent import config
from rpool_agent.config import ServeConfig, load_config_file, load_serve_config, merge
from rpool_agent.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- precedence ---------------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    cfg = merge({}, {})
    assert cfg == ServeConfig()
    assert (cfg.pool, cfg.socket, cfg.slots_per_gpu, cfg.socket_mode) == (None, None, 1, 0o660)
    assert (cfg.max_message_bytes, cfg.handshake_timeout, cfg.log_level) == (65536, 10.0, "info")


def test_file_over_defaults_and_given_cli_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "slots_per_gpu: 4\nhyperthreads: true\nsocket_group: rpool\nlog-level: DEBUG\n"
        "admin_group: wheel\n",
    )
    cli = {"slots_per_gpu": 2, "hyperthreads": None, "admin_group": "ops", "mig": False}
    cfg = load_serve_config(path, cli)
    assert cfg.slots_per_gpu == 2  # given on the command line: wins
    assert cfg.admin_group == "ops"
    assert cfg.mig is False  # given as False: still given
    assert cfg.hyperthreads is True  # None means "not given": the file shows through
    assert cfg.socket_group == "rpool"  # only in the file
    assert cfg.log_level == "debug"  # kebab-case key, any case of level
    assert cfg.max_connections_per_uid == 64  # in neither: default
    assert cfg.config_file == str(path)


def test_cli_option_names_are_accepted_and_checked() -> None:
    assert merge({}, {"slots-per-gpu": 3}).slots_per_gpu == 3
    with pytest.raises(ConfigError, match=r"^command line: --slots-per-gpu: expected an integer"):
        merge({}, {"slots_per_gpu": "many"})
    with pytest.raises(ConfigError, match=r"unknown key '--colour'"):
        merge({}, {"colour": "blue"})


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = write(tmp_path / "etc", "pool: pool.yaml\nstate_dir: ../state\nsocket: /run/x.sock\n")
    values = load_config_file(path)
    assert values["pool"] == str(tmp_path / "etc" / "pool.yaml")
    assert Path(values["state_dir"]).resolve() == tmp_path / "state"
    assert values["socket"] == "/run/x.sock"


@pytest.mark.parametrize(
    ("written", "mode"), [("0660", 0o660), ('"0640"', 0o640), ('"0o600"', 0o600), ("0777", 0o777)]
)
def test_socket_mode_is_octal(tmp_path: Path, written: str, mode: int) -> None:
    assert load_config_file(write(tmp_path, f"socket_mode: {written}\n"))["socket_mode"] == mode


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "# nothing set\n")) == {}


def test_shipped_example_loads(tmp_path: Path) -> None:
    from rpool_agent.install import unit_text

    values = load_config_file(write(tmp_path, unit_text("agent.yaml")))
    assert values["socket_group"] == "rpool"
    assert values["socket_mode"] == 0o660
    assert "pool" not in values  # detect by default


# --- broken files: one line naming file and key -------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slots_per_gpu: [1\n", r"agent\.yaml:2:1: invalid YAML: "),
        ("mig: true\n\tslots_per_gpu: 2\n", r"agent\.yaml:2:1: invalid YAML: a tab: YAML indents"),
        ("- a\n- b\n", r"agent\.yaml: expected a mapping of options, got list"),
        ("slot_per_gpu: 2\n", r"agent\.yaml: unknown key 'slot_per_gpu' \(known: pool, "),
        ("slots_per_gpu: two\n", r"agent\.yaml: slots_per_gpu: expected an integer, got 'two'"),
        ("slots_per_gpu: 0\n", r"slots_per_gpu: expected a positive integer, got 0"),
        ("slots_per_gpu: true\n", r"slots_per_gpu: expected an integer, got True"),
        ("hyperthreads: yes please\n", r"hyperthreads: expected true or false"),
        ("handshake_timeout: -1\n", r"handshake_timeout: expected a positive number of seconds"),
        ("handshake_timeout: .nan\n", r"handshake_timeout: expected a positive number"),
        ("socket_mode: 660\n", r"socket_mode: expected an octal mode such as 0660, got 660"),
        ("socket_mode: rw\n", r"socket_mode: expected an octal mode"),
        ("log_level: loud\n", r"log_level: expected one of debug, info, warning"),
        ("socket_group: 5\n", r"socket_group: expected a string, got 5"),
        ("pool: ''\n", r"pool: expected a string, got ''"),
        ("slots_per_gpu: 1\nslots-per-gpu: 2\n", r"slots-per-gpu: given twice"),
        ("config_file: x\n", r"unknown key 'config_file'"),
    ],
)
def test_broken_file_is_one_config_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file: No such file"):
        load_config_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"cannot read config file: Is a directory"):
        load_config_file(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.yaml: not a UTF-8 text file"):
        load_config_file(binary)


def test_broken_file_at_the_command_line_is_one_line(tmp_path: Path) -> None:
    """Through the real CLI: no traceback, non-zero exit (ConfigError via cli.main)."""
    path = write(tmp_path, "slots_per_gpu: two\n")
    code = (
        "import sys\nfrom rpool_agent.cli import main\n"
        "sys.argv = ['rpool-agent', 'serve', '--config', sys.argv[1]]\nmain()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"rpool-agent: {path}: slots_per_gpu: expected an integer, got 'two'"
    ]


# --- default paths ------------------------------------------------------------------------


def test_default_socket_path() -> None:
    assert config.default_socket_path({}, uid=0) == "/run/rpool-agent/agent.sock"
    user = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert config.default_socket_path(user, uid=1000) == "/run/user/1000/rpool-agent/agent.sock"
    forced = {"RPOOL_AGENT_SOCKET": "/tmp/a.sock", **user}
    assert config.default_socket_path(forced, uid=0) == "/tmp/a.sock"
    assert config.default_socket_path(forced, uid=1000) == "/tmp/a.sock"
    with pytest.raises(ConfigError, match="XDG_RUNTIME_DIR is not set"):
        config.default_socket_path({}, uid=1000)


def test_client_socket_path_falls_back_to_the_system_agent(tmp_path: Path) -> None:
    user = {"XDG_RUNTIME_DIR": str(tmp_path)}
    system = "/run/rpool-agent/agent.sock"
    assert config.client_socket_path(user, uid=1000) == system  # no user agent running
    own = tmp_path / "rpool-agent" / "agent.sock"
    own.parent.mkdir()
    own.touch()
    assert config.client_socket_path(user, uid=1000) == str(own)  # the user's own agent wins
    assert config.client_socket_path(user, uid=0) == system
    assert config.client_socket_path({}, uid=1000) == system
    forced = {"RPOOL_AGENT_SOCKET": "/x.sock", **user}
    assert config.client_socket_path(forced, uid=1000) == "/x.sock"


def test_default_state_dir() -> None:
    assert config.default_state_dir({}, uid=0) == "/var/lib/rpool-agent"
    assert config.default_state_dir({"STATE_DIRECTORY": "/var/lib/x:/var/lib/y"}, 0) == "/var/lib/x"
    assert config.default_state_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}, 5) == "/s/rpool-agent"
    assert config.default_state_dir({"HOME": "/h"}, uid=5) == "/h/.local/state/rpool-agent"


def test_resolved_fills_in_the_paths() -> None:
    cfg = ServeConfig(slots_per_gpu=2).resolved({}, uid=0)
    assert (cfg.socket, cfg.state_dir) == ("/run/rpool-agent/agent.sock", "/var/lib/rpool-agent")
    kept = ServeConfig(socket="/a.sock", state_dir="/st").resolved({}, uid=0)
    assert (kept.socket, kept.state_dir) == ("/a.sock", "/st")
