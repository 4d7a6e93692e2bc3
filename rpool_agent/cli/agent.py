"""Commands that run or steer the agent: `serve`, and the admin's `drain`, `undrain`,
`reload`."""

from __future__ import annotations

from .options import Command, add_pool_shape, echo, number, positive, tell_agent

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


handshake_seconds = number(float, 0.001, "a number of seconds >= 0.001")


def declare_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="YAML config file (agent.yaml); options win over it"
    )
    p.add_argument(
        "--pool",
        metavar="FILE",
        help="serve this pool file (any form) instead of this node's detected hardware",
    )
    add_pool_shape(p)
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="Unix socket to listen on (default: $RPOOL_AGENT_SOCKET, else the system"
        " socket in /run as root, a socket in $XDG_RUNTIME_DIR for a user)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the lease table is kept across restarts (default: $STATE_DIRECTORY,"
        " else a directory in /var/lib as root, in ~/.local/state for a user)",
    )
    p.add_argument(
        "--forget-leases",
        action="store_true",
        default=None,
        help="start with no leases even if the state dir's journal is lost or unreadable"
        " (the agent refuses otherwise: their jobs may still run; docs/durability.md)",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group that owns the socket: its members may lease",
    )
    p.add_argument(
        "--admin-group",
        metavar="GROUP",
        help="group whose members may drain, undrain and reload (root always may)",
    )
    p.add_argument("--socket-mode", metavar="MODE", help="octal mode of the socket (default: 0660)")
    p.add_argument(
        "--max-connections-per-uid",
        type=positive,
        metavar="N",
        help="open connections one uid may hold (default: 64)",
    )
    p.add_argument(
        "--max-pending-per-connection",
        type=positive,
        metavar="N",
        help="acquires one connection may have waiting (default: 16)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=positive,
        metavar="N",
        help="largest request accepted, in bytes (default: 65536)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=handshake_seconds,
        metavar="SECONDS",
        help="how long a new connection may stay silent before it is closed",
    )
    p.add_argument(
        "--gpu-health-interval",
        type=number(float, 0, "a number of seconds >= 0"),
        metavar="SECONDS",
        help="seconds between GPU health polls (default: 30 for a detected pool, off with"
        " a pool file; 0: off); a GPU that fails is drained until it answers again",
    )


def declare_drain(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", metavar="TYPE:ID", help="the instance, e.g. gpus:3")
    p.add_argument(
        "--reason",
        default="",
        metavar="TEXT",
        help="why (e.g. 'ECC errors, ticket 123'): shown by `status` until undrained, and logged",
    )


def declare_undrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("resource", metavar="TYPE:ID", help="the instance, e.g. gpus:3")


def serve(args: argparse.Namespace) -> int:
    from ..serve import serve_main

    # Every other option of serve is a config file setting (config.py checks the names);
    # None, not given, lets the file's value show through.
    not_settings = ("config", "handler", "command_parser", "forget_leases")
    given = {k: v for k, v in vars(args).items() if k not in not_settings and v is not None}
    serve_main(args.config, given, forget_leases=bool(args.forget_leases))
    return 0


def drain(args: argparse.Namespace) -> int:
    return tell_agent(lambda c: c.drain(args.resource, args.reason), f"drained {args.resource}")


def undrain(args: argparse.Namespace) -> int:
    return tell_agent(lambda c: c.undrain(args.resource), f"undrained {args.resource}")


def reload(args: argparse.Namespace) -> int:
    from ..client import Client

    with Client() as c:
        result = c.reload()
    if result.get("reloaded"):
        echo(f"reloaded: {result.get('pool')}")
    else:
        echo("not reloaded: this agent was given no pool source to read again")
    return 0


COMMANDS = (
    Command(
        "serve",
        "Hold the pool and grant leases over a Unix socket.\n\n"
        "Runs until SIGTERM; SIGHUP reloads the pool. Settings come from the defaults,\n"
        "then the --config file, then these options. See docs/systemd.md for running it\n"
        "as a service.",
        declare_serve,
        serve,
    ),
    Command(
        "drain",
        "Grant nothing new from an instance (admin).\n\nLeases that hold it run on.",
        declare_drain,
        drain,
    ),
    Command("undrain", "Grant from a drained instance again (admin).", declare_undrain, undrain),
    Command(
        "reload",
        "Read the pool again, as SIGHUP does (admin).\n\n"
        "Re-reads the pool file, or probes the hardware again if the agent serves\n"
        "detected hardware.",
        None,
        reload,
    ),
)
