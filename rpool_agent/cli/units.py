"""`install-units`: the systemd units, sysusers/tmpfiles entries and an example config."""

from __future__ import annotations

from .options import Command, echo

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


def declare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefix",
        default="/",
        metavar="DIR",
        help="root to install under: / (the default), or a staging tree for a package",
    )
    p.add_argument(
        "--exec",
        dest="exec_path",
        metavar="PATH",
        help="the rpool-agent script ExecStart= runs (default: the one running now)",
    )


def install_units(args: argparse.Namespace) -> int:
    from ..install import install_units as install

    try:
        done, notes = install(args.prefix, args.exec_path)
    except OSError as exc:
        echo(
            f"rpool-agent: cannot install units: {exc.filename or ''}: {exc.strerror or exc}",
            err=True,
        )
        return 1
    for item in done:
        echo(f"{item.action} {item.path}")
    for note in notes:
        echo(f"note: {note}")
    if args.prefix == "/":
        echo(
            "next: systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload"
            " && systemctl enable --now rpool-agent.socket rpool-agent.service"
        )
    return 0


COMMANDS = (
    Command(
        "install-units",
        "Install the systemd units and an example config.\n\n"
        "Writes the service and socket units, sysusers and tmpfiles entries and an\n"
        "example agent.yaml; an edited /etc/rpool-agent/agent.yaml is kept. See\n"
        "docs/systemd.md.",
        declare,
        install_units,
    ),
)
