"""`audit`: which processes use a GPU without a lease on it (docs/status.md).

It audits now, from this process: the agent says who holds which GPU, NVML (through
pynvml, imported only here) says which processes run on each, psutil whose children they
are. `serve` runs the same audit periodically and `status` shows its latest result.
"""

from __future__ import annotations

from .options import Command, echo

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

DOC = """\
List the processes that use a GPU without a lease on it.

A process is within the rules when it holds a lease on that GPU or descends from
a process that does. GPUs outside the agent's pool are not audited.

exit status:
  0  every process on a GPU of the pool holds a lease on it
  1  some do not (they are listed), or no agent answers (one line on stderr)
  2  usage error
  3  NVML cannot be read: no audit is possible (one line on stderr)"""

#: The exit status when NVML cannot be read (no driver, no library).
CANNOT_AUDIT = 3


def declare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        dest="as_json",
        action="store_true",
        help="the audit as JSON (the `audit` object of docs/status.md)",
    )


def audit(args: argparse.Namespace) -> int:
    from ..audit import run_audit
    from ..client import Client
    from ..status_text import render_audit

    with Client() as c:
        doc = c.status()
    result = run_audit(doc)
    if result["problem"]:
        echo(f"rpool-agent: cannot audit the GPUs: {result['problem']}", err=True)
        return CANNOT_AUDIT
    if args.as_json:
        import json

        echo(json.dumps(result, indent=2))
    else:
        echo("\n".join(render_audit(result)))
        for note in result["notes"]:
            echo(f"rpool-agent: note: {note}", err=True)
    return 1 if result["violations"] else 0


COMMANDS = (Command("audit", DOC, declare, audit),)
