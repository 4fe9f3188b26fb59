"""structlog set-up: JSON lines when stderr is not a terminal, readable when it is.

structlog is imported on first use, after `warmgate run` has spawned its child.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def configure(level: str = "info", fmt: str = "auto") -> None:
    """One event per line on stderr, with stable keys (`event`, `phase`, `shape`, `ms`, ...)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    structlog = _structlog(pretty_tracebacks=fmt == "console")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per record (line and newline together), so a child line copied to the
        # same stderr can never land between a record and its newline.
        logger_factory=structlog.WriteLoggerFactory(file=_Stderr()),
        cache_logger_on_first_use=True,
    )


class _Stderr:
    """stderr for log records, until its reader goes away (a closed pipe, a hung-up
    terminal). Then the rest goes to /dev/null: PID 1 must not stop, nor skip what it was
    doing, over a log line that nobody can read."""

    def write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
        except OSError:
            _lose_stderr()

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except OSError:
            _lose_stderr()


def _lose_stderr() -> None:
    # fd 2 itself, so the pump threads' copies of the child's output and the interpreter's
    # last flush (which, failing, would make the exit status 120) stop failing too.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr.flush()  # the text held for the gone reader now goes to /dev/null


def get(name: str = "warmgate") -> Any:
    import structlog

    return structlog.get_logger(name)


def _structlog(pretty_tracebacks: bool) -> Any:
    """structlog; without rich when only JSON is written (rich and pygments: ~5 MB of RSS).

    structlog.dev imports rich, when installed, for the console renderer's tracebacks; a
    None entry in sys.modules makes that import fail as if rich were absent.
    """
    if pretty_tracebacks or "structlog" in sys.modules or "rich" in sys.modules:
        import structlog

        return structlog
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog
