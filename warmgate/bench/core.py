"""The benchmark core: start an upstream under a readiness strategy, wait for Ready,
then send the held-out mix once (first) and again with fresh text (warm).

Strategies, each on a fresh upstream process with a fresh compile cache:
  health     Ready when the upstream's /health says 200 (a plain readinessProbe)
  warmup.sh  /health, then the reference documents' three chat requests of
             100/500/1000 words, max_tokens 50, errors thrown away as the script does
  warmgate   `warmgate run -- <upstream>`, Ready when warmgate's /ready says 200
  plan       as warmgate, with a user plan (--plan)

The first/warm ratio of each held-out request is its first latency over the median of
`warm_runs` later runs with fresh text (fresh, so the prefix cache cannot flatter them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from warmgate.bench import HeldoutRequest, load_heldout

STRATEGIES = ("health", "warmup.sh", "warmgate", "plan")
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
class Upstream:
    """How to start the server under test on a given port."""

    argv: list[str]  # without --host/--port
    env: dict[str, str] = field(default_factory=dict)
    name: str = "sim"

    def command(self, port: int) -> list[str]:
        return [*self.argv, "--host", "127.0.0.1", "--port", str(port)]


def sim_upstream(extra: Sequence[str] = ()) -> Upstream:
    return Upstream([sys.executable, "-m", "warmgate", "sim", *extra], name="sim")


def command_upstream(command: str, name: str = "command") -> Upstream:
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
    return Upstream(words, env, name)


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

    @property
    def warm_median(self) -> float | None:
        return statistics.median(self.warm_ms) if self.warm_ms else None

    @property
    def wall_ratio(self) -> float | None:
        warm = self.warm_median
        return self.first_ms / warm if self.first_ms is not None and warm else None

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
        """Simulated cost when the upstream reports it (the simulator), else wall time."""
        cost = self.cost_ratio
        return cost if cost is not None else self.wall_ratio


@dataclass(slots=True)
class Outcome:
    strategy: str
    spawn_to_healthy_s: float | None = None
    spawn_to_ready_s: float | None = None
    requests: list[Measured] = field(default_factory=list)
    error: str | None = None

    @property
    def max_ratio(self) -> float | None:
        ratios = [m.ratio for m in self.requests if m.ratio is not None]
        return max(ratios) if ratios else None

    @property
    def worst(self) -> str:
        rated = [m for m in self.requests if m.ratio is not None]
        return max(rated, key=lambda m: m.ratio or 0).name if rated else "-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_strategy(
    strategy: str,
    upstream: Upstream,
    *,
    plan: Path | None = None,
    warm_runs: int = 3,
    ready_timeout: float = 1500.0,
    warmgate_args: Sequence[str] = (),
    log_dir: Path | None = None,
) -> Outcome:
    """One fresh upstream under one strategy: time to Ready, then the held-out mix."""
    outcome = Outcome(strategy)
    port = free_port()
    probe_port = free_port() if strategy in ("warmgate", "plan") else None
    argv = upstream.command(port)
    if probe_port is not None:
        extra = [*warmgate_args, *(["--plan", str(plan)] if strategy == "plan" and plan else [])]
        argv = [
            sys.executable,
            "-m",
            "warmgate",
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            str(probe_port),
            "--log-format",
            "json",
            *extra,
            "--",
            *argv,
        ]
    with tempfile.TemporaryDirectory(prefix="warmgate-bench-") as cache:
        env = {**os.environ, **upstream.env, **_fresh_cache_env(cache)}
        log = open(log_dir / f"{strategy}.log", "wb") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        began = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=600.0, trust_env=False) as client:
                await _until_ok(client, f"{base}/health", proc, ready_timeout)
                outcome.spawn_to_healthy_s = time.monotonic() - began
                model, context = await _model(client, base)
                if strategy == "warmup.sh":
                    await _warmup_sh(client, base, model)
                elif probe_port is not None:
                    await _until_ok(
                        client, f"http://127.0.0.1:{probe_port}/ready", proc, ready_timeout
                    )
                outcome.spawn_to_ready_s = time.monotonic() - began
                outcome.requests = await _mix(client, base, model, context, warm_runs)
        except (RuntimeError, httpx.HTTPError, TimeoutError) as exc:
            outcome.error = str(exc) or type(exc).__name__
        finally:
            stop_session(proc)
            if log_dir:
                log.close()  # type: ignore[union-attr]
    return outcome


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


async def _mix(
    client: httpx.AsyncClient, base: str, model: str, context: int, warm_runs: int
) -> list[Measured]:
    """Each held-out request once (first), then again `warm_runs` times with fresh text (warm).

    First and warm runs of one request go back to back, so both see the engine in the same
    state; only the one-time work of that request's shape separates them.
    """
    rate = await _tokens_per_word(client, base, model)
    results = []
    for request in load_heldout():
        measured = Measured(request.name)
        results.append(measured)
        first = await _send(client, base, model, request, rate, context)
        if isinstance(first, str):
            measured.error = first
            continue
        measured.first_ms, cost, measured.compiled_after_ready = first
        if cost is not None:
            measured.first_cost_ms, measured.first_compile_ms = cost
        for _ in range(warm_runs):
            warm = await _send(client, base, model, request, rate, context)
            if isinstance(warm, str):
                measured.error = warm
                break
            measured.warm_ms.append(warm[0])
            if warm[1] is not None:
                measured.warm_cost_ms.append(warm[1][0])
    return results


async def _send(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    request: HeldoutRequest,
    rate: float,
    context: int,
) -> tuple[float, tuple[float, float] | None, list[str]] | str:
    """`concurrency` copies at once with fresh text: (wall ms, simulated (cost, compile) ms, keys
    compiled) or an error."""
    words = max(1, int(min(request.prompt_tokens, context - request.max_tokens - 64) / rate))
    bodies = [
        request.render(" ".join(random.choices(_BENCH_WORDS, k=words)), model)
        for _ in range(request.concurrency)
    ]
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
    return ms, batch_cost, compiled


def _sim_report(reply: httpx.Response) -> tuple[tuple[float, float] | None, list[str]]:
    """The simulator's (cost, compile) ms and compiled keys: from its headers, or for a
    stream from the `: sim-cost` comment at its end."""
    import json

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


def stop_session(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM the server's whole session, SIGKILL it if it outlives `timeout`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def report(outcomes: Sequence[Outcome]) -> str:
    """Markdown: one summary row per strategy, then first/warm per held-out request."""
    lines = [
        "| strategy | spawn→healthy s | spawn→Ready s | max first/warm | worst request | "
        "kernels compiled after Ready | error |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for o in outcomes:
        misses = sum(len(m.compiled_after_ready) for m in o.requests)
        lines.append(
            f"| {o.strategy} | {_fmt(o.spawn_to_healthy_s)} | {_fmt(o.spawn_to_ready_s)} | "
            f"{_fmt(o.max_ratio, 2)} | {o.worst} | {misses} | {o.error or ''} |"
        )
    names = [m.name for m in outcomes[0].requests] if outcomes else []
    if names:
        lines += [
            "",
            "Each cell: first/warm ratio (first wall ms / warm median wall ms). Over the simulator the",
            "ratio comes from its own cost report (first cost over that cost without its one-time",
            "compilation), which machine noise and differing output lengths cannot move.",
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


def _cell(m: Measured | None) -> str:
    if m is None:
        return "-"
    if m.error:
        return "error"
    return f"{_fmt(m.ratio, 2)} ({_fmt(m.first_ms, 0)}/{_fmt(m.warm_median, 0)} ms)"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def as_json(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    import dataclasses

    return [
        {
            **{k: v for k, v in dataclasses.asdict(o).items() if k != "requests"},
            "max_ratio": o.max_ratio,
            "requests": [
                {
                    **dataclasses.asdict(m),
                    "ratio": m.ratio,
                    "wall_ratio": m.wall_ratio,
                    "cost_ratio": m.cost_ratio,
                }
                for m in o.requests
            ],
        }
        for o in outcomes
    ]


# --- one start driven by a caller (scripts/kubelet_replay.py) ------------------------------


@dataclass(slots=True)
class Started:
    """A fresh upstream process, under `warmgate run` when `probe_port` is set."""

    proc: subprocess.Popen[bytes]
    port: int  # the upstream's API port
    probe_port: int | None  # warmgate's probe port
    began: float  # time.monotonic() just before the spawn: the container's start

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def warmgate_command(
    probe_port: int, upstream_argv: Sequence[str], args: Sequence[str] = ()
) -> list[str]:
    """`warmgate run` on 127.0.0.1:`probe_port` over the upstream, as `run_strategy` starts it."""
    return [
        sys.executable, "-m", "warmgate", "run", "--host", "127.0.0.1", "--port", str(probe_port),
        "--log-format", "json", *args, "--", *upstream_argv,
    ]  # fmt: skip


@contextlib.contextmanager
def started(
    upstream: Upstream,
    *,
    under_warmgate: bool = False,
    warmgate_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> Iterator[Started]:
    """Spawn the upstream (fresh compile cache, own session) and stop it on exit: SIGINT, which
    warmgate forwards at once without a drain, then SIGKILL to the session after 10 s."""
    port = free_port()
    probe_port = free_port() if under_warmgate else None
    argv = upstream.command(port)
    if probe_port is not None:
        argv = warmgate_command(probe_port, argv, warmgate_args)
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="warmgate-bench-"))
        log: Any = stack.enter_context(open(log_path, "wb")) if log_path else subprocess.DEVNULL
        env = {**os.environ, **upstream.env, **_fresh_cache_env(cache)}
        began = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            yield Started(proc, port, probe_port, began)
        finally:
            _interrupt(proc)


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the server left behind in its session
    proc.wait()


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
    measured.first_ms, cost, measured.compiled_after_ready = sent
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
