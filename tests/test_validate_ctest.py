"""`rpool-agent validate` on a CTest spec exits with the real ctest's verdict.

The specs are CMake's own test data for its spec reader (tests/cmake_resource_spec, see
its README) plus edge cases of ours; each is fed to the real `ctest --resource-spec-file`
(a refused spec: exit 8, no test run) and to `validate`. What ctest reads but its manual
calls wrong is a warning, and `--strict` fails on it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli_formats import ctest_or_skip

from rpool_agent.cli import main

SPECS = Path(__file__).resolve().parent / "cmake_resource_spec"
#: What CMake's testCTestResourceSpec.cxx expects its reader to read.
CMAKE_READS = {"spec1.json", "spec2.json", "spec14.json", "spec15.json", "spec16.json"}
CMAKE_READS.add("spec20.json")


def spec(local: str, after: str = "") -> str:
    """A version 1.0 spec whose `local` is the JSON text `local`."""
    return '{"version": {"major": 1, "minor": 0}, "local": ' + local + "}" + after


OURS = {
    "single_quotes": "{'version': {'major': 1, 'minor': 0}, 'local': []}",
    "seed_yaml_shape": 'local:\n  gpus:\n  - {id: "0"}\n',
    "local_a_mapping": spec('{"gpus": [{"id": "0"}]}'),
    "slots_0": spec('[{"gpus": [{"id": "0", "slots": 0}]}]'),
    "duplicate_id": spec('[{"gpus": [{"id": "0"}, {"id": "0"}]}]'),
    "dropped_type": spec('[{"GPUs": [{"id": "0"}]}]'),
    "dropped_type_bad_value": spec('[{"GPUs": 5}]'),
    "version_1_1": '{"version": {"major": 1, "minor": 1}, "local": []}',
    "version_empty": '{"version": {}, "local": []}',
    "version_minor_float": '{"version": {"major": 1, "minor": 0.0}, "local": []}',
    "slots_true": spec('[{"gpus": [{"id": "0", "slots": true}]}]'),
    "slots_2_5": spec('[{"gpus": [{"id": "0", "slots": 2.5}]}]'),
    "slots_too_many": spec('[{"gpus": [{"id": "0", "slots": 4294967296}]}]'),
    "id_a_number": spec('[{"gpus": [{"id": 0}]}]'),
    "id_newline": spec('[{"gpus": [{"id": "0\\n"}]}]'),
    "comments": spec("[] /* jsoncpp takes comments */").replace(", ", ", // and these\n", 1),
    "trailing_commas": spec('[{"gpus": [{"id": "0"},],},],'),
    "byte_order_mark": "\ufeff" + spec("[]"),
    "text_after": spec("[]", " and then some"),
    "root_a_list": "[]",
    "local_two_nodes": spec("[{}, {}]"),
}


def ctest_reads(ctest: str, spec: Path, workdir: Path) -> bool:
    """The real ctest's verdict: it runs the project's one test, or refuses the spec."""
    (workdir / "CTestTestfile.cmake").write_text(f'add_test(t "{shutil.which("true")}")\n')
    done = subprocess.run(
        [ctest, "--resource-spec-file", str(spec)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    refused = "Could not read/parse resource spec file" in done.stdout + done.stderr
    assert refused == (done.returncode == 8), done.stdout + done.stderr
    return not refused


def validate(*args: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["validate", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return int(exited.value.code or 0), out, err


def spec_files(tmp: Path) -> list[Path]:
    for name, text in OURS.items():
        (tmp / f"{name}.json").write_text(text, encoding="utf-8")
    return [*sorted(SPECS.glob("*.json")), *sorted(tmp.glob("*.json"))]


def test_validate_exits_with_ctests_verdict_on_every_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ctest = ctest_or_skip()
    work = tmp_path / "work"
    work.mkdir()
    specs = tmp_path / "ours"
    specs.mkdir()
    verdicts = {}
    for spec in spec_files(specs):
        reads = ctest_reads(ctest, spec, work)
        code, out, err = validate(spec, capsys=capsys)
        strict, _, _ = validate("--strict", spec, capsys=capsys)
        verdicts[spec.name] = reads
        assert code == (0 if reads else 1), (spec.name, reads, out, err)
        if reads:  # warnings, if any, do not fail it; --strict makes them fail
            warned = [line for line in err.splitlines() if ": warning: " in line]
            assert len(warned) == len(err.splitlines()), err
            assert strict == (1 if warned else 0), (spec.name, err)
        else:
            assert out == "" and err and strict == 1, (spec.name, out, err)
    cmake = {name for name, reads in verdicts.items() if reads and name.startswith("spec")}
    assert cmake == CMAKE_READS  # this ctest agrees with CMake's own expectations
    expected_ours = {"slots_0", "duplicate_id", "dropped_type", "dropped_type_bad_value"}
    expected_ours |= {"version_minor_float", "comments", "trailing_commas", "byte_order_mark"}
    expected_ours.add("text_after")
    assert {n.removesuffix(".json") for n, r in verdicts.items() if r} - {
        c.removesuffix(".json") for c in CMAKE_READS
    } == expected_ours


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("local_a_mapping", "ctest refuses it: 'local' must be a list, not a mapping"),
        ("single_quotes", "ctest refuses it: not JSON (Expecting property name enclosed"),
        ("seed_yaml_shape", "ctest refuses it: not JSON"),
    ],
)
def test_shapes_we_read_and_ctest_does_not_say_how_to_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, says: str
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(OURS[name])
    code, out, err = validate(spec, capsys=capsys)
    assert code == 1 and out == ""
    first, second = err.splitlines()
    assert first.startswith(f"{spec}: {says}")
    assert second.endswith(f"`rpool-agent convert {spec} --to ctest` writes a spec ctest reads")


def test_a_warning_names_the_place_and_strict_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "version": {"major": 1, "minor": 0},
                "local": [{"gpus": [{"id": "0", "slots": 0}, {"id": "1"}]}],
            }
        )
    )
    code, out, err = validate(spec, capsys=capsys)
    assert code == 0
    assert err == (
        f"{spec}: warning: local[0].gpus[0]: slots 0: an id ctest can never give out"
        " (leave it out)\n"
    )
    assert out == f"{spec}: ctest reads it; 1 warning(s)\n"
    assert validate("--strict", spec, capsys=capsys)[0] == 1
