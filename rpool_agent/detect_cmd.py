"""`rpool-agent detect`'s body, and a fast path that runs it without typer.

`detect` is the command a node runs most (`rpool-agent detect > pool.yaml` in every job's
prologue) and its budget is a few times hwloc's `lstopo`. typer alone costs more than that
to import, so `cli.main` hands a plain `detect` invocation to `fast_main`, an argparse
parser for the same options; `--help` and anything it cannot parse still go through typer.
tests/test_detect_cli.py checks that both parsers know exactly the same options.
"""

from __future__ import annotations

import os
import sys

from .errors import ConfigError, RpoolAgentError

FORMATS = ("canary", "canary-nodes", "ctest", "json")


def run_detect(
    form: str = "canary",
    *,
    hyperthreads: bool = False,
    slots_per_gpu: int = 1,
    mig: bool = False,
    sysroot: str = "/",
    output: str | None = None,
) -> None:
    """Probe, then write the pool (or the JSON topology report) to stdout or `output`."""
    from .detect import detect_pool, topology_report
    from .probes.nvidia import probe_gpus

    if form not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {form!r}")
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
        sys.stderr.write(f"rpool-agent: {gpus.problem}\n")
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


def fast_parser():  # -> argparse.ArgumentParser (argparse imported lazily)
    import argparse

    p = argparse.ArgumentParser(prog="rpool-agent detect", add_help=False)
    p.add_argument("--format", "-f", dest="form", default="canary")
    p.add_argument("--hyperthreads", action="store_true")
    p.add_argument("--slots-per-gpu", type=int, default=1)
    p.add_argument("--mig", action="store_true")
    p.add_argument("--sysroot", default="/")
    p.add_argument("--output", "-o", default=None)
    return p


def fast_main(argv: list[str]) -> int | None:
    """Run `detect` from `argv` (after the word detect); None: let typer handle it."""
    if any(a in ("--help", "-h") for a in argv):
        return None
    try:
        args, rest = fast_parser().parse_known_args(argv)
    except SystemExit:
        return None  # a usage error: typer prints the proper message
    if rest or args.slots_per_gpu < 1:
        return None
    try:
        run_detect(
            args.form,
            hyperthreads=args.hyperthreads,
            slots_per_gpu=args.slots_per_gpu,
            mig=args.mig,
            sysroot=args.sysroot,
            output=args.output,
        )
    except RpoolAgentError as exc:
        sys.stderr.write(f"rpool-agent: {exc}\n")
        return 2 if isinstance(exc, ConfigError) else exc.exit_code
    return 0
