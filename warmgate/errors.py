"""Exit codes warmgate uses for its own outcomes, and the error that carries one.

A child may exit with these numbers too, which is why every exit is logged
once as `event=exit` with a `reason`.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    USAGE = 2  # bad flags, bad environment variable, unreadable plan file
    UPSTREAM_NEVER_HEALTHY = 69  # EX_UNAVAILABLE: not healthy within --startup-timeout
    WARMUP_FAILED = 70  # EX_SOFTWARE: warm-up failed under --on-warmup-failure fail
    PROBE_PORT_UNAVAILABLE = 71  # EX_OSERR: the probe port could not be bound
    INTERNAL_ERROR = 70  # EX_SOFTWARE too: a bug in warmgate (the log has the traceback)
    NOT_EXECUTABLE = 126
    NOT_FOUND = 127


class WarmgateError(Exception):
    """An error that ends warmgate with one log line and a documented exit code."""

    def __init__(self, message: str, code: int = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = int(code)
