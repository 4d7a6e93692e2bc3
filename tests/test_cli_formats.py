"""`rpool-agent validate` and `convert` as real subprocesses; their CTest spec fed to real ctest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rpool_agent import formats

SCRIPT = Path(sys.executable).with_name("rpool-agent")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rpool_agent.cli"]

FLAT = """\
resource_pool:
  additional_properties:
    instances:
      gpus:
        "0": {uuid: GPU-8a1b2c3d, name: NVIDIA H200}
  resources:
    cpus: [{id: "0", slots: 1}, {id: "1", slots: 1}]
    gpus: [{id: "0", slots: 1}]
"""

BAD_SPEC = (
    '{"version": {"major": 1, "minor": 1},'
    ' "local": [{"gpus": [{"id": "GPU-1"}, {"id": "1", "slots": -1}]}]}'
)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    path = tmp_path / "pool.yaml"
    path.write_text(FLAT)
    return path


def test_validate_ok_prints_one_line_summary(flat: Path) -> None:
    done = cli("validate", flat)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{flat}: valid canary pool: {formats.load_file(flat).summary()}\n"
    assert "cpus: 2 instances, 2 slots" in done.stdout


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(BAD_SPEC)
    done = cli("validate", path)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert (
        lines[0] == f"{path}: version.minor: unsupported version minor 1 (ctest reads exactly 1.0)"
    )
    assert lines[1].startswith(f"{path}: local[0].gpus[0].id: id 'GPU-1' must match")
    assert lines[2] == f"{path}: local[0].gpus[1].slots: slots -1 out of range 0..4294967295"
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["validate", "{tmp}/missing.yaml"], 1, "{tmp}/missing.yaml: cannot read: No such file"),
        (["validate", "{tmp}"], 1, "{tmp}: cannot read: Is a directory"),
        (["validate", "{tmp}/broken.yaml"], 1, "{tmp}/broken.yaml: not valid YAML ("),
        (["validate", "{tmp}/tab.yaml"], 1, "not valid YAML (a tab: YAML indents with spaces"),
        (["validate", "/dev/zero"], 1, "/dev/zero: larger than 64 MiB: not a pool file"),
        (["validate", "{tmp}/pool.yaml", "--format", "toml"], 2, "invalid choice: 'toml'"),
        (["validate", "{tmp}/pool.yaml", "-f", "ctest"], 1, "this is the canary form, not ctest"),
        (["convert", "{tmp}/pool.yaml", "--to", "json"], 2, "invalid choice: 'json'"),
        (["convert", "{tmp}/spec.json", "--to", "canary"], 1, "(and 2 more problems)"),
        (["convert", "{tmp}/two.yaml", "--to", "ctest"], 1, "a CTest spec holds one node"),
        (
            ["convert", "{tmp}/pool.yaml", "--to", "ctest", "-o", "{tmp}/no/dir/x.json"],
            1,
            "cannot write {tmp}/no/dir/x.json: No such file or directory",
        ),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    flat: Path, args: list[str], code: int, message: str
) -> None:
    tmp = flat.parent
    (tmp / "broken.yaml").write_text("a: [\n")
    (tmp / "tab.yaml").write_text(FLAT.replace("  resources:", "\tresources:"))
    (tmp / "spec.json").write_text(BAD_SPEC)
    (tmp / "two.yaml").write_text(
        "nodes:\n- {id: a, resources: {cpus: [{id: 0}]}}\n- {id: b, resources: {cpus: [{id: 0}]}}\n"
    )
    done = cli(*(a.format(tmp=tmp) for a in args))
    assert done.returncode == code
    assert message.format(tmp=tmp) in done.stderr
    if code == 1:
        assert len(done.stderr.splitlines()) == 1, done.stderr


def test_convert_to_node_form_keeps_properties(flat: Path) -> None:
    done = cli("convert", flat, "--to", "canary-nodes")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    doc = yaml.safe_load(done.stdout)
    gpu = doc["resource_pool"]["nodes"][0]["resources"]["gpus"][0]
    assert gpu == {
        "id": "0",
        "slots": 1,
        "properties": {"vendor": "NVIDIA", "uuid": "GPU-8a1b2c3d", "name": "NVIDIA H200"},
    }
    back = formats.parse_text(done.stdout)
    assert back.local.resources["gpus"][0].properties["uuid"] == "GPU-8a1b2c3d"


def run_ctest(ctest: str, spec: Path) -> subprocess.CompletedProcess[str]:
    """ctest in the spec's folder, where the test's CTestTestfile.cmake is."""
    return subprocess.run(
        [ctest, "--resource-spec-file", str(spec)],
        cwd=spec.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ctest_or_skip() -> str:
    path = shutil.which("ctest")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("ctest is not installed (Debian package: cmake)")
        pytest.skip("ctest is not installed (Debian package: cmake)")
    return path


def test_real_ctest_reads_the_spec_we_write_and_rejects_what_we_reject(
    flat: Path, tmp_path: Path
) -> None:
    ctest = ctest_or_skip()
    spec = tmp_path / "spec.json"
    done = cli("convert", flat, "--to", "ctest", "-o", spec)
    assert done.returncode == 0, done.stderr
    assert "note: ctest: dropped properties of 1 gpus instance (uuid, name)" in done.stderr
    assert json.loads(spec.read_text())["local"][0]["gpus"] == [{"id": "0", "slots": 1}]
    # A one-test "project": ctest reads CTestTestfile.cmake directly, no cmake configure needed.
    env_out = tmp_path / "env.txt"
    (tmp_path / "CTestTestfile.cmake").write_text(
        f'add_test(t "{shutil.which("sh")}" "-c" "env > {env_out}")\n'
        'set_tests_properties(t PROPERTIES RESOURCE_GROUPS "gpus:1;cpus:1")\n'
    )
    run = run_ctest(ctest, spec)
    assert run.returncode == 0, run.stdout + run.stderr
    env = dict(line.split("=", 1) for line in env_out.read_text().splitlines() if "=" in line)
    assert env["CTEST_RESOURCE_GROUP_COUNT"] == "2"
    assert env["CTEST_RESOURCE_GROUP_0_GPUS"] == "id:0,slots:1"
    # Version 1.1: we reject it, and so does ctest (exit 8, no test run).
    spec.write_text(json.dumps({"version": {"major": 1, "minor": 1}, "local": []}))
    assert cli("validate", spec).returncode == 1
    env_out.unlink()
    run = run_ctest(ctest, spec)
    assert run.returncode == 8
    assert "Could not read/parse resource spec file" in run.stdout + run.stderr
    assert not env_out.exists()


@pytest.mark.parametrize(
    ("local", "version", "ctest_reads"),
    [
        ([{"gpus": [{"id": "0\n"}]}], {"major": 1, "minor": 0}, False),  # `$` let it through
        ([{"gpu\n": [{"id": "0"}]}], {"major": 1, "minor": 0}, True),  # ctest drops the type
        ([{"gpus": [{"id": "0"}]}], {"major": 1.0, "minor": 0.0}, True),  # we refused 1.0
        ([{"gpus": [{"id": "0", "slots": 2.0}]}], {"major": 1, "minor": 0}, True),
        ([{"gpus": [{"id": "0", "slots": 2.5}]}], {"major": 1, "minor": 0}, False),
    ],
)
def test_validate_agrees_with_the_real_ctest_on_edge_specs(
    tmp_path: Path, local: list[Any], version: dict[str, Any], ctest_reads: bool
) -> None:
    """ctest reading a spec means it is well-formed to ctest: `validate` exits as ctest
    decides. A type name ctest drops silently is a warning, which --strict refuses (the
    reference says a validator should)."""
    ctest = ctest_or_skip()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"version": version, "local": local}))
    (tmp_path / "CTestTestfile.cmake").write_text(f'add_test(t "{shutil.which("true")}")\n')
    run = run_ctest(ctest, spec)
    assert (run.returncode != 8) == ctest_reads, run.stdout + run.stderr
    assert (cli("validate", spec).returncode == 0) == ctest_reads  # ctest's verdict
    strict = cli("validate", "--strict", spec).returncode == 0
    dropped_type = any(not name.isidentifier() for group in local for name in group)
    assert strict == (ctest_reads and not dropped_type)  # what ctest drops: a warning


def test_the_seeds_yaml_shape_of_a_spec_is_refused_as_ctest_refuses_it_with_the_way_out(
    tmp_path: Path,
) -> None:
    ctest = ctest_or_skip()
    spec = tmp_path / "spec.yaml"
    spec.write_text("local:\n  gpus:\n  - {id: '0'}\n")  # the seed's shape: no version
    assert formats.load_file(spec).local.resources["gpus"][0].id == "0"  # we read it
    done = cli("validate", spec)
    assert done.returncode == 1 and done.stdout == ""
    assert f"{spec}: ctest refuses it: not JSON" in done.stderr
    assert f"`rpool-agent convert {spec} --to ctest` writes a spec ctest reads" in done.stderr
    (tmp_path / "CTestTestfile.cmake").write_text(f'add_test(t "{shutil.which("true")}")\n')
    assert run_ctest(ctest, spec).returncode == 8  # as validate says
    spec.write_text(cli("convert", spec, "--to", "ctest").stdout)  # what it advises
    assert cli("validate", spec).stderr == "" and run_ctest(ctest, spec).returncode == 0


def test_nesting_that_would_crash_the_yaml_loader_is_one_line(tmp_path: Path) -> None:
    """PyYAML's C loader overflows the C stack (SIGSEGV, no message) past ~20,000 levels.
    Our depth check says so; a PyYAML wheel whose libyaml has its own limit (0.2.5's
    "exceeded maximum nesting depth", at 1,000) says it first: one line either way."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 60_000 + "]" * 60_000 + "\n")
    done = cli("validate", deep)
    assert done.returncode == 1
    assert done.stderr in (
        f"{deep}: nested more than 1000 deep\n",
        f"{deep}: not valid YAML (exceeded maximum nesting depth, line 1 column 1001)\n",
    )


def test_help_on_both_commands() -> None:
    for command in ("validate", "convert"):
        done = cli(command, "--help")
        assert done.returncode == 0
        assert "--format" in done.stdout or "--to" in done.stdout
