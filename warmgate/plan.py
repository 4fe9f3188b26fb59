"""The warm-up plan: a pure function of the settings, the engine's limits and what the
upstream reported.

A *shape* is (endpoint, streaming, sampling features, prompt length, concurrency): one
batch of requests the shell sends at once. Engines specialise kernels on combinations of
these (sampling path x batch size, logprobs x prefill length), and on their own limits: a
step computes at most `step_budget` tokens (vLLM's max_num_batched_tokens), so a longer
prompt, or a batch of prompts, only chunks into steps of sizes the plan already covers.

Two coverages:
- "engine" (the default) covers each kind of specialisation once, as cheaply as it can:
  feature rows (a pairwise covering of path x add-on features x endpoint x stream, one
  short request carrying several features), one request per prompt-length octave up to
  one step budget, one mixed batch per power-of-two batch size, and one chunked prompt.
  24 shapes for a 2048-token context, and no more for a longer one but the chunked
  prompt. The shapes run most valuable first (order_by_value), so that a warm-up budget
  cuts the least useful ones.
- "pairwise" is the thorough sweep: every pair of levels of two of (length octave up to
  the context, one feature, concurrency bucket, endpoint, stream) in some shape, 72
  shapes at 2048 tokens, in covering order.

Never planned: prompt_logprobs with stream=True (vLLM refuses it), and prompt tokens x
concurrency above the load cap (one step budget for "engine", eight for "pairwise"),
but for the engine plan's one chunked prompt.

Prompts are fresh for every request (the prefix cache would otherwise make warm
timings look up to 8x too good): token-id lists when the upstream has /tokenize, exact
in length; otherwise text at a measured tokens-per-word rate. Chat prompts are always
text and stay below the length cap with room for the chat template.

The module does no I/O: the shell reads files and talks to the upstream, then calls
`build_plan`, `body_for`, the prompt helpers and `Convergence`.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from warmgate import engineconfig
from warmgate.latency import Batch, prior_ms
from warmgate.options import COVERAGES, DEFAULTS, FEATURES

__all__ = [
    "DEFAULT_TOKENS_PER_WORD",
    "ENDPOINTS",
    "FEATURES",
    "WORDS",
    "Convergence",
    "ModelInfo",
    "Plan",
    "PlanError",
    "PlanFileSpec",
    "PlanSettings",
    "ReplaySpec",
    "Shape",
    "ShapeKey",
    "ShapeSpec",
    "UpstreamInfo",
    "adapter_plan",
    "batch_of",
    "body_for",
    "build_plan",
    "covering_rows",
    "length_levels",
    "order_by_value",
    "parse_plan_file",
    "prompt_text",
    "prompt_token_ids",
    "redacted_body",
    "rewarm_plan",
    "source_of",
    "split_features",
    "to_quarantine",
    "without_quarantined",
]

Body = dict[str, Any]
PromptKind = Literal["tokens", "text", "recorded"]


class PlanError(ValueError):
    """The plan cannot be built; the message names the input and the fix."""


# --- vocabulary -------------------------------------------------------------------

ENDPOINTS: dict[str, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
    "classify": "/classify",
}
_GENERATE = ("completions", "chat")
_POOLING_ENDPOINT = {"embed": "embeddings", "classify": "classify"}  # model kind -> endpoint

# Sampling feature (warmgate.options.FEATURES) -> body fields (completions, chat). Each one
# takes a different path through the sampler or the output processor.
_FEATURE_FIELDS: dict[str, tuple[Body, Body]] = {
    "greedy": ({"temperature": 0.0}, {"temperature": 0.0}),
    # min_p too: vLLM applies it in a step of its own, and clients send it with top-k/p.
    "sampling": (
        {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05},
        {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05},
    ),
    "penalties": (
        {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
        {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
    ),
    "seed": ({"temperature": 0.8, "seed": 1234}, {"temperature": 0.8, "seed": 1234}),
    "n": ({"n": 2, "temperature": 0.8}, {"n": 2, "temperature": 0.8}),
    "logprobs": ({"logprobs": 5}, {"logprobs": True, "top_logprobs": 5}),
    "prompt_logprobs": ({"prompt_logprobs": 1}, {"prompt_logprobs": 1}),
    "json": (
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_object"}},
    ),
}
_NO_STREAM_FEATURES = frozenset({"prompt_logprobs"})  # vLLM: not available with stream=True

DEFAULT_TOKENS_PER_WORD = 1.5  # on the high side, so text prompts come out short, not long
DEFAULT_MAX_MODEL_LEN = 2048  # when neither the upstream nor the settings say
MIN_REPEATS = 2  # runs a cold shape needs before it can count as converged
SLOWER_RUNS = 3  # a repeat this many --converge fractions slower than the run before: again
_SHORT_DECODE = 4  # max_tokens of length and batch shapes: their prompt or batch is the point
_BATCH_PROMPT = 8  # prompt tokens of each request of a mixed batch
# When nothing says otherwise: the vLLM CPU build's own defaults (engineconfig cites them).
_CPU_ENGINE = engineconfig.defaults(None)
DEFAULT_STEP_BUDGET: int = _CPU_ENGINE["step_budget"]  # max_num_batched_tokens
DEFAULT_MAX_NUM_SEQS: int = _CPU_ENGINE["max_num_seqs"]
PAIRWISE_BUDGETS = 8  # the pairwise sweep's default load cap, in step budgets
_SHORT_PROMPT = 32  # feature rows: the features, not the prompt, are the point
_TEMPLATE_TOKENS = 32  # room for the chat template / special tokens around text prompts
_TEXT_SLACK = 0.10  # text prompts miss their target by up to this much

# Common words for text prompts (and, tokenized once by the shell, the vocabulary of
# token-id prompts: ordinary tokens only, never special or multimodal placeholders).
_WORD_TEXT = """
    time year people way day man thing woman life child world school state family
    student group country problem hand part place case week company system program
    question work government number night point home water room mother area money
    story fact month lot right study book eye job word business issue side kind head
    house service friend father power hour game line end member law car city community
    name president team minute idea kid body information back parent face others level
    office door health person art war history party result change morning reason
    research girl guy moment air teacher force education foot boy age policy process
    music market sense nation plan college interest death experience effect use class
    control care field development role effort rate heart drug show leader light voice
    wife police mind price report decision son view relationship town road arm
    difference value building action model season society tax director position player
    record paper space ground form event official matter center couple site project
    activity star table need court oil situation cost industry figure street image
    phone data picture practice piece land product doctor wall patient worker news test
    movie north love support technology step baby computer type attention film tree
    source organization hair window evidence population site river bank garden summer
    little small large green simple early quiet bright open careful strong gentle
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))


# --- inputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the upstream's /v1/models."""

    id: str
    max_model_len: int | None = None
    kind: str = "generate"  # "generate", "embed", "classify"; anything else is skipped
    is_lora: bool = False


@dataclass(frozen=True)
class UpstreamInfo:
    """What the upstream reported before warm-up."""

    models: tuple[ModelInfo, ...]
    has_tokenize: bool = False
    tokens_per_word: float | None = None  # measured via /tokenize on WORDS, if available


@dataclass(frozen=True)
class ShapeSpec:
    """A [[shape]] table of a plan file, or a shape of the traffic profile (warmgate.profile)."""

    where: str  # "plan.toml [[shape]] #2", for error messages
    endpoint: str  # a key of ENDPOINTS
    prompt_tokens: int
    stream: bool = False
    feature: str | None = None  # None: greedy (generation) / plain (pooling); "a+b": both
    concurrency: int = 1
    max_tokens: int | None = None  # None: PlanSettings.max_tokens
    model: str | None = None  # None: the first planned model that serves the endpoint
    body: Mapping[str, Any] = field(default_factory=dict, hash=False)
    weight: float = 1.0  # a profile shape's observed frequency; not a plan-file key


@dataclass(frozen=True)
class ReplaySpec:
    """One recorded request body from a replay JSONL file."""

    where: str  # "recorded.jsonl:3"
    endpoint: str  # a key of ENDPOINTS
    body: Mapping[str, Any] = field(hash=False)
    concurrency: int = 1


@dataclass(frozen=True)
class PlanFileSpec:
    """A parsed --plan file."""

    source: str
    mode: Literal["extend", "replace"] = "extend"
    shapes: tuple[ShapeSpec, ...] = ()
    replay: tuple[ReplaySpec, ...] = ()


@dataclass(frozen=True)
class PlanSettings:
    """Everything about the plan that comes from flags, env or the plan file.

    The fields that are options of `warmgate run` (max_tokens, concurrency, features, ...)
    take their defaults from warmgate.options and arrive checked by its rules (config's
    settings run them); only the plan's own fields are checked here.
    """

    max_tokens: int = DEFAULTS["max_tokens"]
    concurrency: tuple[int, ...] = DEFAULTS["concurrency"]
    min_prompt_tokens: int = 4
    max_inflight_tokens: int | None = DEFAULTS["max_inflight_tokens"]  # None: from step_budget
    features: tuple[str, ...] = DEFAULTS["features"]
    endpoints: tuple[str, ...] = _GENERATE  # for generating models
    stream: tuple[bool, ...] = (False, True)
    models: tuple[str, ...] = DEFAULTS["models"]  # empty: every model the upstream serves
    max_model_len: int | None = None  # caps the upstream's value (or stands in for it)
    converge: float = DEFAULTS["converge"]
    min_repeats: int = MIN_REPEATS
    max_repeats: int = DEFAULTS["max_repeats"]
    plan_file: PlanFileSpec | None = None
    # The traffic profile's shapes (warmgate.profile.plan_specs): planned first, by weight.
    profile: tuple[ShapeSpec, ...] = ()
    profile_requests: int = 0  # the client requests behind it (PROFILE_TRUSTED)
    coverage: str = DEFAULTS["coverage"]  # "engine" or "pairwise"
    # What the engine specialises on (warmgate.engineconfig reads it from the child):
    step_budget: int = DEFAULT_STEP_BUDGET  # max_num_batched_tokens: tokens one step computes
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    chunked_prefill: bool = True
    compile_sizes: tuple[int, ...] = ()  # token counts the engine compiles a graph for

    @property
    def inflight_cap(self) -> int:
        """Prompt tokens x concurrency one shape may put in flight. By default one step
        budget for the engine plan: more only chunks into steps the plan already covers.
        The pairwise sweep keeps its thorough 8 budgets."""
        if self.max_inflight_tokens is not None:
            return self.max_inflight_tokens
        return self.step_budget * (1 if self.coverage == "engine" else PAIRWISE_BUDGETS)

    def __post_init__(self) -> None:
        _check(
            self.min_prompt_tokens >= 1,
            f"min_prompt_tokens must be >= 1, got {self.min_prompt_tokens}",
        )
        for name in self.endpoints:
            _check(name in _GENERATE, f"unknown endpoint {name!r}; use {_or(_GENERATE)}")
        _check(bool(self.stream), "stream needs at least one of false, true")
        _check(
            1 <= self.min_repeats <= self.max_repeats,
            f"need 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}",
        )
        _check(
            self.coverage in COVERAGES, f"unknown coverage {self.coverage!r}; use {_or(COVERAGES)}"
        )
        _check(
            self.step_budget >= 1 and self.max_num_seqs >= 1, "step budget and seqs must be >= 1"
        )
        _check(
            self.max_model_len is None or self.max_model_len > self.max_tokens,
            f"max_model_len {self.max_model_len} leaves no room for max_tokens",
        )


# --- output -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One request shape; the shell sends `concurrency` requests of it at once.

    `family` is a stable, human-readable key such as "chat/stream/logprobs/len254/c4",
    unique per (model, family). `prompt_tokens` is exact for "tokens" prompts, a target
    for "text" prompts and 0 for "recorded" ones (replayed bodies, sent as recorded).
    """

    family: str
    endpoint: str  # URL path
    model: str
    prompt_kind: PromptKind
    prompt_tokens: int
    concurrency: int = 1
    stream: bool = False
    feature: str = "greedy"
    max_tokens: int = 0  # 0 for pooling endpoints
    fields: Mapping[str, Any] = field(default_factory=dict, hash=False)
    recorded: Mapping[str, Any] | None = field(default=None, hash=False)
    # A mixed batch: request i also takes variants[i % len] (a different sampling path
    # each, as real traffic mixes them in one step). `feature` then names them with ",".
    variants: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)

    @property
    def features(self) -> tuple[str, ...]:
        return split_features(self.feature)

    @property
    def seqs(self) -> int:
        """Sequences the batch decodes at once: n=2 doubles a request."""
        per_request = 2 if "n" in self.features and not self.variants else 1
        return self.concurrency * per_request

    @property
    def key(self) -> ShapeKey:
        return ShapeKey(
            self.model,
            self.family,
            self.endpoint,
            self.stream,
            self.feature,
            self.prompt_tokens,
            self.concurrency,
        )


@dataclass(frozen=True)
class ShapeKey:
    """A shape as a quarantine records it and a log names it: no prompt, no body fields.

    (model, family) identifies it in a plan built from the same settings and upstream.
    """

    model: str
    family: str
    endpoint: str  # URL path
    stream: bool
    feature: str
    prompt_tokens: int
    concurrency: int

    @property
    def load(self) -> int:
        """Prompt tokens the shape puts in flight at once."""
        return self.prompt_tokens * self.concurrency

    @property
    def features(self) -> tuple[str, ...]:
        return split_features(self.feature)

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _KEY_TYPES}

    @classmethod
    def from_dict(cls, data: object) -> ShapeKey | None:
        """The key a record holds, or None when it is not one (another version, an edit)."""
        if not isinstance(data, Mapping):
            return None
        values: dict[str, Any] = {name: data.get(name) for name in _KEY_TYPES}
        if not all(
            isinstance(v, kind) and (kind is not int or not isinstance(v, bool))
            for v, kind in zip(values.values(), _KEY_TYPES.values(), strict=True)
        ):
            return None
        return cls(**values)


_KEY_TYPES: dict[str, type] = {
    "model": str,
    "family": str,
    "endpoint": str,
    "stream": bool,
    "feature": str,
    "prompt_tokens": int,
    "concurrency": int,
}


@dataclass(frozen=True)
class Plan:
    shapes: tuple[Shape, ...]
    warnings: tuple[str, ...] = ()
    tokens_per_word: float = DEFAULT_TOKENS_PER_WORD  # for prompt_text
    converge: float = DEFAULTS["converge"]
    min_repeats: int = MIN_REPEATS
    max_repeats: int = DEFAULTS["max_repeats"]

    def convergence(self) -> Convergence:
        """A fresh convergence tracker for one shape."""
        return Convergence(self.converge, self.min_repeats, self.max_repeats)


# --- building the plan --------------------------------------------------------------


def build_plan(settings: PlanSettings, upstream: UpstreamInfo) -> Plan:
    """The warm-up plan for these settings and this upstream; PlanError if empty."""
    warnings: list[str] = []
    models = _select_models(settings, upstream, warnings)
    file = settings.plan_file
    learned = _profile_shapes(settings, upstream, models, warnings)
    shapes: list[Shape] = list(learned)
    if file is None or file.mode == "extend":
        defaults = _default_shapes(settings, upstream, models, warnings)
        if learned and settings.coverage == "engine":  # what the profile left to cover first
            claimed = _claims_of(learned)
            if settings.profile_requests >= PROFILE_TRUSTED:
                defaults = _observed_only(defaults, learned, claimed)
            defaults = order_by_value(defaults, covered=claimed)
        shapes += defaults
    if file is not None:
        shapes += [_file_shape(s, settings, upstream, models) for s in file.shapes]
        shapes += [_replay_shape(r, models, warnings) for r in file.replay]
    shapes = _dedupe(shapes)
    if not shapes:
        served = ", ".join(f"{m.id} ({m.kind})" for m in upstream.models) or "none"
        why = "".join(f"; {w}" for w in warnings)
        raise PlanError(
            f"nothing to warm up: no shape fits the served models ({served}){why}; "
            "check --model, --plan and the model kinds"
        )
    text_used = any(s.prompt_kind == "text" for s in shapes)
    if text_used and upstream.tokens_per_word is None:
        warnings.append(
            f"tokens per word not measured; assuming {DEFAULT_TOKENS_PER_WORD}, "
            "text prompt lengths are rough"
        )
    return Plan(
        tuple(shapes),
        tuple(warnings),
        upstream.tokens_per_word or DEFAULT_TOKENS_PER_WORD,
        settings.converge,
        settings.min_repeats,
        settings.max_repeats,
    )


def length_levels(limit: int, min_tokens: int) -> tuple[int, ...]:
    """One prompt length per octave, ascending: limit, limit//2, ... while >= min_tokens.

    Halving from the limit puts the top level exactly at the limit and never lands two
    levels in one octave.
    """
    levels: list[int] = []
    n = limit
    while n >= min_tokens:
        levels.append(n)
        n //= 2
    return tuple(reversed(levels))


PairOk = Callable[[int, int, int, int], bool]


def covering_rows(sizes: Sequence[int], pair_ok: PairOk | None = None) -> list[tuple[int, ...]]:
    """A pairwise covering array: rows of level indices, one per factor.

    Every pair (factor i at level a, factor j at level b) with pair_ok(i, a, j, b)
    appears in some row, and no row holds a pair that is not ok. Greedy (AETG-style)
    and deterministic: each row starts from the first uncovered pair, then every other
    factor takes the level that covers the most new pairs, ties going to the level used
    least so far (so levels share the rows evenly), then to the lowest index. Put the
    factors with most levels first: the covering then needs about sizes[0] * sizes[1]
    rows, the lower bound.
    """
    ok = pair_ok or (lambda i, a, j, b: True)
    k = len(sizes)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(k), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
        if ok(i, a, j, b)
    }
    uses = [[0] * size for size in sizes]
    rows: list[tuple[int, ...]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for f in range(k):
            if f not in row:
                row[f] = _best_level(f, sizes[f], row, uncovered, ok, uses[f])
        full = tuple(row[f] for f in range(k))
        rows.append(full)
        for f, v in enumerate(full):
            uses[f][v] += 1
        uncovered -= {(i, full[i], j, full[j]) for i, j in itertools.combinations(range(k), 2)}
    return rows


def _best_level(
    f: int,
    size: int,
    row: dict[int, int],
    uncovered: set[tuple[int, int, int, int]],
    ok: PairOk,
    uses: list[int],
) -> int:
    def fits(v: int) -> bool:
        return all(ok(*_ordered(f, v, g, w)) for g, w in row.items())

    def gain(v: int) -> int:
        return sum(_ordered(f, v, g, w) in uncovered for g, w in row.items())

    candidates = [v for v in range(size) if fits(v)]
    if not candidates:  # only when a level has no allowed partner at all
        raise PlanError(f"no level of factor {f} fits {row}; the plan constraints conflict")
    return max(candidates, key=lambda v: (gain(v), -uses[v], -v))


def _ordered(f: int, v: int, g: int, w: int) -> tuple[int, int, int, int]:
    return (f, v, g, w) if f < g else (g, w, f, v)


def _select_models(
    settings: PlanSettings, upstream: UpstreamInfo, warnings: list[str]
) -> list[ModelInfo]:
    if not upstream.models:
        raise PlanError("the upstream lists no models in /v1/models; is it serving one?")
    served = {m.id for m in upstream.models}
    for name in settings.models:
        if name not in served:
            raise PlanError(
                f"--model {name!r} is not served by the upstream (it serves {_or(sorted(served))})"
            )
    models = [m for m in upstream.models if not settings.models or m.id in settings.models]
    for m in models:
        if m.kind != "generate" and m.kind not in _POOLING_ENDPOINT:
            warnings.append(f"model {m.id!r} of kind {m.kind!r}: no warm-up fits it; skipped")
    return [m for m in models if m.kind == "generate" or m.kind in _POOLING_ENDPOINT]


def _context(model: ModelInfo, settings: PlanSettings, warnings: list[str]) -> int:
    if model.max_model_len is None and settings.max_model_len is None:
        warnings.append(
            f"model {model.id!r} reports no max_model_len; assuming "
            f"{DEFAULT_MAX_MODEL_LEN} (set --max-model-len to change it)"
        )
        return DEFAULT_MAX_MODEL_LEN
    known = [n for n in (model.max_model_len, settings.max_model_len) if n is not None]
    return min(known)


def _text_cap(limit: int) -> int:
    """Largest text prompt target that still fits once the template and slack are added."""
    return int((limit - _TEMPLATE_TOKENS) * (1 - _TEXT_SLACK))


def _default_shapes(
    settings: PlanSettings, upstream: UpstreamInfo, models: list[ModelInfo], warnings: list[str]
) -> list[Shape]:
    shapes: list[Shape] = []
    lora_seen = False
    for model in models:
        context = _context(model, settings, warnings)
        if model.kind in _POOLING_ENDPOINT:
            shapes += _pooling_shapes(model, context, settings, upstream)
        elif model.is_lora:
            shapes += _lora_shapes(model, context, settings, upstream, first=not lora_seen)
            lora_seen = True
        elif settings.coverage == "engine":
            shapes += order_by_value(_engine_shapes(model, context, settings, upstream, warnings))
        else:
            shapes += _generate_shapes(model, context, settings, upstream, warnings)
    return shapes


# --- the engine plan: what the engine specialises on, each covered once ------------------
#
# Sampling paths are exclusive (a request takes one); add-ons ride along with any path.
_PATHS = ("greedy", "sampling", "seed")
_ADDONS = ("penalties", "n", "logprobs", "prompt_logprobs", "json")
SAMPLING_PATHS, ADDON_FEATURES = _PATHS, _ADDONS  # warmgate.profile names requests with them
# Features whose work grows with the prompt (logits over prompt positions, prefill-sized
# buffers): they are warmed at every prompt length, the others once.
_LENGTH_FEATURES = ("logprobs", "prompt_logprobs")


def _engine_shapes(
    model: ModelInfo,
    context: int,
    settings: PlanSettings,
    upstream: UpstreamInfo,
    warnings: list[str],
) -> list[Shape]:
    """The default plan of a generating model, built around the engine's own limits.

    Four groups, each covering one kind of specialisation with as little compute as can:
    - features: a pairwise covering of path x add-ons x endpoint x stream, one short
      request per row, so one request warms several features and their pairs;
    - lengths: one request per prompt-length octave up to one step budget, carrying
      the length-dependent features. A longer prompt only chunks into such steps;
    - batches: one mixed batch per power-of-two batch size up to the largest
      --concurrency bucket, its requests taking the sampling paths in turn (sampler
      kernels specialise on the batch size and the mix of a step);
    - chunked: one prompt longer than a step, when the context allows it.
    """
    limit = context - settings.max_tokens
    top = min(limit, settings.step_budget)
    endpoints = _fitting_endpoints(model, context, settings, upstream, warnings)
    paths = [f for f in _PATHS if f in settings.features]
    addons = [f for f in _ADDONS if f in settings.features]
    if settings.stream == (True,) and "prompt_logprobs" in addons:
        warnings.append("prompt_logprobs needs stream=false, which the settings exclude; skipped")
        addons.remove("prompt_logprobs")
    if not endpoints:
        return []
    if top < settings.min_prompt_tokens:
        warnings.append(
            f"model {model.id!r}: max_model_len {context} leaves no prompt length "
            f"of at least {settings.min_prompt_tokens} tokens; skipped"
        )
        return []

    def shape(
        endpoint: str,
        stream: bool,
        features: Sequence[str],
        length: int,
        c: int,
        max_tokens: int = settings.max_tokens,
    ) -> Shape:
        made = _gen_shape(model, endpoint, stream, "greedy", length, c, max_tokens, upstream, limit)
        feature = "+".join(features) or "default"
        return replace(
            made,
            family=made.family.replace("/greedy/", f"/{feature}/", 1),
            feature=feature,
            fields=_combined_fields(features, endpoint),
        )

    short = min(_SHORT_PROMPT, top)
    shapes = [
        shape(endpoint, stream, features, short, 1)
        for endpoint, stream, features in _feature_rows(paths, addons, endpoints, settings.stream)
    ]
    along = [f for f in addons if f in _LENGTH_FEATURES]
    lengths_on = "completions" if "completions" in endpoints else endpoints[0]
    # The octaves, and each size the engine compiled for (vLLM's compile_sizes): a prompt of
    # exactly that many tokens is the one that meets that specialisation.
    exact = {n for n in settings.compile_sizes if settings.min_prompt_tokens <= n <= top}
    lengths = tuple(sorted(set(length_levels(top, settings.min_prompt_tokens)) | exact))
    # Lengths and batches decode a few tokens only: the first decode step of a batch is the
    # one that meets its kernels; on the CPU build a batch of 64 spent 1.4 of its 2.3 s in
    # 16 decode steps.
    brief = min(settings.max_tokens, _SHORT_DECODE)
    shapes += [shape(lengths_on, False, paths[:1] + along, n, 1, brief) for n in lengths]
    batch_prompt = min(_BATCH_PROMPT, top)
    shapes += _mixed_batches(shape, paths, endpoints, batch_prompt, brief, settings)
    if settings.chunked_prefill and limit > settings.step_budget:
        # Greedy: the vLLM CPU build kills its engine on a seeded prefill that is chunked.
        shapes.append(shape(lengths_on, False, ["greedy"], limit, 1, brief))
    return shapes


def _feature_rows(
    paths: Sequence[str],
    addons: Sequence[str],
    endpoints: Sequence[str],
    streams: Sequence[bool],
) -> list[tuple[str, bool, list[str]]]:
    """(endpoint, stream, features) rows covering every pair of path, add-on (on or
    off), endpoint and stream mode, except prompt_logprobs with stream (vLLM refuses it)
    and n with greedy (n identical answers)."""
    path_levels: list[str | None] = list(paths) or [None]
    factors: list[Sequence[Any]] = [path_levels, *[(False, True)] * len(addons), endpoints, streams]
    stream_at = len(factors) - 1

    def pair_ok(i: int, a: int, j: int, b: int) -> bool:
        level = {i: factors[i][a], j: factors[j][b]}
        for f, on in level.items():
            if 0 < f < stream_at - 1 and on is True:
                name = addons[f - 1]
                if name == "prompt_logprobs" and level.get(stream_at) is True:
                    return False
                if name == "n" and level.get(0) == "greedy":
                    return False
        return True

    rows = []
    for row in covering_rows([len(f) for f in factors], pair_ok):
        values = [factors[f][v] for f, v in enumerate(row)]
        path, flags, endpoint, stream = values[0], values[1:-2], values[-2], values[-1]
        features = ([path] if path else []) + [a for a, on in zip(addons, flags, strict=True) if on]
        rows.append((endpoint, stream, features))
    return rows


def _mixed_batches(
    shape: Callable[[str, bool, Sequence[str], int, int, int], Shape],
    paths: Sequence[str],
    endpoints: Sequence[str],
    short: int,
    max_tokens: int,
    settings: PlanSettings,
) -> list[Shape]:
    """One batch per power-of-two size from 2 to the largest bucket (engines pad batches
    to such sizes), each request on the next sampling path, so that every path meets
    every size. A size smaller than the number of paths takes several batches."""
    most = min(max(settings.concurrency), settings.max_num_seqs, settings.inflight_cap // short)
    mixed = []
    size, turn = 2, 0
    while size <= most and paths:
        for first in range(0, len(paths), size):
            order = [paths[(first + i) % len(paths)] for i in range(size)]
            endpoint = endpoints[turn % len(endpoints)]
            turn += 1
            made = shape(endpoint, False, [], short, size, max_tokens)
            feature = ",".join(dict.fromkeys(order))
            mixed.append(
                replace(
                    made,
                    family=made.family.replace("/default/", f"/mix:{feature}/", 1),
                    feature=feature,
                    variants=tuple(_combined_fields([p], endpoint) for p in order),
                )
            )
        size *= 2
    return mixed


def _combined_fields(features: Sequence[str], endpoint: str) -> Body:
    """The body fields of several features at once. The sampling path goes last, so
    its temperature wins over an add-on's (n and seed set one to sample at all)."""
    merged: Body = {}
    for name in sorted(features, key=lambda f: f in _PATHS):
        merged.update(copy.deepcopy(_FEATURE_FIELDS[name][0 if endpoint == "completions" else 1]))
    return merged


# --- ordering by value ---------------------------------------------------------------------


def order_by_value(
    shapes: Sequence[Shape],
    weight: Callable[[Shape], float] | None = None,
    covered: Collection[tuple[Any, ...]] = (),
) -> list[Shape]:
    """The shapes, most value first: the one-time cost a shape is expected to remove per
    second it takes. Cost is latency.prior_ms; the one-time cost removed is counted as
    the specialisations (a feature, a feature on an endpoint, a prompt-length octave, a
    sampling path at a batch size...) the shape is first to touch, one unit each, times
    `weight` (a profile shape's observed frequency; 1 by default). `covered`: what
    shapes planned before these touch already.
    Greedy: each pick sees what the earlier ones covered. Ties keep the plan's order."""
    left = list(shapes)
    claims = {id(s): _claims(s) for s in left}
    cost = {id(s): prior_ms(batch_of(s)) for s in left}
    worth = {id(s): weight(s) if weight is not None else 1.0 for s in left}
    seen: set[tuple[Any, ...]] = set(covered)
    ordered: list[Shape] = []
    while left:
        best = max(left, key=lambda s: len(claims[id(s)] - seen) * worth[id(s)] / cost[id(s)])
        if not claims[id(best)] - seen:
            ordered += left  # nothing new anywhere: the rest keep their order
            break
        left.remove(best)
        ordered.append(best)
        seen |= claims[id(best)]
    return ordered


# A profile of this many client requests stands for the deployment's traffic: the default
# plan then adds only what those requests use (endpoint and feature) that the profile's own
# shapes have not touched, and skips features no client sent. A smaller one only goes first.
PROFILE_TRUSTED = 100


def _observed_only(
    defaults: Sequence[Shape], learned: Sequence[Shape], claimed: Collection[tuple[Any, ...]]
) -> list[Shape]:
    used = {(s.endpoint, f) for s in learned for f in s.features}
    return [
        s
        for s in defaults
        if all((s.endpoint, f) in used for f in s.features) and _claims(s) - set(claimed)
    ]


def _claims_of(shapes: Sequence[Shape]) -> set[tuple[Any, ...]]:
    return set().union(*map(_claims, shapes)) if shapes else set()


SOURCES = {"profile/": "profile", "file/": "plan", "replay/": "plan"}


def source_of(family: str) -> str:
    """Where a planned shape came from: "profile" (the learned traffic profile), "plan"
    (the user's --plan file) or "default" (the default plan); its family says it."""
    return next((src for prefix, src in SOURCES.items() if family.startswith(prefix)), "default")


def batch_of(shape: Shape) -> Batch:
    """What one run of `shape` asks of the engine, for warmgate.latency."""
    return Batch(shape.key.load, shape.max_tokens, shape.seqs)


def _claims(shape: Shape) -> set[tuple[Any, ...]]:
    """The specialisations a shape touches (see order_by_value)."""
    endpoint, stream, size = shape.endpoint, shape.stream, _pow2(shape.prompt_tokens)
    features = shape.features
    claims: set[tuple[Any, ...]] = {("endpoint", endpoint, stream), ("length", size)}
    for f in features:
        claims |= {("feature", f), ("feature@endpoint", f, endpoint), ("feature@stream", f, stream)}
        if f in _LENGTH_FEATURES:
            claims.add(("feature@length", f, size))
    if not shape.variants:
        claims |= {("pair", f, g) for f, g in itertools.combinations(sorted(features), 2)}
    for path in [f for f in features if f in _PATHS] or ["default"]:
        claims.add(("batch", path, _pow2(shape.seqs)))
    return claims


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _generate_shapes(
    model: ModelInfo,
    context: int,
    settings: PlanSettings,
    upstream: UpstreamInfo,
    warnings: list[str],
) -> list[Shape]:
    limit = context - settings.max_tokens
    lengths = length_levels(limit, settings.min_prompt_tokens)
    if lengths and lengths[-1] > settings.inflight_cap:
        warnings.append(
            f"prompts above max_inflight_tokens {settings.inflight_cap} skipped "
            f"(max_model_len {context}); raise --max-inflight-tokens to warm them"
        )
        lengths = tuple(n for n in lengths if n <= settings.inflight_cap)
    features = settings.features
    if settings.stream == (True,) and "prompt_logprobs" in features:
        warnings.append("prompt_logprobs needs stream=false, which the settings exclude; skipped")
        features = tuple(f for f in features if f != "prompt_logprobs")
    endpoints = _fitting_endpoints(model, context, settings, upstream, warnings)
    concurrency = _bounded_buckets(settings, lengths, warnings)
    if not endpoints:
        return []
    if not lengths or not features or not concurrency:
        warnings.append(
            f"model {model.id!r}: max_model_len {context} leaves no prompt length "
            f"of at least {settings.min_prompt_tokens} tokens; skipped"
        )
        return []
    # Factor order: most levels first, so the covering stays near its lower bound.
    factors: tuple[Sequence[Any], ...] = (
        lengths,
        features,
        concurrency,
        endpoints,
        settings.stream,
    )

    def pair_ok(i: int, a: int, j: int, b: int) -> bool:
        level = {i: factors[i][a], j: factors[j][b]}
        if 1 in level and 4 in level and level[1] in _NO_STREAM_FEATURES and level[4]:
            return False
        too_big = 0 in level and 2 in level and level[0] * level[2] > settings.inflight_cap
        return not too_big

    shapes = []
    for row in covering_rows([len(f) for f in factors], pair_ok):
        length, feature, conc, endpoint, stream = (factors[f][v] for f, v in enumerate(row))
        shapes.append(
            _gen_shape(
                model, endpoint, stream, feature, length, conc, settings.max_tokens, upstream, limit
            )
        )
    return shapes


def _fitting_endpoints(
    model: ModelInfo,
    context: int,
    settings: PlanSettings,
    upstream: UpstreamInfo,
    warnings: list[str],
) -> tuple[str, ...]:
    """The endpoints whose prompts fit the context: text ones need room for the template."""
    endpoints = settings.endpoints
    text_only = () if upstream.has_tokenize else ("completions",)
    if _text_cap(context - settings.max_tokens) < settings.min_prompt_tokens:
        endpoints = tuple(e for e in endpoints if e != "chat" and e not in text_only)
        dropped = _or([e for e in settings.endpoints if e not in endpoints])
        warnings.append(
            f"model {model.id!r}: max_model_len {context} is too short for text "
            f"prompts; {dropped} skipped"
        )
    return endpoints


def _bounded_buckets(
    settings: PlanSettings, lengths: Sequence[int], warnings: list[str]
) -> tuple[int, ...]:
    shortest = lengths[0] if lengths else settings.min_prompt_tokens
    kept = tuple(
        c for c in sorted(set(settings.concurrency)) if c * shortest <= settings.inflight_cap
    )
    if len(kept) < len(set(settings.concurrency)):
        most = settings.inflight_cap // shortest
        warnings.append(
            f"concurrency above {most} exceeds max_inflight_tokens "
            f"{settings.inflight_cap}; those buckets skipped"
        )
    return kept


def _gen_shape(
    model: ModelInfo,
    endpoint: str,
    stream: bool,
    feature: str,
    length: int,
    concurrency: int,
    max_tokens: int,
    upstream: UpstreamInfo,
    limit: int,
) -> Shape:
    kind: PromptKind = "tokens" if endpoint == "completions" and upstream.has_tokenize else "text"
    tokens = length if kind == "tokens" else max(1, min(length, _text_cap(limit)))
    fields = _FEATURE_FIELDS[feature][0 if endpoint == "completions" else 1]
    family = f"{endpoint}/{'stream' if stream else 'nostream'}/{feature}/len{tokens}/c{concurrency}"
    return Shape(
        family,
        ENDPOINTS[endpoint],
        model.id,
        kind,
        tokens,
        concurrency,
        stream,
        feature,
        max_tokens,
        copy.deepcopy(fields),
    )


def _lora_shapes(
    model: ModelInfo, context: int, settings: PlanSettings, upstream: UpstreamInfo, *, first: bool
) -> list[Shape]:
    """LoRA kernels are shared by all adapters: the first one sweeps every length (c1)
    and every bucket (shortest length); the others only need loading, one request each."""
    limit = context - settings.max_tokens
    lengths = length_levels(limit, settings.min_prompt_tokens)
    if not lengths:
        return []
    endpoint = settings.endpoints[0]
    rows = [(n, 1) for n in lengths] + [
        (lengths[0], c)
        for c in sorted(settings.concurrency)
        if c > 1 and c * lengths[0] <= settings.inflight_cap
    ]
    if not first:
        rows = rows[:1]
    return [
        _gen_shape(model, endpoint, False, "greedy", n, c, settings.max_tokens, upstream, limit)
        for n, c in rows
    ]


def _pooling_shapes(
    model: ModelInfo, context: int, settings: PlanSettings, upstream: UpstreamInfo
) -> list[Shape]:
    """Embedding/classification: no sampling or streaming, so lengths x buckets in full."""
    endpoint = _POOLING_ENDPOINT[model.kind]
    kind: PromptKind = "tokens" if upstream.has_tokenize else "text"
    limit = context if kind == "tokens" else _text_cap(context)
    shapes = []
    for n in length_levels(limit, settings.min_prompt_tokens):
        for c in sorted(settings.concurrency):
            if n * c <= settings.inflight_cap:
                shapes.append(
                    Shape(
                        f"{endpoint}/len{n}/c{c}",
                        ENDPOINTS[endpoint],
                        model.id,
                        kind,
                        n,
                        c,
                        feature="plain",
                    )
                )
    return shapes


def _model_for(endpoint: str, name: str | None, models: list[ModelInfo], where: str) -> ModelInfo:
    fits = [m for m in models if endpoint in _endpoints_of(m)]
    if name is not None:
        match = [m for m in fits if m.id == name]
        if not match:
            raise PlanError(
                f"{where}: model {name!r} is not a planned model serving {endpoint} "
                f"(candidates: {_or([m.id for m in fits]) or 'none'})"
            )
        return match[0]
    if not fits:
        raise PlanError(
            f"{where}: no served model has the {endpoint} endpoint "
            f"(models: {_or([f'{m.id} ({m.kind})' for m in models]) or 'none'})"
        )
    return fits[0]


def _endpoints_of(model: ModelInfo) -> tuple[str, ...]:
    return _GENERATE if model.kind == "generate" else (_POOLING_ENDPOINT[model.kind],)


def _profile_shapes(
    settings: PlanSettings, upstream: UpstreamInfo, models: list[ModelInfo], warnings: list[str]
) -> list[Shape]:
    """The profile's shapes, most valuable first with the observed frequency as weight;
    a shape that no longer fits (a shorter context now, a model gone) is left out."""
    shapes: dict[int, Shape] = {}
    weights: dict[int, float] = {}
    for spec in sorted(settings.profile, key=lambda s: -s.weight):
        try:
            model = _model_for(spec.endpoint, spec.model, models, spec.where)
            room = _context(model, settings, []) - (spec.max_tokens or settings.max_tokens)
            if room < 1:
                raise PlanError(f"{spec.where}: max_model_len of {model.id!r} leaves no prompt")
            spec = replace(spec, prompt_tokens=min(spec.prompt_tokens, room))
            shape = _file_shape(spec, settings, upstream, models, prefix="profile")
        except PlanError as exc:
            warnings.append(f"traffic profile: {exc}; left out")
            continue
        shapes[id(shape)], weights[id(shape)] = shape, spec.weight
    kept = _dedupe(list(shapes.values()))
    return order_by_value(kept, weight=lambda s: weights[id(s)])


def _file_shape(
    spec: ShapeSpec,
    settings: PlanSettings,
    upstream: UpstreamInfo,
    models: list[ModelInfo],
    prefix: str = "file",
) -> Shape:
    model = _model_for(spec.endpoint, spec.model, models, spec.where)
    context = _context(model, settings, [])
    generating = spec.endpoint in _GENERATE
    max_tokens = (spec.max_tokens or settings.max_tokens) if generating else 0
    if spec.prompt_tokens + max_tokens > context:
        raise PlanError(
            f"{spec.where}: prompt_tokens {spec.prompt_tokens} + max_tokens "
            f"{max_tokens} exceeds max_model_len {context} of {model.id!r}; "
            f"lower prompt_tokens to {context - max_tokens} or less"
        )
    feature = spec.feature or ("greedy" if generating else "plain")
    kind: PromptKind = "tokens" if spec.endpoint != "chat" and upstream.has_tokenize else "text"
    tokens = spec.prompt_tokens
    if kind == "text":
        tokens = max(1, min(tokens, _text_cap(context - max_tokens)))
    fields: Body = {}
    if generating:
        fields.update(_combined_fields(split_features(feature), spec.endpoint))
    fields.update(copy.deepcopy(dict(spec.body)))
    stream = spec.stream and generating
    mode = ("stream/" if stream else "nostream/") if generating else ""
    family = f"{prefix}/{spec.endpoint}/{mode}{feature}/len{tokens}/c{spec.concurrency}"
    return Shape(
        family,
        ENDPOINTS[spec.endpoint],
        model.id,
        kind,
        tokens,
        spec.concurrency,
        stream,
        feature,
        max_tokens,
        fields,
    )


def _replay_shape(spec: ReplaySpec, models: list[ModelInfo], warnings: list[str]) -> Shape:
    recorded = spec.body.get("model")
    fits = [m.id for m in models if spec.endpoint in _endpoints_of(m)]
    name = recorded if isinstance(recorded, str) and recorded in fits else None
    model = _model_for(spec.endpoint, name, models, spec.where)
    if recorded is not None and name is None:
        warnings.append(f"{spec.where}: model {recorded!r} is not served; replayed on {model.id!r}")
    max_tokens = spec.body.get("max_tokens") or spec.body.get("max_completion_tokens")
    return Shape(
        f"replay/{spec.where}",
        ENDPOINTS[spec.endpoint],
        model.id,
        "recorded",
        0,
        spec.concurrency,
        spec.body.get("stream") is True,
        "replay",
        max_tokens if isinstance(max_tokens, int) else 0,
        recorded=copy.deepcopy(dict(spec.body)),
    )


def _dedupe(shapes: list[Shape]) -> list[Shape]:
    """Keep the first shape of each (model, family): tiny contexts can clamp two into one."""
    seen: set[tuple[str, str]] = set()
    out = []
    for s in shapes:
        if (s.model, s.family) not in seen:
            seen.add((s.model, s.family))
            out.append(s)
    return out


# --- quarantine: shapes that killed the engine -------------------------------------


def split_features(feature: str) -> tuple[str, ...]:
    """The features a shape's `feature` names: "logprobs+json" (one request carries
    both) or "greedy,sampling" (a mixed batch: each request one)."""
    return tuple(dict.fromkeys(f for part in feature.split(",") for f in part.split("+") if f))


def to_quarantine(
    planned: Sequence[ShapeKey], completed: Collection[ShapeKey], in_flight: Sequence[ShapeKey]
) -> tuple[ShapeKey, ...]:
    """What to leave out of the next start after the engine died with `in_flight` running.

    The shapes in flight, and every planned shape sharing a feature with them that is
    not known to be safe: a larger load (prompt tokens x concurrency) than the largest
    shape with that feature that completed before the crash. Without the second part the
    next start would die on the next such shape. Shapes, never a whole feature: smaller
    ones stay warmed. (A shape may carry several features; any one may be the culprit.)
    """
    quarantined = dict.fromkeys(in_flight)
    done = set(completed)
    for feature in dict.fromkeys(f for s in in_flight for f in s.features):
        safe = max((s.load for s in done if feature in s.features), default=0)
        for s in planned:
            if feature in s.features and s.load > safe and s not in done:
                quarantined[s] = None
    return tuple(quarantined)


def without_quarantined(
    the_plan: Plan, quarantined: Collection[ShapeKey]
) -> tuple[Plan, tuple[Shape, ...]]:
    """The plan less its quarantined shapes (matched by model and family), and those left out.

    PlanError when nothing would be left: an empty warm-up cannot tell a healed engine
    from a broken one.
    """
    names = {(q.model, q.family) for q in quarantined}
    kept = tuple(s for s in the_plan.shapes if (s.model, s.family) not in names)
    dropped = tuple(s for s in the_plan.shapes if (s.model, s.family) in names)
    if dropped and not kept:
        raise PlanError(
            f"every shape of the plan is quarantined ({len(dropped)} killed the engine or "
            "may kill it); fix the engine, then start with a new --cache-key or delete the "
            "key's quarantine.json under --cache-dir"
        )
    return replace(the_plan, shapes=kept), dropped


# --- after Ready: the re-warm after a wake-up, and a LoRA adapter loaded at run time --------


def rewarm_plan(startup: Plan) -> Plan:
    """The short plan run after the engine wakes from sleep, chosen from the startup plan.

    Waking keeps the compiled kernels but reallocates the weights and the KV cache: the
    first step of each batch size pays for it again, and so does each endpoint's first
    request. So: per (model, endpoint, concurrency) the startup shape of least load (the
    batch buckets and one short request per endpoint), in the startup plan's order.
    """
    least: dict[tuple[str, str, int], Shape] = {}
    for shape in startup.shapes:
        where = (shape.model, shape.endpoint, shape.concurrency)
        if where not in least or shape.key.load < least[where].key.load:
            least[where] = shape
    kept = set(map(id, least.values()))
    return replace(startup, shapes=tuple(s for s in startup.shapes if id(s) in kept))


def adapter_plan(settings: PlanSettings, upstream: UpstreamInfo, adapter: str) -> Plan:
    """The short plan of a LoRA adapter loaded after Ready: one short greedy request per
    endpoint, one at a time (the pod serves meanwhile; low priority). Its kernels are the
    base model's, warm since start-up; what is cold is the adapter's own first use.

    An adapter's /v1/models card has no max_model_len: its base model's stands in.
    """
    model = next((m for m in upstream.models if m.id == adapter), None)
    if model is None:
        raise PlanError(f"adapter {adapter!r} is no longer in /v1/models (unloaded?)")
    warnings: list[str] = []
    if model.max_model_len is None:
        base = [m.max_model_len for m in upstream.models if not m.is_lora and m.max_model_len]
        model = replace(model, max_model_len=min(base) if base else None)
    context = _context(model, settings, warnings)
    limit = context - settings.max_tokens
    short = min(_SHORT_PROMPT, limit)
    if short < 1:
        raise PlanError(f"adapter {adapter!r}: max_model_len {context} leaves no prompt")
    shapes = tuple(
        _gen_shape(model, endpoint, False, "greedy", short, 1, settings.max_tokens, upstream, limit)
        for endpoint in _fitting_endpoints(model, context, settings, upstream, warnings)
    )
    if not shapes:
        raise PlanError(f"adapter {adapter!r}: no endpoint fits; {'; '.join(warnings)}")
    return Plan(
        shapes,
        tuple(warnings),
        upstream.tokens_per_word or DEFAULT_TOKENS_PER_WORD,
        settings.converge,
        settings.min_repeats,
        settings.max_repeats,
    )


# --- requests -----------------------------------------------------------------------


def body_for(shape: Shape, prompt: Sequence[int] | str, index: int = 0) -> Body:
    """The JSON body of request `index` of a batch of `shape`, given a fresh prompt.

    `prompt` is a token-id list for prompt_kind "tokens" and text for "text"; it is
    ignored for "recorded" shapes, which are sent as recorded (with `model` set).
    """
    if shape.recorded is not None:
        body = copy.deepcopy(dict(shape.recorded))
        body["model"] = shape.model
        return body
    if shape.prompt_kind == "text" and not isinstance(prompt, str):
        raise ValueError(f"{shape.family}: needs a text prompt (prompt_text), got token ids")
    if shape.prompt_kind == "tokens" and isinstance(prompt, str):
        raise ValueError(f"{shape.family}: needs token ids (prompt_token_ids), got text")
    payload: str | list[int] = prompt if isinstance(prompt, str) else list(prompt)
    body = {"model": shape.model}
    if shape.endpoint == ENDPOINTS["chat"]:
        body["messages"] = [{"role": "user", "content": payload}]
    elif shape.endpoint == ENDPOINTS["completions"]:
        body["prompt"] = payload
    else:
        body["input"] = payload
    if shape.max_tokens:
        body["max_tokens"] = shape.max_tokens
        body["stream"] = shape.stream
        if shape.stream:
            body["stream_options"] = {"include_usage": True}  # usage lets the shell count tokens
    body.update(copy.deepcopy(dict(shape.fields)))
    if shape.variants:
        body.update(copy.deepcopy(dict(shape.variants[index % len(shape.variants)])))
    return body


def redacted_body(shape: Shape) -> Body:
    """The body of one request of `shape` with its prompt replaced by a placeholder that
    names its size: what a log line or a bug report may show (never the prompt text)."""
    placeholder = (
        f"<{shape.prompt_tokens} prompt tokens>" if shape.prompt_tokens else "<prompt removed>"
    )
    body = body_for(shape, [0] if shape.prompt_kind == "tokens" else "")
    for name in ("prompt", "input"):
        if name in body:
            body[name] = placeholder
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [
            {**m, "content": placeholder} if isinstance(m, dict) else placeholder for m in messages
        ]
    return body


def prompt_token_ids(vocab: Sequence[int], n: int, seed: int) -> list[int]:
    """Exactly n token ids drawn from `vocab`, deterministic per seed, fresh across seeds.

    `vocab` should hold ordinary text tokens (e.g. /tokenize of WORDS), never special
    or placeholder tokens.
    """
    if not vocab:
        raise ValueError("vocab is empty: tokenize WORDS first")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return random.Random(seed).choices(list(vocab), k=n)


def prompt_text(words: Sequence[str], n_tokens: int, tokens_per_word: float, seed: int) -> str:
    """About n_tokens tokens of text (never more words than the rate allows), fresh per seed."""
    if not words:
        raise ValueError("words is empty")
    if n_tokens < 1 or tokens_per_word <= 0:
        raise ValueError(
            f"need n_tokens >= 1 and tokens_per_word > 0, got {n_tokens}, {tokens_per_word}"
        )
    count = max(1, int(n_tokens / tokens_per_word))
    return " ".join(random.Random(seed).choices(list(words), k=count))


class Convergence:
    """Repeat a shape until it stops getting faster.

    Done once the last run is no more than `tolerance` faster than the previous one (the
    previous run paid no one-time cost the last one was spared) and not much slower
    (SLOWER_RUNS tolerances: a run that got far slower may have met a new cost), after at
    least `min_runs`; or after `max_runs` (then `converged` stays False: warn, don't
    fail). A warm run that noise made slower needs no third run: on the CPU build one
    batch of 64 ran 2345 then 2687 ms, and two more runs showed nothing.
    One run is one batch of `concurrency` requests; record its wall time.
    """

    def __init__(
        self,
        tolerance: float = DEFAULTS["converge"],
        min_runs: int = MIN_REPEATS,
        max_runs: int = DEFAULTS["max_repeats"],
    ) -> None:
        if not 0 < tolerance < 1 or not 1 <= min_runs <= max_runs:
            raise ValueError(
                f"bad convergence rule: tolerance={tolerance}, "
                f"min_runs={min_runs}, max_runs={max_runs}"
            )
        self.tolerance = tolerance
        self.min_runs = min_runs
        self.max_runs = max_runs
        self._runs: list[float] = []
        self.converged = False

    def record(self, ms: float) -> bool:
        """Add one run's latency; True when no further run is needed."""
        if self.done:
            raise ValueError("record() after done: the shape already converged or ran out")
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")
        self._runs.append(ms)
        if len(self._runs) >= max(2, self.min_runs):
            prev, last = self._runs[-2], self._runs[-1]
            faster, slower = prev - last, last - prev
            self.converged = (
                faster <= self.tolerance * prev and slower <= SLOWER_RUNS * self.tolerance * prev
            )
        return self.done

    @property
    def done(self) -> bool:
        return self.converged or len(self._runs) >= self.max_runs

    @property
    def runs(self) -> tuple[float, ...]:
        return tuple(self._runs)

    @property
    def cold_ms(self) -> float | None:
        return self._runs[0] if self._runs else None

    @property
    def warm_ms(self) -> float | None:
        return self._runs[-1] if len(self._runs) >= 2 else None


# --- plan files ---------------------------------------------------------------------

_SHAPE_KEYS = (
    "endpoint",
    "stream",
    "feature",
    "prompt_tokens",
    "concurrency",
    "max_tokens",
    "model",
    "body",
)
_TOP_KEYS = ("mode", "shape", "replay")


def parse_plan_file(
    text: str, *, source: str = "plan.toml", read: Callable[[str], str] | None = None
) -> PlanFileSpec:
    """Parse a --plan TOML file; PlanError names the file, the key and the fix.

        mode = "extend"              # or "replace": drop the default plan
        replay = "recorded.jsonl"    # or a list; JSONL of recorded request bodies
        [[shape]]
        endpoint = "chat"            # completions | chat | embeddings | classify (or the path)
        prompt_tokens = 1500
        stream = true                # optional, default false
        feature = "logprobs"         # optional, one of FEATURES, or several: "logprobs+json"
        concurrency = 8              # optional, default 1
        max_tokens = 64              # optional, default --max-tokens
        model = "my-model"           # optional, default the first fitting model
        body = { top_logprobs = 3 }  # optional extra body fields

    `read(name)` returns the text of a replay file named in the plan (the shell
    resolves it next to the plan file); it may raise OSError.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"{source}: not valid TOML: {e}") from None
    _no_unknown(data, _TOP_KEYS, source)
    mode = data.get("mode", "extend")
    if mode not in ("extend", "replace"):
        raise PlanError(f'{source}: mode = {mode!r}; use "extend" or "replace"')
    tables = data.get("shape", [])
    if not isinstance(tables, list):
        raise PlanError(f"{source}: 'shape' must be an array of tables; write [[shape]]")
    shapes = tuple(_shape_spec(t, f"{source} [[shape]] #{i}") for i, t in enumerate(tables, 1))
    replay = tuple(
        r for name in _replay_names(data, source) for r in _replay_file(name, source, read)
    )
    return PlanFileSpec(source, mode, shapes, replay)


def _shape_spec(table: object, where: str) -> ShapeSpec:
    if not isinstance(table, dict):
        raise PlanError(f"{where}: must be a table")
    _no_unknown(table, _SHAPE_KEYS, where)
    endpoint = _endpoint_key(table.get("endpoint"), f"{where} endpoint")
    feature = table.get("feature")
    known = isinstance(feature, str) and all(f in _FEATURE_FIELDS for f in feature.split("+"))
    if feature is not None and (endpoint not in _GENERATE or not known):
        allowed = (
            f"{_or(FEATURES)}, or several joined with + (logprobs+json)"
            if endpoint in _GENERATE
            else "nothing (pooling endpoint)"
        )
        raise PlanError(f"{where}: feature {feature!r} does not apply; use {allowed}")
    if "prompt_tokens" not in table:
        raise PlanError(f"{where}: prompt_tokens is required (a positive integer)")
    body = table.get("body", {})
    if not isinstance(body, dict):
        raise PlanError(f"{where}: body must be a table, e.g. body = {{ top_logprobs = 3 }}")
    stream = table.get("stream", False)
    if not isinstance(stream, bool):
        raise PlanError(f"{where}: stream must be true or false, got {stream!r}")
    model = table.get("model")
    if model is not None and not isinstance(model, str):
        raise PlanError(f"{where}: model must be a string, got {model!r}")
    prompt_tokens = _positive(table["prompt_tokens"], f"{where} prompt_tokens")
    concurrency = _positive(table.get("concurrency", 1), f"{where} concurrency")
    max_tokens = table.get("max_tokens")
    if max_tokens is not None:
        max_tokens = _positive(max_tokens, f"{where} max_tokens")
    return ShapeSpec(
        where, endpoint, prompt_tokens, stream, feature, concurrency, max_tokens, model, body
    )


def _replay_names(data: dict[str, Any], source: str) -> list[str]:
    names = data.get("replay", [])
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PlanError(f'{source}: replay must be a file name or a list of them, e.g. "rec.jsonl"')
    return names


def _replay_file(name: str, source: str, read: Callable[[str], str] | None) -> list[ReplaySpec]:
    if read is None:
        raise PlanError(f"{source}: replay = {name!r} but no reader was given for replay files")
    try:
        text = read(name)
    except OSError as e:
        raise PlanError(
            f"{source}: replay file {name!r} cannot be read ({e.strerror or e}); "
            "paths are relative to the plan file"
        ) from None
    specs = [
        _replay_line(line, f"{name}:{n}")
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip()
    ]
    if not specs:
        raise PlanError(f"{source}: replay file {name!r} holds no requests (one JSON per line)")
    return specs


def _replay_line(line: str, where: str) -> ReplaySpec:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PlanError(f"{where}: not JSON ({e.msg}); each line must be one request") from None
    if not isinstance(record, dict):
        raise PlanError(f"{where}: must be a JSON object")
    if "body" in record:  # {"endpoint": ..., "body": {...}, "concurrency": n}
        body = record["body"]
        if not isinstance(body, dict):
            raise PlanError(f"{where}: 'body' must be a JSON object")
        endpoint = _endpoint_key(
            record.get("endpoint") or _infer_endpoint(body, where), f"{where} endpoint"
        )
        conc = _positive(record.get("concurrency", 1), f"{where} concurrency")
        return ReplaySpec(where, endpoint, body, conc)
    return ReplaySpec(where, _infer_endpoint(record, where), record)


def _infer_endpoint(body: dict[str, Any], where: str) -> str:
    for key, endpoint in (("messages", "chat"), ("prompt", "completions"), ("input", "embeddings")):
        if key in body:
            return endpoint
    raise PlanError(
        f'{where}: body has no "messages", "prompt" or "input"; '
        'wrap it as {"endpoint": "/v1/...", "body": {...}}'
    )


def _endpoint_key(value: object, where: str) -> str:
    for key, path in ENDPOINTS.items():
        if value in (key, path):
            return key
    raise PlanError(f"{where} = {value!r}; use {_or(list(ENDPOINTS))} or their paths")


def _positive(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{where} must be a positive integer, got {value!r}")
    return value


def _no_unknown(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise PlanError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


def _or(items: Sequence[str]) -> str:
    return ", ".join(items)
