"""The systemd files, `install-units`, and the wheel/sdist, checked with the real tools.

`systemd-analyze verify`, `systemd-sysusers --root` and `systemd-tmpfiles --root` judge
the files (the `system_tool` fixture fails rather than skips in CI). The slow test builds
the sdist and wheel with `python -m build` (isolated, as a user would) and installs the
wheel into a fresh venv with its dependencies resolved by pip, so a dependency missing
from pyproject.toml fails here rather than on a node.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from rpool_agent import config
from rpool_agent.install import TARGETS, render_service, unit_text

REPO = Path(__file__).resolve().parent.parent
#: What a checkout holds beside its sources: virtual environments, git, build leftovers.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "results"
)
UNITS = REPO / "rpool_agent" / "units"


def cli(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-m", "rpool_agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def verify(system_tool, *units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [system_tool("systemd-analyze"), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_verified(done: subprocess.CompletedProcess[str]) -> None:
    # verify exits 0 on warnings such as an unknown key: those count as failures here.
    ours = [line for line in done.stderr.splitlines() if "rpool-agent" in line]
    assert done.returncode == 0 and not ours, done.stderr


# --- the files themselves -----------------------------------------------------------------


def test_packaging_links_point_at_the_shipped_files() -> None:
    """packaging/ holds links, so the package data is the one copy that can be edited."""
    links = {
        "systemd/rpool-agent.service": "rpool-agent.service",
        "systemd/rpool-agent.socket": "rpool-agent.socket",
        "sysusers.d/rpool-agent.conf": "rpool-agent.sysusers.conf",
        "tmpfiles.d/rpool-agent.conf": "rpool-agent.tmpfiles.conf",
        "etc/agent.yaml": "agent.yaml",
    }
    for link, name in links.items():
        path = REPO / "packaging" / link
        assert path.is_symlink(), link
        assert path.resolve() == (UNITS / name).resolve(), link
    docs = {"systemd.md"}  # the other way round: the package links to docs/systemd.md
    assert (UNITS / "systemd.md").resolve() == (REPO / "docs" / "systemd.md").resolve()
    assert {t.source for t in TARGETS} == set(links.values()) | docs
    assert {p.name for p in UNITS.iterdir()} == set(links.values()) | docs


def test_service_and_socket_agree_with_the_agent() -> None:
    service = unit(unit_text("rpool-agent.service"))["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["WatchdogSec"]
    assert service["ExecStart"].endswith(f" serve --config {config.SYSTEM_CONFIG}")
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["DevicePolicy"] == "closed"
    assert service["RuntimeDirectoryPreserve"] == "yes"  # the socket unit's socket lives there
    assert "ProtectProc" not in service  # the agent reads other users' /proc/<pid>/stat
    socket_unit = unit(unit_text("rpool-agent.socket"))["Socket"]
    assert socket_unit["ListenStream"] == config.SYSTEM_SOCKET
    assert socket_unit["SocketMode"] == "0660"
    groups = re.findall(r"^g\s+(\S+)", unit_text("rpool-agent.sysusers.conf"), re.M)
    assert socket_unit["SocketGroup"] in groups
    example = config.load_config_file(UNITS / "agent.yaml")
    assert example["socket_group"] == socket_unit["SocketGroup"]
    assert example["admin_group"] in groups


def test_systemd_analyze_security_scores_the_service_at_most_2(tmp_path: Path, system_tool) -> None:
    """Exposure as systemd scores it (0 best, 10 worst); PrivateNetwork, IPAddressDeny and
    PrivateMounts took it from 2.3 to 1.5. ProtectProc and PrivateDevices stay off: the
    agent reads every holder's /proc/<pid>/stat and NVML opens /dev/nvidia*."""
    assert cli("install-units", "--prefix", str(tmp_path)).returncode == 0
    service = tmp_path / "etc/systemd/system/rpool-agent.service"
    done = subprocess.run(
        [system_tool("systemd-analyze"), "security", "--offline=yes", str(service)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (score,) = re.findall(
        r"Overall exposure level for rpool-agent\.service: ([0-9.]+)", done.stdout
    )
    assert float(score) <= 2.0, done.stdout
    service_keys = unit(service.read_text())["Service"]
    for key in ("PrivateNetwork", "PrivateMounts"):
        assert service_keys[key] == "yes"
    assert service_keys["IPAddressDeny"] == "any"
    assert "ProtectProc" not in service_keys and "PrivateDevices" not in service_keys


def test_device_allow_uses_no_path_globs() -> None:
    """systemd-analyze accepts `DeviceAllow=/dev/nvidia* rw` silently, but systemd only
    globs device-group names (`char-...`), so such a line would allow nothing."""
    lines = re.findall(r"^DeviceAllow=(\S+)\s+(\S+)$", unit_text("rpool-agent.service"), re.M)
    assert ("char-nvidia*", "rw") in lines
    for spec, _ in lines:
        assert spec.startswith("char-") or not any(c in spec for c in "*?["), spec


def test_render_service_points_execstart_at_the_script() -> None:
    text, notes = render_service(unit_text("rpool-agent.service"), "/opt/rp/bin/rpool-agent")
    service = unit(text)["Service"]
    assert (
        service["ExecStart"] == "/opt/rp/bin/rpool-agent serve --config /etc/rpool-agent/agent.yaml"
    )
    assert service["ProtectHome"] == "yes" and notes == []
    text, notes = render_service(unit_text("rpool-agent.service"), "/root/venv/bin/rpool-agent")
    assert unit(text)["Service"]["ProtectHome"] == "read-only"  # yes would hide the script
    assert notes and "home directory" in notes[0]
    text, _ = render_service(unit_text("rpool-agent.service"), "/opt/my tools/rpool-agent")
    assert unit(text)["Service"]["ExecStart"].startswith('"/opt/my tools/rpool-agent" serve')


# --- install-units, then the real tools ---------------------------------------------------


def test_install_units_then_systemd_accepts_everything(tmp_path: Path, system_tool) -> None:
    root = tmp_path / "root"
    done = cli("install-units", "--prefix", str(root))
    assert done.returncode == 0, done.stderr
    wrote = [
        line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("wrote ")
    ]
    assert sorted(wrote) == sorted(str(root / t.dest) for t in TARGETS)

    service = root / "etc/systemd/system/rpool-agent.service"
    socket_unit = root / "etc/systemd/system/rpool-agent.socket"
    exe = unit(service.read_text())["Service"]["ExecStart"].split()[0]
    assert os.path.isabs(exe) and os.path.basename(exe) == "rpool-agent"
    assert os.access(exe, os.X_OK)  # this installation's script, found by install-units
    assert_verified(verify(system_tool, service, socket_unit))
    # Documentation= names the doc install-units put there (file: URIs are absolute).
    (doc,) = (u for u in unit(service.read_text())["Unit"]["Documentation"].split() if "file:" in u)
    installed_doc = root / doc.removeprefix("file:/")
    assert installed_doc.read_text() == (REPO / "docs" / "systemd.md").read_text()

    # The tools that act on the sysusers and tmpfiles entries, aimed at the staging root.
    (root / "etc/group").parent.mkdir(parents=True, exist_ok=True)
    sysusers = subprocess.run(
        [system_tool("systemd-sysusers"), f"--root={root}"], capture_output=True, text=True
    )
    assert sysusers.returncode == 0, sysusers.stderr
    assert re.search(r"^rpool:x:\d+:", (root / "etc/group").read_text(), re.M)
    tmpfiles = subprocess.run(
        [system_tool("systemd-tmpfiles"), f"--root={root}", "--create"],
        capture_output=True,
        text=True,
    )
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert (root / "run/rpool-agent").is_dir()
    assert (root / "var/lib/rpool-agent").stat().st_mode & 0o777 == 0o750


def test_install_units_keeps_an_edited_config(tmp_path: Path) -> None:
    assert cli("install-units", "--prefix", str(tmp_path)).returncode == 0
    conf = tmp_path / "etc/rpool-agent/agent.yaml"
    conf.write_text("slots_per_gpu: 3\n")
    staged = tmp_path / "opt/x/rpool-agent"  # a package build stages the script too
    staged.parent.mkdir(parents=True)
    staged.write_text("#!/bin/sh\n")
    staged.chmod(0o755)
    again = cli("install-units", "--prefix", str(tmp_path), "--exec", "/opt/x/rpool-agent")
    assert again.returncode == 0, again.stderr
    assert f"kept {conf}" in again.stdout.splitlines()
    assert conf.read_text() == "slots_per_gpu: 3\n"
    service = (tmp_path / "etc/systemd/system/rpool-agent.service").read_text()
    assert "ExecStart=/opt/x/rpool-agent serve " in service


def test_verify_would_catch_a_broken_unit(tmp_path: Path, system_tool) -> None:
    """The verify check above can fail: a service naming a missing program does."""
    bad = tmp_path / "rpool-agent.service"
    bad.write_text(unit_text("rpool-agent.service").replace("ExecStart=/", "ExecStart=/nope/"))
    (tmp_path / "rpool-agent.socket").write_text(unit_text("rpool-agent.socket"))
    assert verify(system_tool, bad, tmp_path / "rpool-agent.socket").returncode != 0


@pytest.mark.parametrize(
    ("exec_path", "says"),
    [
        ("/nope", "--exec /nope: no executable file there, nor {tmp}/nope"),
        ("rpool-agent", "--exec rpool-agent: give the script's absolute path"),
        ("/etc/passwd", "--exec /etc/passwd: no executable file there"),  # not executable
    ],
)
def test_install_units_refuses_an_exec_that_is_not_there(
    tmp_path: Path, exec_path: str, says: str
) -> None:
    done = cli("install-units", "--prefix", str(tmp_path), "--exec", exec_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"rpool-agent: {says.format(tmp=tmp_path)}"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing installed


def test_install_units_unwritable_prefix_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli("install-units", "--prefix", str(blocker))
    assert done.returncode == 1
    assert done.stderr.startswith("rpool-agent: cannot install units: ")
    assert len(done.stderr.strip().splitlines()) == 1


# --- wheel and sdist ----------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_and_sdist_ship_the_units_and_run_from_a_fresh_venv(
    tmp_path: Path, system_tool
) -> None:
    dist = tmp_path / "dist"
    # Built from a copy: setuptools stages the sdist and the egg-info inside the source
    # tree, so two builds of one checkout at once (two suites run side by side) collided.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("rpool_agent-*.whl")
    (sdist,) = dist.glob("rpool_agent-*.tar.gz")
    shipped = {f"rpool_agent/units/{t.source}" for t in TARGETS}
    assert shipped <= set(zipfile.ZipFile(wheel).namelist())
    assert "is absent from the `packages` configuration" not in build.stdout + build.stderr
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/METADATA")
    headers = metadata.decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: MIT" in headers  # SPDX, PEP 639
    assert "License-File: LICENSE" in headers
    assert not [h for h in headers if "cpuinfo" in h]  # declared but never imported: gone
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        tar.extractall(tmp_path / "sdist", filter="data")
    assert shipped <= in_sdist
    # What the sdist's own tests and the README's links need.
    needed = {"LICENSE", "README.md", "tests/conftest.py", "tests/agent_fixture.py"}
    needed |= {"tests/nvml_fixture.py", "tests/fake_nvml/fake_nvml.c", "docs/systemd.md"}
    needed |= {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    needed |= {"tests/trees/two_socket_ht/proc/cpuinfo", ".ci/run"}
    assert needed <= in_sdist, needed - in_sdist
    assert not [n for n in in_sdist if "__pycache__" in n or n.endswith(".pyc")]
    # The sdist's tests run (against this installation of the package): the fixtures, the
    # recorded trees and the fake NVML, compiled from the sdist's C source, are all there.
    (root,) = (tmp_path / "sdist").iterdir()
    pytest_script = Path(sys.executable).with_name("pytest")  # not -m: no checkout on sys.path
    some = [
        "tests/test_probes_cpu.py",
        "tests/test_probes_nvidia.py::test_eight_gpus_over_two_numa_nodes",
    ]
    tests = subprocess.run(
        [str(pytest_script), "-q", "-p", "no:cacheprovider", *some],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert " passed" in tests.stdout and "skipped" not in tests.stdout

    # A fresh venv without pip (faster); the running pip installs into it, dependencies
    # included, so nothing from this interpreter's site-packages can stand in.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--no-compile",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = venv / "bin" / "rpool-agent"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [python, "-c", "import rpool_agent; print(rpool_agent.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where  # the wheel's copy, not the checkout

    version = subprocess.run([script, "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("rpool-agent "), version
    detect = subprocess.run(
        [script, "detect"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert detect.returncode == 0, detect.stderr
    assert "cpus" in detect.stdout

    root = tmp_path / "root"
    installed = subprocess.run(
        [script, "install-units", "--prefix", str(root)], capture_output=True, text=True, env=env
    )
    assert installed.returncode == 0, installed.stderr
    service = root / "etc/systemd/system/rpool-agent.service"
    assert f"ExecStart={script} serve " in service.read_text()
    assert_verified(verify(system_tool, service, root / "etc/systemd/system/rpool-agent.socket"))
