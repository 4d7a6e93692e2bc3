"""`rpool-agent install-units`: put the shipped systemd files where systemd looks.

The canonical files live in the package (`rpool_agent/units/`, package data) so that a
wheel installed by pip carries them; `packaging/` in the repository only links to them.
Installing is a copy plus one rewrite: ExecStart= must name the `rpool-agent` script of
the installation doing the install (pip puts it in /usr/local/bin, /usr/bin or a venv's
bin/, and systemd needs an absolute path).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ConfigError

SCRIPT = "rpool-agent"


@dataclass(frozen=True)
class Target:
    """One shipped file and where it goes under the prefix."""

    source: str  # name in rpool_agent/units/
    dest: str  # path relative to the prefix
    keep_existing: bool = False  # an admin's edited copy is never overwritten


TARGETS = (
    Target("rpool-agent.service", "etc/systemd/system/rpool-agent.service"),
    Target("rpool-agent.socket", "etc/systemd/system/rpool-agent.socket"),
    Target("rpool-agent.sysusers.conf", "usr/lib/sysusers.d/rpool-agent.conf"),
    Target("rpool-agent.tmpfiles.conf", "usr/lib/tmpfiles.d/rpool-agent.conf"),
    Target("agent.yaml", "etc/rpool-agent/agent.yaml", keep_existing=True),
    # The service's Documentation=: docs/systemd.md, shipped beside the units (a link).
    Target("systemd.md", "usr/share/doc/rpool-agent/systemd.md"),
)

# Trees ProtectHome=yes hides from the service; a script there needs read-only instead.
_HOME_TREES = ("/home", "/root", "/run/user")


def unit_text(name: str) -> str:
    """A shipped file's text, read from the installed package."""
    return resources.files("rpool_agent").joinpath("units", name).read_text(encoding="utf-8")


def find_script(argv0: str | None = None) -> str:
    """The absolute path of this installation's `rpool-agent` script.

    In order: the running script (argv[0], when it is one), the scripts directory of the
    running interpreter's installation scheme, then PATH. Raises ConfigError when none is
    found (e.g. run as `python -m rpool_agent.cli` from a source tree).
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    candidates = []
    if os.path.basename(argv0) == SCRIPT:
        candidates.append(os.path.abspath(argv0))
    candidates.append(os.path.join(sysconfig.get_path("scripts"), SCRIPT))
    candidates.append(os.path.join(os.path.dirname(sys.executable), SCRIPT))
    candidates.append(shutil.which(SCRIPT) or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise ConfigError(f"cannot find the {SCRIPT} script: pass --exec PATH")


def checked_script(script: str, root: Path) -> str:
    """`--exec`'s path, refused unless it is absolute and an executable file, here or
    under `root` (a staging tree, where a package build puts the script as well): a unit
    whose ExecStart= names nothing would install cleanly and fail only when started."""
    if not os.path.isabs(script):
        raise ConfigError(f"--exec {script}: give the script's absolute path")
    staged = root / script.lstrip("/")
    for path in (Path(script), staged):
        if path.is_file() and os.access(path, os.X_OK):
            return script
    where = "" if root.resolve() == Path("/") else f", nor {staged}"
    raise ConfigError(f"--exec {script}: no executable file there{where}")


def render_service(text: str, script: str) -> tuple[str, list[str]]:
    """The service file with ExecStart= naming `script`, and notes on what was changed."""
    notes: list[str] = []
    lines = []
    home = any(script == t or script.startswith(t + "/") for t in _HOME_TREES)
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            args = line.partition("=")[2].split(None, 1)
            exe = f'"{script}"' if any(c.isspace() for c in script) else script
            line = f"ExecStart={exe}" + (f" {args[1]}" if len(args) > 1 else "")
        elif home and line.strip() == "ProtectHome=yes":
            line = "ProtectHome=read-only"
            notes.append(f"{script} is under a home directory: ProtectHome=read-only")
        lines.append(line)
    if script.startswith("/tmp/"):
        notes.append(f"{script} is under /tmp, which PrivateTmp=yes hides from the service")
    return "\n".join(lines) + "\n", notes


@dataclass(frozen=True)
class Installed:
    path: Path
    action: str  # "wrote" or "kept"


def install_units(
    prefix: str | os.PathLike[str] = "/", script: str | None = None
) -> tuple[list[Installed], list[str]]:
    """Copy the shipped files under `prefix`; returns what was done and notes for the user.

    An existing agent.yaml is kept; the unit, sysusers and tmpfiles files are replaced.
    OSError (permissions, read-only file system) propagates to the caller.
    """
    root = Path(prefix)
    script = checked_script(script, root) if script else find_script()
    done: list[Installed] = []
    notes: list[str] = []
    for target in TARGETS:
        dest = root / target.dest
        if target.keep_existing and dest.exists():
            done.append(Installed(dest, "kept"))
            continue
        text = unit_text(target.source)
        if target.source.endswith(".service"):
            text, more = render_service(text, script)
            notes.extend(more)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(dest)
        done.append(Installed(dest, "wrote"))
    return done, notes
