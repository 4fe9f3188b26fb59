"""Learning the traffic profile after Ready: the engine's request log and its /metrics.

- `RequestShapes` reads vLLM's `--enable-log-requests` lines (`Received request <id>:
  params: SamplingParams(...), lora_request: ...`) as the pump threads pass them, and
  counts one `profile.Combo` per client request: the endpoint from the id's prefix
  (chatcmpl-/cmpl-), the features from the SamplingParams. warmgate's own requests
  (X-Request-Id `warmgate-...`, logged as `chatcmpl-warmgate-...`) are left out. The
  request line does not say whether the client streams; with `--enable-log-outputs`
  too, vLLM's closing line for a chat request does (`Generated response <id> (streaming
  delta|complete)` or not), so such a request is counted when it closes. Otherwise its
  streaming is unknown (None). Prompts (logged at DEBUG only) are never read.
- `read_metrics` takes what no log line carries from /metrics: the prompt-length and
  max_tokens histograms and the requests running, as marginals. `Learner` keeps the
  histograms' values at Ready, so that what the warm-up sent is not counted, samples the
  running requests every few seconds, and writes this pod's profile every
  `--profile-interval` seconds and once more when the drain starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from warmgate import log, profile
from warmgate.childlog import LineScanner
from warmgate.profile import Combo, Profile
from warmgate.profilestore import ProfileStore
from warmgate.upstream import Upstream

SAMPLE_EVERY_S = 5.0  # the running-requests gauge, read this often after Ready
METRICS_TIMEOUT_S = 5.0
MAX_PENDING = 10_000  # requests awaiting their closing line; more are counted at once
PROMPT_TOKENS = "vllm:request_prompt_tokens"
MAX_TOKENS = "vllm:request_params_max_tokens"
RUNNING = "vllm:num_requests_running"

# "... [request_logger.py:65] Received request chatcmpl-abc: params: SamplingParams(...)"
_RECEIVED = re.compile(r"Received request (\S+): params: ")
_GENERATED = re.compile(r"Generated response (\S+?)( \(streaming (?:complete|delta)\))?: ")
_ENDED = re.compile(r"Request (\S+) (?:aborted\.|failed\b)")


class RequestShapes(LineScanner):
    """Counts the combinations of the client requests the engine logs, once `learning`."""

    kept_bytes = 64 * 1024  # long stop lists push logprobs far into the line

    def __init__(self, outputs_logged: bool) -> None:
        super().__init__()
        self.outputs_logged = outputs_logged  # closing lines tell a chat request's streaming
        self.learning = False  # set by the event loop at Ready; a plain bool is safe
        self.own = 0  # warmgate's own requests seen (left out)
        self.seen = 0  # client requests counted since start (written or not yet)
        self._counts: dict[Combo, int] = {}
        self._pending: dict[str, tuple[str, dict[str, str]]] = {}

    def scan(self, lines: list[bytes]) -> None:
        for raw in lines:
            if b"Received request" in raw:
                self._received(raw.decode("utf-8", "replace"))
            elif self._pending and (b"Generated response" in raw or b"Request " in raw):
                self._closed(raw.decode("utf-8", "replace"))

    def take(self) -> dict[Combo, int]:
        """The counts since the last call (the event loop adds them to the pod's profile)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            return counts

    def _received(self, line: str) -> None:
        found = _RECEIVED.search(line)
        if found is None or not self.learning:
            return
        request_id = found.group(1)
        endpoint = profile.endpoint_of(request_id)
        if endpoint is None:
            return
        if profile.is_warmgate_request(request_id):
            self.own += 1
            return
        params = profile.parse_sampling_params(line[found.end() :])
        if params is None:
            return
        waits = self.outputs_logged and endpoint == "chat" and len(self._pending) < MAX_PENDING
        if waits:
            self._pending[request_id] = (endpoint, params)
        else:
            self._count(profile.combo_from_params(endpoint, params, None))

    def _closed(self, line: str) -> None:
        if (generated := _GENERATED.search(line)) is not None:
            request_id, stream = generated.group(1), generated.group(2) is not None
        elif (ended := _ENDED.search(line)) is not None:
            request_id, stream = ended.group(1), None  # aborted before it said
        else:
            return
        if (waiting := self._pending.pop(request_id, None)) is not None:
            self._count(profile.combo_from_params(waiting[0], waiting[1], stream))

    def _count(self, combo: Combo) -> None:
        self._counts[combo] = self._counts.get(combo, 0) + 1
        self.seen += 1


@dataclass(frozen=True)
class MetricsReading:
    """The histograms' cumulative `le` buckets (summed over label sets) and the gauge."""

    prompt_tokens: dict[float, float] = field(default_factory=dict)
    max_tokens: dict[float, float] = field(default_factory=dict)
    running: float | None = None


def parse_metrics(text: str) -> MetricsReading | None:
    """The profile's metrics from a /metrics page; None when it is not one."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[str, dict[float, float]] = {PROMPT_TOKENS: {}, MAX_TOKENS: {}}
    running: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == RUNNING:
                    running = (running or 0.0) + sample.value
                elif sample.name.endswith("_bucket") and sample.name[:-7] in buckets:
                    le = float(sample.labels["le"])
                    into = buckets[sample.name[:-7]]
                    into[le] = into.get(le, 0.0) + sample.value
    except (ValueError, KeyError):
        return None
    return MetricsReading(buckets[PROMPT_TOKENS], buckets[MAX_TOKENS], running)


async def read_metrics(upstream: Upstream) -> MetricsReading | None:
    page = await upstream.metrics_page(METRICS_TIMEOUT_S)
    return parse_metrics(page) if page is not None else None


class Learner:
    """This pod's profile: counts from the log and /metrics after Ready, written on a
    volume every `interval` seconds and at the drain. The event loop owns it."""

    def __init__(self, store: ProfileStore, outputs_logged: bool, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.requests = RequestShapes(outputs_logged)
        self.loaded: Profile | None = None  # every pod's files, merged, read at start
        self.load_warnings: list[str] = []
        self.mine = Profile(store.key, pods=(store.pod,))
        self._base: Profile | None = None  # this pod's file from an earlier container
        self._at_ready: MetricsReading | None = None
        # The histograms' growth during warmgate's own warm-ups after Ready (a re-warm, an
        # adapter's), per bucket range: left out of the profile, as the start-up's is.
        self._own: dict[str, dict[tuple[float, float], float]] = {}
        self._own_running = 0  # own warm-ups running now: no concurrency sample meanwhile
        self.written_at: float | None = None  # wall time of the last write
        self.write_warning: str | None = None
        self._log = log.get()

    def load(self) -> None:
        """Read every pod's profile of this key, and this pod's own (off the event loop)."""
        self.loaded, self.load_warnings = self.store.read_all()
        own, warning = self.store.read_own()
        if warning is not None:
            self.load_warnings.append(warning)
        if own is not None:
            self._base = own
            self.mine = profile.merge([own], self.store.key)
            self.mine.pods = (self.store.pod,)

    async def learn(self, upstream: Upstream) -> None:
        """From Ready on: the baseline, then samples and writes until cancelled."""
        self._at_ready = await read_metrics(upstream)
        self.requests.learning = True
        next_write = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(min(SAMPLE_EVERY_S, self.interval))
            reading = await read_metrics(upstream)
            self._sample(reading)
            if time.monotonic() >= next_write:
                next_write = time.monotonic() + self.interval
                await self._write(reading)

    async def save(self, upstream: Upstream) -> None:
        """The last write, when the drain starts: the counts so far."""
        if not self.requests.learning:
            return  # never Ready: nothing learned
        reading = await read_metrics(upstream)
        await self._write(reading)

    @contextlib.asynccontextmanager
    async def own_traffic(self, upstream: Upstream) -> AsyncIterator[None]:
        """Around a warm-up of warmgate's own after Ready: what the histograms gain
        meanwhile is not the clients'. (Clients' requests in that window are lost to the
        lengths; their features still count, from the log.)"""
        if not self.requests.learning:
            yield
            return
        self._own_running += 1
        before = await read_metrics(upstream)
        try:
            yield
        finally:
            after = await read_metrics(upstream)
            self._own_running -= 1
            if before is not None and after is not None:
                for name in ("prompt_tokens", "max_tokens"):
                    gained = profile.bucket_counts(getattr(after, name), getattr(before, name))
                    own = self._own.setdefault(name, {})
                    for bucket, n in gained.items():
                        own[bucket] = own.get(bucket, 0.0) + n

    def _sample(self, reading: MetricsReading | None) -> None:
        running = reading.running if reading is not None else None
        if running is not None and running >= 1 and not self._own_running:
            level = profile.octave(round(running))
            self.mine.concurrency[level] = self.mine.concurrency.get(level, 0) + 1

    async def _write(self, reading: MetricsReading | None) -> None:
        now = time.time()
        for combo, n in self.requests.take().items():
            self.mine.count(combo, now, n)
        if reading is not None:
            self._marginals(reading)
        self.mine.updated = now
        warning = await asyncio.to_thread(self.store.write, self.mine)
        self.written_at = now if warning is None else self.written_at
        if warning is not None and warning != self.write_warning:
            self._log.warning("profile", note=warning)
        self.write_warning = warning
        if warning is None:
            self._log.info(
                "profile",
                path=str(self.store.own),
                requests=self.mine.requests,
                combinations=len(self.mine.combos),
                own_left_out=self.requests.own,
            )

    def _marginals(self, reading: MetricsReading) -> None:
        """This pod's earlier marginals plus the histograms' growth since Ready."""
        then = self._at_ready
        base = self._base
        for name in ("prompt_tokens", "max_tokens"):
            since = profile.bucket_counts(
                getattr(reading, name), getattr(then, name) if then is not None else None
            )
            own = self._own.get(name, {})
            delta = profile.octaves_of(
                {b: n - own.get(b, 0.0) for b, n in since.items() if n > own.get(b, 0.0)}
            )
            merged = dict(getattr(base, name)) if base is not None else {}
            for k, v in delta.items():
                merged[k] = round(merged.get(k, 0.0) + v, 3)
            setattr(self.mine, name, merged)

    def status(self, now: float) -> dict[str, Any]:
        """/status's `profile`: what the start found, and what this pod has learned."""
        return {
            "key": self.store.key,
            "path": str(self.store.own),
            "loaded": self.loaded.summary(now) if self.loaded is not None else None,
            "learning": self.requests.learning,
            "learned": {
                "requests": self.mine.requests,  # as last written, earlier containers' too
                "seen": self.requests.seen,  # counted by this container, written or not
                "combinations": len(self.mine.combos),
                "lengths_known": bool(self.mine.prompt_tokens),
                "written_s_ago": round(now - self.written_at, 1)
                if self.written_at is not None
                else None,
            },
            "warnings": [*self.load_warnings, *filter(None, [self.write_warning])],
        }


def logs_requests(argv: tuple[str, ...]) -> bool:
    """Whether the last of vLLM's --enable-log-requests / --no-enable-log-requests is on."""
    on = False
    for word in argv:
        if word == "--enable-log-requests":
            on = True
        elif word == "--no-enable-log-requests":
            on = False
    return on
