"""Deterministic outputs: what each sequence will say, decided when the request arrives.

A sequence is a pure function of the prompt, the sampling spec and its index, so the
same request always gets the same text (greedy ignores the seed; sampling without a
seed derives one from the prompt). The engine only decides *when* tokens come out.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from warmgate.sim.tokenizer import BYTE_BASE, EOS, Tokenizer

EOS_MEAN_TOKENS = 96  # without ignore_eos, EOS comes after this many tokens on average
_SENTENCE_END = 0.08  # chance that a word is followed by "."
_PERIOD, _SPACE = BYTE_BASE + ord("."), BYTE_BASE + ord(" ")


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    json_mode: str | None = None  # "object" | "schema"
    json_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SeqPlan:
    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]  # text each token adds (EOS adds "", a stop cut shortens)
    finish_reason: str  # "length" | "stop"
    stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def plan_sequence(
    tok: Tokenizer, prompt_ids: Sequence[int], spec: SamplingSpec, index: int
) -> SeqPlan:
    rng = random.Random(_seed(prompt_ids, spec, index))
    if spec.json_mode is not None:
        body = tok.encode(_json_text(rng, tok, spec.json_schema))
        eos_at = _eos_position(rng, spec, len(body))
    else:
        # EOS is drawn first so that only the words that will be said are generated.
        eos_at = _eos_position(rng, spec, 0)
        body = _words(rng, tok, spec.max_tokens if eos_at is None else eos_at)
    token_ids = (
        _pad(body, spec.max_tokens)[: spec.max_tokens]
        if eos_at is None
        else [*_pad(body, eos_at)[:eos_at], EOS]
    )
    pieces = [tok.token_str(t) if t != EOS else "" for t in token_ids]
    stopped = _apply_stops(token_ids, pieces, spec)
    if stopped is not None:
        return stopped
    if token_ids[-1] == EOS:
        return SeqPlan(tuple(token_ids), tuple(pieces), "stop")
    return SeqPlan(tuple(token_ids), tuple(pieces), "length")


def _seed(prompt_ids: Sequence[int], spec: SamplingSpec, index: int) -> int:
    prompt_hash = zlib.crc32(array("q", prompt_ids).tobytes())
    if spec.temperature == 0:
        return prompt_hash  # greedy: every choice says the same thing
    base = spec.seed if spec.seed is not None else prompt_hash
    return (base * 1_000_003 + index) & 0xFFFFFFFFFFFF


def _words(rng: random.Random, tok: Tokenizer, count: int) -> list[int]:
    words = tok.generation_ids
    out: list[int] = []
    while len(out) < count:
        out.append(rng.choice(words))
        if rng.random() < _SENTENCE_END:
            out.append(_PERIOD)
    return out


def _pad(body: list[int], length: int) -> list[int]:
    # Structured output that is complete but must go on (ignore_eos/min_tokens): spaces.
    return body + [_SPACE] * (length - len(body)) if len(body) < length else body


def _eos_position(rng: random.Random, spec: SamplingSpec, body_len: int) -> int | None:
    """How many tokens come before EOS, or None when the sequence runs to max_tokens."""
    if spec.ignore_eos:
        return None
    if spec.json_mode is not None:
        at = max(body_len, spec.min_tokens)  # the grammar ends the output with its object
    else:
        at = spec.min_tokens + int(rng.expovariate(1 / EOS_MEAN_TOKENS))
    return at if at < spec.max_tokens else None


def _apply_stops(token_ids: list[int], pieces: list[str], spec: SamplingSpec) -> SeqPlan | None:
    for position, token_id in enumerate(token_ids):
        if position + 1 >= spec.min_tokens and token_id in spec.stop_token_ids:
            kept = [*pieces[:position], ""]
            return SeqPlan(tuple(token_ids[: position + 1]), tuple(kept), "stop", token_id)
    if not spec.stop:
        return None
    text = "".join(pieces)
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + len(piece))
    best: tuple[int, str] | None = None
    for stop in spec.stop:
        at = text.find(stop)
        while at != -1 and _token_at(starts, at + len(stop) - 1) + 1 < spec.min_tokens:
            at = text.find(stop, at + 1)
        if at != -1 and stop and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    last = _token_at(starts, at + len(stop) - 1)  # the token that completes the stop string
    end = at + len(stop) if spec.include_stop_str_in_output else at
    kept = [text[starts[i] : max(starts[i], min(starts[i + 1], end))] for i in range(last + 1)]
    return SeqPlan(tuple(token_ids[: last + 1]), tuple(kept), "stop", stop)


def _token_at(starts: list[int], char_index: int) -> int:
    """Index of the token whose text covers `char_index` (starts are cumulative)."""
    lo, hi = 0, len(starts) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= char_index:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _json_text(rng: random.Random, tok: Tokenizer, schema: Mapping[str, Any] | None) -> str:
    if schema is None or not isinstance(schema.get("properties"), Mapping):
        value: Any = {"answer": _phrase(rng, tok), "count": rng.randint(1, 9)}
    else:
        value = _json_value(rng, tok, schema, depth=0)
    return json.dumps(value)


def _json_value(rng: random.Random, tok: Tokenizer, schema: Mapping[str, Any], depth: int) -> Any:
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if kind == "object" and depth < 4:
        props = schema.get("properties")
        if not isinstance(props, Mapping):
            return {}
        return {
            str(name): _json_value(rng, tok, sub if isinstance(sub, Mapping) else {}, depth + 1)
            for name, sub in props.items()
        }
    if kind == "array" and depth < 4:
        items = schema.get("items")
        sub = items if isinstance(items, Mapping) else {}
        return [_json_value(rng, tok, sub, depth + 1) for _ in range(2)]
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _phrase(rng, tok)


def _phrase(rng: random.Random, tok: Tokenizer) -> str:
    return "".join(tok.token_str(rng.choice(tok.generation_ids)) for _ in range(3)).strip()


# -- logprobs ---------------------------------------------------------------------------


def token_logprob(token_id: int, position: int) -> float:
    """A plausible, deterministic log-probability for a token at a position."""
    return -round(0.05 + ((token_id * 31 + position * 17) % 200) / 100, 4)


def top_logprobs(token_id: int, position: int, k: int, vocab: int) -> list[tuple[int, float]]:
    """The sampled token first, then k-1 deterministic alternatives, less likely."""
    best = token_logprob(token_id, position)
    out = [(token_id, best)]
    # Walk the vocabulary with a stride coprime to its size: every id is reached once,
    # so k distinct alternatives always exist (a multiplicative walk can cycle early).
    stride = 97 + 2 * (position % 50)
    while math.gcd(stride, vocab) != 1:
        stride += 1
    for step in range(1, vocab):
        if len(out) >= max(k, 1):
            break
        out.append(((token_id + step * stride) % vocab, round(best - 0.7 * len(out), 4)))
    return out
