"""The module layering stays honest: imports point down, heavy modules stay off hot paths.

Read with `ast` (what a module imports at its top level), plus a few real interpreter runs
for what a command actually loads, since a lazy import inside a function is fine but a
transitive top-level one is not.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "rpool_agent"
PROBES = REPO / "probes"

#: The pure core: no sockets, no clock, no processes, no event loop.
PURE = [
    "errors",
    "pool",
    "requests",
    "protocol",
    "lease",
    "placement",
    "tables",
    "waiters",
    "allocator",
    "formats",
]
IMPURE_MODULES = {
    "asyncio",
    "socket",
    "select",
    "selectors",
    "subprocess",
    "threading",
    "time",
    "random",
    "secrets",
    "signal",
}


def module_files(name: str) -> list[Path]:
    path = PKG / name
    return sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions), as absolute-ish names."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            found.add(base)
    return found


def all_imports(path: Path) -> set[str]:
    """Every import anywhere in the file, lazy ones included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
    return found


@pytest.mark.parametrize("name", PURE)
def test_pure_core_does_no_io(name: str) -> None:
    for path in module_files(name):
        imported = {m.split(".")[0] for m in all_imports(path)}
        assert not imported & IMPURE_MODULES, f"{path.name} imports {imported & IMPURE_MODULES}"


def test_allocator_and_codec_do_not_touch_the_os() -> None:
    for name in PURE:
        if name in ("errors", "formats"):
            continue
        imported = {m.split(".")[0] for m in all_imports(PKG / f"{name}.py")}
        assert "os" not in imported, name


def test_probes_never_import_the_package() -> None:
    for path in PROBES.glob("*.py"):
        for mod in all_imports(path):
            assert not mod.startswith("rpool_agent"), f"{path.name} imports {mod}"
            assert not mod.startswith(".."), f"{path.name} reaches outside probes: {mod}"


def test_nothing_imports_the_cli() -> None:
    for path in PKG.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        for mod in all_imports(path):
            assert mod not in (".cli", "rpool_agent.cli", "..cli"), path


def test_pynvml_is_imported_lazily_only() -> None:
    for path in [*PKG.rglob("*.py"), *PROBES.glob("*.py")]:
        assert "pynvml" not in top_level_imports(path), path


def loaded_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_client_and_run_path_load_no_asyncio() -> None:
    mods = loaded_modules(
        "import rpool_agent.client, rpool_agent.runner, rpool_agent.handoff\n"
        "from rpool_agent import Client"
    )
    assert "asyncio" not in mods
    assert "rpool_agent.server" not in mods


def test_detect_path_loads_no_server_and_no_yaml() -> None:
    mods = loaded_modules(
        "from rpool_agent.detect import detect_pool\n"
        "from rpool_agent.formats import dumps\n"
        "dumps(detect_pool('/'), 'canary')"
    )
    for heavy in ("asyncio", "rpool_agent.server", "yaml", "psutil", "cpuinfo"):
        assert heavy not in mods, heavy
    if not Path("/proc/driver/nvidia").exists():  # no NVIDIA driver: no pynvml either
        assert "pynvml" not in mods


#: What the `detect` command never imports: together they cost more than the command's
#: whole budget of 6x hwloc's lstopo (docs/detect.md, Speed).
DETECT_NEVER = (
    "typer",
    "click",
    "dataclasses",  # imports inspect: probes/record.py instead
    "inspect",
    "typing",  # TYPE_CHECKING = False
    "pathlib",  # Root joins strings
    "shutil",  # argparse's formatter imports it unless given a width (cli/options.py)
    "glob",
    "copy",  # pool.copy_data
    "yaml",  # yaml_emit writes
    "asyncio",
    "rpool_agent.server",
    "psutil",
    "cpuinfo",
)

# Records every import statement run while `main` runs, of modules already loaded too:
# this interpreter's site hooks (an editable install's finder) load typing and pathlib
# before any of our code, and a clean install does not.
_SPY = """
import builtins, json, sys
seen, real, before = set(), builtins.__import__, set(sys.modules)
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        seen.add(name)
    return real(name, globals, locals, fromlist, level)
sys.argv = {argv!r}
builtins.__import__ = spy
try:
    from rpool_agent.cli import main
    main()
except SystemExit as e:
    assert not e.code, e.code
builtins.__import__ = real
print(json.dumps(sorted(seen | (set(sys.modules) - before))))
"""


@pytest.mark.parametrize("form", ["canary", "canary-nodes", "ctest", "json"])
def test_detect_command_imports_none_of_the_slow_modules(
    trees: Path, tmp_path: Path, form: str
) -> None:
    argv = ["rpool-agent", "detect", "-f", form, "-o", str(tmp_path / "out")]
    tree = [*argv, "--sysroot", str(trees / "two_socket_ht")]
    for args in (tree, argv):  # a recorded tree never tries NVML; the live root does
        out = subprocess.run(
            [sys.executable, "-c", _SPY.format(argv=args)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        imported = set(json.loads(out.splitlines()[-1]))
        assert (tmp_path / "out").stat().st_size > 0
        if args is argv and "pynvml" in imported:
            continue  # NVML answered here: pynvml brings ctypes and more, rightly
        assert not set(DETECT_NEVER) & imported, set(DETECT_NEVER) & imported
