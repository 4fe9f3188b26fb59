"""vLLM 0.32's request logging (`--enable-log-requests`, `--enable-log-outputs`), line for line.

No I/O here but the clock: each function returns the line vLLM's logger would print,
with its prefix. The texts come from vLLM's request_logger.py and v1/engine/async_llm.py:
`Received request` when a request is accepted, `Added request` (the engine's id: the
request's own + 8 random hex digits) when it enters the engine, `Generated response` for
chat outputs only, and the abort lines.
"""

from __future__ import annotations

import os
import time
import uuid

from warmgate.sim.generate import SamplingSpec


def _line(where: str, message: str) -> str:
    stamp = time.strftime("%m-%d %H:%M:%S")
    return f"(APIServer pid={os.getpid()}) INFO {stamp} [{where}] {message}"


def request_id(base: str | None, chat: bool) -> str:
    """vLLM's id of an HTTP request: the X-Request-Id header, else a random one, prefixed."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{base or uuid.uuid4().hex}"


def engine_id(request_id: str) -> str:
    return f"{request_id}-{uuid.uuid4().hex[:8]}"


def received(request_id: str, spec: SamplingSpec, n: int) -> str:
    params = (
        f"SamplingParams(n={n}, temperature={spec.temperature}, seed={spec.seed}, "
        f"stop={list(spec.stop)}, ignore_eos={spec.ignore_eos}, max_tokens={spec.max_tokens}, "
        f"min_tokens={spec.min_tokens})"
    )
    return _line(
        "request_logger.py:65",
        f"Received request {request_id}: params: {params}, lora_request: None.",
    )


def added(engine_id: str) -> str:
    return _line("async_llm.py:578", f"Added request {engine_id}.")


def generated(request_id: str, output: str, finish_reason: str | None, stream: str = "") -> str:
    """stream: "" (a whole response), "delta" or "complete" (a streamed one)."""
    info = f" (streaming {stream})" if stream else ""
    return _line(
        "request_logger.py:108",
        f"Generated response {request_id}{info}: output: {output!r}, "
        f"finish_reason: {finish_reason}",
    )


def aborted(request_id: str, engine_id: str) -> list[str]:
    """The engine's abort, then the request's."""
    return [
        _line("async_llm.py:922", f"Aborted request(s) {engine_id}."),
        _line("async_llm.py:783", f"Request {request_id} aborted."),
    ]
