"""Typed exceptions for the whole package, and the wire error codes they map to.

Library code raises these; the CLI turns any `RpoolAgentError` into one line on stderr
and an exit code, never a traceback. Every server-side error has a stable `code` string
that travels on the wire (see docs/protocol.md), so a client can raise the same class the
server meant.
"""

from __future__ import annotations


class RpoolAgentError(Exception):
    """Base of every error this package raises on purpose."""

    code = "error"
    exit_code = 1


# --- pool documents ---------------------------------------------------------------------


class PoolFormatError(RpoolAgentError, ValueError):
    """A pool document is malformed. The message names file, place and problem."""

    code = "bad_pool"

    def __init__(self, what: str, *, where: str = "", source: str | None = None) -> None:
        self.what = what
        self.where = where
        self.source = source
        parts = [p for p in (source, where) if p]
        super().__init__(f"{': '.join(parts)}: {what}" if parts else what)


# --- requests and allocation --------------------------------------------------------------


class RequestError(RpoolAgentError, ValueError):
    """A resource request cannot be parsed (bad syntax, bad counts)."""

    code = "bad_request"


class UnknownResourceType(RpoolAgentError, TypeError):
    """A request names a resource type the pool does not have."""

    code = "unknown_type"


class ResourceUnavailable(RpoolAgentError):
    """The resources are not available: not now (seed API) or not ever (`Unsatisfiable`)."""

    code = "unavailable"


class Unsatisfiable(ResourceUnavailable):
    """The request exceeds the whole pool's capacity: it can never be granted."""

    code = "unsatisfiable"


class EmptyResourcePoolError(RpoolAgentError):
    """The pool holds no resources at all."""

    code = "empty_pool"


class Timeout(ResourceUnavailable):
    """A blocking acquire waited its whole timeout without a grant."""

    code = "timeout"


class NotOwner(RpoolAgentError, PermissionError):
    """The caller does not own the lease it tried to use."""

    code = "not_owner"


class PermissionDenied(RpoolAgentError, PermissionError):
    """The caller lacks the privilege for this operation (admin, other uid)."""

    code = "permission_denied"


class UnknownLease(RpoolAgentError, KeyError):
    """No lease has that id."""

    code = "unknown_lease"

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "unknown lease"


# --- protocol and transport ---------------------------------------------------------------


class ProtocolError(RpoolAgentError):
    """A message broke the wire protocol (malformed, oversized, wrong version)."""

    code = "malformed"


class MessageTooLarge(ProtocolError):
    """A frame exceeded the size limit; the connection is closed after this."""

    code = "too_large"


class UnknownOperation(ProtocolError):
    code = "unknown_op"


class VersionMismatch(ProtocolError):
    code = "version"


class NotRecorded(RpoolAgentError):
    """The agent could not write a grant to its journal (a full disk): nothing was granted."""

    code = "not_recorded"


class LimitExceeded(RpoolAgentError):
    """A per-connection or per-uid limit was hit (pending acquires, connections)."""

    code = "limit"


class AgentUnavailable(RpoolAgentError, ConnectionError):
    """No agent answers on the socket (not running, wrong path, permission)."""

    code = "agent_unavailable"


class ConfigError(RpoolAgentError, ValueError):
    """A configuration file or option is invalid."""

    code = "bad_config"


class ProbeError(RpoolAgentError):
    """A hardware probe could not read what it must (not: a field a device lacks)."""

    code = "probe"


def _all_error_classes() -> list[type[RpoolAgentError]]:
    seen: list[type[RpoolAgentError]] = []
    stack: list[type[RpoolAgentError]] = [RpoolAgentError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def error_for_code(code: str) -> type[RpoolAgentError]:
    """The exception class a wire error code stands for (the base class if unknown)."""
    for cls in _all_error_classes():
        if cls.code == code:
            return cls
    return RpoolAgentError
