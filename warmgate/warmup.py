"""Runs a warm-up plan against the upstream and records what each shape cost.

The plan (warmgate.plan) decides what to send; this module sends it: fresh
prompts for every request, `concurrency` requests in flight at once, repeats
until the latency converges, retries for 5xx and connection errors, and skips a
feature the upstream refuses with a 4xx.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from warmgate import log, plan
from warmgate.config import WarmupSettings
from warmgate.latency import LatencyModel, is_warm
from warmgate.upstream import Reply, Upstream, UpstreamError

RETRIES = 3  # attempts per request for 5xx, garbage and connection errors
BACKOFF_S = 0.5


class WarmupError(Exception):
    """The warm-up could not be completed (broken upstream, nothing warmed)."""


class _Unsupported(Exception):
    """A 4xx: the upstream does not take this feature."""


@dataclass(slots=True)
class ShapeResult:
    key: plan.ShapeKey
    # running | converged | verified | out_of_repeats | unverified | skipped | failed | cold
    status: str = "pending"
    runs_ms: list[float] = field(default_factory=list)
    predicted_ms: float | None = None  # the warm-latency model's figure for the first run
    error: str | None = None
    body: dict[str, Any] | None = None  # one request's body, prompt redacted (plan.redacted_body)

    @property
    def family(self) -> str:
        return self.key.family

    @property
    def model(self) -> str:
        return self.key.model

    @property
    def cold_ms(self) -> float | None:
        return self.runs_ms[0] if self.runs_ms else None

    @property
    def warm_ms(self) -> float | None:
        verified = self.status == "verified" and self.runs_ms
        return self.runs_ms[-1] if len(self.runs_ms) >= 2 or verified else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "source": plan.source_of(self.family),  # profile, plan (--plan) or default
            "model": self.model,
            "feature": self.key.feature,
            "prompt_tokens": self.key.prompt_tokens,
            "concurrency": self.key.concurrency,
            "status": self.status,
            "cold_ms": _round(self.cold_ms),
            "warm_ms": _round(self.warm_ms),
            "predicted_ms": _round(self.predicted_ms),
            "repeats": len(self.runs_ms),
            "error": self.error,
        }


@dataclass(slots=True)
class Prompts:
    """Fresh prompt material: a vocabulary of ordinary token ids, and the word list."""

    vocab: list[int]
    seeds: itertools.count[int] = field(
        default_factory=lambda: itertools.count(random.getrandbits(31))
    )

    def for_shape(self, shape: plan.Shape, tokens_per_word: float) -> list[int] | str:
        seed = next(self.seeds)
        if shape.prompt_kind == "tokens":
            return plan.prompt_token_ids(self.vocab, shape.prompt_tokens, seed)
        if shape.prompt_kind == "text":
            return plan.prompt_text(plan.WORDS, shape.prompt_tokens, tokens_per_word, seed)
        return ""


async def discover(
    upstream: Upstream, settings: WarmupSettings
) -> tuple[plan.UpstreamInfo, Prompts]:
    """What the upstream serves, and a vocabulary for token-exact prompts."""
    served = await _retry(upstream.models)
    models = []
    for m in served:
        # A model no plan can pick is not probed (an adapter's warm-up names its one model).
        wanted = not settings.models or m.id in settings.models
        kind = await _model_kind(upstream, m.id, settings.request_timeout) if wanted else "generate"
        models.append(plan.ModelInfo(m.id, m.max_model_len, kind, is_lora=m.parent is not None))
    vocab: list[int] = []
    tokens_per_word = None
    text = " ".join(plan.WORDS)
    tokens = await upstream.tokenize(models[0].id, text) if models else None
    if tokens:
        vocab = sorted(set(tokens) - set(await upstream.tokenize(models[0].id, "") or []))
        tokens_per_word = len(tokens) / len(plan.WORDS)
    info = plan.UpstreamInfo(
        tuple(models), has_tokenize=bool(vocab), tokens_per_word=tokens_per_word
    )
    return info, Prompts(vocab)


async def _model_kind(upstream: Upstream, model: str, timeout: float) -> str:
    """'generate' unless the model refuses completions and answers embeddings."""
    probe = {"model": model, "prompt": "hi", "max_tokens": 1}
    reply = await upstream.request(
        "POST", "/v1/completions", probe, request_id=_request_id(), timeout=timeout
    )
    if reply.status in (400, 404, 405, 501):
        embed = await upstream.request(
            "POST",
            "/v1/embeddings",
            {"model": model, "input": "hi"},
            request_id=_request_id(),
            timeout=timeout,
        )
        if embed.status == 200:
            return "embed"
    return "generate"


def build(settings: WarmupSettings, info: plan.UpstreamInfo) -> plan.Plan:
    """The plan for these settings, the engine's limits and what the upstream reported."""
    engine = settings.engine
    limits: dict[str, Any] = {}
    if engine is not None:
        limits = {
            "step_budget": engine.step_budget,
            "max_num_seqs": engine.max_num_seqs,
            "chunked_prefill": engine.chunked_prefill,
            "compile_sizes": engine.compile_sizes,
        }
    plan_settings = plan.PlanSettings(
        max_tokens=settings.max_tokens,
        concurrency=settings.concurrency,
        features=settings.features,
        max_inflight_tokens=settings.max_inflight_tokens,
        models=settings.models,
        converge=settings.converge,
        max_repeats=settings.max_repeats,
        plan_file=settings.plan,
        profile=settings.profile,
        profile_requests=settings.profile_requests,
        coverage=settings.coverage,
        **limits,
    )
    if settings.adapter is not None:
        return plan.adapter_plan(plan_settings, info, settings.adapter)
    startup = plan.build_plan(plan_settings, info)
    return plan.rewarm_plan(startup) if settings.rewarm else startup


Emit = Callable[[dict[str, Any]], None]
# A shape is warm once it converged, its first run matched the warm-latency model
# (verified), it ran out of repeats, or the budget ended its repeats (unverified).
WARMED = ("converged", "verified", "out_of_repeats", "unverified")
VERIFY_SLACK_MS = 10.0  # a first run this much over the model still counts as warm


async def warm(
    upstream: Upstream,
    settings: WarmupSettings,
    emit: Emit,
    quarantined: Sequence[plan.ShapeKey] = (),
) -> None:
    """Discover, plan and run, reporting each step to `emit` as a plain dict (see Progress).

    Shapes in `quarantined` (they killed the engine before) are left out of the plan.
    Raises WarmupError when a shape fails or nothing could be warmed.
    """
    began = settings.budget_from or time.monotonic()
    info, prompts = await discover(upstream, settings)
    the_plan, left_out = plan.without_quarantined(build(settings, info), quarantined)
    emit(
        {
            "event": "plan",
            "models": [m.id for m in info.models],
            "shapes": [s.key.as_dict() for s in the_plan.shapes],
            "quarantined": [s.key.as_dict() for s in left_out],
            "warnings": list(the_plan.warnings),
            "coverage": settings.coverage,
        }
    )
    deadline = began + settings.budget_seconds(None)
    await Runner(upstream, the_plan, prompts, settings, emit, deadline).run()


class Runner:
    """Executes one plan. It keeps no record: every batch and verdict goes to `emit`."""

    def __init__(
        self,
        upstream: Upstream,
        the_plan: plan.Plan,
        prompts: Prompts,
        settings: WarmupSettings,
        emit: Emit,
        deadline: float = float("inf"),
    ) -> None:
        self.upstream, self.plan, self.prompts, self.settings = (
            upstream,
            the_plan,
            prompts,
            settings,
        )
        self._emit = emit
        self._deadline = deadline  # time.monotonic() when the warm-up budget is spent
        self._refused: set[tuple[str, str]] = set()  # (model, feature) the upstream refused
        self.model = LatencyModel()  # warm latency, from the repeats seen so far

    async def run(self) -> None:
        """Every shape in order until the budget is spent; raises WarmupError if one
        fails or nothing was warmed. Shapes the budget leaves out end as "cold"."""
        warmed = False
        for index, shape in enumerate(self.plan.shapes):
            if warmed and self._spent():
                self._emit({"event": "shape", "index": index, "status": "cold", "error": None})
                continue
            # Before any request: if the engine dies of this shape, the gate can name it.
            self._emit({"event": "start", "index": index, "body": plan.redacted_body(shape)})
            status, error = await self._shape(index, shape)
            self._emit({"event": "shape", "index": index, "status": status, "error": error})
            if status == "failed":
                raise WarmupError(f"shape {shape.family}: {error}")
            warmed = warmed or status in WARMED
        if not warmed:
            raise WarmupError("nothing was warmed: the upstream refused every shape")

    def _spent(self) -> bool:
        return time.monotonic() >= self._deadline

    async def _shape(self, index: int, shape: plan.Shape) -> tuple[str, str | None]:
        """Run the shape once; repeat it until it converges unless that first run was
        already as fast as the warm-latency model predicts: (status, error)."""
        if (shape.model, shape.feature) in self._refused:
            return "skipped", f"feature {shape.feature} refused earlier"
        convergence = self.plan.convergence()
        batch = plan.batch_of(shape)
        try:
            while True:
                ms, each_s = await self._batch(shape)
                first = not convergence.runs
                predicted = self.model.predict(batch) if first else None
                self._emit(
                    {
                        "event": "run",
                        "index": index,
                        "ms": ms,
                        "requests_s": each_s,
                        "predicted_ms": predicted,
                    }
                )
                if not first:
                    self.model.observe(batch, ms)  # a repeat: the first run paid the cold costs
                tolerance = 2 * self.plan.converge
                if (
                    first
                    and predicted is not None
                    and is_warm(ms, predicted, tolerance, VERIFY_SLACK_MS)
                ):
                    # Known warm by the model's own verdict: a point that extends its reach to
                    # larger batches, counted at no more than it predicted, so that a cold
                    # run it let through cannot raise the bar for the next ones.
                    self.model.observe(batch, min(ms, predicted))
                    return "verified", None
                if convergence.record(ms):
                    break
                if self._spent():
                    return "unverified", None
        except _Unsupported as exc:
            self._refused.add((shape.model, shape.feature))
            self._emit(
                {
                    "event": "unsupported",
                    "index": index,
                    "feature": shape.feature,
                    "error": str(exc),
                }
            )
            return "skipped", str(exc)
        except (WarmupError, httpx.HTTPError, UpstreamError) as exc:
            return "failed", str(exc) or type(exc).__name__
        return ("converged" if convergence.converged else "out_of_repeats"), None

    async def _batch(self, shape: plan.Shape) -> tuple[float, list[float]]:
        """`concurrency` requests of one shape at once, each with a fresh prompt: the wall
        ms of the batch, and each request's own seconds."""
        bodies = [
            plan.body_for(shape, self.prompts.for_shape(shape, self.plan.tokens_per_word), i)
            for i in range(shape.concurrency)
        ]
        began = time.perf_counter()
        each = await asyncio.gather(*(self._one(shape, body) for body in bodies))
        return (time.perf_counter() - began) * 1000, list(each)

    async def _one(self, shape: plan.Shape, body: dict[str, Any]) -> float:
        """One request, retried for 5xx, garbage and connection errors: its seconds."""
        last = ""
        for attempt in range(RETRIES):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                reply = await self.upstream.request(
                    "POST",
                    shape.endpoint,
                    body,
                    request_id=_request_id(),
                    timeout=self.settings.request_timeout,
                )
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__} from {shape.endpoint}"
                continue
            if 400 <= reply.status < 500:
                raise _Unsupported(f"HTTP {reply.status}: {_error_message(reply)}")
            problem = _invalid(reply)
            if problem is None:
                return reply.ms / 1000
            last = problem
        raise WarmupError(f"{last} (after {RETRIES} attempts)")


class Progress:
    """Reads the runner's events: keeps the results for /status, feeds the latency
    histogram and writes the log lines a person follows (one per shape, with an ETA).

    The events are plain dicts so that they can cross a pipe: `warmgate run` runs the
    warm-up in a process of its own (warmgate.worker) and reads them there.
    """

    def __init__(self, observe: Callable[[str, str, float], None] | None = None) -> None:
        self.results: list[ShapeResult] = []
        self.models: list[str] = []
        self.warnings: list[str] = []
        self.left_out: list[plan.ShapeKey] = []  # quarantined shapes this plan left out
        self._observe = observe
        self._began = time.monotonic()
        self._log = log.get()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "plan":
            self._plan(event)
        elif kind == "start":
            result = self.results[event["index"]]
            result.status, result.body = "running", event["body"]
        elif kind == "run":
            result = self.results[event["index"]]
            result.runs_ms.append(event["ms"])
            if event.get("predicted_ms") is not None:
                result.predicted_ms = event["predicted_ms"]
            if self._observe is not None:
                for seconds in event["requests_s"]:
                    self._observe(result.key.feature, result.key.endpoint, seconds)
        elif kind == "unsupported":
            self._log.warning(
                "feature_unsupported",
                shape=self.results[event["index"]].family,
                feature=event["feature"],
                error=event["error"],
            )
        elif kind == "shape":
            result = self.results[event["index"]]
            result.status, result.error = event["status"], event["error"]
            if result.status != "cold":  # the budget left it out: one line for all at the end
                self._log_shape(result, event["index"])

    def in_flight(self) -> list[ShapeResult]:
        """The shapes started and not warmed: the one running, or one that just failed."""
        return [r for r in self.results if r.status in ("running", "failed")]

    def warmed(self) -> list[ShapeResult]:
        return [r for r in self.results if r.status in WARMED]

    def cold(self) -> list[ShapeResult]:
        """The shapes the warm-up budget left out."""
        return [r for r in self.results if r.status == "cold"]

    def _plan(self, event: dict[str, Any]) -> None:
        self.models = list(event["models"])
        self.warnings += event["warnings"]
        self.results = [ShapeResult(_key(s)) for s in event["shapes"]]
        self.left_out = [_key(s) for s in event.get("quarantined", ())]
        for warning in event["warnings"]:
            self._log.warning("plan", note=warning)
        if self.left_out:
            self._log.warning(
                "quarantine",
                shapes=[k.family for k in self.left_out],
                note=f"{len(self.left_out)} shapes left out of the warm-up: they killed the "
                "engine in an earlier start of this cache key, or are larger than what it "
                "survived. Only these shapes are left out, not their features; a client that "
                "sends one may crash the engine",
            )
        self._log.info("plan", shapes=len(self.results), models=self.models)

    def _log_shape(self, result: ShapeResult, index: int) -> None:
        done = index + 1
        elapsed = time.monotonic() - self._began
        eta = elapsed / done * (len(self.results) - done)
        self._log.info(
            "shape",
            shape=result.family,
            model=result.model,
            status=result.status,
            cold_ms=_round(result.cold_ms),
            ms=_round(result.warm_ms),
            repeats=len(result.runs_ms),
            progress=f"{done}/{len(self.results)}",
            eta_s=round(eta, 1),
        )


def _key(record: dict[str, Any]) -> plan.ShapeKey:
    key = plan.ShapeKey.from_dict(record)
    assert key is not None, f"the runner sent a shape without its key fields: {record}"
    return key


def _invalid(reply: Reply) -> str | None:
    """Why a reply does not count as a good warm-up response, or None if it does."""
    if reply.status != 200:
        return f"HTTP {reply.status}"
    body = reply.body
    if isinstance(body, list):  # a stream: its events must carry choices
        if not any(isinstance(e, dict) and e.get("choices") for e in body):
            return "stream without output"
        return None
    if not isinstance(body, dict):
        return f"not JSON: {reply.text[:80]!r}"
    if body.get("choices") or body.get("data"):
        return None
    return f"no output in {str(body)[:80]}"


def _error_message(reply: Reply) -> str:
    body = reply.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:200]
    return reply.text[:200]


async def _retry(call: Callable[[], Any], attempts: int = 5) -> Any:
    """The server only just turned healthy: give its first answers a few tries."""
    for attempt in range(attempts):
        try:
            return await call()
        except (httpx.HTTPError, UpstreamError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


def _request_id() -> str:
    return f"warmgate-{random.getrandbits(64):016x}"


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 1)


def summary_table(results: list[ShapeResult]) -> str:
    """The final table a person reads: one row per shape."""
    rows = [f"{'shape':<48} {'status':<15} {'cold ms':>9} {'warm ms':>9} {'runs':>4}"]
    for r in results:
        cold = f"{r.cold_ms:.1f}" if r.cold_ms is not None else "-"
        warm = f"{r.warm_ms:.1f}" if r.warm_ms is not None else "-"
        rows.append(f"{r.family:<48} {r.status:<15} {cold:>9} {warm:>9} {len(r.runs_ms):>4}")
    return "\n".join(rows)
