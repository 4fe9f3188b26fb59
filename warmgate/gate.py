"""Warm-up mode: the readiness gate around a running child.

The core decides: warmgate.lifecycle (phases, probe answers, the startup deadline, how
the run ends) and warmgate.drain (when a drain is over). This module only does. A few
loops turn I/O into their events (the child exited, health answered, the warm-up's
verdict, the upstream's requests in flight; signals arrive through `on_signal`), and
`_act` carries out the actions the lifecycle returns. One TaskGroup holds the loops;
EXIT cancels them all.

The probe server runs on a thread of its own and reads nothing but `Gate.published`, a
frozen `ProbeSnapshot` the main loop replaces at each transition, drain poll and cache
measurement, and about once a second with fresh process and GPU readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence, Set
from types import MappingProxyType
from typing import Any, assert_never
from urllib.parse import urlsplit

import httpx

from warmgate import engineconfig, inflight, log, plan, probe, process, profile, servers, traffic
from warmgate.adapters import AdapterBook
from warmgate.cache import CacheReport, quarantine_path, read_quarantine, write_quarantine
from warmgate.childlog import EngineConfigScanner, JitScanner
from warmgate.config import RunSettings, WarmupSettings
from warmgate.drain import (
    Continue,
    Done,
    DrainPolicy,
    DrainState,
    Outcome,
    Reading,
    Unread,
    Verdict,
)
from warmgate.engineconfig import EngineConfig
from warmgate.errors import Ending
from warmgate.lifecycle import (
    ENGINE_DIED,
    Action,
    AdapterPending,
    AdapterWarmed,
    ChildExited,
    ChildSpawned,
    Decision,
    DrainDone,
    Event,
    HealthFailed,
    HealthOk,
    Lifecycle,
    Phase,
    Sigterm,
    Sleep,
    StopAsked,
    WarmupFinished,
)
from warmgate.profilestore import ProfileStore, pod_name, profile_key
from warmgate.telemetry import Counters, Metrics, gpus, process_tree_rss
from warmgate.upstream import Upstream, UpstreamError
from warmgate.warmup import Progress, summary_table
from warmgate.worker import Worker

PROGRESS_EVERY_S = 10.0
READINGS_EVERY_S = 1.0
WARMUP_ID_MARK = "warmgate-"  # in the X-Request-Id of every warm-up request
ENGINE_EXIT_WAIT_S = 10.0  # a failed warm-up with failing health: how long to await the exit
CRASH_NOTE = (
    "the engine died while these warm-up requests ran: a client that sends such a request "
    "will crash the engine too. The body (prompt removed) reproduces it for a bug report"
)

Forward = Callable[[signal.Signals], None]


@dataclasses.dataclass(frozen=True, slots=True)
class _HostReadings:
    """psutil and NVML readings, taken by the main loop about once a second."""

    child_rss: int | None = None
    gpus: list[Mapping[str, Any]] | None = None


class Gate:
    """Warm-up mode's loops and executor, and the `ProbeView` the probe thread reads."""

    def __init__(
        self,
        settings: RunSettings,
        child: process.Child,
        upstream_url: str,
        api_key: str | None,
        forward: Forward,
        cache: CacheReport | None = None,
    ):
        self.settings = settings
        self.child = child
        self.upstream_url = upstream_url
        self._api_key = api_key
        self._forward = forward  # forward a signal to the child, log it, arm the stop timer
        self.upstream = Upstream(
            upstream_url, api_key=api_key, timeout=settings.warmup.request_timeout
        )
        self.started_mono, self.started_wall = time.monotonic(), time.time()
        # Workers (--leader) tell a restarted leader by it: a new Ray head, a group to rejoin.
        self.boot_id = uuid.uuid4().hex
        self.life = Lifecycle(
            self.started_mono,
            unhealthy_threshold=settings.unhealthy_threshold,
            live_grace=settings.live_grace,
            on_warmup_failure=settings.on_warmup_failure,
            startup_timeout=settings.startup_timeout,
        )
        self.jit = JitScanner()
        self.engine_line = EngineConfigScanner()  # the engine's config, as it logged it
        self.engine: EngineConfig | None = None  # resolved when the warm-up starts
        self.budget_s: float | None = None
        # Request ids are tracked only when the engine logs both ends of each request.
        self.requests = (
            inflight.RequestLog() if inflight.logs_request_ends(settings.command) else None
        )
        address = urlsplit(upstream_url)
        self.upstream_port = address.port or (443 if address.scheme == "https" else 80)
        self.progress = Progress()
        self.drain: DrainPolicy | None = None
        self.health_failures = 0  # all failed health checks, for /metrics
        self.cache = cache
        self.learner = _learner(settings)  # the traffic profile (--cache-dir); None: off
        self.quarantined: list[dict[str, Any]] = []  # the cache key's quarantine records
        self.died_in: list[dict[str, Any]] = []  # the shapes in flight when the engine died
        self.rewarm = Progress()  # the latest re-warm after a wake-up
        self.rewarm_s: float | None = None  # how long it took
        self.adapters = AdapterBook()  # LoRA adapters loaded at run time
        self._exited: asyncio.Future[int] | None = None
        self._host = _HostReadings()
        self._log = log.get()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.published: probe.ProbeSnapshot = self._snapshot()
        self.meter = Metrics(lambda: self.published)

    # --- what the probe thread reads --------------------------------------------------

    def metrics(self) -> bytes:
        return self.meter.render()

    def publish(self) -> None:
        """Replace the snapshot the probe thread reads: one reference, swapped whole."""
        self.published = self._snapshot()

    def _snapshot(self) -> probe.ProbeSnapshot:
        now = time.monotonic()
        life = self.life
        status = life.as_status(now)
        status["transitions"] = [
            {"phase": t.phase.value, "at": self._wall(t.at), "reason": t.reason}
            for t in life.transitions
        ]
        status = {
            "mode": "warmup",
            "boot_id": self.boot_id,
            **status,
            "upstream": self.upstream_url,
            "models": self.progress.models,
            "child": {"pid": self.child.pid, "rss_bytes": self._host.child_rss},
            "gpus": self._host.gpus,
            "shapes": [r.as_dict() for r in self.progress.results],
            "warmup": {
                "coverage": self.settings.warmup.coverage,
                "budget_s": self.budget_s,
                "cold": [r.family for r in self.progress.cold()],
                "engine": self.engine.as_dict() if self.engine is not None else None,
            },
            "jit_misses_after_ready": self.jit.after_ready,
            "jit_lines_total": self.jit.total,
            "drain": self._drain_status(self.drain.state) if self.drain is not None else None,
            "cache": self.cache.as_status() if self.cache is not None else None,
            "warnings": self.progress.warnings,
            "engine_died": {"shapes": self.died_in, "note": CRASH_NOTE} if self.died_in else None,
            "quarantined": self.quarantined,
            "profile": self.learner.status(time.time()) if self.learner is not None else None,
            "rewarm": {
                "wakes": life.wakes,
                "seconds": self.rewarm_s,
                "shapes": [r.as_dict() for r in self.rewarm.results],
            },
            "adapters": self.adapters.as_status(self.started_mono),
        }
        drain = self.drain.state if self.drain is not None else None
        counters = Counters(
            phase_seconds=MappingProxyType(life.seconds_per_phase(now)),
            health_failures=self.health_failures,
            jit_misses=self.jit.after_ready,
            drain_inflight=drain.inflight if drain is not None else None,
            drain_seconds=drain.seconds if drain is not None else 0.0,
            cache_bytes=MappingProxyType(self.cache.sizes() if self.cache is not None else {}),
            quarantined=MappingProxyType(_count_by_feature(self.quarantined)),
            cold=MappingProxyType(
                _count_by_feature([r.key.as_dict() for r in self.progress.cold()])
            ),
            adapters=MappingProxyType(self.adapters.counts()),
        )
        return probe.ProbeSnapshot(
            phase=life.phase.value,
            ready=life.ready_ok(),
            started=life.startup_ok(),
            live_until=life.live_until(),
            status=json.dumps(status, separators=(",", ":")).encode(),
            counters=counters,
        )

    def _drain_status(self, state: DrainState) -> dict[str, Any]:
        return {
            "started_at": self._wall(state.started),
            "deadline_s": state.deadline_s,
            "outcome": str(state.outcome or "draining"),
            **self._drain_reading(state),
        }

    def scan_output(self, stream: int, data: bytes) -> None:
        """A copy of the child's output, from the pump threads."""
        self.jit.feed(stream, data)
        if self.engine_line.line is None:
            self.engine_line.feed(stream, data)
        if self.requests is not None:
            self.requests.feed(stream, data)
        if self.cache is not None:
            self.cache.engine.feed(stream, data)
        if self.learner is not None:
            self.learner.requests.feed(stream, data)

    # --- events in, actions out ---------------------------------------------------------

    async def drive_lifecycle(self, exited: asyncio.Future[int], sock: socket.socket) -> Ending:
        """Serve probes and drive the lifecycle until the child has exited; how the run ends.

        `exited` gets the child's wait status from the reaper.
        """
        server = probe.ProbeThread(self, sock)
        self.meter.closed = server.closed_connections
        server.start()
        self._log.info("listening", host=server.host, port=server.port, upstream=self.upstream_url)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.apply(ChildSpawned(self.child.pid))
                self._spawn("child", self._watch_child(exited))
                self._spawn("health", self._poll_health())
                self._spawn("readings", self._take_readings())
                self._spawn("sleep", self._poll_sleep())
                if self.settings.adapter_interval > 0:
                    self._spawn("adapters", self._poll_adapters())
        finally:
            server.stop()
            await self.upstream.aclose()
        ending = self.life.ending
        assert ending is not None, "the task group ends on EXIT, which only a child exit gives"
        return ending

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM goes through the lifecycle (drain); every other signal is forwarded at
        once, and a stop signal among them tells the lifecycle a stop was asked for."""
        if sig == signal.SIGTERM:
            self.apply(Sigterm())
            return
        self._forward(sig)
        if sig in process.STOP_SIGNALS:
            self.apply(StopAsked(sig.name))

    def apply(self, event: Event) -> Decision:
        """Hand one event to the lifecycle, publish what changed, carry out its actions."""
        decision = self.life.handle(event, time.monotonic())
        if decision.changed:
            reason = self.life.transitions[-1].reason
            self._log.info("phase", phase=decision.phase.value, reason=reason)
            # A re-warm's own compiles are not misses: no client is let in meanwhile.
            self.jit.ready = self.life.startup_ok() and decision.phase is not Phase.REWARMING
            self.publish()  # before acting: /ready says 503 before the child hears SIGTERM
            if decision.phase is Phase.READY:
                self._start_learning()
        elif decision.note:
            self._log.info("lifecycle", phase=decision.phase.value, note=decision.note)
        for action in decision.actions:
            self._act(action)
        return decision

    def _act(self, action: Action) -> None:
        match action:
            case Action.START_WARMUP:
                self._spawn("warmup", self._warm_up())
            case Action.CANCEL_WARMUP:
                self._cancel("warmup")
            case Action.START_REWARM:
                self._spawn("warmup", self._rewarm())
            case Action.START_ADAPTER_WARMUP:
                self._spawn("adapter", self._warm_adapter())
            case Action.STOP_ADAPTER_WARMUP:
                self._cancel("adapter")
            case Action.START_DRAIN:
                self._start_drain()
            case Action.SKIP_DRAIN:
                self._cut_drain_short(Outcome.SKIPPED)
            case Action.CANCEL_DRAIN:
                self._cut_drain_short(Outcome.CHILD_EXITED)
            case Action.FORWARD_SIGTERM:
                self._forward(signal.SIGTERM)
            case Action.EXIT:
                for name in list(self._tasks):
                    self._cancel(name)
            case _:
                assert_never(action)

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        if self._tg is None:
            coro.close()  # no task group (yet): nothing runs it
            return
        self._tasks[name] = self._tg.create_task(coro, name=name)

    def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    # --- loops: I/O in, events out ------------------------------------------------------

    async def _watch_child(self, exited: asyncio.Future[int]) -> None:
        self._exited = exited
        wait_status = await exited
        self.apply(
            ChildExited(process.shell_status(wait_status), process.fatal_signal(wait_status))
        )
        if self.life.startup_failure == ENGINE_DIED:
            self._engine_died()

    async def _poll_health(self) -> None:
        """Poll upstream health for the whole life of the child."""
        interval = self.settings.health_interval
        timeout = min(5.0, max(1.0, 4 * interval))
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            ok, why = await self.upstream.health(self.settings.warmup.health_path, timeout=timeout)
            if not ok:
                self.health_failures += 1
            decision = self.apply(HealthOk() if ok else HealthFailed(why))
            now = time.monotonic()
            if decision.changed and self.life.startup_failure == "upstream_never_healthy":
                self._log.error("startup_timeout", after_s=self.settings.startup_timeout, last=why)
            elif self.life.phase is Phase.LOADING and now >= next_progress:
                elapsed = round(now - self.started_mono, 1)
                self._log.info("waiting", phase="loading", elapsed_s=elapsed, last=why)
                next_progress = now + PROGRESS_EVERY_S
            await asyncio.sleep(interval)

    async def _take_readings(self) -> None:
        """psutil and NVML, read off the event loop about once a second, never per probe."""
        while True:
            rss, found = await asyncio.to_thread(self._read_host)
            self._host = _HostReadings(rss, found)
            self.publish()
            await asyncio.sleep(READINGS_EVERY_S)

    def _read_host(self) -> tuple[int | None, list[Mapping[str, Any]] | None]:
        return process_tree_rss(self.child.pid), gpus()

    async def _warm_up(self) -> None:
        settings = self.settings.warmup
        began = time.monotonic()
        await self._measure_cache("healthy")
        await self._read_quarantine()
        await self._load_profile()
        self.progress = Progress(self.meter.observe)
        try:
            async with asyncio.timeout(settings.warmup_timeout):
                await self._run_worker(self._plan_inputs(settings, began))
        except TimeoutError:
            self._warmup_done(False, f"--warmup-timeout {settings.warmup_timeout:g} s reached")
        except Exception as exc:  # any failure of the upstream ends in the documented outcome
            await self._await_dying_engine()
            self._warmup_done(False, str(exc) or type(exc).__name__)
        else:
            self._warmup_done(True, "")
        finally:
            self._forget_warmup_ids()
            self._summarise(time.monotonic() - began)
            await self._measure_cache("warm")

    def _plan_inputs(self, settings: WarmupSettings, began: float) -> WarmupSettings:
        """What the plan needs that only now is known: the engine's limits (its start-up
        line, else its command line, else vLLM's defaults) and the budget in seconds."""
        gpus = self._host.gpus
        memory = int(gpus[0]["memory_total_bytes"]) if gpus else None
        self.engine = engineconfig.resolve(
            engineconfig.from_log(self.engine_line.line or ""),
            engineconfig.from_argv(self.settings.command),
            engineconfig.defaults(memory),
        )
        healthy_after = time.monotonic() - self.started_mono
        self.budget_s = settings.budget_seconds(healthy_after)
        self._log.info("engine_config", **self.engine.as_dict())
        found = self.learner.loaded if self.learner is not None else None
        self._log.info(
            "warmup_budget",
            budget_s=round(self.budget_s, 1),
            healthy_s=round(healthy_after, 1),
            rule="--warmup-budget" if settings.warmup_budget is not None else "auto",
            coverage=settings.coverage,
        )
        return dataclasses.replace(
            settings,
            upstream=self.upstream_url,
            api_key=self._api_key,
            engine=self.engine,
            warmup_budget=self.budget_s,
            budget_from=began,
            profile=self._profile_specs(settings),
            profile_requests=found.requests if found is not None else 0,
        )

    async def _run_worker(self, settings: WarmupSettings, progress: Progress | None = None) -> None:
        """The warm-up runs in a worker process (warmgate.worker); its events land in
        `progress` (the start-up warm-up's when None)."""
        progress = progress or self.progress
        self.publish()
        keys = [k for r in self.quarantined if (k := plan.ShapeKey.from_dict(r)) is not None]
        worker = Worker.spawn()
        self._log.info("warmup_worker", pid=worker.pid)
        async with contextlib.aclosing(worker.run(settings, keys)) as events:
            async for event in events:
                progress.handle(event)

    async def _measure_cache(self, when: str) -> None:
        """Size the compile cache off the event loop (a walk of a few GB takes a while)."""
        if self.cache is None:
            return
        from warmgate.cache import snapshot

        snap = await asyncio.to_thread(snapshot, self.cache.dirs)
        self.cache.record(when, snap)
        self.publish()
        engine = self.cache.engine.as_status()
        self._log.info(
            "cache", phase=when, bytes=snap.size_bytes, files=snap.file_count,
            hit=self.cache.hit, outcome=self.cache.outcome, new_files=self.cache.new_files,
            engine_loaded=engine["loaded"], engine_load_failures=engine["load_failures"],
        )  # fmt: skip

    async def _await_dying_engine(self) -> None:
        """The warm-up failed. If health fails too, the engine may be dying, and its exit
        (the better verdict: engine_died_during_warmup, naming the shape) a moment away:
        wait for it a while. The exit cancels this task; a healthy upstream costs one check."""
        ok, _ = await self.upstream.health(self.settings.warmup.health_path, timeout=2.0)
        if ok or self._exited is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), ENGINE_EXIT_WAIT_S)

    async def _read_quarantine(self) -> None:
        """The cache key's quarantine (--cache-dir): shapes that killed the engine before."""
        if self.cache is None:
            return
        path = quarantine_path(self.cache.dirs)
        self.quarantined, warning = await asyncio.to_thread(read_quarantine, path)
        if warning is not None:
            self._log.warning("quarantine", note=warning)
        self.publish()

    def _engine_died(self) -> None:
        """Name the shapes in flight when the engine died, and quarantine them (--cache-dir)."""
        flying = self.progress.in_flight()
        self.died_in = [{**r.key.as_dict(), "body": r.body} for r in flying]
        ending = self.life.ending
        fields: dict[str, Any] = {
            "shape": ",".join(r.family for r in flying) or None,
            "shapes": self.died_in,
            "code": ending.code if ending is not None else None,
            "note": CRASH_NOTE if flying else "no warm-up request was in flight",
        }
        if flying:
            held = plan.to_quarantine(
                [r.key for r in self.progress.results],
                [r.key for r in self.progress.warmed()],
                [r.key for r in flying],
            )
            fields.update(self._quarantine(held, {r.key for r in flying}))
        self._log.error(ENGINE_DIED, **fields)
        self.publish()

    def _quarantine(
        self, held: Sequence[plan.ShapeKey], flying: Set[plan.ShapeKey]
    ) -> dict[str, Any]:
        """Record `held` under the cache key, so that the next start leaves them out; the
        log fields that say so, or how to get a quarantine."""
        families = [k.family for k in held]
        features = sorted({k.feature for k in held})
        scope = (
            f"{len(held)} shapes of feature {', '.join(features)}: the one in flight and those "
            "larger (prompt tokens x concurrency) than any that completed; not the whole feature"
        )
        if self.cache is None:
            why = (
                "--cache-dir is unusable (see the cache warning)"
                if self.settings.cache_dir is not None
                else "no --cache-dir"
            )
            hint = (
                f"{why}: run warmgate with --cache-dir on a volume, and the next start leaves "
                f"out these {scope}, and becomes Ready"
            )
            return {"quarantine": None, "quarantine_hint": hint, "would_quarantine": families}
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        code = self.life.child_status
        records = [
            {
                **k.as_dict(),
                "reason": "in_flight" if k in flying else "not_known_safe",
                "exit_code": code,
                "at": at,
            }
            for k in held
        ]
        path = quarantine_path(self.cache.dirs)
        # On the event loop: a few hundred bytes, once, while warmgate is ending anyway.
        warning = write_quarantine(path, self.cache.dirs.key, records)
        if warning is not None:
            self._log.warning("quarantine", note=warning)
            return {"quarantine": None, "would_quarantine": families}
        known = {(r.get("model"), r.get("family")) for r in self.quarantined}
        self.quarantined += [r for r in records if (r["model"], r["family"]) not in known]
        return {
            "quarantined": families,
            "quarantine": str(path),
            "quarantine_note": f"the next start of this cache key leaves out these {scope}",
        }

    def _summarise(self, seconds: float) -> None:
        results = self.progress.results
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        self._log.info("warmup_summary", ms=round(seconds * 1000), shapes=len(results), **counts)
        if cold := self.progress.cold():
            self._log.warning(
                "warmup_budget_spent",
                budget_s=self.budget_s,
                cold=[r.family for r in cold],
                note=f"{len(cold)} shapes stayed cold: the first such client requests pay "
                "their one-time costs; raise --warmup-budget to warm them",
            )
        if results and sys.stderr.isatty():
            print(summary_table(results), file=sys.stderr, flush=True)

    def _warmup_done(self, ok: bool, detail: str) -> None:
        if not ok:
            self._log.error("warmup_failed", error=detail, policy=self.settings.on_warmup_failure)
        self.apply(WarmupFinished(ok, detail))

    # --- after Ready: sleep and wake, runtime LoRA adapters --------------------------------

    async def _poll_sleep(self) -> None:
        """After Ready, the upstream's sleep state at the health interval (vLLM's dev-mode
        GET /is_sleeping). A server without it (404/405) is not asked again."""
        interval = self.settings.health_interval
        timeout = min(5.0, max(1.0, 4 * interval))
        while True:
            await asyncio.sleep(interval)
            if not self.life.after_ready():
                continue
            match await self.upstream.is_sleeping(timeout):
                case "absent":
                    self._log.debug("sleep_mode", note="no /is_sleeping upstream: not polled")
                    return
                case "sleeping" | "awake" as answer:
                    self.apply(Sleep(answer == "sleeping"))
                case "unknown":
                    pass  # health polls judge an upstream that does not answer

    async def _rewarm(self) -> None:
        """The short plan after a wake-up (plan.rewarm_plan), then WarmupFinished."""
        began = time.monotonic()
        self.rewarm = Progress(self.meter.observe)
        settings = self._after_ready_settings(rewarm=True)
        self._log.info("rewarm", wakes=self.life.wakes)
        try:
            async with asyncio.timeout(settings.warmup_timeout), self._own_traffic():
                await self._run_worker(settings, self.rewarm)
        except TimeoutError:
            ok, detail = False, f"--warmup-timeout {settings.warmup_timeout:g} s reached"
        except Exception as exc:  # the lifecycle serves anyway; the log says why
            ok, detail = False, str(exc) or type(exc).__name__
        else:
            ok, detail = True, ""
        finally:
            self._forget_warmup_ids()
        self.rewarm_s = round(time.monotonic() - began, 3)
        emit = self._log.info if ok else self._log.warning
        emit("rewarm_done", ms=round(self.rewarm_s * 1000), shapes=len(self.rewarm.results),
             ok=ok, error=detail or None)  # fmt: skip
        self.apply(WarmupFinished(ok, detail))

    def _own_traffic(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Around a warm-up after Ready: the traffic profile leaves its requests out."""
        if self.learner is None:
            return contextlib.nullcontext()
        return self.learner.own_traffic(self.upstream)

    async def _poll_adapters(self) -> None:
        """After Ready, /v1/models every --adapter-interval: adapters new there are warmed
        one at a time while Ready (the lifecycle says when, with START_ADAPTER_WARMUP)."""
        while True:
            await asyncio.sleep(self.settings.adapter_interval)
            if not self.life.after_ready():
                continue
            try:
                served = await self.upstream.models()
            except (httpx.HTTPError, UpstreamError) as exc:
                self._log.debug("adapters_unread", error=str(exc) or type(exc).__name__)
                continue
            listed = {m.id: m.parent for m in served if m.parent is not None}
            at_startup = {r.model for r in self.progress.warmed()}
            if new := self.adapters.served(listed, time.monotonic(), at_startup):
                self._log.info("adapters_seen", adapters=new)
                self.publish()
            if self.adapters.next_pending() is not None:
                self.apply(AdapterPending())

    async def _warm_adapter(self) -> None:
        """Warm the next pending adapter with its short plan (plan.adapter_plan), one
        request at a time; AdapterWarmed after, and the next one if another waits."""
        name = self.adapters.next_pending()
        if name is None:
            self.apply(AdapterWarmed())
            return
        began = time.monotonic()
        self.adapters.started(name)
        self.publish()
        settings = self._after_ready_settings(adapter=name, models=(name,), concurrency=(1,))
        progress = Progress(self.meter.observe)
        error: str | None = None
        try:
            async with asyncio.timeout(settings.warmup_timeout), self._own_traffic():
                await self._run_worker(settings, progress)
        except asyncio.CancelledError:
            self.adapters.stopped(name)  # Ready was left: warmed again once back
            self._log.info("adapter_warmup", adapter=name, state="pending", note="Ready left")
            raise
        except TimeoutError:
            error = f"--warmup-timeout {settings.warmup_timeout:g} s reached"
        except Exception as exc:  # the adapter stays cold; the pod serves on
            error = str(exc) or type(exc).__name__
        finally:
            self._forget_warmup_ids()
        self.adapters.finished(name, time.monotonic(), error)
        emit = self._log.info if error is None else self._log.warning
        emit("adapter_warmup", adapter=name, state="warm" if error is None else "failed",
             ms=round((time.monotonic() - began) * 1000), shapes=len(progress.results),
             error=error)  # fmt: skip
        self.apply(AdapterWarmed())
        if self.adapters.next_pending() is not None:
            self.apply(AdapterPending())

    def _after_ready_settings(self, **changes: Any) -> WarmupSettings:
        """The start-up warm-up's settings and what it learned (engine, budget), for a
        warm-up after Ready; its budget counts from its own start."""
        return dataclasses.replace(
            self.settings.warmup,
            upstream=self.upstream_url,
            api_key=self._api_key,
            engine=self.engine,
            warmup_budget=self.budget_s,
            budget_from=None,
            **changes,
        )

    def _forget_warmup_ids(self) -> None:
        if self.requests is not None:  # every warm-up request has ended by now
            self.requests.forget(WARMUP_ID_MARK)

    # --- the traffic profile (warmgate.traffic): learned after Ready, planned first ---------

    async def _load_profile(self) -> None:
        """Every pod's profile of this deployment, read once, before the first plan."""
        if self.learner is None or self.learner.loaded is not None:
            return
        await asyncio.to_thread(self.learner.load)
        for warning in self.learner.load_warnings:
            self._log.warning("profile", note=warning)
        if (found := self.learner.loaded) is not None:
            self._log.info("profile_loaded", **found.summary(time.time()))
        self.publish()

    def _profile_specs(self, settings: WarmupSettings) -> tuple[plan.ShapeSpec, ...]:
        found = self.learner.loaded if self.learner is not None else None
        if found is None:
            return settings.profile
        cap = settings.max_inflight_tokens or (self.engine.step_budget if self.engine else None)
        try:
            return profile.plan_specs(found, max_prompt_tokens=1 << 30, max_inflight_tokens=cap)
        except plan.PlanError as exc:  # a profile must never cost the start: the default plan
            self._log.warning("profile", note=f"left out: {exc}")
            return ()

    def _start_learning(self) -> None:
        """At Ready (the first time): learn what clients send from now on."""
        if self.learner is None or "profile" in self._tasks or self.learner.requests.learning:
            return
        if not traffic.logs_requests(self.settings.command):
            self._log.warning(
                "profile",
                note="the engine does not log requests: start vLLM with --enable-log-requests "
                "(and --enable-log-outputs, for streaming) to learn a traffic profile",
            )
        self._spawn("profile", self._profile_guard(self.learner.learn(self.upstream)))

    async def _profile_guard(self, work: Coroutine[Any, Any, None]) -> None:
        """The profile is an aid: a failure of its own is a warning, never the pod's end."""
        try:
            await work
        except Exception as exc:
            self._log.warning("profile", error=str(exc) or type(exc).__name__)

    # --- the drain: the policy decides, these carry it out -------------------------------

    def _start_drain(self) -> None:
        settings = self.settings
        self.drain = DrainPolicy(
            time.monotonic(), minimum=settings.drain_min, deadline=settings.drain_deadline
        )
        self._log.info(
            "drain", phase="draining", deadline_s=settings.drain_deadline, min_s=settings.drain_min
        )
        self._spawn("drain", self._poll_drain())
        if self.learner is not None and self.learner.requests.learning:
            self._cancel("profile")  # the last write: what the pod learned up to the drain
            self._spawn("profile_save", self._profile_guard(self.learner.save(self.upstream)))

    async def _poll_drain(self) -> None:
        """Read the upstream's requests in flight until the drain policy says it is over;
        each poll waits no longer than the drain has left (DrainPolicy.poll_timeout)."""
        assert self.drain is not None, "no drain was started"
        while True:
            timeout = self.drain.poll_timeout(time.monotonic())
            reading = await self.upstream.inflight(self.settings.inflight_metrics, timeout)
            names = await asyncio.to_thread(self._in_flight_names)
            match self.drain_polled(reading, names, timeout):
                case Continue(wait=wait):
                    await asyncio.sleep(wait)
                case Done():
                    return

    def drain_polled(
        self, reading: Reading, names: Mapping[str, object], timeout: float | None = None
    ) -> Verdict:
        """One reading of the upstream's requests in flight (or why there is none), handed
        to the drain policy; `timeout`: how long the poll waited at most."""
        assert self.drain is not None, "no drain was started"
        verdict = self.drain.on_poll(time.monotonic(), reading, names)
        if verdict.warn is Unread.NO_GAUGES:
            self._log.warning(
                "drain_no_metrics",
                note="upstream has no in-flight gauges; waiting --drain-min only",
            )
        elif verdict.warn is Unread.NO_ANSWER:
            self._log.warning(
                "drain_no_answer",
                note="upstream did not answer /metrics in time; its requests in flight are "
                "unknown, so the drain waits for an answer or its deadline",
                timeout_s=round(timeout, 2) if timeout is not None else None,
            )
        if isinstance(verdict, Done):
            self._drain_ended(verdict.outcome)
            self.apply(DrainDone())
        else:
            self.publish()
        return verdict

    def _cut_drain_short(self, outcome: Outcome) -> None:
        """A second SIGTERM, or the child exiting on its own, ended the drain early."""
        self._cancel("drain")
        if self.drain is not None and self.drain.cut_short(time.monotonic(), outcome):
            self._drain_ended(outcome)

    def _drain_ended(self, outcome: Outcome) -> None:
        self.publish()
        emit = self._log.info if outcome is Outcome.EMPTIED else self._log.warning
        emit("drain_done", **self._drain_fields())

    @staticmethod
    def _drain_reading(state: DrainState) -> dict[str, Any]:
        """The last poll: requests in flight, or why none could be read; what may still run."""
        return {
            "inflight": state.inflight,
            "unread": str(state.unread) if state.unread is not None else None,
            "seconds": round(state.seconds, 2),
            **state.names,
        }

    def _drain_fields(self) -> dict[str, Any]:
        """The drain_done line: how it ended, and what may still run (named where known)."""
        assert self.drain is not None
        state = self.drain.state
        fields: dict[str, Any] = {"outcome": str(state.outcome), **self._drain_reading(state)}
        may_run = state.outcome is not None and state.outcome.may_leave_requests
        ids_unknown = self.requests is None and servers.recognise(self.settings.command) in (
            servers.VLLM,
            servers.SIM,
        )
        if may_run and ids_unknown:
            fields["requests_hint"] = (
                "start vLLM with --enable-log-requests --enable-log-outputs "
                "to name the requests by id"
            )
        return fields

    def _in_flight_names(self) -> dict[str, Any]:
        """The upstream's client connections, and the request ids its log left open."""
        fields = inflight.named("connections", inflight.read_client_connections(self.upstream_port))
        if self.requests is not None:
            fields.update(inflight.named("requests", self.requests.open_ids()))
            if self.requests.dropped:
                fields["requests_dropped"] = self.requests.dropped
        return fields

    # --- helpers ----------------------------------------------------------------------

    def exit_fields(self) -> dict[str, Any]:
        """What the exit line adds in warm-up mode: the phase, JIT misses, the drain."""
        fields: dict[str, Any] = {
            "phase": self.life.phase.value,
            "jit_misses_after_ready": self.jit.after_ready,
        }
        if self.died_in:
            fields["shape"] = ",".join(shape["family"] for shape in self.died_in)
        if self.drain is not None:
            state = self.drain.state
            outcome = state.outcome.value if state.outcome is not None else None
            fields.update(drain=outcome, inflight=state.inflight, **state.names)
        return fields

    def _wall(self, mono: float) -> float:
        return round(self.started_wall + (mono - self.started_mono), 3)


def _learner(settings: RunSettings) -> traffic.Learner | None:
    """The traffic profile's learner: with --cache-dir and --profile-interval above 0."""
    if settings.cache_dir is None or settings.profile_interval <= 0:
        return None
    store = ProfileStore(
        settings.cache_dir.absolute(),
        profile_key(settings.command),
        pod_name(os.environ),
    )
    return traffic.Learner(
        store, inflight.logs_request_ends(settings.command), settings.profile_interval
    )


def _count_by_feature(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        feature = str(record.get("feature"))
        counts[feature] = counts.get(feature, 0) + 1
    return counts
