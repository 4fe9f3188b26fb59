"""The batching engine: a step loop on asyncio, like vLLM's scheduler in miniature.

Each step admits waiting requests (prefill), then every running sequence samples one
token; the step's simulated cost comes from `costs` and is slept, scaled by
`time_scale`. Requests know their whole output up front (`generate`); the engine
decides only when each token comes out and what the request paid for it.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from warmgate.sim import costs
from warmgate.sim.costs import CostTable, Features, KernelCache, PrefixCache, Work
from warmgate.sim.generate import SeqPlan


@dataclass(slots=True)
class SeqState:
    plan: SeqPlan
    emitted: int = 0
    finish_reason: str | None = None  # "length" | "stop" | "abort" once finished


@dataclass(frozen=True, slots=True)
class Update:
    """What one step (or an abort) did to one request."""

    job: int  # the request's index within its HTTP request
    emitted: tuple[tuple[int, int], ...]  # (sequence index, token position)
    finished: tuple[tuple[int, str], ...]  # (sequence index, finish reason)
    done: bool


@dataclass(eq=False, slots=True)
class EngineRequest:
    job: int
    prompt_ids: Sequence[int]
    seqs: list[SeqState]
    features: Features
    sink: asyncio.Queue[Update]  # shared by the engine requests of one HTTP request
    arrival_ms: float = 0.0
    first_token_ms: float | None = None
    finish_ms: float | None = None
    cached_tokens: int = 0
    compiled: list[str] = field(default_factory=list)
    compile_ms: float = 0.0
    batch_max: int = 0
    done: bool = False
    request_id: str = ""  # vLLM's id for the request ("cmpl-<base>-0", "chatcmpl-<base>")
    engine_id: str = ""  # and the engine's: request_id + "-" + 8 random hex digits

    @property
    def active_seqs(self) -> int:
        return sum(1 for s in self.seqs if s.finish_reason is None)

    @property
    def cost_ms(self) -> float:
        """Simulated time from arrival to finish (0 until finished)."""
        return 0.0 if self.finish_ms is None else self.finish_ms - self.arrival_ms


@dataclass(frozen=True, slots=True)
class _Step:
    ms: float
    batch: list[EngineRequest]


@dataclass(slots=True)
class EngineStats:
    """Totals for /metrics, read at scrape time."""

    finished: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0


CompileHook = Callable[[str, float], None]
FinishHook = Callable[[EngineRequest, str], None]


class Engine:
    def __init__(
        self,
        table: CostTable,
        *,
        time_scale: float = 1.0,
        max_num_seqs: int = 256,
        on_compile: CompileHook | None = None,
        on_finish: FinishHook | None = None,
    ) -> None:
        self._table = table
        self._time_scale = time_scale
        self._max_num_seqs = max_num_seqs
        self._on_compile = on_compile
        self._on_finish = on_finish
        self._kernels = KernelCache()
        self._prefix = PrefixCache(table.prefix_cache_blocks)
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._wake = asyncio.Event()
        self._frozen = False
        self.clock_ms = 0.0
        self.stats = EngineStats()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def scheduled_prompt_tokens(self) -> int:
        """Prompt tokens of the requests running or waiting: what a prefill may chunk."""
        return sum(len(r.prompt_ids) for r in (*self._running, *self._waiting))

    def submit(self, request: EngineRequest) -> None:
        request.arrival_ms = self.clock_ms
        self._waiting.append(request)
        self._wake.set()

    def cancel(self, request: EngineRequest) -> None:
        """The client went away: drop the request without telling anyone."""
        if request.done:
            return
        if request in self._waiting:
            self._waiting.remove(request)
        if request in self._running:
            self._running.remove(request)
        self._finish(request, "abort")

    def abort_all(self) -> None:
        """End every request now with finish_reason "abort" (vLLM on SIGTERM)."""
        for request in [*self._running, *self._waiting]:
            finished = []
            for index, seq in enumerate(request.seqs):
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                    finished.append((index, "abort"))
            self._finish(request, "abort")
            request.sink.put_nowait(Update(request.job, (), tuple(finished), True))
        self._running.clear()
        self._waiting.clear()

    def freeze(self) -> None:
        """Stop stepping for good: requests in flight never finish (a hung engine)."""
        self._frozen = True

    async def run(self) -> None:
        while True:
            while self._frozen or not (self._waiting or self._running):
                self._wake.clear()
                await self._wake.wait()
            step = self._schedule()
            await asyncio.sleep(step.ms / 1000 * self._time_scale)
            if not self._frozen:
                self._complete(step)

    # -- one step ---------------------------------------------------------------------

    def _schedule(self) -> _Step:
        admitted = self._admit()
        works: list[Work] = []
        step_compile = 0.0
        for request in self._running:
            prefill = cached = 0
            if request in admitted:
                prefill, cached = self._prefill(request)
                keys = costs.request_keys(request.features, prefill)
                step_compile += self._compile(request, keys)
            works.append(_work(request, prefill, cached))
        step_compile += self._compile_step_keys()
        return _Step(costs.step_ms(self._table, works) + step_compile, list(self._running))

    def _admit(self) -> list[EngineRequest]:
        seqs = sum(r.active_seqs for r in self._running)
        admitted: list[EngineRequest] = []
        while self._waiting:
            candidate = self._waiting[0]
            # An oversized request still runs alone rather than waiting forever.
            if seqs + candidate.active_seqs > self._max_num_seqs and self._running:
                break
            self._waiting.popleft()
            self._running.append(candidate)
            admitted.append(candidate)
            seqs += candidate.active_seqs
        return admitted

    def _prefill(self, request: EngineRequest) -> tuple[int, int]:
        prompt = request.prompt_ids
        # Prompt logprobs need every prompt position computed, so they skip the cache.
        cached = 0 if request.features.prompt_logprobs else self._prefix.cached_tokens(prompt)
        self._prefix.insert(prompt)
        request.cached_tokens = cached
        self.stats.prefix_queries += len(prompt)
        self.stats.prefix_hits += cached
        self.stats.prompt_tokens += len(prompt)
        return len(prompt) - cached, cached

    def _compile_step_keys(self) -> float:
        batch = sum(r.active_seqs for r in self._running)
        for request in self._running:
            request.batch_max = max(request.batch_max, batch)
        paths = [r.features.sampling for r in self._running]
        ms = 0.0
        for key in costs.step_keys(batch, paths):
            # A batch-wide key is paid by the newest request that needs it: its arrival
            # is what grew the batch into the new bucket.
            path = key.partition(":")[2].partition("@")[0]
            payer = next(
                r
                for r in reversed(self._running)
                if key.startswith("decode:") or r.features.sampling == path
            )
            ms += self._compile(payer, [key])
        return ms

    def _compile(self, request: EngineRequest, keys: list[str]) -> float:
        total = 0.0
        for key in self._kernels.compile(keys):
            ms = costs.compile_ms(self._table, key)
            request.compiled.append(key)
            request.compile_ms += ms
            total += ms
            if self._on_compile is not None:
                self._on_compile(key, ms)
        return total

    def _complete(self, step: _Step) -> None:
        self.clock_ms += step.ms
        for request in step.batch:
            if request.done:
                continue  # aborted or cancelled while the step ran
            emitted: list[tuple[int, int]] = []
            finished: list[tuple[int, str]] = []
            for index, seq in enumerate(request.seqs):
                if seq.finish_reason is not None:
                    continue
                emitted.append((index, seq.emitted))
                seq.emitted += 1
                if seq.emitted >= len(seq.plan.token_ids):
                    seq.finish_reason = seq.plan.finish_reason
                    finished.append((index, seq.finish_reason))
            self.stats.generation_tokens += len(emitted)
            if request.first_token_ms is None:
                request.first_token_ms = self.clock_ms
            done = request.active_seqs == 0
            if done:
                self._running.remove(request)
                self._finish(request, _overall_reason(request))
            request.sink.put_nowait(Update(request.job, tuple(emitted), tuple(finished), done))

    def _finish(self, request: EngineRequest, reason: str) -> None:
        request.done = True
        request.finish_ms = self.clock_ms
        self.stats.finished[reason] += 1
        if self._on_finish is not None:
            self._on_finish(request, reason)


def _work(request: EngineRequest, prefill: int, cached: int) -> Work:
    f = request.features
    return Work(
        prefill_tokens=prefill,
        cached_tokens=cached,
        seqs=request.active_seqs,
        logprobs=f.logprobs,
        prompt_logprobs=f.prompt_logprobs and prefill > 0,
        structured=f.grammar is not None,
        penalties=f.penalties,
    )


def _overall_reason(request: EngineRequest) -> str:
    reasons = {s.finish_reason for s in request.seqs}
    return "length" if "length" in reasons else "stop"
