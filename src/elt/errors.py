"""Exception roots. Each system's module subclasses these and says whether a retry can help."""

from __future__ import annotations


class EltError(Exception):
    """An error the user can act on; its message names the thing to fix."""

    transient: bool = False


class TransientError(EltError):
    """Retrying the same call later may succeed (network blips, a busy server)."""

    transient = True


class TerminalError(EltError):
    """Retrying will fail the same way until someone changes code, config or data."""


class ConfigurationError(TerminalError):
    """A setting, file or parameter is missing or malformed."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what one
    line of a table, log or summary shows.

    >>> first_line(ValueError("bad value\\nmore detail"))
    'bad value'
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def yaml_problem(path: object, exc: BaseException) -> str:
    """`<path>: line <n>: not valid YAML: <problem>`, the line left out when YAML gives none."""
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}:" if mark else ""
    problem = getattr(exc, "problem", None) or first_line(exc)
    return f"{path}:{where} not valid YAML: {problem}"
