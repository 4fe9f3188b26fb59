"""Readings for /status and /metrics: Prometheus registry, GPU (pynvml), process (psutil).

Each library is imported where it is first used: `warmgate run --cache-dir` reads the GPU
name before the child is spawned, and must not wait for prometheus_client to load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from warmgate.lifecycle import Phase

if TYPE_CHECKING:
    from prometheus_client.core import Metric

PHASES = tuple(phase.value for phase in Phase)


@dataclass(frozen=True, slots=True)
class Counters:
    """What the supervisor has counted, as of one snapshot; /metrics shows it at scrape time."""

    phase_seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    health_failures: int = 0
    jit_misses: int = 0
    drain_inflight: float | None = None
    drain_seconds: float = 0.0
    cache_bytes: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    quarantined: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    cold: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # budget cut
    adapters: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # by state


class Reading(Protocol):
    """The latest published state: its phase and its counters."""

    @property
    def phase(self) -> str: ...
    @property
    def counters(self) -> Counters: ...


class Metrics:
    """warmgate's own registry: a histogram fed by the warm-up, gauges read from a `Reading`.

    `read` is called from the probe thread at scrape time: it must only hand over an
    immutable reading, never compute one. Labels take bounded sets only (phase, feature,
    endpoint, moment), never a shape: /status names the shapes.
    """

    def __init__(self, read: Callable[[], Reading]) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        # The probe server's own counts (probe.ProbeThread.closed_connections): set once the
        # server runs; read, like `read`, on the probe thread, which owns that server.
        self.closed: Callable[[], Mapping[str, int]] = lambda: {}

        self.registry = CollectorRegistry(auto_describe=True)
        self.warmup_seconds = Histogram(
            "warmgate_warmup_request_seconds",
            "Latency of warm-up requests, by sampling feature and endpoint.",
            ["feature", "endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.registry.register(_StateCollector(read, lambda: self.closed()))

    def observe(self, feature: str, endpoint: str, seconds: float) -> None:
        self.warmup_seconds.labels(feature=feature, endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _StateCollector:
    def __init__(
        self, read: Callable[[], Reading], closed: Callable[[], Mapping[str, int]]
    ) -> None:
        self._read, self._closed = read, closed

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        reading = self._read()
        c, current = reading.counters, reading.phase
        phase = GaugeMetricFamily(
            "warmgate_phase", "1 for the current lifecycle phase.", labels=["phase"]
        )
        spent = GaugeMetricFamily(
            "warmgate_phase_seconds", "Seconds spent in each phase.", labels=["phase"]
        )
        for name in PHASES:
            phase.add_metric([name], 1.0 if current == name else 0.0)
            spent.add_metric([name], c.phase_seconds.get(name, 0.0))
        yield phase
        yield spent
        yield GaugeMetricFamily(
            "warmgate_ready", "1 while /ready answers 200.", value=float(current == Phase.READY)
        )
        yield CounterMetricFamily(
            "warmgate_health_failures",
            "Upstream health checks that failed.",
            value=c.health_failures,
        )
        yield CounterMetricFamily(
            "warmgate_jit_misses",
            "Engine JIT-compilation lines seen after Ready (shapes warm-up missed).",
            value=c.jit_misses,
        )
        yield GaugeMetricFamily(
            "warmgate_drain_seconds", "Seconds spent draining.", value=c.drain_seconds
        )
        if closed := self._closed():
            family = CounterMetricFamily(
                "warmgate_probe_connections_closed",
                "Probe-port connections closed by warmgate before a request: evicted at the "
                "cap, refused (every one busy), silent past the head deadline.",
                labels=["why"],
            )
            for why, count in sorted(closed.items()):
                family.add_metric([why], count)
            yield family
        if c.drain_inflight is not None:
            yield GaugeMetricFamily(
                "warmgate_drain_inflight",
                "Upstream requests in flight while draining.",
                value=c.drain_inflight,
            )
        if c.cache_bytes:
            cache = GaugeMetricFamily(
                "warmgate_cache_bytes", "Compile cache size.", labels=["when"]
            )
            for when, size in c.cache_bytes.items():
                cache.add_metric([when], float(size))
            yield cache
        yield _by_feature(
            "warmgate_quarantined_shapes",
            "Shapes left out of the warm-up because they killed the engine, or may.",
            c.quarantined,
        )
        yield _by_feature(
            "warmgate_cold_shapes", "Planned shapes the warm-up budget left cold.", c.cold
        )
        if c.adapters:
            adapters = GaugeMetricFamily(
                "warmgate_adapters",
                "LoRA adapters the upstream serves, by warm-up state (pending, warming, warm, "
                "failed).",
                labels=["state"],
            )
            for state, count in c.adapters.items():
                adapters.add_metric([state], float(count))
            yield adapters


def _by_feature(name: str, doc: str, counts: Mapping[str, int]) -> Metric:
    """A gauge of shapes counted by feature (prometheus_client loads with the first scrape)."""
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(name, doc, labels=["feature"])
    for feature, count in counts.items():
        family.add_metric([feature], float(count))
    return family


def process_tree_rss(pid: int) -> int | None:
    """Resident memory of `pid` and everything below it (vLLM's engine processes too)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


_nvml: Any = None  # the pynvml module once initialised, False when no NVIDIA GPU is usable


def gpus() -> list[Mapping[str, Any]] | None:
    """Name and memory of each NVIDIA GPU, or None when there is none (not an error)."""
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = pynvml
        except Exception:  # no driver, no library, no device: all mean "no GPU here"
            _nvml = False
    if _nvml is False:
        return None
    nvml = _nvml
    found: list[Mapping[str, Any]] = []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            found.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_used_bytes": int(memory.used),
                    "memory_total_bytes": int(memory.total),
                }
            )
    except Exception:  # a GPU that vanished mid-read reads as none
        return None
    return found
