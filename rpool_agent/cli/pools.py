"""Commands about pool documents: `detect` writes one from this node's hardware,
`validate` checks one, `convert` rewrites one in another form.

`detect` runs in every job's prologue, so its path imports only what it uses (the probes,
the writer of one form); tests/test_layering.py lists what it must never load.
"""

from __future__ import annotations

import os
import sys

from .options import FORMS_HELP, POOL_FORMATS, Command, add_output, add_pool_shape, echo

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

    from ..errors import PoolFormatError

DETECT_FORMATS = (*POOL_FORMATS, "json")
_MAX_SHOWN = 50  # problems `validate` lists before it just counts the rest


def declare_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--format",
        dest="form",
        choices=DETECT_FORMATS,
        default="canary",
        metavar="FORMAT",
        help="canary (flat YAML, the default), canary-nodes, ctest (resource spec JSON)"
        " or json (the topology report)",
    )
    add_pool_shape(p)
    p.add_argument(
        "--sysroot",
        default="/",
        metavar="DIR",
        help="probe a recorded /sys + /proc tree under DIR instead of this machine",
    )
    add_output(p)
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also say why no GPU was found where there is none (a CPU-only node)",
    )


def declare_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", metavar="FILE", help="pool file: canary YAML (either form) or CTest JSON"
    )
    p.add_argument(
        "-f",
        "--format",
        dest="form",
        choices=("auto", *POOL_FORMATS),
        default="auto",
        metavar="FORMAT",
        help=f"the form FILE must have: {FORMS_HELP} (default: auto, tell from the content)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1) on warnings too: what ctest reads but its manual calls wrong"
        " (a type name it drops, a duplicate id, an id with 0 slots)",
    )


def declare_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="pool file to read (any form)")
    p.add_argument(
        "-t",
        "--to",
        required=True,
        choices=POOL_FORMATS,
        metavar="FORMAT",
        help=f"form to write: {FORMS_HELP}",
    )
    p.add_argument(
        "--from",
        dest="source_form",
        choices=("auto", *POOL_FORMATS),
        default="auto",
        metavar="FORMAT",
        help="form of FILE (default: auto, tell from the content)",
    )
    add_output(p)


# --- detect ---------------------------------------------------------------------------------


def detect(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    try:
        run_detect(
            args.form,
            hyperthreads=bool(args.hyperthreads),
            slots_per_gpu=args.slots_per_gpu or 1,
            mig=args.mig is not False,  # offered unless --no-mig
            sysroot=args.sysroot,
            output=args.output,
            verbose=args.verbose,
        )
    except ConfigError as exc:  # a bad --sysroot and the like: a usage error
        echo(f"rpool-agent: {exc}", err=True)
        return 2
    return 0


def run_detect(
    form: str = "canary",
    *,
    hyperthreads: bool = False,
    slots_per_gpu: int = 1,
    mig: bool = True,
    sysroot: str = "/",
    output: str | None = None,
    verbose: bool = False,
) -> None:
    """Probe, then write the pool (or the JSON topology report) to stdout or `output`.

    NVML installed but failing is an error (ProbeError, nothing written): a pool without
    the node's GPUs would look fine while every GPU job fails (docs/gpus.md). Where there
    is simply no NVIDIA GPU, saying so on every run of every job is noise: `verbose` only.
    A partial reading (a GPU skipped, /proc read instead of NVML) is always said."""
    from ..detect import detect_pool, topology_report
    from ..errors import ProbeError
    from ..probes.nvidia import probe_gpus

    gpus = probe_gpus(sysroot)
    if gpus.failed:
        raise ProbeError(gpus.problem or "NVIDIA GPUs unavailable")
    notes: list[str] = []
    if form == "json":
        import json

        text = json.dumps(topology_report(sysroot, gpu_report=gpus), indent=2) + "\n"
    else:
        from ..formats import dumps

        pool = detect_pool(
            sysroot,
            hyperthreads=hyperthreads,
            slots_per_gpu=slots_per_gpu,
            mig=mig,
            gpu_report=gpus,
            notes=notes,
        )
        text = dumps(pool, form)  # CTest's spec drops topology: expected, so no notes
    said = gpus.problem if verbose or gpus.source != "none" else None
    for line in [said, *notes] if said else notes:
        sys.stderr.write(f"rpool-agent: {line}\n")
    write_text(text, output)


def write_text(text: str, output: str | None) -> None:
    """To stdout (`None` or `-`), or atomically to a file: readers never see half of it.

    An existing path that is not a regular file (`/dev/null`, a FIFO, a terminal) is
    written into, as a shell's `>` would: renaming over it would replace the device node
    itself (run as root, `detect -o /dev/null` left a regular file at /dev/null).
    """
    import stat

    from ..errors import RpoolAgentError

    if output is None or output == "-":
        sys.stdout.write(text)
        return
    try:
        special = not stat.S_ISREG(os.stat(output).st_mode)
    except OSError:
        special = False  # absent (or unreadable): the atomic path below says why it fails
    if special:
        try:
            with open(output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise RpoolAgentError(f"cannot write {output}: {exc.strerror or exc}") from None
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


# --- validate, convert ----------------------------------------------------------------------


def validate(args: argparse.Namespace) -> int:
    """The exit status is the verdict of the tool the file is for. For a CTest spec that
    is ctest's own (formats.ctest.ctest_refuses); what we are stricter about than ctest
    (a type name it drops, a duplicate id, 0 slots) is a warning, an error with --strict.
    A canary file is judged by our reader, which holds canary's rules."""
    from ..errors import RpoolAgentError
    from ..formats import check_text, read_text

    file = args.file
    try:
        text = read_text(file)
    except RpoolAgentError as exc:
        echo(str(exc), err=True)
        return 1
    checked = check_text(text, format=args.form, source=file)
    errors = [str(err) for err in checked.errors]
    warnings: list[str] = []
    if checked.format in ("ctest", "auto"):  # auto: our reader could not even tell
        from ..formats.ctest import ctest_refuses

        refusal = ctest_refuses(text)
        if refusal is None:  # ctest reads it: ours are stricter findings (or comments)
            errors, warnings = [], [_warning(file, err) for err in checked.errors]
        elif not errors and checked.format == "ctest":  # we read it (the seed's YAML)
            errors = [
                f"{file}: ctest refuses it: {refusal}",
                f"{file}: rpool-agent reads it (serve --pool), ctest does not:"
                f" `rpool-agent convert {file} --to ctest` writes a spec ctest reads",
            ]
    shown = [*errors, *warnings]
    for line in shown[:_MAX_SHOWN]:
        echo(line, err=True)
    if len(shown) > _MAX_SHOWN:
        echo(f"{file}: ... and {len(shown) - _MAX_SHOWN} more", err=True)
    if errors:
        return 1
    if checked.pool is not None:
        echo(f"{file}: valid {checked.format} pool: {checked.pool.summary()}")
    else:
        echo(f"{file}: ctest reads it; {len(warnings)} warning(s)")
    return 1 if warnings and args.strict else 0


def _warning(file: str, err: PoolFormatError) -> str:
    return f"{file}: warning: {err.where + ': ' if err.where else ''}{err.what}"


def convert(args: argparse.Namespace) -> int:
    from ..formats import load_file, render

    pool = load_file(args.file, format=args.source_form)
    text, notes = render(pool, args.to)
    write_text(text, args.output)
    for note in notes:
        echo(f"rpool-agent: note: {args.to}: {note}", err=True)
    return 0


COMMANDS = (
    Command(
        "detect",
        "Print this node's CPUs and NVIDIA GPUs as a pool file.\n\n"
        "Probes CPUs, NUMA nodes and GPUs. Lists only the cpus this process may run on\n"
        "(affinity, cgroup cpuset) and the GPUs NVML shows. See docs/detect.md.",
        declare_detect,
        detect,
    ),
    Command(
        "validate",
        "Check a pool file; list every problem.\n\n"
        "Prints a one-line summary, or every problem found and exits 1. The exit status\n"
        "is the verdict of the tool the file is for: for a CTest spec, the real ctest's\n"
        "(JSON as jsoncpp reads it, version 1.0, ...). What ctest takes but its manual\n"
        "calls wrong is a warning; --strict makes warnings fail too.",
        declare_validate,
        validate,
    ),
    Command(
        "convert",
        "Rewrite a pool file in another form.\n\n"
        "What the target form cannot hold is noted on stderr.",
        declare_convert,
        convert,
    ),
)
