"""The real vLLM CPU build, started once under warmgate and shared by the e2e tests.

scripts/test exports WARMGATE_VLLM_CMD (the last line of scripts/real_vllm.sh). Without
it these tests are skipped on a developer's machine, and fail in CI, where they must run.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))

from wgutil import Running, free_port, http_get, wait_for


def vllm_command() -> list[str]:
    command = os.environ.get("WARMGATE_VLLM_CMD")
    if not command:
        if os.environ.get("CI"):
            pytest.fail("WARMGATE_VLLM_CMD is not set: run the suite with scripts/test")
        pytest.skip("WARMGATE_VLLM_CMD not set (scripts/test sets it from scripts/real_vllm.sh)")
    return shlex.split(command)


@dataclass
class Served:
    gate: Running
    probe_port: int
    vllm_port: int
    model: str = "tiny-llama"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.vllm_port}"


@pytest.fixture(scope="package")
def served() -> Iterator[Served]:
    """warmgate run -- vllm (one start for the contract, gate and drain tests)."""
    vllm_port = free_port()
    gate = Running(
        [
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            # The default plan, seed included. The vLLM CPU build (0.32) kills its engine
            # when a seeded request's prefill is chunked ("CPU Generator does not use
            # offset"); the plan never puts more than one step budget (read from vLLM's
            # start-up line) in flight, so none is.
            "--drain-min",
            "2",
            "--",
            *vllm_command(),
            "--host",
            "127.0.0.1",
            "--port",
            str(vllm_port),
        ]
    )
    try:
        probe_port = until_ready(gate, timeout=900)
        assert gate.proc.poll() is None, gate.stderr[-3000:]
        yield Served(gate, probe_port, vllm_port)
    finally:
        gate.stop()


def until_ready(gate: Running, timeout: float) -> int:
    """warmgate's probe port, once its /ready answers 200 or it has exited (callers check)."""
    probe_port = int(gate.wait_event("listening", timeout=60)["port"])
    wait_for(
        lambda: http_get(probe_port, "/ready")[0] == 200 or gate.proc.poll() is not None,
        timeout=timeout,
        interval=0.5,
    )
    return probe_port
