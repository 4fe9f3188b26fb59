"""Worker mode (`warmgate run --leader URL`): tini's duties, plus probes that watch the group.

A worker pod's child (`ray start --block`, or vLLM's headless worker) serves no HTTP, so
there is nothing to warm. This shell polls the leader's read-only `/status` every
--health-interval, hands each reading and SIGTERM to `warmgate.group.Member` (the rules),
publishes the probe answers it gives, and forwards SIGTERM to the child only when it says
(the coordinated drain). The probe server is the warm-up mode's (`probe.ProbeThread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from warmgate import log, probe, process
from warmgate.config import RunSettings
from warmgate.group import (
    LeaderLost,
    LeaderReading,
    LeaderSeen,
    Member,
    Phase,
    Stop,
    read_status,
)
from warmgate.telemetry import Counters

if TYPE_CHECKING:
    import httpx
    from prometheus_client.core import Metric

POLL_TIMEOUT_S = 2.0  # the leader's probe thread answers in milliseconds, even mid-warm-up

Forward = Callable[[signal.Signals], None]


class Membership:
    """Worker mode's loop and executor, and the `ProbeView` the probe thread reads."""

    def __init__(self, settings: RunSettings, child: process.Child, forward: Forward) -> None:
        assert settings.leader is not None, "worker mode needs --leader"
        self.settings, self.child = settings, child
        self._forward = forward  # forward a signal to the child, log it, arm the stop timer
        self.leader_status = settings.leader.rstrip("/") + "/status"
        self.boot_id = uuid.uuid4().hex
        self.started_wall = time.time()
        self.group = Member(
            time.monotonic(),
            lost_after=settings.unhealthy_threshold,
            grace=settings.live_grace,
            hold_cap=settings.drain_deadline,
        )
        self._log = log.get()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._poll_now: asyncio.Event | None = None  # set: poll the leader without waiting
        self._metrics: Any = None  # the registry, built at the first scrape
        self.published: probe.ProbeSnapshot = self._snapshot()

    # --- what the probe thread reads --------------------------------------------------

    def publish(self) -> None:
        self.published = self._snapshot()

    def _snapshot(self) -> probe.ProbeSnapshot:
        now = time.monotonic()
        group = self.group
        status = {
            "mode": "worker",
            "boot_id": self.boot_id,
            "started_at": self.started_wall,
            "leader_url": self.settings.leader,
            **group.as_status(now),
            "child": {"pid": self.child.pid},
        }
        return probe.ProbeSnapshot(
            phase=group.phase.value,
            ready=group.ready_ok(),
            started=group.startup_ok(),
            live_until=group.live_until(),
            status=json.dumps(status, separators=(",", ":")).encode(),
            counters=Counters(),
        )

    def metrics(self) -> bytes:
        """Prometheus text: the worker's group phase and its probe answers."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._metrics is None:
            self._metrics = CollectorRegistry(auto_describe=True)
            self._metrics.register(_GroupCollector(lambda: self.published))
        return bytes(generate_latest(self._metrics))

    # --- the loop -----------------------------------------------------------------------

    @property
    def stop_asked(self) -> bool:
        """SIGTERM reached warmgate (held or forwarded): the run ends as `stopped`."""
        return self.group.sigterm_at is not None

    async def serve_until(self, exited: asyncio.Future[int], sock: socket.socket) -> int:
        """Serve probes and poll the leader until the child has exited; its wait status."""
        server = probe.ProbeThread(self, sock)
        server.start()
        self._log.info("listening", host=server.host, port=server.port, leader=self.settings.leader)
        try:
            async with asyncio.TaskGroup() as tg:
                poller = tg.create_task(self._poll_leader(), name="leader")
                status = await exited
                poller.cancel()
        finally:
            if self._hold_timer is not None:
                self._hold_timer.cancel()
            server.stop()
        return status

    async def _poll_leader(self) -> None:
        import httpx

        poll_now = self._poll_now = asyncio.Event()
        async with httpx.AsyncClient(
            timeout=POLL_TIMEOUT_S,
            trust_env=False,
            verify=self.leader_status.startswith("https://"),
        ) as client:
            while True:
                asked = time.monotonic()
                self.on_reading(await _read_leader(client, self.leader_status), asked)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.health_interval):
                        await poll_now.wait()
                poll_now.clear()

    def on_reading(self, reading: LeaderReading, asked: float) -> None:
        before, leader_before = self.group.phase, self.group.last_seen
        stop = self.group.on_reading(reading, time.monotonic(), asked)
        self.publish()  # before the logs and the stop: what they say, /status says already
        self._log_change(before, leader_before)
        if stop is not None:
            self._release(stop)

    def on_signal(self, sig: signal.Signals) -> None:
        """SIGTERM goes through the group's rules (it may be held); every other signal is
        forwarded at once, as in plain-init mode."""
        if sig != signal.SIGTERM:
            self._forward(sig)
            return
        now = time.monotonic()
        holding = self.group.sigterm_at is None
        stop = self.group.on_sigterm(now)
        self.publish()  # /ready is 503 before anything else happens
        if stop is not None:
            self._release(stop)
        elif holding:
            cap = self.group.hold_until
            assert cap is not None
            seen = self.group.last_seen
            self._log.info(
                "hold",
                signal=sig.name,
                cap_s=round(cap - now, 3),
                leader_phase=seen.phase if seen is not None else None,
                note="the child keeps running until the leader has drained",
            )
            self._hold_timer = asyncio.get_running_loop().call_later(
                max(0.0, cap - now), self._hold_ended
            )
            if self._poll_now is not None:
                self._poll_now.set()  # decide on a reading of the leader taken from now on

    def _hold_ended(self) -> None:
        # The event loop may run a timer up to its clock resolution early: a deadline the
        # group saw as not yet reached would leave the hold with no timer at all.
        cap = self.group.hold_until
        now = time.monotonic() if cap is None else max(time.monotonic(), cap)
        stop = self.group.on_deadline(now)
        if stop is not None:
            self.publish()
            self._release(stop)

    def _release(self, stop: Stop) -> None:
        """The hold is over: SIGTERM reaches the child (the stop timer arms with it)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        seen = self.group.last_seen
        emit = self._log.warning if stop.reason == "hold_timed_out" else self._log.info
        emit(
            "hold_done",
            reason=stop.reason,
            held_s=round(stop.held_s, 3),
            leader_phase=seen.phase if seen is not None else None,
        )
        self._forward(signal.SIGTERM)

    def _log_change(self, before: Phase, leader_before: LeaderSeen | None) -> None:
        group = self.group
        seen = group.last_seen
        if seen is not None and (leader_before is None or seen.phase != leader_before.phase):
            self._log.info("leader", phase=seen.phase, boot=seen.boot_id)
        after = group.phase
        if after is before or after in (Phase.HOLDING, Phase.STOPPING):
            return
        emit = self._log.warning if after is Phase.BROKEN else self._log.info
        emit(
            "group",
            phase=after.value,
            leader_phase=seen.phase if seen is not None else None,
            leader_boot=seen.boot_id if seen is not None else None,
            over=group.over,
            failing=group.lost_why,
        )

    def exit_fields(self) -> dict[str, Any]:
        stop = self.group.stop
        if stop is None:
            return {}
        return {"hold": stop.reason, "held_s": round(stop.held_s, 3)}


async def _read_leader(client: httpx.AsyncClient, url: str) -> LeaderReading:
    import httpx

    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        return LeaderLost(type(exc).__name__)
    return read_status(response.status_code, response.content)


class _GroupCollector:
    """Read on the probe thread: the published snapshot only, never the live state."""

    def __init__(self, read: Callable[[], probe.ProbeSnapshot]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self._read()
        phase = GaugeMetricFamily(
            "warmgate_group_phase", "1 for the worker's current group phase.", labels=["phase"]
        )
        for name in Phase:
            phase.add_metric([name.value], float(snap.phase == name.value))
        yield phase
        yield GaugeMetricFamily(
            "warmgate_ready", "1 while /ready answers 200.", value=float(snap.ready)
        )
        yield GaugeMetricFamily(
            "warmgate_live", "1 while /live answers 200.", value=float(snap.live())
        )
