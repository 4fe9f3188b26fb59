"""Reading a copy of the child's output as it passes through (the pump threads call `feed`).

The engine's log is where it says what a probe cannot see: a kernel compiled during
inference, a compile-cache artifact it could not load, the config it settled on. Scanners
here see whole lines only; an unfinished line waits for its end, per stream, and only its
first `kept_bytes` are kept (4 KiB, unless a scanner needs longer lines).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar

from warmgate.engineconfig import LOG_MARKER

# vLLM's JIT monitor: "Triton kernel JIT compilation during inference: <kernel>" and kin.
JIT_MARKER = b"JIT compilation during inference"


class LineScanner(ABC):
    """Whole lines of each stream, handed to `scan` under one lock (pumps run in threads)."""

    kept_bytes: ClassVar[int] = 4096  # the start of a line names what it is

    def __init__(self) -> None:
        self._tails: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def feed(self, stream: int, data: bytes) -> None:
        with self._lock:
            lines = (self._tails.get(stream, b"") + data).split(b"\n")
            self._tails[stream] = lines.pop()[: self.kept_bytes]
            self.scan(lines)

    @abstractmethod
    def scan(self, lines: list[bytes]) -> None:
        """Called with the lock held, with every line completed by one `feed`."""


class JitScanner(LineScanner):
    """Counts the engine's JIT-monitor lines, and those after Ready: its verdict on warm-up."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.after_ready = 0
        self.ready = False  # set by the event loop; a plain bool is safe across threads

    def scan(self, lines: list[bytes]) -> None:
        found = sum(JIT_MARKER in line for line in lines)
        self.total += found
        if self.ready:
            self.after_ready += found


class EngineConfigScanner(LineScanner):
    """Keeps the engine's start-up config line (`engineconfig.LOG_MARKER`) for `from_log`."""

    kept_bytes = 64 * 1024  # the line runs to 6 KB (GPU sizes, long paths) over several reads

    def __init__(self) -> None:
        super().__init__()
        self.line: str | None = None  # read by the event loop; one reference, set once

    def scan(self, lines: list[bytes]) -> None:
        if self.line is not None:
            return  # the first one: a later one is another start of the engine
        for line in lines:
            if LOG_MARKER in line:
                self.line = line.decode(errors="replace")
                return
