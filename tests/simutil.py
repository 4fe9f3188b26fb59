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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from wgutil import Watched

JIT_PREFIX = "Triton kernel JIT compilation during inference: "
FAST = ("--load-seconds", "0", "--time-scale", "0")


class Sim(Watched):
    """`with Sim("--fail-first", "2") as sim: sim.post(...)`. Later flags win over FAST."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait_listening: bool = True,
        timeout: float = 10.0,
        stdout: bool = False,
    ) -> None:
        """stdout: collect it too (vLLM's own log lines: the request log) in `out_lines`."""
        self.args = [*FAST, *args]
        self.capture_stdout = stdout
        self.env = {**os.environ, **(env or {})}
        self.wait_listening = wait_listening
        self.timeout = timeout
        self.port = 0

    def __enter__(self) -> Sim:
        argv = [sys.executable, "-m", "warmgate.sim", "--host", "127.0.0.1", "--port", "0"]
        self._watch(
            subprocess.Popen(
                [*argv, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.capture_stdout else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=self.env,
            )
        )
        if self.wait_listening:
            self.port = int(self.wait_event("listening", self.timeout)["port"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    # -- the process ---------------------------------------------------------------------

    def jit_keys(self) -> list[str]:
        jit = [ln[len(JIT_PREFIX) :] for ln in self.lines if ln.startswith(JIT_PREFIX)]
        return [rest.split(". ")[0] for rest in jit]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 5.0) -> int:
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


def cost(response: httpx.Response) -> tuple[float, float, list[str]]:
    """(x-sim-cost-ms, x-sim-compile-ms, x-sim-compiled) of a simulator response."""
    compiled = [k for k in response.headers["x-sim-compiled"].split(",") if k]
    return (
        float(response.headers["x-sim-cost-ms"]),
        float(response.headers["x-sim-compile-ms"]),
        compiled,
    )


def complete(sim_port: int, max_tokens: int, timeout: float = 30) -> tuple[int, Any]:
    """POST a completion of `max_tokens` (EOS ignored) straight to a simulator, as a client
    would: (status, parsed JSON or the error text)."""
    body = {"model": "warmgate/sim", "prompt": "hello", "max_tokens": max_tokens}
    request = urllib.request.Request(
        f"http://127.0.0.1:{sim_port}/v1/completions",
        json.dumps({**body, "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


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


def run_sim(
    args: Sequence[str], timeout: float = 10.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the simulator to completion (for runs expected to exit on their own)."""
    argv = [sys.executable, "-m", "warmgate.sim", "--host", "127.0.0.1", "--port", "0"]
    return subprocess.run(
        [*argv, *FAST, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )
