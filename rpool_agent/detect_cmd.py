"""`rpool-agent detect`'s body, and a fast path that runs it without typer.

`detect` is the command a node runs most (`rpool-agent detect > pool.yaml` in every job's
prologue) and its budget is a few times hwloc's `lstopo`. typer alone costs more than that
to import, so `entry.main` hands a plain `detect` invocation to `fast_main`, which parses
the same options by hand (fastargs.py; argparse, with the gettext, locale and shutil it
pulls in, costs ~4 ms); `--help` and anything it does not take exactly as click would
still go through typer, which then prints the proper message. tests/test_detect_cli.py
checks that both know exactly the same options and give the same output.
"""

from __future__ import annotations

import os
import sys

from .errors import ConfigError, RpoolAgentError
from .fastargs import Options, parse_options

FORMATS = ("canary", "canary-nodes", "ctest", "json")


def run_detect(
    form: str = "canary",
    *,
    hyperthreads: bool = False,
    slots_per_gpu: int = 1,
    mig: bool = True,
    sysroot: str = "/",
    output: str | None = None,
) -> None:
    """Probe, then write the pool (or the JSON topology report) to stdout or `output`.

    NVML installed but failing is an error (ProbeError, nothing written): a pool without
    the node's GPUs would look fine while every GPU job fails (docs/gpus.md)."""
    from .detect import detect_pool, topology_report
    from .errors import ProbeError
    from .probes.nvidia import probe_gpus

    if form not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {form!r}")
    gpus = probe_gpus(sysroot)
    if gpus.failed:
        raise ProbeError(gpus.problem or "NVIDIA GPUs unavailable")
    notes: list[str] = []
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
            notes=notes,
        )
        text = dumps(pool, form)  # CTest's spec drops topology: expected, so no notes
    for line in [gpus.problem, *notes] if gpus.problem else notes:
        sys.stderr.write(f"rpool-agent: {line}\n")
    write_text(text, output)


def write_text(text: str, output: str | None) -> None:
    """To stdout (`None` or `-`), or atomically to a file: readers never see half of it."""
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
        raise RpoolAgentError(f"cannot write {output}: {exc.strerror or exc}") from None


#: `detect`'s options as cli.py declares them: option -> (run_detect parameter, takes a value).
OPTIONS: Options = {
    "--format": ("form", True),
    "-f": ("form", True),
    "--hyperthreads": ("hyperthreads", False),
    "--slots-per-gpu": ("slots_per_gpu", True),
    "--mig": ("mig", False),
    "--sysroot": ("sysroot", True),
    "--output": ("output", True),
    "-o": ("output", True),
}


def parse_fast(argv: list[str]) -> dict[str, str | bool] | None:
    """`argv` (after the word detect) as {parameter: value}; None: typer decides."""
    return parse_options(argv, OPTIONS)


def fast_main(argv: list[str]) -> int | None:
    """Run `detect` from `argv` (after the word detect); None: let typer handle it."""
    args = parse_fast(argv)
    if args is None:
        return None
    try:
        slots = int(args.get("slots_per_gpu", 1))  # as click's INT: int() of the text
    except ValueError:
        return None
    if slots < 1:
        return None  # typer names the option and its range
    try:
        run_detect(
            str(args.get("form", "canary")),
            hyperthreads=bool(args.get("hyperthreads", False)),
            slots_per_gpu=slots,
            mig=True,  # `--mig` is the default; `--no-mig` goes to typer
            sysroot=str(args.get("sysroot", "/")),
            output=str(args["output"]) if "output" in args else None,
        )
    except RpoolAgentError as exc:
        sys.stderr.write(f"rpool-agent: {exc}\n")
        return 2 if isinstance(exc, ConfigError) else exc.exit_code
    return 0
