"""The module layering stays honest: imports point down, heavy modules stay off hot paths.

The direction is declared (`LAYERS`) and every import of every module is checked against
it, lazy ones included; a planted upward import in a synthetic graph must be caught.

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

#: The layers, lowest first. A module may import its own layer and the layers its entry
#: names, never a layer above. Modules not named here are the shell (server, client,
#: handoff, detect, ...). Inside the core the order is the direction: each module may
#: import only those listed before it. A package name ("formats") covers its modules.
PROBES_LAYER = ("probes",)  # reads the hardware; knows nothing of rpool_agent
BASE = ("_version", "errors", "yaml_problem")  # leaves: import nothing of ours
#: The pure core: no sockets, no clock, no processes, no environment.
CORE = (
    "pool",
    "requests",
    "formats",
    "protocol",
    "calls",
    "lease",
    "placement",
    "tables",
    "waiters",
    "allocator",
)
TOP = ("", "cli")  # the package's facade (__init__) and the CLI: nothing imports them
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # layer: (its modules, the layers below it that it may import)
    "probes": (PROBES_LAYER, ()),
    "base": (BASE, ()),
    "core": (CORE, ("base",)),
    "shell": ((), ("probes", "base", "core")),
    "top": (TOP, ("probes", "base", "core", "shell")),
}

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


def module_name(path: Path) -> str:
    """`rpool_agent/formats/ctest.py` -> "formats.ctest"; probes/x.py -> "probes.x"."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts[1:] if rel.parts[0] == "rpool_agent" else rel.parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    paths = [*PKG.rglob("*.py"), *PROBES.rglob("*.py")]
    return {module_name(p): p for p in paths if "__pycache__" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere (lazy imports too), by module name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                up = package.split(".") if package else []
                base = ".".join(up[: len(up) - (node.level - 1)])
                mod = ".".join(x for x in (base, mod) if x)
            # `from M import x`: the module M.x if there is one, else M itself
            targets = []
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                short = sub.removeprefix("rpool_agent").removeprefix(".")
                targets.append(sub if sub in known or short in known else mod)
        else:
            continue
        for t in targets:
            if t == "rpool_agent" or t.startswith("rpool_agent."):
                t = t.removeprefix("rpool_agent").removeprefix(".")
                if t.startswith("probes"):  # installed as rpool_agent.probes
                    found.add("rpool_agent.probes")  # reaching into the package
            if t in known and t != name:
                found.add(t)
    return found


def covers(entry: str, name: str) -> bool:
    return name == entry or (entry != "" and name.startswith(entry + "."))


def layer_of(name: str) -> str:
    for layer, (members, _) in LAYERS.items():
        if any(covers(m, name) for m in members):
            return layer
    return "shell"


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in `graph` (module -> modules it imports) that points up or sideways
    out of its layer, or up inside the core."""
    out = []
    for name, targets in sorted(graph.items()):
        layer = layer_of(name)
        below = LAYERS[layer][1]
        for t in sorted(targets):
            if t == "rpool_agent.probes":
                out.append(f"{name} imports probes as rpool_agent.probes: probes stand alone")
                continue
            tl = layer_of(t)
            if tl == layer:
                if layer == "core" and core_rank(t) > core_rank(name):
                    out.append(f"{name} imports {t}, which sits above it in the core")
                continue
            if tl in below or any(covers(b, t) for b in below):
                continue
            out.append(f"{name} ({layer}) imports {t} ({tl}): not a layer it may use")
    return out


def core_rank(name: str) -> int:
    return next(i for i, m in enumerate(CORE) if covers(m, name))


def real_graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def test_imports_point_down() -> None:
    assert violations(real_graph()) == []


def test_no_import_cycles() -> None:
    graph = real_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, n, t]))
            if t not in state:
                visit(t, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"allocator": {"pool", "lease", "errors"}, "pool": {"errors"}}, []),
        ({"pool": {"allocator"}}, ["pool imports allocator, which sits above it in the core"]),
        ({"protocol": {"server"}}, ["protocol (core) imports server (shell)"]),
        ({"formats.ctest": {"client"}}, ["formats.ctest (core) imports client (shell)"]),
        ({"probes.cpu": {"errors"}}, ["probes.cpu (probes) imports errors (base)"]),
        ({"probes.cpu": {"rpool_agent.probes"}}, ["probes.cpu imports probes as rpool_agent"]),
        ({"errors": {"pool"}}, ["errors (base) imports pool (core)"]),
        ({"server": {"cli"}}, ["server (shell) imports cli (top)"]),
        ({"client": {"cli.options"}}, ["client (shell) imports cli.options (top)"]),
        ({"cli.agent": {"server", "probes.cpu", "allocator"}, "server": {"probes.sysfs"}}, []),
        ({"pool": {"probes.record"}}, ["pool (core) imports probes.record (probes)"]),
        ({"pool": {"probes.cpu"}}, ["pool (core) imports probes.cpu (probes)"]),
    ],
)
def test_an_upward_import_is_caught(graph: dict[str, set[str]], expected: list[str]) -> None:
    got = violations(graph)
    assert len(got) == len(expected) and all(
        g.startswith(e) for g, e in zip(got, expected, strict=True)
    ), got


def test_a_planted_upward_import_in_a_real_file_is_caught(tmp_path: Path) -> None:
    """The reader, not only the rule: a module file that imports upward fails."""
    path = tmp_path / "pool.py"
    path.write_text("def f():\n    from .allocator import Allocator\n    from . import cli\n")
    known = {"allocator", "cli", "pool"}
    assert imports_of("pool", path, known) == {"allocator", "cli"}
    assert len(violations({"pool": imports_of("pool", path, known)})) == 2


def test_every_layer_member_exists() -> None:
    names = set(package_modules())
    for members, _ in LAYERS.values():
        for m in members:
            assert any(covers(m, n) for n in names), f"{m!r} is declared but not there"


@pytest.mark.parametrize("name", CORE)
def test_pure_core_does_no_io(name: str) -> None:
    for mod, path in package_modules().items():
        if not covers(name, mod):
            continue
        imported = {m.split(".")[0] for m in all_imports(path)}
        assert not imported & IMPURE_MODULES, f"{path.name} imports {imported & IMPURE_MODULES}"
        if name != "formats":  # formats reads and writes files by name
            assert "os" not in imported, f"{path.name} imports os"


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
    "typing",  # TYPE_CHECKING = False
    "pathlib",  # Root joins strings
    "shutil",  # argparse's formatter imports it unless given a width (cli/options.py)
    "glob",
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
        # No GPU found: the pool forms never define the GPU records; the JSON report
        # converts through their module (gpu.as_dict), so it loads them.
        if form != "json" and (args is tree or not Path("/proc/driver/nvidia/gpus").exists()):
            assert GPU_RECORDS not in imported


#: The GPU records (probes/gpu.py): loaded only by a probe that finds a GPU.
GPU_RECORDS = "rpool_agent.probes.gpu"


def test_a_probe_that_finds_gpus_loads_the_gpu_records(trees: Path) -> None:
    """The other side of the check above, so that it cannot pass by a renamed module."""
    mods = loaded_modules(
        "from rpool_agent.probes.nvidia import probe_gpus\n"
        f"assert probe_gpus({str(trees / 'gpu-procfs-4')!r}).gpus"
    )
    assert GPU_RECORDS in mods
