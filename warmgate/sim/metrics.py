"""The simulator's /metrics: the vLLM series a supervisor or benchmark looks at."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from warmgate.sim.engine import Engine, EngineRequest

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vllm/v1/metrics/buckets.py ITERATION_TOKENS_BUCKETS (0.32.0)
_ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)  # vllm/v1/metrics/buckets.py, request_params_n


def request_tokens_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's build_1_2_5_buckets(max_model_len): 1, 2, 5, 10, 20, 50, ... up to it."""
    values = (m * 10**e for e in range(len(str(max_model_len))) for m in (1, 2, 5))
    return tuple(v for v in values if v <= max_model_len)


class SimMetrics:
    def __init__(self, model: str, engine: Engine, max_model_len: int) -> None:
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
        # Per finished request, as vLLM's PrometheusStatLogger records them: what a
        # supervisor learns prompt lengths, n and max_tokens from (warmgate.traffic).
        tokens = request_tokens_buckets(max_model_len)
        self._request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            names,
            buckets=tokens,
            registry=reg,
        ).labels(**labels)
        self._request_n = Histogram(
            "vllm:request_params_n",
            "Histogram of the n request parameter.",
            names,
            buckets=_N_BUCKETS,
            registry=reg,
        ).labels(**labels)
        self._request_max_tokens = Histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            names,
            buckets=tokens,
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
        sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine "
            "is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means "
            "sleep level 2.",
            [*names, "sleep_state"],
            registry=reg,
        )
        self._sleep_state = {
            state: sleep_state.labels(**labels, sleep_state=state)
            for state in ("awake", "weights_offloaded", "discard_all")
        }
        self.record_sleep_state(asleep=False, level=0)
        self._labels = labels
        self._engine = engine
        self._synced = (0, 0, 0, 0, 0)

    def record_sleep_state(self, asleep: bool, level: int) -> None:
        """vLLM's PrometheusStatLogger.record_sleep_state."""
        self._sleep_state["awake"].set(0 if asleep else 1)
        self._sleep_state["weights_offloaded"].set(1 if asleep and level == 1 else 0)
        self._sleep_state["discard_all"].set(1 if asleep and level == 2 else 0)

    def observe_compile(self, key: str, ms: float) -> None:
        self._compilations.inc()
        self._compile_seconds.inc(ms / 1000)

    def observe_iteration(self, tokens: int) -> None:
        """One engine step with outputs: its newly finished prompts' computed tokens plus
        the tokens it generated, as vLLM's output processor counts them."""
        self._iteration_tokens.observe(tokens)

    def observe_finish(self, reason: str, request: EngineRequest) -> None:
        self._success.labels(**self._labels, finished_reason=reason).inc()
        self._e2e.observe(request.cost_ms / 1000)
        self._request_prompt_tokens.observe(len(request.prompt_ids))
        self._request_n.observe(len(request.seqs))
        self._request_max_tokens.observe(request.max_tokens)

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
