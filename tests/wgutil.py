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
