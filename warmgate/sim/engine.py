"""The batching engine: a step loop on asyncio, like vLLM V1's scheduler in miniature.

Each step has a token budget (`max_num_batched_tokens`). Running requests come first, in
order: a decoding sequence takes one token, an unfinished prefill its next chunk (the rest
of its prompt, or what the budget has left). Waiting requests are then admitted into what
is left, each with a chunk of its uncached prompt; without chunked prefill only when the
whole of it fits. A request samples in the step that completes its prefill and in every
step after. The step's simulated cost comes from `costs` and is slept, scaled by
`time_scale`. Requests know their whole output up front (`generate`); the engine decides
only when each token comes out and what the request paid for it.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from warmgate.sim import costs
from warmgate.sim.costs import CostTable, Features, KernelCache, PrefixCache, Work
from warmgate.sim.generate import SeqPlan
from warmgate.sim.settings import SCHEDULER_DEFAULTS

_DEFAULTS = SCHEDULER_DEFAULTS["cpu"]


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
    computed_tokens: int = 0  # prompt tokens cached or computed so far: prefill progress
    compiled: list[str] = field(default_factory=list)
    compile_ms: float = 0.0
    batch_max: int = 0
    done: bool = False
    max_tokens: int = 0  # the request's max_tokens parameter (vllm:request_params_max_tokens)
    request_id: str = ""  # vLLM's id for the request ("cmpl-<base>-0", "chatcmpl-<base>")
    engine_id: str = ""  # and the engine's: request_id + "-" + 8 random hex digits

    @property
    def active_seqs(self) -> int:
        return sum(1 for s in self.seqs if s.finish_reason is None)

    @property
    def prefill_left(self) -> int:
        return len(self.prompt_ids) - self.computed_tokens

    @property
    def cost_ms(self) -> float:
        """Simulated time from arrival to finish (0 until finished)."""
        return 0.0 if self.finish_ms is None else self.finish_ms - self.arrival_ms


@dataclass(frozen=True, slots=True)
class _Slot:
    """One request's part of one step."""

    request: EngineRequest
    tokens: int  # of the step's budget: the prefill chunk, or one per decoding sequence
    prefill: int = 0  # prompt tokens computed
    cached: int = 0  # prompt tokens found in the prefix cache (on admission only)
    samples: bool = True  # its prefill is complete by the end of the step


@dataclass(frozen=True, slots=True)
class _Step:
    ms: float
    slots: list[_Slot]


@dataclass(slots=True)
class EngineStats:
    """Totals for /metrics, read at scrape time."""

    finished: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    steps: int = 0  # every engine step, those that only compute a prefill chunk too


class Pause(Enum):
    """vLLM's scheduler pause states (sleep mode pauses before it frees memory)."""

    none = "unpaused"
    new = "paused_new"  # running requests go on; new ones wait
    all = "paused_all"  # nothing is scheduled


CompileHook = Callable[[str, float], None]
FinishHook = Callable[[EngineRequest, str], None]
IterationHook = Callable[[int], None]


class Engine:
    def __init__(
        self,
        table: CostTable,
        *,
        time_scale: float = 1.0,
        max_num_seqs: int = _DEFAULTS.max_num_seqs,
        max_num_batched_tokens: int = _DEFAULTS.max_num_batched_tokens,
        enable_chunked_prefill: bool = True,
        max_loras: int = 1,
        on_compile: CompileHook | None = None,
        on_finish: FinishHook | None = None,
        on_iteration: IterationHook | None = None,
    ) -> None:
        self._table = table
        self._time_scale = time_scale
        self._max_num_seqs = max_num_seqs
        self._budget = max_num_batched_tokens
        self._chunked = enable_chunked_prefill
        self._max_loras = max_loras
        self._on_compile = on_compile
        self._on_finish = on_finish
        self._on_iteration = on_iteration
        self._kernels = KernelCache()
        self._prefix = PrefixCache(table.prefix_cache_blocks)
        self._waiting: deque[EngineRequest] = deque()
        self._running: list[EngineRequest] = []
        self._wake = asyncio.Event()
        self._frozen = False
        self._pause = Pause.none
        self._realloc = False  # after a wake-up that freed memory: buckets reallocate
        self._running_empty = asyncio.Event()
        self._running_empty.set()
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
            if not self._running:
                self._running_empty.set()
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
        self._running_empty.set()

    def freeze(self) -> None:
        """Stop stepping for good: requests in flight never finish (a hung engine)."""
        self._frozen = True

    # -- sleep mode: vLLM's scheduler pause states ----------------------------------------

    def pause(self, pause: Pause) -> None:
        """Stop admitting (`new`) or stop stepping (`all`); requests that arrive queue."""
        self._pause = pause
        self._wake.set()

    def resume(self) -> None:
        """Resume scheduling; the requests queued meanwhile are admitted."""
        self._pause = Pause.none
        self._wake.set()

    async def running_drained(self) -> None:
        """Until no request is running (the queued ones do not count)."""
        await self._running_empty.wait()

    def reset_prefix_cache(self) -> None:
        """vLLM clears it when it pauses for a sleep of level 1 or 2."""
        self._prefix = PrefixCache(self._table.prefix_cache_blocks)

    def free_memory(self) -> None:
        """Sleep mode freed the memory: each batch bucket's buffers are reallocated on
        its first step after wake-up."""
        self._kernels.forget("realloc:")
        self._realloc = True

    def forget_kernel(self, key: str) -> None:
        """One key is cold again (an adapter loaded anew: its weights changed)."""
        self._kernels.discard(key)

    async def run(self) -> None:
        while True:
            while not self._has_work():
                self._wake.clear()
                await self._wake.wait()
            step = self._schedule()
            await asyncio.sleep(step.ms / 1000 * self._time_scale)
            if not self._frozen:
                self._complete(step)
            if not self._running:
                self._running_empty.set()

    def _has_work(self) -> bool:
        if self._frozen or self._pause is Pause.all:
            return False
        return bool(self._running) or (bool(self._waiting) and self._pause is Pause.none)

    # -- one step ---------------------------------------------------------------------

    def _schedule(self) -> _Step:
        budget = self._budget
        slots: list[_Slot] = []
        for request in self._running:
            if budget <= 0:
                break
            slot = self._continue(request, budget, alone=not slots)
            if slot is not None:
                slots.append(slot)
                budget -= slot.tokens
        if self._pause is Pause.none:
            slots += self._admit(budget, alone=not slots)
        step_compile = sum(self._compile_chunk(s) for s in slots if s.prefill)
        step_compile += self._compile_step_keys([s.request for s in slots if s.samples])
        works = [_work(s) for s in slots]
        return _Step(costs.step_ms(self._table, works) + step_compile, slots)

    def _continue(self, request: EngineRequest, budget: int, alone: bool) -> _Slot | None:
        """A running request's part of the step: its next prefill chunk, or a decode."""
        if request.prefill_left > 0:
            return self._chunk(request, min(request.prefill_left, budget))
        seqs = request.active_seqs
        # A request's n sequences decode together; one wider than the budget goes alone.
        if seqs > budget and not alone:
            return None
        return _Slot(request, seqs)

    def _admit(self, budget: int, alone: bool) -> list[_Slot]:
        seqs = sum(r.active_seqs for r in self._running)
        slots: list[_Slot] = []
        loras = {r.features.lora for r in self._running if r.features.lora is not None}
        skipped: list[EngineRequest] = []
        while self._waiting and budget > 0:
            candidate = self._waiting[0]
            lora = candidate.features.lora
            if lora is not None and lora not in loras and len(loras) >= self._max_loras:
                # vLLM: every adapter slot is taken by others; later requests may pass.
                skipped.append(self._waiting.popleft())
                continue
            # An oversized request still runs alone rather than waiting forever.
            if seqs + candidate.active_seqs > self._max_num_seqs and self._running:
                break
            cached = self._cached(candidate)
            uncached = len(candidate.prompt_ids) - cached
            # Without chunked prefill the whole uncached prompt must fit (vLLM: break,
            # not skip, so later requests wait too); one wider than a step goes alone.
            if not self._chunked and uncached > budget and not (alone and not slots):
                break
            self._waiting.popleft()
            self._running.append(candidate)
            self._running_empty.clear()
            if lora is not None:
                loras.add(lora)
            seqs += candidate.active_seqs
            candidate.cached_tokens = candidate.computed_tokens = cached
            self.stats.prefix_queries += len(candidate.prompt_ids)
            self.stats.prefix_hits += cached
            chunk = uncached if not self._chunked else min(uncached, budget)
            slot = self._chunk(candidate, chunk, cached)
            slots.append(slot)
            budget -= slot.tokens
        self._waiting.extendleft(reversed(skipped))
        return slots

    def _cached(self, request: EngineRequest) -> int:
        # Prompt logprobs need every prompt position computed, so they skip the cache.
        if request.features.prompt_logprobs:
            return 0
        return self._prefix.cached_tokens(request.prompt_ids)

    def _chunk(self, request: EngineRequest, tokens: int, cached: int = 0) -> _Slot:
        request.computed_tokens += tokens
        # vLLM caches a prompt's full blocks as it schedules them, chunk by chunk.
        self._prefix.insert(request.prompt_ids[: request.computed_tokens])
        return _Slot(request, tokens, tokens, cached, samples=request.prefill_left == 0)

    def _compile_chunk(self, slot: _Slot) -> float:
        # Each chunk is its own prefill shape: a prompt longer than the budget needs no
        # key larger than the budget's bucket.
        return self._compile(slot.request, costs.request_keys(slot.request.features, slot.prefill))

    def _compile_step_keys(self, samplers: list[EngineRequest]) -> float:
        """Batch-wide keys of the sequences that sample in this step (none: no keys)."""
        batch = sum(r.active_seqs for r in samplers)
        if batch == 0:
            return 0.0
        for request in samplers:
            request.batch_max = max(request.batch_max, batch)
        paths = [r.features.sampling for r in samplers]
        ms = 0.0
        for key in costs.step_keys(batch, paths, self._realloc):
            # A batch-wide key is paid by the newest request that needs it: its arrival
            # is what grew the batch into the new bucket.
            path = key.partition(":")[2].partition("@")[0]
            payer = next(
                r
                for r in reversed(samplers)
                if key.startswith(("decode:", "realloc:")) or r.features.sampling == path
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
        self.stats.steps += 1
        iteration_tokens = 0
        outputs = False
        for slot in step.slots:
            request = slot.request
            if request.done or not slot.samples:
                continue  # aborted while the step ran, or its prefill is not done yet
            if request.first_token_ms is None:
                request.first_token_ms = self.clock_ms
                # vLLM counts a prompt once, when its first token comes out.
                self.stats.prompt_tokens += len(request.prompt_ids)
                iteration_tokens += len(request.prompt_ids) - request.cached_tokens
            update = self._sample(request)
            iteration_tokens += len(update.emitted)
            outputs = True
            request.sink.put_nowait(update)
        # vLLM observes vllm:iteration_tokens_total once per step that has outputs: a step
        # that only computes a prefill chunk is not seen.
        if outputs and self._on_iteration is not None:
            self._on_iteration(iteration_tokens)

    def _sample(self, request: EngineRequest) -> Update:
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
        done = request.active_seqs == 0
        if done:
            self._running.remove(request)
            self._finish(request, _overall_reason(request))
        return Update(request.job, tuple(emitted), tuple(finished), done)

    def _finish(self, request: EngineRequest, reason: str) -> None:
        request.done = True
        request.finish_ms = self.clock_ms
        self.stats.finished[reason] += 1
        if self._on_finish is not None:
            self._on_finish(request, reason)


def _work(slot: _Slot) -> Work:
    f = slot.request.features
    return Work(
        prefill_tokens=slot.prefill,
        cached_tokens=slot.cached,
        seqs=slot.request.active_seqs if slot.samples else 0,
        logprobs=f.logprobs,
        prompt_logprobs=f.prompt_logprobs and slot.prefill > 0,
        structured=f.grammar is not None,
        penalties=f.penalties,
    )


def _overall_reason(request: EngineRequest) -> str:
    reasons = {s.finish_reason for s in request.seqs}
    return "length" if "length" in reasons else "stop"
