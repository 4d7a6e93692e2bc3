"""The `rpool-agent` command line: typer commands that call into the library.

Every command imports what it needs inside its body, so `rpool-agent detect` never pays
for the server, and `rpool-agent run` never imports asyncio. Errors from the library
(`RpoolAgentError`) become one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ._version import __version__

app = typer.Typer(
    name="rpool-agent",
    help="Detect this node's CPUs and GPUs, and lease them to concurrent test harnesses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"rpool-agent {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(  # noqa: UP045 - typer needs Optional on 3.10
        None, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """rpool-agent: the node-local authority over CPUs and GPUs."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise (`raise fail(...)`)."""
    typer.echo(f"rpool-agent: {message}", err=True)
    return typer.Exit(code)


# --- commands (one section each; keep bodies thin, logic lives in the library) ---------

# --- hardware: detect ---------------------------------------------------------------------

_DETECT_FORMATS = ("canary", "canary-nodes", "ctest", "json")


@app.command()
def detect(
    form: str = typer.Option(
        "canary",
        "--format",
        "-f",
        help="canary (flat YAML), canary-nodes, ctest (resource spec JSON) or json (topology).",
    ),
    hyperthreads: bool = typer.Option(
        False, "--hyperthreads", help="One cpu per hardware thread, not per core."
    ),
    slots_per_gpu: int = typer.Option(1, "--slots-per-gpu", min=1, help="Slots per GPU."),
    mig: bool = typer.Option(False, "--mig", help="MIG devices replace their parent GPU."),
    sysroot: str = typer.Option(
        "/", "--sysroot", help="Probe a recorded /sys + /proc tree instead of this machine."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Write here, not stdout."),
) -> None:
    """Probe CPUs, NUMA nodes and NVIDIA GPUs; print the pool this process may use."""
    from .detect import detect_pool, topology_report
    from .probes.nvidia import probe_gpus

    if form not in _DETECT_FORMATS:
        raise fail(f"--format must be one of {', '.join(_DETECT_FORMATS)}, not {form!r}", 2)
    gpus = probe_gpus(sysroot)
    if form == "json":
        import json

        text = json.dumps(topology_report(sysroot, gpu_report=gpus), indent=2) + "\n"
    else:
        from .formats import dumps

        pool = detect_pool(
            sysroot,
            hyperthreads=hyperthreads,
            slots_per_gpu=slots_per_gpu,
            mig=mig,
            gpu_report=gpus,
        )
        text = dumps(pool, form)  # CTest's spec drops topology: expected, so no notes
    if gpus.problem:
        typer.echo(f"rpool-agent: {gpus.problem}", err=True)
    _write_text(text, output)


def _write_text(text: str, output: str | None) -> None:
    """To stdout (`None` or `-`), or atomically to a file: readers never see half of it."""
    import os

    if output is None or output == "-":
        sys.stdout.write(text)
        return
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, output)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise fail(f"cannot write {output}: {exc.strerror or exc}") from None



def main() -> None:
    """Console-script entry point: the library's errors become one line, not a traceback."""
    from .errors import RpoolAgentError

    try:
        app()
    except RpoolAgentError as exc:
        typer.echo(f"rpool-agent: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
