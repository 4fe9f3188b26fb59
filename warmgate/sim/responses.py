"""vLLM's OpenAI-compatible response JSON: whole responses, SSE chunks, the model list.

No I/O here. Keys, their order and null-valued fields follow captures of the real vLLM
0.32 CPU server, so that clients (and a contract test) see the same shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from warmgate.sim.api import Context, Generation, Prompt
from warmgate.sim.generate import SeqPlan, token_logprob, top_logprobs
from warmgate.sim.tokenizer import Tokenizer

SYSTEM_FINGERPRINT = "vllm-0.32.0-warmgate-sim"


# -- responses --------------------------------------------------------------------------


class SeqResult(Protocol):
    """A sequence's outcome as the engine leaves it."""

    @property
    def plan(self) -> SeqPlan: ...
    @property
    def emitted(self) -> int: ...
    @property
    def finish_reason(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Ids:
    """Identity shared by every chunk of one response."""

    id: str
    created: int

    @staticmethod
    def new(chat: bool) -> Ids:
        prefix = "chatcmpl" if chat else "cmpl"
        return Ids(f"{prefix}-{uuid.uuid4().hex[:16]}", int(time.time()))


def completion_response(
    gen: Generation, results: Sequence[Sequence[SeqResult]], ids: Ids, tok: Tokenizer
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = []
    for job, seqs in enumerate(results):
        prompt = gen.prompts[job]
        for index, seq in enumerate(seqs):
            text = _echo_text(gen, prompt, tok) + _text(seq)
            choices.append(
                {
                    "index": job * gen.n + index,
                    "text": text,
                    "logprobs": _completion_logprobs(gen, seq, tok, echo_prompt=prompt),
                    "finish_reason": seq.finish_reason,
                    "stop_reason": _stop_reason(seq),
                    "token_ids": _token_ids(gen, seq, 0, seq.emitted),
                    "prompt_logprobs": _prompt_logprobs(gen, prompt, tok),
                    "prompt_token_ids": prompt.ids if gen.return_token_ids else None,
                    "routed_experts": None,
                }
            )
    return {
        "id": ids.id,
        "object": "text_completion",
        "created": ids.created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage(gen, results),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_response(
    gen: Generation, results: Sequence[Sequence[SeqResult]], ids: Ids, tok: Tokenizer
) -> dict[str, Any]:
    choices: list[dict[str, Any]] = [
        {
            "index": index,
            "message": {
                "role": gen.reply_role,
                "content": gen.chat_echo + _text(seq),
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": _chat_logprobs(gen, seq, 0, seq.emitted, tok),
            "finish_reason": seq.finish_reason,
            "stop_reason": _stop_reason(seq),
            "token_ids": _token_ids(gen, seq, 0, seq.emitted),
            "routed_experts": None,
        }
        for index, seq in enumerate(results[0])
    ]
    prompt = gen.prompts[0]
    return {
        "id": ids.id,
        "object": "chat.completion",
        "created": ids.created,
        "model": gen.model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "usage": usage(gen, results),
        "prompt_logprobs": _prompt_logprobs(gen, prompt, tok),
        "prompt_token_ids": prompt.ids if gen.return_token_ids else None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def usage(
    gen: Generation, results: Sequence[Sequence[SeqResult]], details: bool = True
) -> dict[str, Any]:
    prompt_tokens = sum(len(p.ids) for p in gen.prompts)
    completion_tokens = sum(seq.emitted for seqs in results for seq in seqs)
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:  # streamed usage chunks leave these out
        out["prompt_tokens_details"] = None
        out["completion_tokens_details"] = None
    return out


def _echo_text(gen: Generation, prompt: Prompt, tok: Tokenizer) -> str:
    """What an echo puts before the output: the prompt as sent (token ids decoded with
    their special tokens), or nothing when the client asked for token ids instead."""
    if not gen.echo or gen.return_token_ids:
        return ""
    return prompt.text if prompt.text is not None else tok.decode(prompt.ids)


def _text(seq: SeqResult) -> str:
    return "".join(seq.plan.pieces[: seq.emitted])


def _stop_reason(seq: SeqResult) -> str | int | None:
    return seq.plan.stop_reason if seq.finish_reason == "stop" else None


def _token_ids(gen: Generation, seq: SeqResult, start: int, end: int) -> list[int] | None:
    return list(seq.plan.token_ids[start:end]) if gen.return_token_ids else None


def _completion_logprobs(
    gen: Generation,
    seq: SeqResult,
    tok: Tokenizer,
    start: int = 0,
    end: int | None = None,
    echo_prompt: Prompt | None = None,
) -> dict[str, Any] | None:
    if gen.logprobs is None:
        return None
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    if gen.echo and echo_prompt is not None:
        # Echoed prompt tokens come first; the very first has nothing to be scored on.
        for position, token_id in enumerate(echo_prompt.ids):
            tokens.append(tok.token_str(token_id))
            scored = _top_dict(token_id, position, gen.logprobs, tok) if position else None
            token_logprobs.append(token_logprob(token_id, position) if position else None)
            top.append(scored)
    end = seq.emitted if end is None else end
    for position in range(start, end):
        token_id = seq.plan.token_ids[position]
        tokens.append(tok.token_str(token_id))
        token_logprobs.append(token_logprob(token_id, position))
        top.append(_top_dict(token_id, position, gen.logprobs, tok))
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": token_logprobs,
        "tokens": tokens,
        "top_logprobs": top,
    }


def _top_dict(token_id: int, position: int, k: int, tok: Tokenizer) -> dict[str, float]:
    """The sampled token plus k alternatives (vLLM returns up to k + 1 entries)."""
    return {
        tok.token_str(t): lp for t, lp in top_logprobs(token_id, position, k + 1, tok.vocab_size)
    }


def _chat_logprobs(
    gen: Generation, seq: SeqResult, start: int, end: int, tok: Tokenizer
) -> dict[str, Any] | None:
    if gen.logprobs is None:
        return None
    content = []
    for position in range(start, end):
        token_id = seq.plan.token_ids[position]
        alternatives = top_logprobs(token_id, position, gen.logprobs, tok.vocab_size)
        entry = _chat_logprob(tok.token_str(token_id), token_logprob(token_id, position))
        entry["top_logprobs"] = [
            _chat_logprob(tok.token_str(t), lp) for t, lp in alternatives[: gen.logprobs]
        ]
        content.append(entry)
    return {"content": content}


def _chat_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _prompt_logprobs(gen: Generation, prompt: Prompt, tok: Tokenizer) -> list[Any] | None:
    if gen.prompt_logprobs is None:
        return None
    out: list[Any] = [None]  # the first prompt token has nothing before it
    for position in range(1, len(prompt.ids)):
        token_id = prompt.ids[position]
        scored = top_logprobs(token_id, position, gen.prompt_logprobs + 1, tok.vocab_size)
        # The prompt's own token at its (deterministic) rank, then the top-k by rank.
        rank = 1 + (token_id * 31 + position * 17) % tok.vocab_size
        entry = {
            str(token_id): {
                "logprob": scored[0][1],
                "rank": rank,
                "decoded_token": tok.token_str(token_id),
            }
        }
        for r, (alt, lp) in enumerate(scored[1:], start=1):
            entry.setdefault(
                str(alt), {"logprob": lp, "rank": r, "decoded_token": tok.token_str(alt)}
            )
        out.append(entry)
    return out


# -- streaming --------------------------------------------------------------------------


def sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def role_chunks(gen: Generation, ids: Ids) -> list[dict[str, Any]]:
    """Chat streams open each choice with the assistant role, before any token."""
    if not gen.chat:
        return []
    prompt_ids = gen.prompts[0].ids if gen.return_token_ids else None
    chunks: list[dict[str, Any]] = [
        {
            **_chunk_head(gen, ids),
            "choices": [
                {
                    "index": index,
                    "delta": {"role": gen.reply_role, "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ],
            "prompt_token_ids": prompt_ids,
            "prompt_text": None,
        }
        for index in range(gen.n)
    ]
    if gen.chat_echo:  # then the echoed last message, once per choice
        chunks += [
            {
                **_chunk_head(gen, ids),
                "choices": [
                    {
                        "index": index,
                        "delta": {"content": gen.chat_echo},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for index in range(gen.n)
        ]
    if gen.continuous_usage:
        for chunk in chunks:
            chunk["usage"] = _running_usage(gen, len(gen.prompts[0].ids), 0)
    return chunks


def delta_chunk(
    gen: Generation,
    ids: Ids,
    job: int,
    index: int,
    seq: SeqResult,
    positions: range,
    finish_reason: str | None,
    tok: Tokenizer,
) -> dict[str, Any]:
    """One choice's new tokens from one engine step, as vLLM streams them."""
    text = "".join(seq.plan.pieces[positions.start : positions.stop])
    token_ids = _token_ids(gen, seq, positions.start, positions.stop)
    if gen.chat:
        choice: dict[str, Any] = {
            "index": index,
            "delta": {"content": text},
            "logprobs": _chat_logprobs(gen, seq, positions.start, positions.stop, tok),
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = _stop_reason(seq)
        choice["token_ids"] = token_ids
    else:
        # The first chunk of a choice carries the echo and, when echoed or asked for,
        # the prompt's token ids.
        first = positions.start == 0
        prompt = gen.prompts[job]
        echo_prompt = prompt if first and gen.echo else None
        choice = {
            "index": job * gen.n + index,
            "text": (_echo_text(gen, prompt, tok) if first else "") + text,
            "logprobs": _completion_logprobs(
                gen, seq, tok, positions.start, positions.stop, echo_prompt
            ),
            "finish_reason": finish_reason,
            "stop_reason": _stop_reason(seq) if finish_reason is not None else None,
            "prompt_token_ids": (
                prompt.ids if first and (gen.echo or gen.return_token_ids) else None
            ),
            "token_ids": token_ids,
        }
    chunk = {**_chunk_head(gen, ids), "choices": [choice]}
    if gen.continuous_usage:
        prompt_tokens = len(gen.prompts[job].ids)
        chunk["usage"] = _running_usage(gen, prompt_tokens, positions.stop)
    return chunk


def _running_usage(gen: Generation, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """stream_options.continuous_usage_stats: one choice's counts so far, on every chunk."""
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if gen.chat:
        out["completion_tokens_details"] = None
    return out


def usage_chunk(
    gen: Generation, ids: Ids, results: Sequence[Sequence[SeqResult]]
) -> dict[str, Any]:
    return {**_chunk_head(gen, ids), "choices": [], "usage": usage(gen, results, details=False)}


def _chunk_head(gen: Generation, ids: Ids) -> dict[str, Any]:
    return {
        "id": ids.id,
        "object": "chat.completion.chunk" if gen.chat else "text_completion",
        "created": ids.created,
        "model": gen.model,
    }


# -- models ----------------------------------------------------------------------------


def models_response(ctx: Context, adapters: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The base model's card, then each LoRA adapter's (name, path): vLLM gives an
    adapter's card its path as `root`, the base model as `parent`, and no max_model_len."""
    created = int(time.time())
    cards = [_model_card(ctx.model, ctx.model, None, ctx.max_model_len, created)]
    cards += [_model_card(name, path, ctx.model, None, created) for name, path in adapters]
    return {"object": "list", "data": cards}


def _model_card(
    model_id: str, root: str, parent: str | None, max_model_len: int | None, created: int
) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex[:16]}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
