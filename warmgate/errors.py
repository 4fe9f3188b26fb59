"""How warmgate ends: its exit codes, the one table of exit reasons, and the error that carries one.

A child may exit with these numbers too, which is why every exit is logged once as
`event=exit` with a `reason`. `EXIT_REASONS` is that table; the README's "Exit codes"
table is tested against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType


class Exit(IntEnum):
    OK = 0
    USAGE = 2  # bad flags, bad environment variable, unreadable plan file
    UPSTREAM_NEVER_HEALTHY = 69  # EX_UNAVAILABLE: not healthy within --startup-timeout
    WARMUP_FAILED = 70  # EX_SOFTWARE: warm-up failed under --on-warmup-failure fail
    PROBE_PORT_UNAVAILABLE = 71  # EX_OSERR: the probe port could not be bound
    INTERNAL_ERROR = 70  # EX_SOFTWARE too: a bug in warmgate (the log has the traceback)
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127


@dataclass(frozen=True, slots=True)
class ExitReason:
    """One row of the exit table: the `reason` of the exit line, its code, what it means."""

    name: str
    code: int | None  # None: the code comes with the exit (the child's status, an error's code)
    meaning: str
    shown: str = ""  # the README's code column where `code` is None

    @property
    def code_text(self) -> str:
        return self.shown if self.code is None else str(int(self.code))


EXIT_REASONS: Mapping[str, ExitReason] = MappingProxyType(
    {
        row.name: row
        for row in (
            ExitReason(
                "child_exited", None, "the child exited by itself with this code", "child's code"
            ),
            ExitReason(
                "child_killed",
                None,
                "the child died of signal N (137 = SIGKILL, 143 = SIGTERM)",
                "128+N",
            ),
            ExitReason(
                "stopped",
                None,
                "the child exited after a stop that was asked for: SIGTERM (after the drain), "
                "SIGINT or SIGQUIT forwarded, or Ctrl-C in the terminal; `signal` names it",
                "child's code",
            ),
            ExitReason(
                "engine_died_during_warmup",
                None,
                "the child exited during the warm-up; the exit line names the shapes in flight",
                "child's code, or 70",
            ),
            ExitReason("usage", Exit.USAGE, "bad flags, bad environment variable, no command"),
            ExitReason(
                "upstream_never_healthy",
                Exit.UPSTREAM_NEVER_HEALTHY,
                "the upstream was not healthy within `--startup-timeout`",
            ),
            ExitReason(
                "warmup_failed",
                Exit.WARMUP_FAILED,
                "warm-up failed under `--on-warmup-failure fail`",
            ),
            ExitReason(
                "internal_error",
                Exit.INTERNAL_ERROR,
                "a bug in warmgate (the log has the traceback); the child is killed first",
            ),
            ExitReason(
                "probe_port_unavailable",
                Exit.PROBE_PORT_UNAVAILABLE,
                "the probe port could not be bound",
            ),
            ExitReason("not_executable", Exit.NOT_EXECUTABLE, "CMD exists but cannot be executed"),
            ExitReason("command_not_found", Exit.NOT_FOUND, "CMD was not found"),
            ExitReason(
                "error",
                None,
                "another error before the child started (the message says which)",
                "the error's",
            ),
        )
    }
)


@dataclass(frozen=True, slots=True)
class Ending:
    """How a run ends: the exit line's `reason` and the code warmgate exits with."""

    reason: str
    code: int


def ending(reason: str, code: int | None = None) -> Ending:
    """The ending for `reason`; `code` is required where the table leaves the code open.

    A code that contradicts the table is a bug in the caller and raises ValueError.
    """
    row = EXIT_REASONS[reason]
    if row.code is None:
        if code is None:
            raise ValueError(f"exit reason {reason!r} needs its code")
        return Ending(reason, int(code))
    if code is not None and code != row.code:
        raise ValueError(f"exit reason {reason!r} exits {int(row.code)}, not {code}")
    return Ending(reason, int(row.code))


def child_ending(status: int, signal: int | None) -> Ending:
    """The child's own end: its shell status, killed by `signal` when one is given."""
    return ending("child_killed" if signal is not None else "child_exited", status)


class WarmgateError(Exception):
    """An error that ends warmgate with one log line and a documented exit code."""

    def __init__(self, message: str, code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = int(code)
