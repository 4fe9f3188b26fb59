"""The benchmark core: start an upstream under a readiness strategy, wait for Ready,
then send the held-out mix once (first) and again with fresh text (warm).

Strategies, each on a fresh upstream process with a fresh compile cache:
  none       Ready when the container starts (no readinessProbe): clients are sent
             at once and retry until the server answers
  health     Ready when the upstream's /health says 200 (a plain readinessProbe)
  warmup.sh  /health, then the reference documents' three chat requests of
             100/500/1000 words, max_tokens 50, errors thrown away as the script does
  warmgate   `warmgate run -- <upstream>`, Ready when warmgate's /ready says 200
  warmgate-pairwise
             as warmgate, with the thorough sweep (`--coverage pairwise`) and no budget
             but `--warmup-timeout`: the warm-up warmgate had before `--coverage engine`
  plan       as warmgate, with a user plan (--plan)
  profile    as warmgate, on a --cache-dir where a first start (not measured) learned a
             traffic profile: Ready, `profile_requests` requests of the mix, then a drain.
             Only the profile is kept from it: the measured start's compile caches are
             empty, as every other strategy's

Every strategy's warm-up is the time from healthy to Ready: the seconds it spends after the
engine could have served (0 for none and health). Under warmgate, its /status at Ready
says which coverage and budget it ran and how each shape ended (`cold`: the budget left it
out). `budget` runs the warmgate strategy with `--warmup-budget B` (see `sweep`).

The first/warm ratio of each held-out request is its first latency over the median of
`warm_runs` later runs with fresh text (fresh, so the prefix cache cannot flatter them).
With `pin_output` (the default) every run of a request generates the same number of
tokens (vLLM's `min_tokens` = `max_tokens`, which holds back EOS and stop strings), so
that first and warm runs differ by one-time work only, not by where a random-weight
model happened to stop; structured-output requests are left alone (their grammar ends them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from warmgate.bench import HELDOUT_CONTEXT, HeldoutRequest, load_heldout
from warmgate.childlog import JIT_MARKER
from warmgate.options import option

STRATEGIES = ("none", "health", "warmup.sh", "warmgate", "warmgate-pairwise", "plan", "profile")
UNDER_WARMGATE = ("warmgate", "warmgate-pairwise", "plan", "profile")
# What the profile strategy's server logs: vLLM's request lines (the features of each
# request) and, for chat, its output lines (whether the client streamed).
PROFILE_LOG_FLAGS = ("--enable-log-requests", "--enable-log-outputs")

RETRY_S = 0.5  # how often a client of the `none` strategy retries a refused request
# Words for held-out prompts: deliberately not the warm-up plan's vocabulary.
_BENCH_WORDS = [
    "river",
    "stone",
    "lantern",
    "harbor",
    "meadow",
    "signal",
    "copper",
    "window",
    "orchard",
    "ladder",
    "winter",
    "compass",
    "thunder",
    "velvet",
    "garden",
    "mirror",
    "canyon",
    "feather",
    "silver",
    "market",
    "engine",
    "blanket",
    "pepper",
    "island",
    "rocket",
    "button",
    "marble",
    "candle",
    "forest",
    "planet",
    "summer",
    "shadow",
    "violin",
    "helmet",
    "carpet",
    "saddle",
    "wagon",
    "tunnel",
    "basket",
    "kettle",
    "puzzle",
    "anchor",
    "bridge",
]
_WARMUP_SH_WORDS = (100, 500, 1000)


@dataclass(slots=True)
class ServerRecipe:
    """How to start the server under test on a given port."""

    argv: list[str]  # without --host/--port
    env: dict[str, str] = field(default_factory=dict)
    name: str = "sim"

    def command(self, port: int) -> list[str]:
        return [*self.argv, "--host", "127.0.0.1", "--port", str(port)]


def sim_upstream(extra: Sequence[str] = ()) -> ServerRecipe:
    return ServerRecipe([sys.executable, "-m", "warmgate", "sim", *extra], name="sim")


def command_upstream(command: str, name: str = "command") -> ServerRecipe:
    """A server started by a command line of the user's (e.g. the real-vLLM script's)."""
    words = shlex.split(command)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words and words[0] == "env":
        words.pop(0)
        while words and "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
    return ServerRecipe(words, env, name)


@dataclass(slots=True)
class Measured:
    name: str
    first_ms: float | None = None
    warm_ms: list[float] = field(default_factory=list)
    first_cost_ms: float | None = None  # the simulator's own report, when present
    first_compile_ms: float | None = None  # the part of it that was one-time compilation
    warm_cost_ms: list[float] = field(default_factory=list)
    compiled_after_ready: list[str] = field(
        default_factory=list
    )  # simulator keys compiled by `first`
    error: str | None = None
    first_tokens: int | None = None  # tokens generated by the first run (its longest reply)
    warm_tokens: list[int | None] = field(default_factory=list)
    # Set when this stands for several starts (`combine`): each start's ratio and warm ratio
    # (None for a single start). A combined row's warm_ms holds each start's warm median,
    # which the single-start formulas below must never read as runs.
    start_ratios: list[float] | None = None
    start_warm_ratios: list[float] | None = None

    @property
    def warm_median(self) -> float | None:
        return statistics.median(self.warm_ms) if self.warm_ms else None

    @property
    def length_fitted(self) -> bool:
        """True when the first run generated another number of tokens than the warm runs
        (output not pinned: structured output, or a server that ignores min_tokens) and the
        warm runs spread enough to fit warm latency against output length."""
        return self._fit() is not None and self.first_tokens not in self.warm_tokens

    def _fit(self) -> tuple[float, float, int, int] | None:
        """(intercept ms, ms per token, fewest, most tokens) of the warm runs' straight line,
        or None without two distinct lengths or with a slope that is not positive."""
        points = [(n, ms) for n, ms in zip(self.warm_tokens, self.warm_ms, strict=False) if n]
        lengths = {n for n, _ in points}
        if self.first_tokens is None or len(points) != len(self.warm_ms) or len(lengths) < 2:
            return None
        mean_n = statistics.fmean(n for n, _ in points)
        mean_ms = statistics.fmean(ms for _, ms in points)
        spread = sum((n - mean_n) ** 2 for n, _ in points)
        slope = sum((n - mean_n) * (ms - mean_ms) for n, ms in points) / spread
        if slope <= 0:
            return None
        return mean_ms - slope * mean_n, slope, min(lengths), max(lengths)

    @property
    def wall_ratio(self) -> float | None:
        """First ms over warm ms at the same output length: the warm median when the lengths
        match (pinned output), else the warm runs' line at the first run's length, kept
        inside the lengths the warm runs reached (no extrapolation)."""
        if self.first_ms is None or not self.warm_ms:
            return None
        # Warm runs as long as the first, when some are (always, with pinned output).
        same = [
            ms
            for n, ms in zip(self.warm_tokens, self.warm_ms, strict=False)
            if n is not None and n == self.first_tokens
        ]
        if same:
            return self.first_ms / statistics.median(same)
        fit = self._fit() if self.length_fitted else None
        if fit is not None and self.first_tokens is not None:
            intercept, slope, fewest, most = fit
            warm = intercept + slope * min(max(self.first_tokens, fewest), most)
            return self.first_ms / warm if warm > 0 else None
        warm_median = self.warm_median
        return self.first_ms / warm_median if warm_median else None

    @property
    def warm_ratio(self) -> float | None:
        """The first warm run as if it were the first: over the median of the others
        (cost reports over the simulator, wall ms at equal length elsewhere)."""
        if self.start_warm_ratios is not None:
            return _median(self.start_warm_ratios)
        costs, walls = self.warm_cost_ms, self.warm_ms
        runs = costs if len(costs) == len(walls) and costs else walls
        if len(runs) < 3 or len(set(self.warm_tokens)) > 1:
            return None
        rest = statistics.median(runs[1:])
        return runs[0] / rest if rest > 0 else None

    @property
    def cost_ratio(self) -> float | None:
        """The ratio from the simulator's own report: first cost over that cost without its
        one-time compilation. Deterministic, and blind to output lengths that differ between
        runs (stop strings and EOS end fresh texts at different points)."""
        if self.first_cost_ms is None or self.first_compile_ms is None:
            return None
        warm = self.first_cost_ms - self.first_compile_ms
        return self.first_cost_ms / warm if warm > 0 else None

    @property
    def ratio(self) -> float | None:
        """Simulated cost when the upstream reports it (the simulator), else wall time; the
        median over the starts when this stands for several."""
        if self.start_ratios is not None:
            return _median(self.start_ratios)
        cost = self.cost_ratio
        return cost if cost is not None else self.wall_ratio


@dataclass(slots=True)
class Outcome:
    """One strategy's start. Times are seconds from the spawn (the container's start)."""

    strategy: str
    spawn_to_healthy_s: float | None = None
    spawn_to_ready_s: float | None = None
    first_good_s: float | None = None  # the end of the first 200 a client got
    refused_before_good: int = 0  # client attempts that failed before it (strategy none)
    jit_after_ready: int | None = None  # engine JIT-monitor lines printed after Ready
    gpu_memory_bytes: int | None = None  # used on the GPUs after the mix, when there are any
    requests: list[Measured] = field(default_factory=list)
    error: str | None = None
    runs: list[Outcome] = field(default_factory=list)  # the starts `combine` made this of
    warm_runs: int = 0  # per held-out request and start
    budget: str | None = None  # the --warmup-budget this start was given (`sweep`), if any
    # From warmgate's /status at Ready (strategies under warmgate): its coverage, the budget
    # it resolved, how many shapes ended in each status, and those the budget left cold.
    coverage: str | None = None
    budget_s: float | None = None
    shape_status: dict[str, int] = field(default_factory=dict)
    cold_shapes: list[str] = field(default_factory=list)

    @property
    def warmup_s(self) -> float | None:
        """Healthy to Ready: what the strategy waits after the engine could serve (0 for a
        strategy Ready at or before healthy); the median over the starts of a combined row."""
        if self.runs:
            return _median(r.warmup_s for r in self.runs)
        if self.spawn_to_ready_s is None or self.spawn_to_healthy_s is None:
            return None
        return max(0.0, self.spawn_to_ready_s - self.spawn_to_healthy_s)

    @property
    def warmup_per_healthy(self) -> float | None:
        """The warm-up over the engine's own start (spawn to healthy)."""
        warmup, healthy = self.warmup_s, self.spawn_to_healthy_s
        return warmup / healthy if warmup is not None and healthy else None

    @property
    def budget_bound(self) -> bool:
        """True when the budget cut the warm-up short: shapes left cold, or repeats ended
        before a shape converged. A larger budget then warms more."""
        return bool(self.cold_shapes) or self.shape_status.get("unverified", 0) > 0

    @property
    def max_ratio(self) -> float | None:
        ratios = [m.ratio for m in self.requests if m.ratio is not None]
        return max(ratios) if ratios else None

    @property
    def noise_floor(self) -> float | None:
        """The same statistic for runs known to be warm: the max over the requests of the
        first warm run over the median of the other warm runs. A max first/warm below it
        cannot be told from a warm server on this machine. Over the simulator it is the cost
        report's own spread (a warm run that still compiled, e.g. a new batch bucket)."""
        ratios = [m.warm_ratio for m in self.requests if m.warm_ratio is not None]
        return max(ratios) if ratios else None

    @property
    def worst(self) -> str:
        rated = [m for m in self.requests if m.ratio is not None]
        return max(rated, key=lambda m: m.ratio or 0).name if rated else "-"

    @property
    def compiled_after_ready(self) -> int:
        """Kernels the simulator compiled for the held-out mix (0 over other servers)."""
        return sum(len(m.compiled_after_ready) for m in self.requests)


def combine(runs: Sequence[Outcome]) -> Outcome:
    """Several starts of one strategy as one row: the median of each time, and each held-out
    request's ratio as the median of its ratios over the starts. A first request happens
    once per start, so more starts are the only way to more than one sample of it."""
    if len(runs) == 1:
        return runs[0]

    first = runs[0]
    out = Outcome(
        first.strategy,
        _median(r.spawn_to_healthy_s for r in runs),
        _median(r.spawn_to_ready_s for r in runs),
        _median(r.first_good_s for r in runs),
        round(statistics.median(r.refused_before_good for r in runs)),
        max((r.jit_after_ready for r in runs if r.jit_after_ready is not None), default=None),
        max((r.gpu_memory_bytes for r in runs if r.gpu_memory_bytes is not None), default=None),
        error=next((r.error for r in runs if r.error), None),
        runs=list(runs),
        warm_runs=first.warm_runs,
        budget=first.budget,
        coverage=first.coverage,
        budget_s=_median(r.budget_s for r in runs),
        shape_status=first.shape_status,
        cold_shapes=sorted({s for r in runs for s in r.cold_shapes}),
    )
    for i, request in enumerate(first.requests):
        same = [r.requests[i] for r in runs if i < len(r.requests)]
        out.requests.append(
            Measured(
                request.name,
                first_ms=_median(m.first_ms for m in same),
                warm_ms=[w for m in same if (w := m.warm_median) is not None],
                compiled_after_ready=sorted({k for m in same for k in m.compiled_after_ready}),
                error=next((m.error for m in same if m.error), None),
                start_ratios=[x for m in same if (x := m.ratio) is not None],
                start_warm_ratios=[x for m in same if (x := m.warm_ratio) is not None],
            )
        )
    return out


def _median(values: Iterable[float | None]) -> float | None:
    """The median of the known values; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_strategy(
    strategy: str,
    recipe: ServerRecipe,
    *,
    plan: Path | None = None,
    warm_runs: int = 3,
    ready_timeout: float = 1500.0,
    warmgate_args: Sequence[str] = (),
    log_dir: Path | None = None,
    pin_output: bool,
    log_name: str | None = None,
    budget: str | None = None,
    mix_name: str,
    profile_requests: int,
) -> Outcome:
    """One fresh upstream under one strategy: time to Ready, then the held-out mix.
    `budget`: the warmgate strategy's --warmup-budget (over any in `warmgate_args`)."""
    outcome = Outcome(strategy, warm_runs=warm_runs, budget=budget)
    args = strategy_args(strategy, warmgate_args, plan, budget)
    with contextlib.ExitStack() as stack:
        if strategy == "profile":
            learned = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wg-profile-")))
            recipe = dataclasses.replace(recipe, argv=[*recipe.argv, *PROFILE_LOG_FLAGS])
            args += ["--cache-dir", str(learned)]
            name = f"{(log_name or strategy).removesuffix('.log')}.learn.log"
            try:
                await learn_profile(
                    recipe, args, learned, profile_requests, mix_name, log_dir and log_dir / name
                )
            except (RuntimeError, httpx.HTTPError, TimeoutError) as exc:
                outcome.error = f"learning the profile: {exc or type(exc).__name__}"
                return outcome
        await _measure(
            outcome, recipe, args, log_dir, log_name, pin_output, mix_name, ready_timeout
        )
    return outcome


async def _measure(
    outcome: Outcome,
    recipe: ServerRecipe,
    args: Sequence[str],
    log_dir: Path | None,
    log_name: str | None,
    pin_output: bool,
    mix_name: str,
    ready_timeout: float = 1500.0,
) -> None:
    strategy, warm_runs = outcome.strategy, outcome.warm_runs
    with started(
        recipe,
        under_warmgate=strategy in UNDER_WARMGATE,
        warmgate_args=args,
        log_path=log_dir / (log_name or f"{strategy}.log") if log_dir else None,
        stop=TERMINATE,
    ) as server:
        proc, base = server.proc, server.base
        mix = _Mix(base, warm_runs, pin_output, server.began, mix_name)
        try:
            async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
                if strategy == "none":  # Ready at once: clients arrive and retry
                    outcome.spawn_to_ready_s = 0.0
                    outcome.refused_before_good = await _until_served(
                        client, mix, proc, ready_timeout
                    )
                    outcome.spawn_to_healthy_s = time.monotonic() - server.began
                else:
                    await _until_ok(client, f"{base}/health", proc, ready_timeout)
                    outcome.spawn_to_healthy_s = time.monotonic() - server.began
                    if strategy == "warmup.sh":
                        await _warmup_sh(client, base, (await _model(client, base))[0])
                    elif server.probe_port is not None:
                        probe = f"http://127.0.0.1:{server.probe_port}"
                        await _until_ok(client, f"{probe}/ready", proc, ready_timeout)
                        with contextlib.suppress(httpx.HTTPError, ValueError):
                            _read_warmup(outcome, (await client.get(f"{probe}/status")).json())
                    outcome.spawn_to_ready_s = (
                        outcome.spawn_to_healthy_s
                        if strategy == "health"
                        else time.monotonic() - server.began
                    )
                jit_at_ready = _count_jit(server.log_path)
                outcome.requests = await mix.run(client)
                outcome.first_good_s = mix.first_good_s
                outcome.jit_after_ready = _count_jit(server.log_path) - jit_at_ready
                outcome.gpu_memory_bytes = _gpu_memory()
        except (RuntimeError, httpx.HTTPError, TimeoutError) as exc:
            outcome.error = str(exc) or type(exc).__name__


async def learn_profile(
    recipe: ServerRecipe,
    args: Sequence[str],
    cache_dir: Path,
    requests: int,
    mix_name: str,
    log_path: Path | None,
    ready_timeout: float = 1500.0,
) -> None:
    """The profile strategy's first start: warmgate on `cache_dir`, Ready, then the mix
    (fresh text each time) until `requests` client requests, then SIGTERM: warmgate writes
    the profile at its drain. Everything else it left in `cache_dir` is removed, so that
    the measured start compiles from nothing, as every other strategy's does."""
    with started(recipe, under_warmgate=True, warmgate_args=args, log_path=log_path) as server:
        assert server.probe_port is not None
        async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
            await _until_ok(client, f"{server.base}/health", server.proc, ready_timeout)
            probe = f"http://127.0.0.1:{server.probe_port}"
            await _until_ok(client, f"{probe}/ready", server.proc, ready_timeout)
            mix = _Mix(server.base, 0, True, server.began, mix_name)
            per_round = sum(r.concurrency for r in mix.requests)
            for _ in range(-(-requests // per_round)):
                failed = [m.error for m in await mix.run(client) if m.error]
                if failed:
                    raise RuntimeError(failed[0])
        stop_session(server.proc, Stop(signal.SIGTERM, 60.0, leader_only=True))
    profiles = cache_dir / "profiles"
    if not any(profiles.glob("*/*.json")):
        raise RuntimeError(f"the learning start wrote no profile under {profiles}")
    for entry in cache_dir.iterdir():
        if entry != profiles:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def strategy_args(
    strategy: str, warmgate_args: Sequence[str], plan: Path | None, budget: str | None
) -> list[str]:
    """`warmgate run`'s options for `strategy`. The pairwise strategy's go first, so that
    `warmgate_args` can change them; a sweep's budget goes last, over theirs."""
    args = list(warmgate_args)
    if strategy == "warmgate-pairwise":
        # The old sweep had no budget: the warm-up timeout is the most a budget can be.
        timeout = option("run", "warmup_timeout").default
        args = ["--coverage", "pairwise", "--warmup-budget", f"{timeout:g}", *args]
    if strategy == "plan" and plan is not None:
        args += ["--plan", str(plan)]
    if budget is not None:
        args += ["--warmup-budget", budget]
    return args


def _read_warmup(outcome: Outcome, status: dict[str, Any]) -> None:
    """What warmgate's /status says of its warm-up, into `outcome`."""
    warmup = status.get("warmup") or {}
    outcome.coverage = warmup.get("coverage")
    outcome.budget_s = warmup.get("budget_s")
    outcome.cold_shapes = list(warmup.get("cold") or [])
    counts: dict[str, int] = {}
    for shape in status.get("shapes") or []:
        counts[str(shape.get("status"))] = counts.get(str(shape.get("status")), 0) + 1
    outcome.shape_status = counts


def _count_jit(log_path: Path) -> int:
    """JIT-monitor lines the engine has printed so far (warmgate passes them through)."""
    try:
        return log_path.read_bytes().count(JIT_MARKER)
    except OSError:
        return 0


def _gpu_memory() -> int | None:
    from warmgate.telemetry import gpus

    found = gpus()
    return sum(int(g["memory_used_bytes"]) for g in found) if found else None


def _fresh_cache_env(root: str) -> dict[str, str]:
    """Point every compile cache at an empty directory: each start is a cold start."""
    return {
        "VLLM_CACHE_ROOT": f"{root}/vllm",
        "TRITON_CACHE_DIR": f"{root}/triton",
        "TORCHINDUCTOR_CACHE_DIR": f"{root}/inductor",
        "CUDA_CACHE_PATH": f"{root}/cuda",
        "FLASHINFER_WORKSPACE_BASE": f"{root}/flashinfer",
    }


async def _until_ok(
    client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {url} said 200")
        try:
            if (await client.get(url, timeout=2.0)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} not 200 within {timeout:g} s")


async def _model(client: httpx.AsyncClient, base: str) -> tuple[str, int]:
    data = (await client.get(f"{base}/v1/models")).json()["data"][0]
    return str(data["id"]), int(data.get("max_model_len") or 2048)


async def _warmup_sh(client: httpx.AsyncClient, base: str, model: str) -> None:
    """The reference warmup.sh: three sequential chat requests; failures ignored, as it does."""
    for words in _WARMUP_SH_WORDS:
        text = " ".join(random.choices(_BENCH_WORDS, k=words))
        body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 50}
        with contextlib.suppress(httpx.HTTPError):
            await client.post(f"{base}/v1/chat/completions", json=body)


async def _tokens_per_word(client: httpx.AsyncClient, base: str, model: str) -> float:
    text = " ".join(_BENCH_WORDS * 4)
    try:
        reply = await client.post(f"{base}/tokenize", json={"model": model, "prompt": text})
        return max(0.5, int(reply.json()["count"]) / (len(_BENCH_WORDS) * 4))
    except (httpx.HTTPError, ValueError, KeyError):
        return 1.5


async def _until_served(
    client: httpx.AsyncClient, mix: _Mix, proc: subprocess.Popen[bytes], timeout: float
) -> int:
    """A client of a pod that is Ready at once: retry every RETRY_S until the server
    answers; the number of refused or failed attempts."""
    deadline, refused = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it answered")
        try:
            await mix.discover(client)
            return refused
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            refused += 1
        await asyncio.sleep(RETRY_S)
    raise TimeoutError(f"{mix.base} did not answer within {timeout:g} s")


class _Mix:
    """The held-out mix against one upstream: each request once (first), then again
    `warm_runs` times with fresh text (warm).

    First and warm runs of one request go back to back, so both see the engine in the same
    state; only the one-time work of that request's shape separates them.
    """

    def __init__(self, base: str, warm_runs: int, pin_output: bool, began: float, mix: str) -> None:
        self.base, self.warm_runs, self.pin_output, self.began = base, warm_runs, pin_output, began
        self.requests = load_heldout(mix)
        self.model: str | None = None
        self.context = HELDOUT_CONTEXT
        self.rate = 1.5
        self.first_good_s: float | None = None

    async def discover(self, client: httpx.AsyncClient) -> None:
        """The model, context and tokens per word, as a client configured for it knows them."""
        model, self.context = await _model(client, self.base)
        self.rate = await _tokens_per_word(client, self.base, model)
        self.model = model

    async def run(self, client: httpx.AsyncClient) -> list[Measured]:
        if self.model is None:
            await self.discover(client)
        results = []
        for request in self.requests:
            measured = Measured(request.name)
            results.append(measured)
            first = await self._send(client, request)
            if isinstance(first, str):
                measured.error = first
                continue
            measured.first_ms, cost, measured.compiled_after_ready, measured.first_tokens = first
            if cost is not None:
                measured.first_cost_ms, measured.first_compile_ms = cost
            for _ in range(self.warm_runs):
                warm = await self._send(client, request)
                if isinstance(warm, str):
                    measured.error = warm
                    break
                measured.warm_ms.append(warm[0])
                measured.warm_tokens.append(warm[3])
                if warm[1] is not None:
                    measured.warm_cost_ms.append(warm[1][0])
        return results

    async def _send(self, client: httpx.AsyncClient, request: HeldoutRequest) -> _Sent | str:
        assert self.model is not None
        sent = await _send(
            client, self.base, self.model, request, self.rate, self.context, self.pin_output
        )
        if self.first_good_s is None and not isinstance(sent, str):
            self.first_good_s = time.monotonic() - self.began
        return sent


# (wall ms, simulated (cost, compile) ms, keys compiled, tokens generated by the longest reply)
_Sent = tuple[float, tuple[float, float] | None, list[str], int | None]


def pinned(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with its output length fixed at its max_tokens: vLLM's min_tokens holds back
    EOS and stop strings until then. Structured output is left alone: its grammar may allow
    nothing but EOS once the document is complete."""
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    if not most or "response_format" in body or "guided_json" in body:
        return body
    return {**body, "min_tokens": most}


async def _send(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    request: HeldoutRequest,
    rate: float,
    context: int,
    pin_output: bool = False,
) -> _Sent | str:
    """`concurrency` copies at once with fresh text: a `_Sent`, or an error."""
    words = max(1, int(min(request.prompt_tokens, context - request.max_tokens - 64) / rate))
    bodies = [
        request.render(" ".join(random.choices(_BENCH_WORDS, k=words)), model)
        for _ in range(request.concurrency)
    ]
    bodies = [_with_usage(pinned(b) if pin_output else b) for b in bodies]
    await _open_connections(client, base, request.concurrency)
    began = time.perf_counter()
    replies = await asyncio.gather(
        *(client.post(f"{base}{request.endpoint}", json=b) for b in bodies)
    )
    ms = (time.perf_counter() - began) * 1000
    bad = [r for r in replies if r.status_code != 200]
    if bad:
        return f"HTTP {bad[0].status_code}: {bad[0].text[:160]}"
    reports = [_sim_report(r) for r in replies]
    costs = [cost for cost, _ in reports if cost is not None]
    compiled = sorted({key for _, keys in reports for key in keys})
    # One batch: its slowest reply, and the most compilation any reply waited for.
    batch_cost = (max(c[0] for c in costs), max(c[1] for c in costs)) if costs else None
    lengths = [_generated(r) for r in replies]
    longest = None if None in lengths else max(n for n in lengths if n is not None)
    return ms, batch_cost, compiled, longest


async def _open_connections(client: httpx.AsyncClient, base: str, count: int) -> None:
    """Have `count` connections open before a batch is timed: without them the batch's
    requests leave one handshake apart and reach the engine in separate steps, whereas warm
    runs reuse the connections of the run before. The server is measured, not the client."""
    if count > 1:
        with contextlib.suppress(httpx.HTTPError):
            await asyncio.gather(*(client.get(f"{base}/health") for _ in range(count)))


def _generated(reply: httpx.Response) -> int | None:
    """Tokens a reply generated, from its usage (a stream's last chunk: see `_with_usage`)."""
    if not reply.headers.get("content-type", "").startswith("text/event-stream"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(reply.json()["usage"]["completion_tokens"])
        return None
    for line in reversed(reply.text.splitlines()):
        if line.startswith("data: {") and '"usage"' in line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return int(json.loads(line[len("data: ") :])["usage"]["completion_tokens"])
    return None


def _with_usage(body: dict[str, Any]) -> dict[str, Any]:
    """A stream asked for its usage chunk too, so the runs' output lengths can be compared."""
    if not body.get("stream") or (body.get("stream_options") or {}).get("include_usage"):
        return body
    return {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}


def _sim_report(reply: httpx.Response) -> tuple[tuple[float, float] | None, list[str]]:
    """The simulator's (cost, compile) ms and compiled keys: from its headers, or for a
    stream from the `: sim-cost` comment at its end."""
    for line in reversed(reply.text.splitlines()):
        if line.startswith(": sim-cost "):
            report = json.loads(line[len(": sim-cost ") :])
            return (float(report["cost_ms"]), float(report["compile_ms"])), list(
                report.get("compiled", [])
            )
    if "x-sim-cost-ms" not in reply.headers:
        return None, []
    keys = [k for k in reply.headers.get("x-sim-compiled", "").split(",") if k]
    cost = (float(reply.headers["x-sim-cost-ms"]), float(reply.headers.get("x-sim-compile-ms", 0)))
    return cost, keys


@dataclass(frozen=True, slots=True)
class Stop:
    """How a started server is stopped: `signum` to its whole session (or to the session's
    leader alone), then SIGKILL to whatever is left of the session once the leader has
    exited or `timeout_s` has passed."""

    signum: signal.Signals = signal.SIGTERM
    timeout_s: float = 30.0
    leader_only: bool = False


TERMINATE = Stop()  # the benchmark's: every process of the server at once
INTERRUPT = Stop(signal.SIGINT, 10.0, leader_only=True)  # warmgate forwards it without a drain


def stop_session(proc: subprocess.Popen[bytes], how: Stop = TERMINATE) -> None:
    """Stop a server started in a session of its own (`start_new_session=True`)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            if how.leader_only:
                proc.send_signal(how.signum)
            else:
                os.killpg(proc.pid, how.signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=how.timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the server left behind in its session
    proc.wait()


def report(outcomes: Sequence[Outcome]) -> str:
    """Markdown: one summary row per strategy, then first/warm per held-out request."""
    lines = [
        "| strategy | starts | warm runs | spawn→healthy s | spawn→Ready s | warm-up s | "
        "warm-up / healthy | warm-up shapes | spawn→first good response s | refused before it | "
        "max first/warm | noise floor | worst request | JIT lines after Ready | "
        "kernels compiled after Ready (sim) | GPU memory MiB | error |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for o in outcomes:
        gpu = o.gpu_memory_bytes / 2**20 if o.gpu_memory_bytes is not None else None
        lines.append(
            f"| {o.strategy} | {max(1, len(o.runs))} | {o.warm_runs} | {_fmt(o.spawn_to_healthy_s)} | "
            f"{_fmt(o.spawn_to_ready_s)} | {_fmt(o.warmup_s)} | {_fmt(o.warmup_per_healthy, 2)} | "
            f"{shapes_cell(o)} | {_fmt(o.first_good_s)} | {o.refused_before_good} | "
            f"{_fmt(o.max_ratio, 2)} | {_fmt(o.noise_floor, 2)} | {o.worst} | "
            f"{_fmt(o.jit_after_ready, 0)} | "
            f"{o.compiled_after_ready} | {_fmt(gpu, 0)} | {o.error or ''} |"
        )
    lines += [
        "",
        "Warm-up: healthy to Ready, the seconds a strategy waits after the engine could serve",
        "(0 when Ready at or before healthy); warm-up / healthy sets it against the engine's",
        "own start. Warm-up shapes: warmgate's plan at Ready, by how each shape ended (cold:",
        "its --warmup-budget left the shape out).",
    ]
    rows = {o.strategy: o for o in outcomes}
    if "profile" in rows and "warmgate" in rows:
        learned, default = rows["profile"].warmup_s, rows["warmgate"].warmup_s
        if learned is not None and default:
            lines += [
                "",
                f"Profile: its warm-up took {learned / default:.2f} of the default plan's "
                f"({learned:.1f} s against {default:.1f} s), after a first start had learned "
                "the profile from the mix.",
            ]
    if any(len(o.runs) > 1 for o in outcomes):
        lines += [
            "",
            "A row of several starts combines them: the median of each time, and of each",
            "request's first/warm ratio over the starts (max first/warm and noise floor are",
            "taken over those).",
        ]
    names = [m.name for m in outcomes[0].requests] if outcomes else []
    if names:
        lines += [
            "",
            "Each cell: first/warm ratio (first wall ms / warm median wall ms). Output lengths are",
            "pinned (min_tokens = max_tokens) except for structured output; where the first run",
            "generated another number of tokens than the warm ones, its warm latency is read off",
            "a line fitted to the warm runs (length-fitted). Over the simulator the ratio comes",
            "from its own cost report (first cost over that cost without its one-time",
            "compilation), which machine noise cannot move. Noise floor: the max over the",
            "requests of the first warm run over the median of the others, the same statistic",
            "for runs known to be warm; a max first/warm below it is within the machine's noise.",
        ]
        lines += [
            "",
            "| held-out request | " + " | ".join(o.strategy for o in outcomes) + " |",
            "|---|" + "---:|" * len(outcomes),
        ]
        for i, name in enumerate(names):
            cells = []
            for o in outcomes:
                m = o.requests[i] if i < len(o.requests) else None
                cells.append(_cell(m))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shapes_cell(o: Outcome) -> str:
    """`34: 30 verified, 2 converged, 2 cold` for a warmgate start, `-` for the others."""
    if not o.shape_status:
        return "-"
    total = sum(o.shape_status.values())
    parts = ", ".join(f"{n} {status}" for status, n in sorted(o.shape_status.items()))
    return f"{total}: {parts}"


def _cell(m: Measured | None) -> str:
    if m is None:
        return "-"
    if m.error:
        return "error"
    fitted = ", length-fitted" if m.length_fitted and m.cost_ratio is None else ""
    return f"{_fmt(m.ratio, 2)} ({_fmt(m.first_ms, 0)}/{_fmt(m.warm_median, 0)} ms{fitted})"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def as_json(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    import dataclasses

    return [
        {
            **{k: v for k, v in dataclasses.asdict(o).items() if k not in ("requests", "runs")},
            "warmup_s": o.warmup_s,
            "warmup_per_healthy": o.warmup_per_healthy,
            "budget_bound": o.budget_bound,
            "max_ratio": o.max_ratio,
            "noise_floor": o.noise_floor,
            "compiled_after_ready": o.compiled_after_ready,
            "runs": as_json(o.runs),
            "requests": [
                {
                    **dataclasses.asdict(m),
                    "ratio": m.ratio,
                    "wall_ratio": m.wall_ratio,
                    "cost_ratio": m.cost_ratio,
                    "length_fitted": m.length_fitted,
                }
                for m in o.requests
            ],
        }
        for o in outcomes
    ]


# --- one start -------------------------------------------------------------------------------


@dataclass(slots=True)
class Started:
    """A fresh upstream process, under `warmgate run` when `probe_port` is set."""

    proc: subprocess.Popen[bytes]
    port: int  # the upstream's API port
    probe_port: int | None  # warmgate's probe port
    began: float  # time.monotonic() just before the spawn: the container's start
    log_path: Path  # its stdout and stderr

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def warmgate_command(
    probe_port: int, upstream_argv: Sequence[str], args: Sequence[str] = ()
) -> list[str]:
    """`warmgate run` on 127.0.0.1:`probe_port` over the upstream."""
    return [
        sys.executable, "-m", "warmgate", "run", "--host", "127.0.0.1", "--port", str(probe_port),
        "--log-format", "json", *args, "--", *upstream_argv,
    ]  # fmt: skip


@contextlib.contextmanager
def started(
    recipe: ServerRecipe,
    *,
    under_warmgate: bool = False,
    warmgate_args: Sequence[str] = (),
    log_path: Path | None = None,
    stop: Stop = INTERRUPT,
) -> Iterator[Started]:
    """Spawn the upstream on free ports, in a session of its own with a fresh compile cache,
    its output in `log_path` (else a file in that cache); stop it on exit as `stop` says."""
    port = free_port()
    probe_port = free_port() if under_warmgate else None
    argv = recipe.command(port)
    if probe_port is not None:
        argv = warmgate_command(probe_port, argv, warmgate_args)
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="warmgate-bench-"))
        log_path = log_path or Path(cache) / "server.log"
        log = stack.enter_context(log_path.open("wb"))
        env = {**os.environ, **recipe.env, **_fresh_cache_env(cache)}
        began = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            yield Started(proc, port, probe_port, began, log_path)
        finally:
            stop_session(proc, stop)


async def send_first(
    client: httpx.AsyncClient,
    base: str,
    request: HeldoutRequest,
    *,
    model: str,
    context: int = 2048,
) -> Measured:
    """Send one held-out request once, as a client would: the model and context from
    /v1/models when the upstream answers, else the given ones. Connection errors and
    non-200 answers become `error`; over the simulator its cost report is filled in."""
    measured = Measured(request.name)
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        model, context = await _model(client, base)
    rate = await _tokens_per_word(client, base, model)
    began = time.perf_counter()
    try:
        sent = await _send(client, base, model, request, rate, context)
    except httpx.HTTPError as exc:
        measured.first_ms = (time.perf_counter() - began) * 1000
        measured.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return measured
    if isinstance(sent, str):
        measured.first_ms = (time.perf_counter() - began) * 1000
        measured.error = sent
        return measured
    measured.first_ms, cost, measured.compiled_after_ready, measured.first_tokens = sent
    if cost is not None:
        measured.first_cost_ms, measured.first_compile_ms = cost
    return measured


async def warmup_sh(client: httpx.AsyncClient, base: str, poll_s: float = 1.0) -> None:
    """The whole reference warmup.sh: `until curl -s /health; do sleep 1; done`, then its
    three chat requests."""
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(f"{base}/health", timeout=10.0)).status_code == 200:
                break
        await asyncio.sleep(poll_s)
    model, _ = await _model(client, base)
    await _warmup_sh(client, base, model)
