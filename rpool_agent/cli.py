"""The `rpool-agent` command line: typer commands that call into the library.

Every command imports what it needs inside its body, so `rpool-agent detect` never pays
for the server, and `rpool-agent run` never imports asyncio. Errors from the library
(`RpoolAgentError`) become one line on stderr and an exit code, never a traceback.
"""

from __future__ import annotations

import sys

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
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """rpool-agent: the node-local authority over CPUs and GPUs."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise (`raise fail(...)`)."""
    typer.echo(f"rpool-agent: {message}", err=True)
    return typer.Exit(code)


# --- commands (one section each; keep bodies thin, logic lives in the library) ---------

# --- pool documents: validate, convert ---------------------------------------------------

_FORMS_HELP = "canary (flat, canary-wm <= 26.4), canary-nodes (canary-wm >= 26.9) or ctest"
_MAX_SHOWN = 50  # problems `validate` lists before it just counts the rest


def _pool_format(option: str, value: str, *, auto: bool) -> str:
    from .formats import FORMATS

    allowed = (("auto",) if auto else ()) + FORMATS
    if value not in allowed:
        raise fail(f"{option} must be one of {', '.join(allowed)}, not {value!r}", 2)
    return value


@app.command()
def validate(
    file: str = typer.Argument(..., help="Pool file: canary YAML (either form) or CTest JSON."),
    form: str = typer.Option("auto", "--format", "-f", help=f"auto, {_FORMS_HELP}."),
) -> None:
    """Check a pool file: a one-line summary, or every problem found (exit 1)."""
    from .formats import check_file

    checked = check_file(file, format=_pool_format("--format", form, auto=True))
    if checked.errors or checked.pool is None:
        for err in checked.errors[:_MAX_SHOWN]:
            typer.echo(str(err), err=True)
        if len(checked.errors) > _MAX_SHOWN:
            typer.echo(f"{file}: ... and {len(checked.errors) - _MAX_SHOWN} more", err=True)
        raise typer.Exit(1)
    typer.echo(f"{file}: valid {checked.format} pool: {checked.pool.summary()}")
    if checked.format == "ctest":
        from pathlib import Path

        from .formats.ctest import ctest_reads

        if not ctest_reads(Path(file).read_text(encoding="utf-8-sig", errors="replace")):
            typer.echo(
                f"{file}: note: the seed's YAML shape of a CTest spec; ctest itself reads only "
                "JSON with 'version' and 'local' a list (convert --to ctest writes that)",
                err=True,
            )


@app.command()
def convert(
    file: str = typer.Argument(..., help="Pool file to read (any form)."),
    to: str = typer.Option(..., "--to", "-t", help=f"Form to write: {_FORMS_HELP}."),
    output: str | None = typer.Option(None, "--output", "-o", help="Write here, not stdout."),
    source_form: str = typer.Option("auto", "--from", help="Form of FILE (default: detect)."),
) -> None:
    """Rewrite a pool file in another form; what the target cannot hold is noted on stderr."""
    from .formats import load_file, render

    to = _pool_format("--to", to, auto=False)
    pool = load_file(file, format=_pool_format("--from", source_form, auto=True))
    text, notes = render(pool, to)
    from .detect_cmd import write_text

    write_text(text, output)  # stdout, or atomically to a file
    for note in notes:
        typer.echo(f"rpool-agent: note: {to}: {note}", err=True)


# --- hardware: detect ---------------------------------------------------------------------


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
    mig: bool = typer.Option(
        True, "--mig/--no-mig", help="A MIG-mode GPU: offer its MIG devices, or leave it out."
    ),
    sysroot: str = typer.Option(
        "/", "--sysroot", help="Probe a recorded /sys + /proc tree instead of this machine."
    ),
    output: str | None = typer.Option(None, "--output", "-o", help="Write here, not stdout."),
) -> None:
    """Probe CPUs, NUMA nodes and NVIDIA GPUs; print the pool this process may use."""
    from .detect_cmd import run_detect
    from .errors import ConfigError

    try:
        run_detect(
            form,
            hyperthreads=hyperthreads,
            slots_per_gpu=slots_per_gpu,
            mig=mig,
            sysroot=sysroot,
            output=output,
        )
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


# --- lease daemon and clients: serve, run, acquire, release, status, drain ---------------


@app.command()
def serve(
    pool: str | None = typer.Option(
        None, "--pool", help="Pool file (any format); default: detect."
    ),
    socket_path: str | None = typer.Option(None, "--socket", help="Socket path to listen on."),
    config: str | None = typer.Option(
        None, "--config", help="YAML config file; options win over it."
    ),
    hyperthreads: bool | None = typer.Option(
        None, "--hyperthreads/--no-hyperthreads", help="One cpu per hardware thread."
    ),
    slots_per_gpu: int | None = typer.Option(None, "--slots-per-gpu", min=1, help="Slots per GPU."),
    mig: bool | None = typer.Option(
        None, "--mig/--no-mig", help="A MIG-mode GPU: offer its MIG devices, or leave it out."
    ),
    state_dir: str | None = typer.Option(
        None, "--state-dir", help="Where the lease table is kept."
    ),
    socket_group: str | None = typer.Option(
        None, "--socket-group", help="Group owning the socket."
    ),
    admin_group: str | None = typer.Option(
        None, "--admin-group", help="Group allowed to drain/reload."
    ),
    socket_mode: str | None = typer.Option(
        None, "--socket-mode", help="Octal mode of the socket (default 0660)."
    ),
    max_connections_per_uid: int | None = typer.Option(
        None, "--max-connections-per-uid", min=1, help="Open connections per uid (64)."
    ),
    max_pending_per_connection: int | None = typer.Option(
        None, "--max-pending-per-connection", min=1, help="Waiting acquires per connection (16)."
    ),
    max_message_bytes: int | None = typer.Option(
        None, "--max-message-bytes", min=1, help="Largest message accepted (65536)."
    ),
    handshake_timeout: float | None = typer.Option(
        None, "--handshake-timeout", min=0.001, help="Seconds a new connection may stay silent."
    ),
) -> None:
    """Hold the pool and grant leases over a Unix socket until SIGTERM."""
    from .serve import serve_main

    given = {
        "pool": pool,
        "socket": socket_path,
        "hyperthreads": hyperthreads,
        "slots_per_gpu": slots_per_gpu,
        "mig": mig,
        "state_dir": state_dir,
        "socket_group": socket_group,
        "admin_group": admin_group,
        "socket_mode": socket_mode,
        "max_connections_per_uid": max_connections_per_uid,
        "max_pending_per_connection": max_pending_per_connection,
        "max_message_bytes": max_message_bytes,
        "handshake_timeout": handshake_timeout,
    }
    serve_main(config, {k: v for k, v in given.items() if v is not None})


# Options end at the command: `run --gpus 1 cmd --gpus 3` gives cmd its own --gpus, and an
# unknown option before the command is an error, not a command named "--bogus".
_RUN_SETTINGS = {"allow_interspersed_args": False}


@app.command(context_settings=_RUN_SETTINGS)
def run(
    cmd: list[str] = typer.Argument(..., help="The command, after --."),
    gpus: int = typer.Option(0, "--gpus", min=0, help="Number of distinct GPUs."),
    cpus: int = typer.Option(0, "--cpus", min=0, help="Number of distinct cpus (cores)."),
    request: str | None = typer.Option(
        None, "--request", help="A request: RESOURCE_GROUPS string or JSON (items or mapping)."
    ),
    timeout: float | None = typer.Option(None, "--timeout", min=0, help="Seconds to wait."),
    label: str | None = typer.Option(None, "--label", help="Shown in status."),
) -> None:
    """Lease resources, then exec CMD inside the lease ({ctest_spec}, {pool}, {pool_nodes}).

    Exit status: CMD's own; 125 when run itself fails (no agent, refused, timed out), 126
    when CMD cannot be executed, 127 when it is not found, like env(1) and timeout(1).
    """
    from .errors import RpoolAgentError
    from .runner import RUN_FAILED, run_in_lease

    try:
        code = run_in_lease(
            cmd, gpus=gpus, cpus=cpus, request=request, timeout=timeout, label=label
        )
    except RpoolAgentError as exc:
        raise fail(str(exc), RUN_FAILED) from None
    raise typer.Exit(code)


@app.command()
def acquire(
    gpus: int = typer.Option(0, "--gpus", min=0),
    cpus: int = typer.Option(0, "--cpus", min=0),
    request: str | None = typer.Option(None, "--request"),
    timeout: float | None = typer.Option(None, "--timeout", min=0),
    label: str | None = typer.Option(None, "--label"),
    holder: int | None = typer.Option(
        None, "--holder", help="PID whose lifetime the lease follows (default: the parent)."
    ),
) -> None:
    """For scripts: lease for a process, print `export` lines (eval them)."""
    from .runner import acquire_for_script

    typer.echo(
        acquire_for_script(
            gpus=gpus, cpus=cpus, request=request, timeout=timeout, label=label, holder=holder
        )
    )


@app.command()
def release(lease: str = typer.Argument(..., help="Lease id (RPOOL_LEASE_ID).")) -> None:
    """Release a lease now (yours, or any as root)."""
    from .client import Client

    with Client() as c:
        c.release(lease)
    typer.echo(f"released {lease}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Free and used slots per type, leases and waiters."""
    from .client import Client
    from .runner import format_status

    with Client() as c:
        snap = c.status()
    if as_json:
        import json

        typer.echo(json.dumps(snap, indent=2))
    else:
        typer.echo(format_status(snap))


@app.command()
def drain(
    resource: str = typer.Argument(..., help="TYPE:ID, e.g. gpus:3"),
    reason: str = typer.Option("", "--reason"),
) -> None:
    """Grant nothing new from an instance (admin); existing leases run on."""
    from .client import Client

    with Client() as c:
        c.drain(resource, reason)
    typer.echo(f"drained {resource}")


@app.command()
def undrain(resource: str = typer.Argument(..., help="TYPE:ID")) -> None:
    """Grant from a drained instance again (admin)."""
    from .client import Client

    with Client() as c:
        c.undrain(resource)
    typer.echo(f"undrained {resource}")


@app.command()
def reload() -> None:
    """Re-read or re-detect the pool (admin); like SIGHUP."""
    from .client import Client

    with Client() as c:
        result = c.reload()
    if result.get("reloaded"):
        typer.echo(f"reloaded: {result.get('pool')}")
    else:
        typer.echo("not reloaded: this agent was given no pool source to read again")


# --- systemd packaging: install-units -----------------------------------------------------


@app.command("install-units")
def install_units(
    prefix: str = typer.Option("/", "--prefix", help="Root to install under (/, or staging)."),
    exec_path: str | None = typer.Option(
        None, "--exec", help="rpool-agent script for ExecStart= (default: the one running)."
    ),
) -> None:
    """Install the systemd units, sysusers/tmpfiles entries and an example agent.yaml."""
    from .install import install_units as install

    try:
        done, notes = install(prefix, exec_path)
    except OSError as exc:
        raise fail(f"cannot install units: {exc.filename or ''}: {exc.strerror or exc}") from None
    for item in done:
        typer.echo(f"{item.action} {item.path}")
    for note in notes:
        typer.echo(f"note: {note}")
    if prefix == "/":
        typer.echo(
            "next: systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload"
            " && systemctl enable --now rpool-agent.socket rpool-agent.service"
        )


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
