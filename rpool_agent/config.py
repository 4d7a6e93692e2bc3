"""How `rpool-agent serve` is configured: defaults, the config file, the command line.

Precedence, highest first:

1. command-line options that were given (`rpool-agent serve --slots-per-gpu 2`);
2. the config file (`--config FILE`, YAML, the keys are `ServeConfig`'s field names;
   `slots-per-gpu` is accepted for `slots_per_gpu`);
3. the defaults below. `socket` and `state_dir` default to None and are resolved at start
   by `default_socket_path()` / `default_state_dir()` (root vs. user paths, environment).

A key, whoever gives it, replaces the whole value (no merging inside values). Relative
paths in a config file (`pool`, `socket`, `state_dir`) are taken relative to the file's
directory, so a file means the same wherever the agent was started from. Every mistake is
one `ConfigError` line naming the file and the key. On SIGHUP the server re-reads the file
and merges it again with the same command-line values, so those keep winning.

Clients share the socket rules (paths.py, re-exported here): `client_socket_path()` is
where `Client()` connects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .paths import (  # noqa: F401 - the path rules, re-exported where they used to live
    SOCKET_ENV,
    SYSTEM_CONFIG,
    SYSTEM_SOCKET,
    SYSTEM_STATE_DIR,
    client_socket_path,
    default_socket_path,
    default_state_dir,
    user_socket_path,
)

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `serve` needs to know before it starts. None means "decide at start"."""

    pool: str | None = None  # pool file; None: detect this node at start
    socket: str | None = None  # None: default_socket_path()
    hyperthreads: bool = False  # lease hyperthread siblings as separate cpus
    slots_per_gpu: int = 1
    mig: bool = True  # a MIG-mode GPU: its MIG devices (True) or left out (False)
    state_dir: str | None = None  # None: default_state_dir()
    socket_group: str | None = None  # group of a socket the agent creates itself
    socket_mode: int = 0o660
    admin_group: str | None = None  # may drain/undrain/reload, besides root
    max_connections_per_uid: int = 64
    max_connections_root: int = 1024
    max_leases_per_uid: int = 1024  # held and waiting, empty requests included; not root
    max_waiting_per_uid: int = 256
    max_pending_per_connection: int = 16
    max_message_bytes: int = 65536
    handshake_timeout: float = 10.0  # seconds a new connection may stay silent
    log_level: str = "info"
    # Seconds between GPU health polls (docs/gpus.md); None: 30 for a detected pool, off
    # with a pool file; 0: off.
    gpu_health_interval: float | None = None
    metrics_file: str | None = None  # node_exporter textfile (*.prom); None: no metrics
    metrics_interval: float = 15.0  # seconds between metrics file writes
    audit_interval: float = 60.0  # seconds between GPU audits (docs/status.md)
    # The config file this came from (None: none); not a key a file can set.
    config_file: str | None = field(default=None, compare=False)

    def resolved(self, env: Mapping[str, str] = os.environ, uid: int | None = None) -> ServeConfig:
        """A copy with `socket` and `state_dir` filled in from the defaults."""
        return replace(
            self,
            socket=self.socket or default_socket_path(env, uid),
            state_dir=self.state_dir or default_state_dir(env, uid),
        )


# --- validation ---------------------------------------------------------------------------

_FIELDS = {f.name: f for f in fields(ServeConfig) if f.name != "config_file"}
_PATH_KEYS = ("pool", "socket", "state_dir", "metrics_file")


def _check(key: str, value: Any, label: str) -> Any:
    """The value converted to the field's type, or a one-line ConfigError ("label: ...")."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{label}: expected {expected}, got {value!r}")

    kind = _FIELDS[key].type  # a string: `from __future__ import annotations`
    if value is None and "None" in kind:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "socket_mode":
        return _mode(value, bad)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 1:
            raise bad("a positive integer")
        return value
    if kind in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number of seconds")
        if key == "gpu_health_interval" and value == 0:
            return 0.0  # off
        if not value > 0:
            raise bad("a positive number of seconds")
        return float(value)
    if not isinstance(value, str) or not value:
        raise bad("a string")
    if key == "log_level":
        if value.lower() not in LOG_LEVELS:
            raise bad("one of " + ", ".join(LOG_LEVELS))
        return value.lower()
    return value


def _mode(value: Any, bad: Any) -> int:
    """0660 (YAML 1.1 reads it as octal), "0660", "660" or "0o660"; never decimal 660."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        try:
            value = int(text, 8)
        except ValueError:
            raise bad("an octal mode such as 0660") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise bad("an octal mode such as 0660")
    return value


def _validate(values: Mapping[str, Any], where: str, *, key_style: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        shown = f"--{key.replace('_', '-')}" if key_style == "option" else str(raw_key)
        if key not in _FIELDS:
            known = ", ".join(_FIELDS)
            raise ConfigError(f"{where}: unknown key {shown!r} (known: {known})")
        if key in out:
            raise ConfigError(f"{where}: {shown}: given twice")
        out[key] = _check(key, value, f"{where}: {shown}")
    return out


# --- the file and the merge ---------------------------------------------------------------


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config file's keys, checked and converted; relative paths made absolute.

    Raises ConfigError (one line, naming the file and, where there is one, the key or the
    line) for a missing or unreadable file, bad YAML, a top level that is not a mapping,
    an unknown key or a value of the wrong type.
    """
    import yaml

    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        from .yaml_problem import describe

        problem, mark = describe(exc, text)
        at = f":{mark[0]}:{mark[1]}" if mark is not None else ""
        raise ConfigError(f"{where}{at}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    values = _validate(data, where, key_style="file")
    base = Path(path).resolve().parent
    for key in _PATH_KEYS:
        if values.get(key) is not None:
            values[key] = str(base / os.path.expanduser(values[key]))
    return values


def merge(
    file_values: Mapping[str, Any], cli_values: Mapping[str, Any], *, config_file: str | None = None
) -> ServeConfig:
    """Defaults, overridden by the file's values, overridden by the given CLI values.

    `cli_values` maps field names (or option names, `slots-per-gpu`) to what the command
    line said; None means "not given", so that the file's value shows through (the
    command line's options default to None, `--hyperthreads/--no-hyperthreads` too).
    """
    given = {k: v for k, v in cli_values.items() if v is not None}
    cli = _validate(given, "command line", key_style="option")
    checked = _validate(file_values, config_file or "config", key_style="file")
    return ServeConfig(**{**checked, **cli}, config_file=config_file)


def load_serve_config(
    config_file: str | os.PathLike[str] | None, cli_values: Mapping[str, Any]
) -> ServeConfig:
    """`serve`'s whole configuration: the file (when given) merged with the command line."""
    file_values = load_config_file(config_file) if config_file is not None else {}
    return merge(
        file_values, cli_values, config_file=str(config_file) if config_file is not None else None
    )
