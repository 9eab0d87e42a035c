"""Exit codes, and how each kind of failure is told to the user.

Errors are classified once, here: a command raises (or collects) exceptions,
and :func:`exit_code_for` / :func:`error_lines` decide the exit code and the
text. The codes are a contract for scripts (``docs/cli.md``)::

    0  success
    1  the server refused (NotFound, Conflict, AlreadyExists, Forbidden, Invalid...)
    2  usage error or bad input, caught before anything was written
    3  the apiserver cannot be reached, or the client config is missing or invalid
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

from shoal import errors


class ExitCode(IntEnum):
    OK = 0
    SERVER_REFUSED = 1
    BAD_INPUT = 2
    UNREACHABLE = 3


class CLIError(Exception):
    """A failure the CLI itself detected; ``exit_code`` says which class."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CLIError):
    """Bad flags or arguments, an unknown kind, a malformed selector."""


class InputError(CLIError):
    """Manifests that cannot be applied; ``problems`` lists every one."""

    def __init__(self, problems: Iterable[object]) -> None:
        self.problems: tuple[str, ...] = tuple(str(p) for p in problems)
        super().__init__("; ".join(self.problems))


class ConfigError(CLIError):
    """No client config, or one that cannot be used."""

    exit_code = ExitCode.UNREACHABLE


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code a failure maps to (see the module docstring)."""
    if isinstance(error, CLIError):
        return error.exit_code
    if isinstance(error, errors.Unavailable):
        return ExitCode.UNREACHABLE
    if isinstance(error, errors.ShoalError):
        return ExitCode.SERVER_REFUSED
    if isinstance(error, OSError):
        return ExitCode.BAD_INPUT
    return ExitCode.SERVER_REFUSED


def server_error_line(error: errors.ShoalError) -> str:
    """kubectl's wording: ``Error from server (NotFound): pods "x" not found``."""
    if isinstance(error, errors.Unavailable):
        return f"Unable to connect to the server: {error.message}"
    return f"Error from server ({error.reason}): {error}"


def error_lines(error: BaseException) -> list[str]:
    """What to print on stderr for a failure, one line per problem."""
    if isinstance(error, InputError):
        return [f"error: {p}" for p in error.problems]
    if isinstance(error, CLIError):
        return [f"error: {error.message}"]
    if isinstance(error, errors.ShoalError):
        return [server_error_line(error)]
    if isinstance(error, OSError):
        where = f": {error.filename}" if error.filename else ""
        return [f"error: {error.strerror or error}{where}"]
    return [f"error: {error}"]
