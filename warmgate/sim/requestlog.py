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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _line(where: str, message: str) -> str:
    stamp = time.strftime("%m-%d %H:%M:%S")
    return f"(APIServer pid={os.getpid()}) INFO {stamp} [{where}] {message}"


def request_id(base: str | None, chat: bool) -> str:
    """vLLM's id of an HTTP request: the X-Request-Id header, else a random one, prefixed."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{base or uuid.uuid4().hex}"


def engine_id(request_id: str) -> str:
    return f"{request_id}-{uuid.uuid4().hex[:8]}"


# StructuredOutputsParams' constraint and option fields, in its dataclass order.
STRUCTURED_FIELDS = (
    "json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace",
    "disable_additional_properties", "whitespace_pattern", "structural_tag",
)  # fmt: skip
_STRUCTURED_DEFAULTS: dict[str, Any] = {
    "disable_any_whitespace": False,
    "disable_additional_properties": False,
}


@dataclass(frozen=True, slots=True)
class LoggedParams:
    """What vLLM's SamplingParams repr prints of a request, but max_tokens (per prompt).

    Values are as vLLM holds them after its request model and SamplingParams.__post_init__
    (floats for the float fields, lists for stop and stop_token_ids)."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    thinking_token_budget: int | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: Mapping[str, Any] | None = None  # STRUCTURED_FIELDS set
    extra_args: Mapping[str, Any] | None = None


def sampling_params(params: LoggedParams, max_tokens: int) -> str:
    """vLLM 0.32's SamplingParams.__repr__, field for field."""
    p = params
    return (
        f"SamplingParams(n={p.n}, presence_penalty={p.presence_penalty}, "
        f"frequency_penalty={p.frequency_penalty}, repetition_penalty={p.repetition_penalty}, "
        f"temperature={p.temperature}, watermarking=None, top_p={p.top_p}, top_k={p.top_k}, "
        f"min_p={p.min_p}, seed={p.seed}, stop={list(p.stop)}, "
        f"stop_token_ids={list(p.stop_token_ids)}, bad_words={list(p.bad_words)}, "
        f"thinking_token_budget={p.thinking_token_budget}, "
        f"include_stop_str_in_output={p.include_stop_str_in_output}, "
        f"ignore_eos={p.ignore_eos}, max_tokens={max_tokens}, min_tokens={p.min_tokens}, "
        f"logprobs={p.logprobs}, prompt_logprobs={p.prompt_logprobs}, "
        f"skip_special_tokens={p.skip_special_tokens}, "
        f"spaces_between_special_tokens={p.spaces_between_special_tokens}, "
        f"structured_outputs={_structured(p.structured_outputs)}, extra_args={_extra(p)})"
    )


def _structured(fields: Mapping[str, Any] | None) -> str:
    """StructuredOutputsParams' dataclass repr, as logged: before the engine picks a
    backend, so `_backend` is still None."""
    if fields is None:
        return "None"
    shown = ", ".join(
        f"{name}={fields.get(name, _STRUCTURED_DEFAULTS.get(name))!r}" for name in STRUCTURED_FIELDS
    )
    return f"StructuredOutputsParams({shown}, _backend=None, _backend_was_auto=False)"


def _extra(params: LoggedParams) -> str:
    return "None" if not params.extra_args else str(dict(params.extra_args))


def received(
    request_id: str, params: LoggedParams, max_tokens: int, lora_request: str | None = None
) -> str:
    """`lora_request`: the adapter's LoRARequest repr, when the request names one."""
    return _line(
        "request_logger.py:65",
        f"Received request {request_id}: params: {sampling_params(params, max_tokens)}, "
        f"lora_request: {lora_request}.",
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
