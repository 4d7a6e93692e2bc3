"""PyYAML's complaint about a document, in words a user can act on.

Shared by the pool reader (formats) and the config reader: both say where the problem
is and, for the most common one, what it is. PyYAML reports a tab as "found character
that cannot start any token" (the C loader does not even show the character); YAML never
indents with tabs, so say "tab".
"""

from __future__ import annotations


def describe(exc: Exception, text: str) -> tuple[str, tuple[int, int] | None]:
    """(problem, (line, column) counted from 1, or None) for a `yaml.YAMLError` raised
    reading `text`."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem, None
    line, column = mark.line + 1, mark.column + 1
    lines = text.split("\n", line)
    if len(lines) >= line and lines[line - 1][column - 1 : column] == "\t":
        problem = "a tab: YAML indents with spaces, never tabs"
    return problem, (line, column)
