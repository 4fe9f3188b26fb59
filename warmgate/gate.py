"""Warm-up mode: the readiness gate around a running child.

One TaskGroup holds the health poller, the warm-up, the drain and the probe
server; the lifecycle (warmgate.lifecycle) decides, this module acts on its
decisions. Shutdown is cancellation of that group.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from warmgate import inflight, log, probe, process, servers
from warmgate import lifecycle as lc
from warmgate.cache import CacheReport
from warmgate.childlog import JitScanner
from warmgate.config import RunSettings, WarmupSettings
from warmgate.errors import Exit
from warmgate.telemetry import Counters, Metrics, gpus, process_tree_rss
from warmgate.upstream import Upstream
from warmgate.warmup import Progress, summary_table
from warmgate.worker import Worker

PROGRESS_EVERY_S = 10.0
WARMUP_ID_MARK = "warmgate-"  # in the X-Request-Id of every warm-up request
# Drain outcomes that leave requests possibly still running: their log lines name them.
NAMED_OUTCOMES = ("timed_out", "skipped", "no_metrics")
NAME_KEYS = ("connections", "connections_more", "requests", "requests_more", "requests_dropped")


class _ChildGone(Exception):
    """Raised inside the TaskGroup to cancel every task once the child has exited."""


class Gate:
    """Warm-up mode's state, and the `ProbeView` the probe server answers from."""

    def __init__(
        self,
        settings: RunSettings,
        child: process.Child,
        upstream_url: str,
        api_key: str | None,
        cache: CacheReport | None = None,
    ):
        self.settings = settings
        self.child = child
        self.upstream_url = upstream_url
        self._api_key = api_key
        self.upstream = Upstream(
            upstream_url, api_key=api_key, timeout=settings.warmup.request_timeout
        )
        self.started_mono, self.started_wall = time.monotonic(), time.time()
        self.life = lc.Lifecycle(
            self.started_mono,
            unhealthy_threshold=settings.unhealthy_threshold,
            live_grace=settings.live_grace,
            on_warmup_failure="ready" if settings.on_warmup_failure == "ready" else "fail",
        )
        self.jit = JitScanner()
        # Request ids are tracked only when the engine logs both ends of each request.
        self.requests = (
            inflight.RequestLog() if inflight.logs_request_ends(settings.command) else None
        )
        address = urlsplit(upstream_url)
        self.upstream_port = address.port or (443 if address.scheme == "https" else 80)
        self.counters = Counters()
        self.meter = Metrics(self._read_counters)
        self.progress = Progress()
        self.drain: dict[str, Any] = {}
        self.exit_reason: str | None = None
        self.cache = cache
        if cache is not None:
            self.counters.cache_bytes = cache.sizes()
        self._log = log.get()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopper: Any = None

    # --- ProbeView --------------------------------------------------------------------

    def phase(self) -> str:
        return self.life.phase.value

    def ready_ok(self) -> bool:
        return self.life.ready_ok()

    def live_ok(self) -> bool:
        return self.life.live_ok(time.monotonic()) and self.life.child_status is None

    def startup_ok(self) -> bool:
        return self.life.startup_ok()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        snap = self.life.snapshot(now)
        for t in snap["transitions"]:  # type: ignore[attr-defined]
            t["at"] = self._wall(t["at"])
        return {
            "mode": "warmup",
            **snap,
            "upstream": self.upstream_url,
            "models": self.progress.models,
            "child": {"pid": self.child.pid, "rss_bytes": process_tree_rss(self.child.pid)},
            "gpus": gpus(),
            "shapes": [r.as_dict() for r in self.progress.results],
            "jit_misses_after_ready": self.jit.after_ready,
            "jit_lines_total": self.jit.total,
            "drain": self.drain or None,
            "cache": self.cache.as_status() if self.cache is not None else None,
            "warnings": self.progress.warnings,
        }

    def metrics(self) -> bytes:
        return self.meter.render()

    def scan_output(self, stream: int, data: bytes) -> None:
        """A copy of the child's output, from the pump threads."""
        self.jit.feed(stream, data)
        if self.requests is not None:
            self.requests.feed(stream, data)
        if self.cache is not None:
            self.cache.engine.feed(stream, data)

    # --- running ----------------------------------------------------------------------

    async def run(self, exited: asyncio.Future[int], sock: socket.socket, stopper: Any) -> int:
        """Serve probes and drive the lifecycle until the child exits; the exit code."""
        self._stopper = stopper
        server = probe.ProbeThread(self, sock)
        server.start()
        self._log.info("listening", host=server.host, port=server.port, upstream=self.upstream_url)
        self._apply(lc.ChildSpawned(self.child.pid))
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn("health", self._watch_health())
                status = await exited
                self._apply(lc.ChildExited(process.exit_code(status)))
                raise _ChildGone
        except* _ChildGone:
            pass
        finally:
            server.stop()
            await self.upstream.aclose()
        return self._exit_code(status)

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM goes through the lifecycle (drain); every other signal is forwarded at once."""
        if sig == signal.SIGTERM:
            self._apply(lc.Sigterm())
            return
        delivered = process.send(self.child, sig, group=self.settings.signal_group)
        self._log.info("signal", signal=sig.name, forwarded=delivered)
        if sig in process.STOP_SIGNALS:
            self._stopper.arm()

    def _apply(self, event: lc.Event) -> None:
        now = time.monotonic()
        decision = self.life.handle(event, now)
        if decision.changed:
            self._log.info(
                "phase", phase=decision.phase.value, reason=self.life.transitions[-1].reason
            )
            self.jit.ready = self.jit.ready or decision.phase is lc.Phase.READY
        elif decision.note:
            self._log.info("lifecycle", phase=decision.phase.value, note=decision.note)
        for action in decision.actions:
            self._act(action)

    def _act(self, action: lc.Action) -> None:
        if action is lc.Action.START_WARMUP:
            self._spawn("warmup", self._warm_up())
        elif action is lc.Action.CANCEL_WARMUP:
            self._cancel("warmup")
        elif action is lc.Action.START_DRAIN:
            self._spawn("drain", self._drain())
        elif action is lc.Action.CANCEL_DRAIN:
            self._cancel("drain")
            self._drain_cut_short()
        elif action is lc.Action.FORWARD_SIGTERM:
            delivered = process.send(self.child, signal.SIGTERM, group=self.settings.signal_group)
            self._log.info("signal", signal="SIGTERM", forwarded=delivered)
            self._stopper.arm()

    def _spawn(self, name: str, coro: Any) -> None:
        if self._tg is not None:
            self._tasks[name] = self._tg.create_task(coro, name=name)

    def _cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    # --- tasks ------------------------------------------------------------------------

    async def _watch_health(self) -> None:
        """Poll upstream health for the whole life of the child."""
        interval = self.settings.health_interval
        timeout = min(5.0, max(1.0, 4 * interval))
        next_progress = time.monotonic() + PROGRESS_EVERY_S
        while True:
            ok, why = await self.upstream.health(self.settings.warmup.health_path, timeout=timeout)
            if not ok:
                self.counters.health_failures += 1
            self._apply(lc.HealthOk() if ok else lc.HealthFailed(why))
            now = time.monotonic()
            if self.life.phase is lc.Phase.LOADING:
                if now - self.started_mono > self.settings.startup_timeout:
                    self.exit_reason = "upstream_never_healthy"
                    self._log.error(
                        "startup_timeout", after_s=self.settings.startup_timeout, last=why
                    )
                    self._apply(lc.StartupTimedOut())
                elif now >= next_progress:
                    self._log.info(
                        "waiting",
                        phase="loading",
                        elapsed_s=round(now - self.started_mono, 1),
                        last=why,
                    )
                    next_progress = now + PROGRESS_EVERY_S
            await asyncio.sleep(interval)

    async def _warm_up(self) -> None:
        settings = self.settings.warmup
        began = time.monotonic()
        await self._measure_cache("healthy")
        self.progress = Progress(self.meter.observe)
        try:
            async with asyncio.timeout(settings.warmup_timeout):
                await self._run_worker(settings)
        except TimeoutError:
            self._warmup_done(False, f"--warmup-timeout {settings.warmup_timeout:g} s reached")
        except Exception as exc:  # any failure of the upstream ends in the documented outcome
            self._warmup_done(False, str(exc) or type(exc).__name__)
        else:
            self._warmup_done(True, "")
        finally:
            if self.requests is not None:  # every warm-up request has ended by now
                self.requests.forget(WARMUP_ID_MARK)
            self._summarise(time.monotonic() - began)
            await self._measure_cache("warm")

    async def _run_worker(self, settings: WarmupSettings) -> None:
        """The warm-up runs in a worker process (warmgate.worker); its events land here."""
        settings = dataclasses.replace(settings, upstream=self.upstream_url, api_key=self._api_key)
        worker = Worker.spawn()
        self._log.info("warmup_worker", pid=worker.pid)
        async with contextlib.aclosing(worker.run(settings)) as events:
            async for event in events:
                self.progress.handle(event)

    async def _measure_cache(self, when: str) -> None:
        """Size the compile cache off the event loop (a walk of a few GB takes a while)."""
        if self.cache is None:
            return
        from warmgate.cache import snapshot

        snap = await asyncio.to_thread(snapshot, self.cache.dirs)
        self.cache.record(when, snap)
        self.counters.cache_bytes = self.cache.sizes()
        engine = self.cache.engine.as_status()
        self._log.info(
            "cache", phase=when, bytes=snap.size_bytes, files=snap.file_count,
            hit=self.cache.hit, outcome=self.cache.outcome, new_files=self.cache.new_files,
            engine_loaded=engine["loaded"], engine_load_failures=engine["load_failures"],
        )  # fmt: skip

    def _summarise(self, seconds: float) -> None:
        results = self.progress.results
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        self._log.info("warmup_summary", ms=round(seconds * 1000), shapes=len(results), **counts)
        if results and sys.stderr.isatty():
            print(summary_table(results), file=sys.stderr, flush=True)

    def _warmup_done(self, ok: bool, detail: str) -> None:
        if not ok:
            self._log.error("warmup_failed", error=detail, policy=self.settings.on_warmup_failure)
            if self.settings.on_warmup_failure == "fail":
                self.exit_reason = "warmup_failed"
        self._apply(lc.WarmupFinished(ok, detail))

    async def _drain(self) -> None:
        """Wait for --drain-min and an idle upstream, at most until the drain deadline."""
        settings = self.settings
        began = time.monotonic()
        deadline, earliest = began + settings.drain_deadline, began + settings.drain_min
        zero_polls, warned = 0, False
        self.drain = {
            "started_at": self._wall(began),
            "deadline_s": settings.drain_deadline,
            "outcome": "draining",
        }
        self._log.info(
            "drain", phase="draining", deadline_s=settings.drain_deadline, min_s=settings.drain_min
        )
        while True:
            inflight = await self.upstream.inflight(settings.inflight_metrics)
            now = time.monotonic()
            self.counters.drain_inflight = inflight
            self.counters.drain_seconds = now - began
            self.drain.update(inflight=inflight, seconds=round(now - began, 2))
            self.drain.update(await asyncio.to_thread(self._in_flight_names))
            if inflight is None and not warned:
                warned = True
                self._log.warning(
                    "drain_no_metrics",
                    note="upstream has no in-flight gauges; waiting --drain-min only",
                )
            zero_polls = zero_polls + 1 if inflight == 0 else 0
            idle = inflight is None or zero_polls >= 2
            if idle and now >= earliest:
                # Without gauges nothing was checked: say so rather than "emptied".
                self._finish_drain("emptied" if inflight is not None else "no_metrics")
                return
            if now >= deadline:
                self._finish_drain("timed_out")
                return
            await asyncio.sleep(min(0.5, max(0.0, deadline - now)))

    def _drain_cut_short(self) -> None:
        """A second SIGTERM, or the child exiting on its own, ended the drain early."""
        if self.drain.get("outcome") != "draining":
            return
        outcome = "child_exited" if self.life.child_status is not None else "skipped"
        self.drain["seconds"] = round(self._wall(time.monotonic()) - self.drain["started_at"], 2)
        self._log.warning("drain_done", **self._drain_outcome(outcome))

    def _finish_drain(self, outcome: str) -> None:
        emit = self._log.info if outcome == "emptied" else self._log.warning
        emit("drain_done", **self._drain_outcome(outcome))
        self._apply(lc.DrainDone())

    def _drain_outcome(self, outcome: str) -> dict[str, Any]:
        """Record how the drain ended; the drain_done fields, naming what may still run."""
        self.drain["outcome"] = outcome
        fields: dict[str, Any] = {
            "outcome": outcome,
            "inflight": self.drain.get("inflight"),
            "seconds": self.drain.get("seconds"),
        }
        if outcome not in NAMED_OUTCOMES:  # nothing left running: the names are stale
            for key in NAME_KEYS:
                self.drain.pop(key, None)
            return fields
        fields.update((k, self.drain[k]) for k in NAME_KEYS if k in self.drain)
        if self.requests is None and servers.recognise(self.settings.command) in (
            servers.VLLM,
            servers.SIM,
        ):
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

    def _exit_code(self, status: int) -> int:
        code = process.exit_code(status)
        if self.exit_reason == "upstream_never_healthy":
            return int(Exit.UPSTREAM_NEVER_HEALTHY)
        if self.exit_reason == "warmup_failed":
            return int(Exit.WARMUP_FAILED)
        return code

    def exit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "phase": self.life.phase.value,
            "jit_misses_after_ready": self.jit.after_ready,
        }
        if self.drain:
            fields["drain"] = self.drain.get("outcome")
            fields["inflight"] = self.drain.get("inflight")
            fields.update((k, self.drain[k]) for k in NAME_KEYS if k in self.drain)
        return fields

    def _wall(self, mono: float) -> float:
        return round(self.started_wall + (mono - self.started_mono), 3)

    def _read_counters(self) -> Counters:
        c = self.counters
        c.phase = self.life.phase.value
        now = time.monotonic()
        spent: dict[str, float] = {}
        transitions = self.life.transitions
        for here, following in zip(transitions, [*transitions[1:], None], strict=True):
            end = following.at if following is not None else now
            spent[here.phase.value] = spent.get(here.phase.value, 0.0) + end - here.at
        c.phase_seconds = spent
        c.jit_misses = self.jit.after_ready
        return c
