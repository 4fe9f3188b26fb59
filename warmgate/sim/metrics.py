"""The simulator's /metrics: the vLLM series a supervisor or benchmark looks at."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from warmgate.sim.engine import Engine

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vllm/v1/metrics/buckets.py ITERATION_TOKENS_BUCKETS (0.32.0)
_ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class SimMetrics:
    def __init__(self, model: str, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model, "engine": "0"}
        names = list(labels)
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, names, registry=reg).labels(**labels)

        gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).set_function(lambda: engine.num_running)
        gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).set_function(lambda: engine.num_waiting)
        waiting = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason.",
            [*names, "reason"],
            registry=reg,
        )
        waiting.labels(**labels, reason="capacity").set_function(lambda: engine.num_waiting)
        waiting.labels(**labels, reason="deferred").set(0)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*names, "finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length", "abort", "error", "repetition"):
            self._success.labels(**labels, finished_reason=reason)  # vLLM shows zeros too
        self._prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", names, registry=reg
        ).labels(**labels)
        self._generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", names, registry=reg
        ).labels(**labels)
        self._prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", names, registry=reg
        ).labels(**labels)
        self._prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", names, registry=reg
        ).labels(**labels)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency (simulated seconds).",
            names,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self._iteration_tokens = Histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            names,
            buckets=_ITERATION_TOKENS_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self._steps = Counter(
            "warmgate_sim:engine_steps",
            "Engine steps, those that only compute a prefill chunk too.",
            names,
            registry=reg,
        ).labels(**labels)
        self._compilations = Counter(
            "warmgate_sim:jit_compilations", "Kernel keys compiled lazily.", names, registry=reg
        ).labels(**labels)
        self._compile_seconds = Counter(
            "warmgate_sim:jit_compile_seconds", "Simulated compile time.", names, registry=reg
        ).labels(**labels)
        self._labels = labels
        self._engine = engine
        self._synced = (0, 0, 0, 0, 0)

    def observe_compile(self, key: str, ms: float) -> None:
        self._compilations.inc()
        self._compile_seconds.inc(ms / 1000)

    def observe_iteration(self, tokens: int) -> None:
        """One engine step with outputs: its newly finished prompts' computed tokens plus
        the tokens it generated, as vLLM's output processor counts them."""
        self._iteration_tokens.observe(tokens)

    def observe_finish(self, reason: str, simulated_seconds: float) -> None:
        self._success.labels(**self._labels, finished_reason=reason).inc()
        self._e2e.observe(simulated_seconds)

    def render(self) -> bytes:
        self._sync_totals()
        return generate_latest(self.registry)

    def _sync_totals(self) -> None:
        # Token totals live in the engine (it counts per step); copy the increase here.
        stats = self._engine.stats
        now = (
            stats.prompt_tokens,
            stats.generation_tokens,
            stats.prefix_queries,
            stats.prefix_hits,
            stats.steps,
        )
        counters = (
            self._prompt_tokens,
            self._generation_tokens,
            self._prefix_queries,
            self._prefix_hits,
            self._steps,
        )
        for counter, before, after in zip(counters, self._synced, now, strict=True):
            if after > before:
                counter.inc(after - before)
        self._synced = now
