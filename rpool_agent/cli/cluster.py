"""Commands for nodes a cluster scheduler hands out (docs/cluster.md): `export` describes
this node to Slurm or Flux, `job` runs a command under an agent private to one job.

`export` formats the report `detect --format json` prints, built by the same calls; the
scheduler's view is never probed a second time.
"""

from __future__ import annotations

import argparse

from .leases import command_of
from .options import Command, add_output, count, echo, positive

EXPORT_DOC = """\
Describe this node to a cluster scheduler.

  slurm  the slurm.conf node line (what `slurmd -C` prints, where the machine is
         regular) and the matching gres.conf lines (GPU types as Slurm's NVML
         autodetection names them, Cores= near each GPU, MIG devices)
  flux   the Flux resource set, RFC 20 R version 1 (JSON)

What the scheduler cannot express about this node (hybrid cores, offline CPUs,
uneven sockets, a restricted cpuset) is said on stderr, with what to choose.
See docs/cluster.md."""

JOB_DOC = """\
Run CMD under an agent private to this job's allocation (Slurm, Flux).

The agent offers exactly what the job was given (its CPU affinity and cpuset,
its CUDA_VISIBLE_DEVICES); CMD and everything it starts lease from it through
RPOOL_AGENT_SOCKET (`rpool-agent run`, the pytest plugin, the client library).
The agent stops when CMD ends. See docs/cluster.md.

exit status:
  CMD's own when CMD ran (128+N when signal N ended it)
  125       the job's agent could not start (CMD was not run)
  126, 127  CMD cannot be executed / was not found
  2         usage error"""


def declare_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        choices=("slurm", "flux"),
        metavar="TARGET",
        help="slurm (slurm.conf and gres.conf lines) or flux (RFC 20 R)",
    )
    p.add_argument(
        "--sysroot",
        default="/",
        metavar="DIR",
        help="describe a recorded /sys + /proc tree under DIR instead of this machine",
    )
    p.add_argument(
        "--rank",
        type=count,
        default=0,
        metavar="N",
        help="flux: this node's execution target (rank) in the fleet's R (default: 0)",
    )
    add_output(p)


def declare_job(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slots-per-gpu",
        type=positive,
        metavar="N",
        help="slots per GPU, so that N tests can share one (default: 1)",
    )
    p.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]", help="the command to run"
    )


def export(args: argparse.Namespace) -> int:
    from ..detect import topology_report
    from ..errors import ConfigError, ProbeError
    from ..probes.nvidia import probe_gpus
    from .pools import write_text

    try:
        gpus = probe_gpus(args.sysroot)
        if gpus.failed:  # as detect: GPUs that NVML cannot read are not "no GPUs"
            raise ProbeError(gpus.problem or "NVIDIA GPUs unavailable")
        report = topology_report(args.sysroot, gpu_report=gpus)
    except ConfigError as exc:
        echo(f"rpool-agent: {exc}", err=True)
        return 2
    if args.target == "slurm":
        from ..export_slurm import slurm_export

        out = slurm_export(report)
        text, notes = out.text(), out.notes
    else:
        import json

        from ..export_flux import flux_notes, flux_r

        text, notes = json.dumps(flux_r(report, rank=args.rank)) + "\n", flux_notes(report)
    for line in notes:
        echo(f"rpool-agent: {line}", err=True)
    write_text(text, args.output)
    return 0


def job(args: argparse.Namespace) -> int:
    from ..job_agent import run_job

    return run_job(command_of(args), slots_per_gpu=args.slots_per_gpu)


COMMANDS = (
    Command("export", EXPORT_DOC, declare_export, export),
    Command("job", JOB_DOC, declare_job, job, usage="%(prog)s [OPTIONS] -- CMD [ARG ...]"),
)
