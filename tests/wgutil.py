"""Helpers shared by the tests: run warmgate as a real process and read its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from warmgate.bench.core import free_port as free_port  # the tests' import of it

CHILDREN = Path(__file__).parent / "children"
WARMGATE = [sys.executable, "-m", "warmgate"]


def child(name: str, *args: str) -> list[str]:
    """argv of a helper child program in tests/children/."""
    return [sys.executable, str(CHILDREN / name), *args]


def start(
    args: Sequence[str], env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "WARMGATE_LOG_FORMAT": "json", **(env or {})}
    # No terminal unless a test gives one: pytest run by hand must not lend warmgate its own.
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(
        [*WARMGATE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, **kw
    )


def run(args: Sequence[str], timeout: float = 30, **kw: Any) -> tuple[int, str, str]:
    proc = start(args, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log records of warmgate's stderr, in order (child text lines are skipped)."""
    return [record for line in stderr.splitlines() for record in _records(line)]


_DECODER = json.JSONDecoder()


def _records(line: str) -> list[dict[str, Any]]:
    """Every JSON log record on one line, even two run together.

    warmgate and the child it pumps share stderr, and a record can land mid-line: with
    PYTHONUNBUFFERED=1 (common in images) structlog's print() writes the record and its
    newline separately, so `{warmgate}{child}\n\n` happens.
    """
    found = []
    at = line.find("{")
    while at != -1:
        try:
            record, end = _DECODER.raw_decode(line, at)
        except ValueError:
            at = line.find("{", at + 1)
            continue
        if isinstance(record, dict) and "event" in record:
            found.append(record)
        at = line.find("{", end)
    return found


def exit_event(stderr: str) -> dict[str, Any]:
    exits = [e for e in events(stderr) if e.get("event") == "exit"]
    assert len(exits) == 1, f"expected one exit event in:\n{stderr}"
    return exits[0]


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Watched:
    """A child process whose stderr (and stdout, when piped: a chatty child would block on
    it otherwise) threads collect line by line as it runs; every wait on them is bounded."""

    proc: subprocess.Popen[bytes]

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []  # stderr, without line ends
        self.out_lines: list[str] = []
        self._changed = threading.Condition()
        self._stderr_done = False
        self._readers = [threading.Thread(target=self._read, args=(proc.stderr, self.lines))]
        if proc.stdout is not None:
            self._readers.append(
                threading.Thread(target=self._read, args=(proc.stdout, self.out_lines))
            )
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                into.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            if into is self.lines:
                self._stderr_done = True
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return "".join(f"{line}\n" for line in self.out_lines)

    @property
    def stderr(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines of stderr so far, all or those of one event."""
        return [e for e in events(self.stderr) if name is None or e.get("event") == name]

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """The first stderr line that `predicate` accepts, once the process has written it."""
        deadline = time.monotonic() + timeout
        exited_at: float | None = None
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                now = time.monotonic()
                if exited_at is None and self.proc.poll() is not None:
                    exited_at = now  # the reader may still hold its last lines
                if self._stderr_done or (exited_at is not None and now - exited_at > 0.2):
                    raise AssertionError(
                        f"exited {self.proc.returncode} before the line waited for:\n{self.stderr}"
                    )
                if now >= deadline:
                    raise AssertionError(f"no such line within {timeout} s:\n{self.stderr}")
                self._changed.wait(min(deadline - now, 0.1))

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The first JSON log record of event `name` whose fields equal `match`."""

        def wanted(record: dict[str, Any]) -> bool:
            return record.get("event") == name and all(record.get(k) == v for k, v in match.items())

        line = self.wait_line(lambda line: any(map(wanted, _records(line))), timeout)
        return next(filter(wanted, _records(line)))


class Running(Watched):
    """A warmgate process whose stderr log is collected line by line as it runs."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self._watch(start(args, env=env))

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._readers[0].join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._readers[0].join(timeout=5)


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON or text) of GET http://127.0.0.1:port/path."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            status, body = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")
