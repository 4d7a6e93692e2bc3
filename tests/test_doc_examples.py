"""The shell examples in README.md and docs/*.md run, as written, so they cannot drift.

Every ```sh block runs whole in bash (`set -e`), and the `$ ` lines of every ```console
block; a block that cannot run here (it installs, needs root, is a synopsis) says so on
the line before it: `<!-- not run by tests/test_doc_examples.py: REASON -->`.

They run against a private agent serving this machine's CPUs and four GPUs of the fake
NVML (tests/fake_nvml; there is no NVIDIA GPU here), which `detect` sees too, each block
in a fresh folder holding what the examples name: a canary test under tests/ (canary-wm
is a test dependency, so `canary` really runs), a one-test CTestTestfile.cmake for the
real ctest, train.py, ci.sh, pool.yaml, and tests/trees (the recorded machines).
`nvidia-smi` is a stub, the one thing mocked: there is no driver here to answer it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nvml_fixture as nf
import pytest
from agent_fixture import wait_for_socket

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!-- not run by tests/test_doc_examples\.py: (.+) -->$")
fake_nvml_dir = nf.fake_nvml_dir  # session fixture: gcc builds the fake once


class Example:
    def __init__(self, doc: Path, line: int, lang: str, body: list[str], skip: str | None):
        self.doc, self.line, self.lang, self.skip = doc, line, lang, skip
        if lang == "console":  # the commands, not the output shown
            body = [b[2:] for b in body if b.startswith("$ ")]
        self.script = "\n".join(body) + "\n"

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def examples() -> list[Example]:
    found = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            lang = lines[i][3:].strip() if lines[i].startswith("```") else None
            if lang in ("sh", "console"):
                end = lines.index("```", i + 1)
                marker = SKIP.match(lines[i - 1]) if i else None
                found.append(
                    Example(doc, i + 1, lang, lines[i + 1 : end], marker and marker.group(1))
                )
                i = end
            i += 1
    return found


EXAMPLES = examples()

CANARY_TEST = """\
import os
import canary

canary.directives.keywords("fast")


def test():
    print(os.sched_getaffinity(0), os.getenv("CUDA_VISIBLE_DEVICES"))


if __name__ == "__main__":
    test()
"""


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory, fake_nvml_dir: Path) -> Any:
    """The agent and the environment every example runs in."""
    base = tmp_path_factory.mktemp("doc-examples")
    conf = nf.write_config(
        base / "nvml.conf",
        [{"uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000"} for i in range(4)],
    )
    stubs = base / "bin"
    stubs.mkdir()
    smi = stubs / "nvidia-smi"  # mocked: no NVIDIA driver here to answer it
    smi.write_text('#!/bin/sh\necho "GPU ${CUDA_VISIBLE_DEVICES}: (nvidia-smi stub)"\n')
    smi.chmod(0o755)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in nf.clean_environ().items() if not k.startswith("RPOOL_")}
    env.update(
        PATH=f"{stubs}:{venv_bin}:/usr/local/bin:/usr/bin:/bin",
        LD_LIBRARY_PATH=str(fake_nvml_dir),
        FAKE_NVML_CONFIG=str(conf),
        RPOOL_AGENT_SOCKET=str(base / "agent.sock"),
        STATE_DIRECTORY=str(base / "state"),  # never /var/lib, whatever an example starts
        HOME=str(base / "home"),
        XDG_RUNTIME_DIR=str(base / "run"),
        TMPDIR=str(base / "tmp"),
    )
    for d in ("home", "run", "tmp"):
        (base / d).mkdir(mode=0o700)
    log = open(base / "agent.log", "wb")  # noqa: SIM115 (open while the agent runs)
    agent = subprocess.Popen(
        [sys.executable, "-m", "rpool_agent.cli", "serve", "--state-dir", str(base / "st")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_socket(env["RPOOL_AGENT_SOCKET"], agent)
        yield base, env
    finally:
        agent.terminate()
        agent.wait(30)
        log.close()


def workdir(base: Path, name: str, env: dict[str, str]) -> Path:
    """A fresh folder holding the files the examples name."""
    d = base / re.sub(r"[^A-Za-z0-9]+", "_", name)
    (d / "tests").mkdir(parents=True)
    (d / "tests" / "trees").symlink_to(REPO / "tests" / "trees")
    (d / "tests" / "hello.pyt").write_text(CANARY_TEST)
    true = shutil.which("true")
    (d / "CTestTestfile.cmake").write_text(
        f'add_test(t "{true}")\nset_tests_properties(t PROPERTIES RESOURCE_GROUPS "gpus:1")\n'
    )
    (d / "train.py").write_text("import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'])\n")
    (d / "ci.sh").write_text(
        '#!/bin/sh\necho "job sees CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"\n'
    )
    (d / "ci.sh").chmod(0o755)
    pool = subprocess.run(
        [sys.executable, "-m", "rpool_agent.cli", "detect", "--format", "canary-nodes"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    (d / "pool.yaml").write_text(pool.stdout)
    return d


def test_every_example_is_run_or_says_why_not() -> None:
    assert len(EXAMPLES) > 10
    for example in EXAMPLES:
        if example.skip is None:
            assert example.script.strip(), f"{example.name}: an empty example"


@pytest.mark.slow  # canary's start-up: a few seconds per canary example
@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.skip is None], ids=lambda e: e.name)
def test_example_runs(setting: Any, example: Example) -> None:
    base, env = setting
    cwd = workdir(base, example.name, env)
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", example.script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, f"{example.name}:\n{example.script}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    # no stray files named by an unmatched glob (the recording recipe once made "*")
    strays = [p for p in Path(env["TMPDIR"]).rglob("*") if p.name == "*"]
    assert not strays, strays
