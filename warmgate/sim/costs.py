"""The simulator's cost model: pure functions and plain state, no I/O, no clocks.

Two parts, as in a real engine:
- one-time costs: the first request that needs a "kernel key" (a shape or code path the
  engine compiles lazily) pays for compiling it; later requests do not;
- warm costs: a per-step compute model (forward pass, prefill per token, per-sequence
  overhead) in which one step serves every running sequence, so batching is cheap, and
  prompt blocks already in the prefix cache are nearly free.

All times are simulated milliseconds. Defaults are shaped like measurements of real
vLLM (CPU build: first `logprobs` request 378 ms vs 128 ms warm, first `json_object`
183 vs 111 ms, a repeated prompt up to 8x faster; H100: logprobs 3.8x, sampling 2.2x,
json 2.2x).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

BLOCK_TOKENS = 16  # vLLM's default KV-cache block size, the unit of prefix caching


@dataclass(frozen=True, slots=True)
class CostTable:
    forward_ms: float  # one forward pass of the weights, paid by every step
    step_overhead_ms: float  # scheduling and sampling bookkeeping per step
    prefill_ms_per_token: float  # prompt tokens computed
    cached_ms_per_token: float  # prompt tokens found in the prefix cache
    seq_ms: float  # each sequence decoded in a step (attention over its own KV)
    logprobs_ms_per_token: float
    prompt_logprobs_ms_per_token: float
    structured_ms_per_token: float  # grammar mask applied per sampled token
    penalties_ms_per_token: float
    request_ms: float  # per HTTP request: tokenise, detokenise, serialise
    prefix_cache_blocks: int
    compile_ms: Mapping[str, float] = field(default_factory=dict)
    default_compile_ms: float = 10.0  # a key whose family the table does not name
    # Sleep mode (--enable-sleep-mode): level 1 offloads the weights to host memory and
    # copies them back on wake-up; level 2 discards them, so waking reloads them.
    sleep_ms: float = 500.0
    discard_ms: float = 100.0
    wake_ms: float = 400.0
    reload_ms: float = 2000.0
    lora_load_ms: float = 150.0  # POST /v1/load_lora_adapter: read the adapter's weights


_CPU_COMPILE = {
    "prefill": 12.0,
    "decode": 10.0,
    "sampling:greedy": 4.0,
    "sampling:random": 8.0,
    "sampling:top_p_top_k": 30.0,
    "sampling:penalties": 25.0,
    "sampling:seeded": 20.0,
    "sampling_batch": 5.0,
    "logprobs": 150.0,
    "logprobs_prefill": 100.0,
    "prompt_logprobs": 120.0,
    "prompt_logprobs_prefill": 80.0,
    "json": 50.0,
    "json_grammar": 22.0,
    "chat_template": 15.0,
    "stream": 8.0,
    "parallel_sampling": 30.0,
    "lora": 60.0,
    "realloc": 25.0,
}

_H100_COMPILE = {
    "prefill": 20.0,
    "decode": 15.0,
    "sampling:greedy": 5.0,
    "sampling:random": 45.0,
    "sampling:top_p_top_k": 70.0,
    "sampling:penalties": 55.0,
    "sampling:seeded": 50.0,
    "sampling_batch": 40.0,
    "logprobs": 130.0,
    "logprobs_prefill": 81.0,
    "prompt_logprobs": 90.0,
    "prompt_logprobs_prefill": 60.0,
    "json": 60.0,
    "json_grammar": 25.0,
    "chat_template": 10.0,
    "stream": 5.0,
    "parallel_sampling": 25.0,
    "lora": 45.0,
    "realloc": 20.0,
}

PROFILES: Mapping[str, CostTable] = MappingProxyType(
    {
        # A small model on the vLLM CPU build: ~111 ms for 50 prompt + 16 output tokens.
        "cpu": CostTable(
            forward_ms=5.5,
            step_overhead_ms=0.5,
            prefill_ms_per_token=0.2,
            cached_ms_per_token=0.02,
            seq_ms=0.15,
            logprobs_ms_per_token=1.0,
            prompt_logprobs_ms_per_token=0.05,
            structured_ms_per_token=0.05,
            penalties_ms_per_token=0.2,
            request_ms=2.0,
            prefix_cache_blocks=4096,
            compile_ms=MappingProxyType(_CPU_COMPILE),
        ),
        # A small model on one H100: ~70 ms for the same request, dominated by decode.
        "h100": CostTable(
            forward_ms=4.0,
            step_overhead_ms=0.3,
            prefill_ms_per_token=0.01,
            cached_ms_per_token=0.001,
            seq_ms=0.02,
            logprobs_ms_per_token=0.3,
            prompt_logprobs_ms_per_token=0.005,
            structured_ms_per_token=0.05,
            penalties_ms_per_token=0.05,
            request_ms=1.0,
            prefix_cache_blocks=65536,
            compile_ms=MappingProxyType(_H100_COMPILE),
        ),
    }
)


def table_from_mapping(data: Mapping[str, Any], base: CostTable) -> CostTable:
    """`base` with the entries of a parsed costs file applied; `compile_ms` entries are
    merged key by key. Raises ValueError naming the offending entry."""
    changes: dict[str, Any] = {}
    names = {f.name: f for f in dataclasses.fields(CostTable)}
    for name, value in data.items():
        if name not in names:
            known = ", ".join(sorted(names))
            raise ValueError(f"unknown cost {name!r} (known: {known})")
        if name == "compile_ms":
            if not isinstance(value, Mapping):
                raise ValueError("compile_ms must be a table of key = milliseconds")
            merged = dict(base.compile_ms)
            for key, ms in value.items():
                merged[str(key)] = _non_negative(f"compile_ms.{key}", ms)
            changes[name] = MappingProxyType(merged)
        elif name == "prefix_cache_blocks":
            changes[name] = int(_non_negative(name, value))
        else:
            changes[name] = _non_negative(name, value)
    return dataclasses.replace(base, **changes)


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"cost {name} must be a non-negative number, got {value!r}")
    return float(value)


# -- kernel keys ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Features:
    """What a request asks of the engine, as far as lazily compiled paths go."""

    sampling: str = "random"  # "greedy" | "random" | "top_p_top_k"
    penalties: bool = False
    seeded: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    grammar: str | None = None  # "object", or "schema-<hash>" per distinct schema
    chat: bool = False
    stream: bool = False
    n: int = 1
    lora: str | None = None  # the adapter's name (model=<adapter>)


def bucket(count: int) -> int:
    """The power-of-two bucket a count falls in (1, 2, 4, 8, ...), as engines pad shapes."""
    return 1 if count <= 1 else 1 << (count - 1).bit_length()


def request_keys(features: Features, prefill_tokens: int) -> list[str]:
    """Keys a request needs for one prefill chunk; `prefill_tokens` are those it computes
    (at most the step's token budget, so a longer prompt adds no larger prefill shape)."""
    prefill = f"prefill:{bucket(max(prefill_tokens, BLOCK_TOKENS))}"
    size = prefill.partition(":")[2]
    keys = [prefill, f"sampling:{features.sampling}"]
    if features.penalties:
        keys.append("sampling:penalties")
    if features.seeded:
        keys.append("sampling:seeded")
    if features.logprobs:
        keys += ["logprobs", f"logprobs_prefill:{size}"]
    if features.prompt_logprobs:
        keys += ["prompt_logprobs", f"prompt_logprobs_prefill:{size}"]
    if features.grammar is not None:
        keys += ["json", f"json_grammar:{features.grammar}"]
    if features.chat:
        keys.append("chat_template")
    if features.stream:
        keys.append("stream")
    if features.n > 1:
        keys.append("parallel_sampling")
    if features.lora is not None:
        # Per adapter: its first request moves its weights into a slot and runs cold.
        keys.append(f"lora:{features.lora}")
    return keys


def step_keys(running_seqs: int, sampling_paths: Iterable[str], realloc: bool = False) -> list[str]:
    """Keys a decode step needs: its batch bucket, and each sampling path at that bucket
    (sampling kernels specialise on batch size as well as on the path). After a wake-up
    from sleep mode each bucket's first step also reallocates its buffers (`realloc:`)."""
    size = bucket(running_seqs)
    keys = [f"decode:{size}"]
    if realloc:
        keys.append(f"realloc:{size}")
    return keys + [f"sampling_batch:{p}@{size}" for p in sorted(set(sampling_paths))]


def compile_ms(table: CostTable, key: str) -> float:
    """One-time cost of a key: its exact entry, else the part before '@', else its family."""
    for name in (key, key.partition("@")[0], key.partition(":")[0]):
        if name in table.compile_ms:
            return table.compile_ms[name]
    return table.default_compile_ms


class KernelCache:
    """Which keys are compiled. Everything starts cold: start-up pre-warms nothing."""

    def __init__(self) -> None:
        self._compiled: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._compiled

    def __len__(self) -> int:
        return len(self._compiled)

    def discard(self, key: str) -> None:
        self._compiled.discard(key)

    def forget(self, prefix: str) -> None:
        """Make every key starting with `prefix` cold again."""
        self._compiled = {key for key in self._compiled if not key.startswith(prefix)}

    def compile(self, keys: Iterable[str]) -> list[str]:
        """Mark keys compiled; return those that were cold (in order, without repeats)."""
        cold: list[str] = []
        for key in keys:
            if key not in self._compiled:
                self._compiled.add(key)
                cold.append(key)
        return cold


# -- prefix cache -----------------------------------------------------------------------


class PrefixCache:
    """vLLM-style automatic prefix caching: full blocks of 16 tokens are identified by a
    hash chained over all blocks before them, and kept least-recently-used."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def cached_tokens(self, token_ids: Sequence[int]) -> int:
        """Leading prompt tokens already cached. The last prompt token is always
        recomputed (its logits are needed), so a full hit still computes one block."""
        hit = 0
        for block_hash in block_hashes(token_ids):
            if block_hash not in self._blocks:
                break
            self._blocks.move_to_end(block_hash)
            hit += BLOCK_TOKENS
        if hit >= len(token_ids):
            hit -= BLOCK_TOKENS
        return hit

    def insert(self, token_ids: Sequence[int]) -> None:
        for block_hash in block_hashes(token_ids):
            self._blocks[block_hash] = None
            self._blocks.move_to_end(block_hash)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)


def block_hashes(token_ids: Sequence[int]) -> list[int]:
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        parent = hash((parent, tuple(token_ids[start : start + BLOCK_TOKENS])))
        hashes.append(parent)
    return hashes


# -- warm compute -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Work:
    """One request's share of one engine step."""

    prefill_tokens: int = 0  # prompt tokens computed in this step
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache in this step
    seqs: int = 0  # sequences that sample a token in this step
    logprobs: bool = False
    prompt_logprobs: bool = False
    structured: bool = False
    penalties: bool = False


def step_ms(table: CostTable, works: Iterable[Work]) -> float:
    """Warm cost of one step serving all `works` together (compilation not included)."""
    ms = table.forward_ms + table.step_overhead_ms
    for w in works:
        ms += w.prefill_tokens * table.prefill_ms_per_token
        ms += w.cached_tokens * table.cached_ms_per_token
        per_seq = table.seq_ms
        if w.logprobs:
            per_seq += table.logprobs_ms_per_token
        if w.structured:
            per_seq += table.structured_ms_per_token
        if w.penalties:
            per_seq += table.penalties_ms_per_token
        ms += w.seqs * per_seq
        if w.prompt_logprobs:
            ms += (w.prefill_tokens + w.cached_tokens) * table.prompt_logprobs_ms_per_token
    return ms
