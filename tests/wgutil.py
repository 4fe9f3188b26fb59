"""Helpers shared by the tests: run warmgate as a real process and read its log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CHILDREN = Path(__file__).parent / "children"
WARMGATE = [sys.executable, "-m", "warmgate"]


def child(name: str, *args: str) -> list[str]:
    """argv of a helper child program in tests/children/."""
    return [sys.executable, str(CHILDREN / name), *args]


def start(
    args: Sequence[str], env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "WARMGATE_LOG_FORMAT": "json", **(env or {})}
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
    """The JSON log lines of warmgate's stderr, in order (child output lines are skipped)."""
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """A warmgate process whose stderr log is collected line by line as it runs."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        import threading

        self.proc = start(args, env=env)
        self.lines: list[str] = []
        self.out_lines: list[str] = []  # stdout is drained too, or a chatty child would block on it
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stderr, self.lines), daemon=True
        )
        self._out_reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, self.out_lines), daemon=True
        )
        self._reader.start()
        self._out_reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            into.append(raw.decode(errors="replace"))

    @property
    def stdout(self) -> str:
        return "".join(self.out_lines)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = events(self.stderr)
        return [e for e in found if name is None or e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for e in self.events(name):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                for e in self.events(name):
                    if all(e.get(k) == v for k, v in match.items()):
                        return e
                raise AssertionError(
                    f"exited {self.proc.returncode} before {name} {match}:\n{self.stderr}"
                )
            return None

        return wait_for(find, timeout=timeout)  # type: ignore[no-any-return]

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)


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
