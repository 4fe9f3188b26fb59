"""Run `warmgate sim` as a real process on 127.0.0.1 and talk to it.

The port is read from the simulator's `{"event": "listening", "port": N}` log line; every
wait is bounded, and the process is killed when the `with` block ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

JIT_PREFIX = "Triton kernel JIT compilation during inference: "
FAST = ("--load-seconds", "0", "--time-scale", "0")


class Sim:
    """`with Sim("--fail-first", "2") as sim: sim.post(...)`. Later flags win over FAST."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait_listening: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.args = [*FAST, *args]
        self.env = {**os.environ, **(env or {})}
        self.wait_listening = wait_listening
        self.timeout = timeout
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> Sim:
        argv = [sys.executable, "-m", "warmgate.sim", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            [*argv, *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if self.wait_listening:
            self.port = int(self.wait_event("listening", self.timeout)["port"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # -- the process ---------------------------------------------------------------------

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                assert self.proc is not None
                if left <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    if self.proc.poll() is not None:
                        time.sleep(0.05)  # the reader thread may still hold a last line
                        for line in self.lines[seen:]:
                            if predicate(line):
                                return line
                    raise AssertionError("no matching line; stderr was:\n" + self.stderr)
                self._changed.wait(min(left, 0.1))

    def wait_event(self, event: str, timeout: float = 5.0) -> dict[str, Any]:
        line = self.wait_line(lambda ln: _event_of(ln) == event, timeout)
        found: dict[str, Any] = json.loads(line)
        return found

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in list(self.lines) if ln.startswith("{")]

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def jit_keys(self) -> list[str]:
        jit = [ln[len(JIT_PREFIX) :] for ln in self.lines if ln.startswith(JIT_PREFIX)]
        return [rest.split(". ")[0] for rest in jit]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 5.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    # -- HTTP ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def async_client(self, timeout: float = 20.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        return httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits)

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        with self.client(timeout) as client:
            return client.get(path)

    def post(self, path: str, body: Any, timeout: float = 10.0) -> httpx.Response:
        with self.client(timeout) as client:
            return client.post(path, json=body)


def _event_of(line: str) -> Any:
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line).get("event")
    except ValueError:
        return None


def cost(response: httpx.Response) -> tuple[float, float, list[str]]:
    """(x-sim-cost-ms, x-sim-compile-ms, x-sim-compiled) of a simulator response."""
    compiled = [k for k in response.headers["x-sim-compiled"].split(",") if k]
    return (
        float(response.headers["x-sim-cost-ms"]),
        float(response.headers["x-sim-compile-ms"]),
        compiled,
    )


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final "[DONE]"."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def token_prompt(length: int, salt: int = 0) -> list[int]:
    """A prompt of exactly `length` tokens; a different salt gives fresh text."""
    return [264 + (i * 7 + salt * 131) % 700 for i in range(length)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def poll(check: Callable[[], bool], timeout: float = 5.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()


def run_sim(args: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run the simulator to completion (for runs expected to exit on their own)."""
    argv = [sys.executable, "-m", "warmgate.sim", "--host", "127.0.0.1", "--port", "0"]
    return subprocess.run(
        [*argv, *FAST, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
