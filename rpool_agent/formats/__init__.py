"""Pool documents: canary flat, canary node form and the CTest resource spec.

Every form reads into and writes from the one model in `rpool_agent.pool`, so converting
is read-then-write. Reading checks as it goes and collects every problem (`check_*`, what
`rpool-agent validate` prints); `parse_*`/`load_file` raise the first as a
`PoolFormatError` naming file, place and problem. Writing re-reads its own output with the
same checks, so nothing this package writes is a document it would reject. See
docs/formats.md for the forms and which canary versions read which.

Pure apart from `load_file`/`check_file` (which read a file); PyYAML is imported only to
read YAML text, never to write it (see `yaml_emit`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import PoolFormatError
from ..pool import Pool
from . import canary_flat, canary_nodes, ctest
from .validate import Problems, first_error, kind

TYPE_CHECKING = False  # not typing's: `detect` does not import typing
if TYPE_CHECKING:
    from typing import Any

FORMATS = ("canary", "canary-nodes", "ctest")
_MODULES = {m.NAME: m for m in (canary_flat, canary_nodes, ctest)}
WRAPPER = "resource_pool"

__all__ = [
    "FORMATS",
    "Checked",
    "check_document",
    "check_file",
    "check_text",
    "detect_format",
    "dumps",
    "load_file",
    "parse_document",
    "parse_text",
    "read_text",
    "render",
    "to_document",
]


@dataclass(slots=True)
class Checked:
    """What reading a document found: its form, the pool (None if unusable), every problem."""

    format: str
    pool: Pool | None
    errors: list[PoolFormatError]

    def __init__(
        self,
        format: str,
        pool: Pool | None = None,
        errors: list[PoolFormatError] | None = None,
    ) -> None:
        self.format = format
        self.pool = pool
        self.errors = [] if errors is None else errors

    def pool_or_raise(self) -> Pool:
        if self.errors or self.pool is None:
            raise first_error(self.errors or [PoolFormatError("no pool")])
        return self.pool


def detect_format(doc: Any) -> str:
    """Which of FORMATS `doc` (parsed YAML/JSON) is written in, from its top-level keys."""
    if not isinstance(doc, Mapping):
        raise PoolFormatError(f"a pool document is a mapping, not {kind(doc)}")
    if "version" in doc or "local" in doc:
        return ctest.NAME
    payload = doc.get(WRAPPER, doc)
    if isinstance(payload, Mapping) and "nodes" in payload:
        return canary_nodes.NAME
    return canary_flat.NAME


def _check_format(format: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise PoolFormatError(f"unknown format {format!r} (choose auto, {', '.join(FORMATS)})")


def check_document(doc: Any, *, format: str = "auto", source: str | None = None) -> Checked:
    """Read already-parsed data, collecting every problem instead of stopping at the first.

    The pool shares nothing with `doc` (readers do not copy: text they parse is theirs).
    """
    checked = _check(doc, format, source)
    if checked.pool is not None:
        checked.pool = checked.pool.copy()
    return checked


def _check(doc: Any, format: str, source: str | None) -> Checked:
    _check_format(format)
    try:
        found = detect_format(doc)
    except PoolFormatError as exc:
        return Checked(format, None, [PoolFormatError(exc.what, source=source)])
    problems = Problems(source)
    if format not in ("auto", found):
        problems.add(f"this is the {found} form, not {format} (drop --format, or convert it)")
        return Checked(format, None, problems.errors)
    module = _MODULES[found]
    where = ""
    payload = doc
    if module is not ctest and WRAPPER in doc:
        payload, where = doc[WRAPPER], WRAPPER
        if not isinstance(payload, Mapping):
            problems.add(f"must be a mapping, not {kind(payload)}", where)
            return Checked(found, None, problems.errors)
    pool = module.read(payload, problems, where)
    return Checked(found, None if problems else pool, problems.errors)


def _load_text(text: str, source: str | None) -> Any:
    """JSON or YAML text as data. JSON is tried first: it needs no PyYAML import."""
    if not text.strip():
        raise PoolFormatError("empty document", source=source)
    json_error = ""
    if text.lstrip().startswith("{"):
        import json

        try:
            return json.loads(text)
        except ValueError as exc:  # maybe a YAML flow mapping: `{cpus: 8}`
            err = exc if isinstance(exc, json.JSONDecodeError) else None
            json_error = f"{err.msg}, line {err.lineno} column {err.colno}" if err else str(exc)
        except RecursionError:
            raise PoolFormatError("nested too deeply", source=source) from None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        if len(text) > _DEEP_ENOUGH_TO_CRASH:
            _check_depth(yaml.parse(text, Loader=loader), source)
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        from ..yaml_problem import describe

        problem, mark = describe(exc, text)
        at = f", line {mark[0]} column {mark[1]}" if mark else ""
        what = f"not valid YAML ({problem}{at})"
        if json_error:
            what = f"not valid JSON ({json_error}) nor YAML ({problem}{at})"
        raise PoolFormatError(what, source=source) from None
    except PoolFormatError:  # said precisely already (the depth check)
        raise
    except (ValueError, RecursionError) as exc:  # e.g. `2024-13-01` is no date
        raise PoolFormatError(f"not valid YAML ({exc})", source=source) from None


#: PyYAML's C loader builds nodes recursively and overflows the C stack (SIGSEGV, no
#: message) somewhere past 20,000 levels; a text this short cannot nest that deep.
_DEEP_ENOUGH_TO_CRASH = 20_000
_MAX_DEPTH = 1_000  # a pool document nests about 6 deep


def _check_depth(events: Any, source: str | None) -> None:
    """Refuse deep nesting from the parser's events (iterative, so it cannot overflow)
    before the loader builds anything; about a third of the load's own time."""
    import yaml

    opens = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
    closes = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    depth = 0
    for event in events:
        if isinstance(event, opens):
            depth += 1
            if depth > _MAX_DEPTH:
                raise PoolFormatError(f"nested more than {_MAX_DEPTH} deep", source=source)
        elif isinstance(event, closes):
            depth -= 1


def check_text(text: str, *, format: str = "auto", source: str | None = None) -> Checked:
    _check_format(format)
    try:
        doc = _load_text(text, source)
    except PoolFormatError as exc:
        return Checked(format, None, [exc])
    return _check(doc, format, source)


#: Larger than any pool file (a 1,000-node cluster of 256-cpu nodes is about 20 MB):
#: `validate /dev/zero` must end, with a reason.
MAX_FILE_BYTES = 64 * 1024 * 1024


def read_text(path: str | os.PathLike[str]) -> str:
    """A pool file's text (at most MAX_FILE_BYTES); PoolFormatError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise PoolFormatError(f"cannot read: {exc.strerror or exc}", source=str(path)) from None
    except UnicodeDecodeError:
        raise PoolFormatError("not UTF-8 text", source=str(path)) from None
    if len(text) > MAX_FILE_BYTES:
        limit = f"{MAX_FILE_BYTES // 2**20} MiB"
        raise PoolFormatError(f"larger than {limit}: not a pool file", source=str(path))
    return text


def check_file(path: str | os.PathLike[str], *, format: str = "auto") -> Checked:
    """Read and check a pool file; unreadable files become one problem, not an exception."""
    try:
        text = read_text(path)
    except PoolFormatError as exc:
        return Checked(format, None, [exc])
    return check_text(text, format=format, source=str(path))


def parse_document(doc: Any, *, format: str = "auto", source: str | None = None) -> Pool:
    """The pool in already-parsed YAML/JSON data; raises the first PoolFormatError."""
    return check_document(doc, format=format, source=source).pool_or_raise()


def parse_text(text: str, *, format: str = "auto", source: str | None = None) -> Pool:
    """The pool in YAML or JSON text; raises the first PoolFormatError."""
    return check_text(text, format=format, source=source).pool_or_raise()


def load_file(path: str | os.PathLike[str], *, format: str = "auto") -> Pool:
    """The pool in a file (errors name the path); raises the first PoolFormatError."""
    return check_file(path, format=format).pool_or_raise()


def to_document(pool: Pool, format: str) -> tuple[dict[str, Any], list[str]]:
    """`pool` as a `format` document, plus notes on what the form could not hold.

    Raises PoolFormatError when the pool cannot be written in that form at all (two
    nodes in a CTest spec, a GPU UUID as a CTest id...), naming the place in the output.
    """
    if format not in FORMATS:
        raise PoolFormatError(f"unknown format {format!r} (choose {', '.join(FORMATS)})")
    doc, notes = _MODULES[format].write(pool)
    checked = _check(doc, format, f"cannot write {format}")
    if checked.errors:
        raise first_error(checked.errors)
    return doc, notes


def render(pool: Pool, format: str) -> tuple[str, list[str]]:
    """`dumps` plus the notes of `to_document` (what `rpool-agent convert` reports)."""
    doc, notes = to_document(pool, format)
    if format == ctest.NAME:
        import json

        return json.dumps(doc, indent=2) + "\n", notes
    from .yaml_emit import dumps as yaml_dumps

    return yaml_dumps(doc), notes


def dumps(pool: Pool, format: str) -> str:
    """`pool` as text: the canary forms as YAML, the CTest spec as JSON (indent 2)."""
    return render(pool, format)[0]
