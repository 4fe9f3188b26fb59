"""Kubelet probe replay (issue 7): what the kubelet would see of a cold pod, probe by probe.

    .venv/bin/python scripts/kubelet_replay.py [--time-scale 0.05] [--command CMD] [--timeline]

It reads the probes the manifest configures (by default the Deployment of the gpu overlay,
docker/kubernetes/overlays/gpu, as `kubectl kustomize` renders it; --manifest takes another
kustomization directory or a YAML file: startupProbe, readinessProbe, livenessProbe with
initialDelaySeconds, periodSeconds, timeoutSeconds, failureThreshold, successThreshold and
httpGet path/port, or tcpSocket) and replays them with
the kubelet's rules against a fresh local start of each row's pod (the benchmark core starts
it: fresh process, fresh compile cache; `warmgate sim` unless --command names a server such as
`bash scripts/real_vllm.sh | tail -1`). Rows (--rows):

  container-start  no probe: Ready the moment the container starts; the first request races
                   the model load
  health           readinessProbe on the server's /health, no warm-up
  warmup.sh        the reference script runs from container start (wait for /health, then
                   three chat requests); the readinessProbe is an exec probe that passes once
                   it has finished and /health answers 200
  warmgate         `warmgate run -- <server>` with the manifest's three probes on its port
  naive-liveness   the failure mode the other way round: readiness and liveness on /health,
                   no startupProbe and no initialDelaySeconds, so a slow load gets the pod
                   restarted; /health probes use the manifest's readiness/liveness timings

At the moment the pod turns Ready it sends one held-out request (--request, default the first
one with logprobs) straight to the server, as the Service would, and records its latency, its
error if any, and over the simulator its own cost report and the kernel keys it compiled.
Probing goes on for --after-ready seconds after Ready, so a liveness probe has time to act.

Kubelet rules replayed (pkg/kubelet/prober):
- every probe ticks every periodSeconds from the container's start and does nothing before
  initialDelaySeconds; a probe slower than its period makes the ticker skip ticks;
- readiness and liveness probe only once the startup probe has succeeded (at once without
  one), and the startup probe stops then; the success also triggers a readiness probe at once,
  as the kubelet's pod status update does;
- an attempt fails on a status outside 200-399, a connection error or timeoutSeconds; a result
  counts once it repeats failureThreshold (successThreshold) times in a row;
- the pod is Ready while started and its readiness result is success (initially failure);
- failureThreshold failures in a row of the startup or liveness probe restart the container,
  and so does the container exiting.
Restarts are recorded as "would restart at t=...", not carried out. --on-restart continue (the
default) keeps the same container and counts on: the row still shows how long the load took
and what the first request met, marked with a dagger, though a real pod would have been killed
(and, with a load longer than the probes allow, crash-loop forever). --on-restart stop ends the
row at the first restart. Not replayed: the kubelet's start-up jitter, exec/grpc manifest probes.

--time-scale multiplies every delay, period and timeout (0.05 replays the manifest 20x faster,
for CI); timeouts and periods are floored at --min-timeout-ms (50), above a loopback round trip.
Over the simulator the pod's clock runs at the same scale: the simulator's --load-seconds is
--load-seconds (manifest seconds) times the scale, and its --time-scale is the scale
(--sim-args may override both). Times in the report are real seconds since the container's
start; the simulator's cost report is in unscaled simulated milliseconds. A --command server
runs at its own pace (--load-seconds does not apply): keep --time-scale 1 for it, or the probes
give it less time than the manifest does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import shlex
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import manifests  # scripts/manifests.py: renders the Kustomize overlays

from warmgate.bench import HeldoutRequest, core, load_heldout

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = manifests.overlay("gpu")
KINDS = ("startup", "readiness", "liveness")
ROWS = ("container-start", "health", "warmup.sh", "warmgate", "naive-liveness")
KUBE_PROBE_HEADERS = {"User-Agent": "kube-probe/1.32", "Accept": "*/*", "Connection": "close"}
WARMGATE_PORT = 8080  # warmgate's --port default
VLLM_PORT = 8000  # vllm serve's --port default

# --- the manifest: probe specs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpGet:
    path: str
    port: int | str  # a number or a container port's name
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class TcpSocket:
    port: int | str


@dataclass(frozen=True, slots=True)
class Exec:
    """An exec probe; the replay runs the check it stands for itself."""

    command: str


Action = HttpGet | TcpSocket | Exec


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """One probe, with the Kubernetes defaults for whatever the manifest leaves out."""

    action: Action
    initial_delay_s: float = 0.0
    period_s: float = 10.0
    timeout_s: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1

    def scaled(self, scale: float, floor_s: float) -> ProbeSpec:
        return dataclasses.replace(
            self,
            initial_delay_s=self.initial_delay_s * scale,
            period_s=max(self.period_s * scale, floor_s),
            timeout_s=max(self.timeout_s * scale, floor_s),
        )

    def describe(self) -> str:
        a = self.action
        target = (
            f"GET {a.path} :{a.port}"
            if isinstance(a, HttpGet)
            else f"tcp :{a.port}"
            if isinstance(a, TcpSocket)
            else f"exec {a.command!r}"
        )
        return (
            f"{target} delay {self.initial_delay_s:g}s period {self.period_s:g}s "
            f"timeout {self.timeout_s:g}s failure {self.failure_threshold} "
            f"success {self.success_threshold}"
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    probes: Mapping[str, ProbeSpec]  # by kind: startup, readiness, liveness
    port_names: Mapping[str, int]  # containerPort by name
    warmgate_port: int  # container port of warmgate's probe server
    api_port: int  # container port of the server's API

    def container_port(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        if port.isdigit():
            return int(port)
        if port not in self.port_names:
            raise ValueError(
                f"probe port {port!r} names no containerPort (have: {sorted(self.port_names)})"
            )
        return self.port_names[port]


def load_manifest(path: Path = MANIFEST, container: str | None = None) -> Manifest:
    """The probes and ports of one container of the Deployment (or Pod, StatefulSet,
    LeaderWorkerSet...) in `path`, a kustomization directory (rendered) or a YAML file: the
    container named `container`, else the first that has a probe."""
    try:
        docs = manifests.documents(path)
    except manifests.RenderError as exc:
        raise ValueError(f"--manifest {exc}") from None
    containers: list[dict[str, Any]] = []
    for doc in docs:
        for pod in _pod_specs(doc):
            containers += [c for c in pod.get("containers") or [] if isinstance(c, dict)]
    chosen = [
        c
        for c in containers
        if (c.get("name") == container if container else any(f"{k}Probe" in c for k in KINDS))
    ]
    if not chosen:
        what = f"a container named {container!r}" if container else "a container with probes"
        raise ValueError(f"--manifest {path}: no {what}")
    c = chosen[0]
    port_names = {
        str(p["name"]): int(p["containerPort"])
        for p in c.get("ports") or []
        if isinstance(p, dict) and "name" in p
    }
    env = {
        str(e.get("name")): str(e.get("value")) for e in c.get("env") or [] if isinstance(e, dict)
    }
    warmgate_port = port_names.get("warmgate") or int(env.get("WARMGATE_PORT", WARMGATE_PORT))
    api_port = port_names.get("http") or _flag_port(c.get("args") or []) or VLLM_PORT
    probes = {k: _probe(path, k, c[f"{k}Probe"]) for k in KINDS if c.get(f"{k}Probe")}
    return Manifest(probes, port_names, warmgate_port, api_port)


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs of one object: a Pod's own, a workload's template, or a
    LeaderWorkerSet's leader and worker templates (leader first)."""
    spec = doc.get("spec") or {}
    group = spec.get("leaderWorkerTemplate") or {}
    templates = [spec.get("template"), group.get("leaderTemplate"), group.get("workerTemplate")]
    pods = [t["spec"] for t in templates if isinstance(t, dict) and isinstance(t.get("spec"), dict)]
    return pods or [spec]


def _flag_port(args: Sequence[Any]) -> int | None:
    words = [str(a) for a in args]
    for i, word in enumerate(words[:-1]):
        if word == "--port" and words[i + 1].isdigit():
            return int(words[i + 1])
    return None


def _probe(path: Path, kind: str, raw: dict[str, Any]) -> ProbeSpec:
    where = f"--manifest {path}: {kind}Probe"
    action: Action
    if "httpGet" in raw:
        get = raw["httpGet"]
        if str(get.get("scheme", "HTTP")).upper() != "HTTP":
            raise ValueError(f"{where}: only scheme HTTP is replayed")
        headers = tuple((str(h["name"]), str(h["value"])) for h in get.get("httpHeaders") or [])
        action = HttpGet(str(get.get("path", "/")), get["port"], headers)
    elif "tcpSocket" in raw:
        action = TcpSocket(raw["tcpSocket"]["port"])
    else:
        raise ValueError(f"{where}: only httpGet and tcpSocket probes are replayed")
    spec = ProbeSpec(
        action,
        initial_delay_s=float(raw.get("initialDelaySeconds", 0)),
        period_s=float(raw.get("periodSeconds", 10)),
        timeout_s=float(raw.get("timeoutSeconds", 1)),
        failure_threshold=int(raw.get("failureThreshold", 3)),
        success_threshold=int(raw.get("successThreshold", 1)),
    )
    if kind != "readiness" and spec.success_threshold != 1:
        raise ValueError(f"{where}: successThreshold must be 1 (Kubernetes rejects anything else)")
    if (
        spec.period_s <= 0
        or spec.timeout_s <= 0
        or spec.failure_threshold < 1
        or spec.success_threshold < 1
    ):
        raise ValueError(f"{where}: periods, timeouts and thresholds must be positive")
    return spec


# --- the kubelet's rules: pure, no I/O, no clock -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    t: float  # seconds since the container's start
    probe: str  # startup, readiness, liveness, container or request
    what: str  # started, ready, not-ready, restart, sent, answered
    detail: str = ""


class Kubelet:
    """The kubelet's probe decisions for one container, fed one probe result at a time."""

    def __init__(self, probes: Mapping[str, ProbeSpec]) -> None:
        self.probes = dict(probes)
        self.started = False
        self.ready = False
        self.readiness_ok = False
        self.attempts = dict.fromkeys(self.probes, 0)
        self.failures = dict.fromkeys(self.probes, 0)
        self.reasons: dict[str, Counter[str]] = {k: Counter() for k in self.probes}  # failures
        self.restarts: list[Event] = []
        self._last: dict[str, bool | None] = dict.fromkeys(self.probes)
        self._run = dict.fromkeys(self.probes, 0)

    def start(self, t: float) -> list[Event]:
        """The container is running: without a startup probe it counts as started, without a
        readiness probe as ready once started."""
        events = []
        if "startup" not in self.probes:
            self.started = True
            events.append(Event(t, "startup", "started", "no startupProbe"))
        self.readiness_ok = "readiness" not in self.probes
        return events + self._set_ready(t, "no readinessProbe")

    def should_probe(self, kind: str, t: float) -> bool:
        if t < self.probes[kind].initial_delay_s:
            return False
        return not self.started if kind == "startup" else self.started

    def observe(self, kind: str, ok: bool, t: float, detail: str = "") -> list[Event]:
        spec = self.probes[kind]
        self.attempts[kind] += 1
        self.failures[kind] += not ok
        if not ok:
            self.reasons[kind][detail] += 1
        if self._last[kind] == ok:
            self._run[kind] += 1
        else:
            self._last[kind], self._run[kind] = ok, 1
        if self._run[kind] < (spec.success_threshold if ok else spec.failure_threshold):
            return []
        if kind == "readiness":
            self.readiness_ok = ok
            return self._set_ready(t, detail)
        if not ok:  # startup or liveness: kill and restart; probing resumes on the new container
            self._run[kind] = 0
            return self.restart(
                t, kind, f"{spec.failure_threshold} failures in a row, last: {detail}"
            )
        if kind == "startup" and not self.started:
            self.started = True
            return [Event(t, "startup", "started", detail), *self._set_ready(t, detail)]
        return []

    def restart(self, t: float, cause: str, detail: str) -> list[Event]:
        event = Event(t, cause, "restart", detail)
        self.restarts.append(event)
        return [event]

    def _set_ready(self, t: float, detail: str) -> list[Event]:
        ready = self.started and self.readiness_ok
        if ready == self.ready:
            return []
        self.ready = ready
        return [Event(t, "readiness", "ready" if ready else "not-ready", detail)]


# --- the rows -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    label: str
    probes: Mapping[str, ProbeSpec]
    under_warmgate: bool = False
    warmup_sh: bool = False  # the reference warmup.sh runs from the container's start


def rows(manifest: Manifest) -> dict[str, Row]:
    """The comparison's rows, all with the manifest's probe timings; only targets differ."""
    readiness = manifest.probes.get(
        "readiness", ProbeSpec(HttpGet("/ready", manifest.warmgate_port))
    )
    liveness = manifest.probes.get("liveness", ProbeSpec(HttpGet("/live", manifest.warmgate_port)))
    health = HttpGet("/health", manifest.api_port)
    on_health = dataclasses.replace(readiness, action=health)
    return {
        "container-start": Row("container-start", "container start, no probe", {}),
        "health": Row("health", "/health readinessProbe", {"readiness": on_health}),
        "warmup.sh": Row(
            "warmup.sh",
            "warmup.sh, exec readinessProbe",
            {
                "readiness": dataclasses.replace(
                    readiness, action=Exec("warmup.sh done && curl -f /health")
                )
            },
            warmup_sh=True,
        ),
        "warmgate": Row(
            "warmgate", "warmgate, manifest probes", manifest.probes, under_warmgate=True
        ),
        "naive-liveness": Row(
            "naive-liveness",
            "/health liveness, no startupProbe",
            {
                "readiness": on_health,
                "liveness": dataclasses.replace(liveness, action=health, initial_delay_s=0.0),
            },
        ),
    }


def check_ports(row: Row, manifest: Manifest) -> None:
    """Every probe of the row targets a port its pod has: the server's, or warmgate's."""
    have = {manifest.api_port: "the server's"}
    if row.under_warmgate:
        have[manifest.warmgate_port] = "warmgate's"
    for kind, spec in row.probes.items():
        if isinstance(spec.action, Exec):
            continue
        if manifest.container_port(spec.action.port) not in have:
            ports = " and ".join(f"{name} {port}" for port, name in have.items())
            raise ValueError(
                f"{kind}Probe port {spec.action.port!r}: the {row.key} pod has only {ports}"
            )


# --- the replay: one row's pod, its probes and its first request ---------------------------------


@dataclass(slots=True)
class Options:
    upstream: core.ServerRecipe
    request: HeldoutRequest
    model: str  # used only when /v1/models does not answer
    time_scale: float = 1.0
    min_timeout_s: float = 0.05
    after_ready_s: float = 30.0  # manifest seconds
    deadline_s: float = 2400.0  # manifest seconds
    on_restart: Literal["continue", "stop"] = "continue"
    warmgate_args: Sequence[str] = ()
    log_dir: Path | None = None


@dataclass(slots=True)
class RowResult:
    key: str
    label: str
    probes: dict[str, str] = field(default_factory=dict)  # kind: scaled spec
    ready_at_s: float | None = None
    attempts: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    failure_reasons: dict[str, dict[str, int]] = field(default_factory=dict)
    restarts: list[Event] = field(default_factory=list)
    first: core.Measured | None = None
    first_sent_at_s: float | None = None
    events: list[Event] = field(default_factory=list)
    error: str | None = None

    @property
    def restarted_before_ready(self) -> bool:
        return bool(self.restarts) and (
            self.ready_at_s is None or self.restarts[0].t <= self.ready_at_s
        )

    @property
    def first_ok(self) -> bool:
        return self.first is not None and self.first.error is None


Check = Callable[[ProbeSpec], Awaitable[tuple[bool, str]]]


class Replay:
    """One row: start its pod, run one task per probe as the kubelet's workers do, send the
    first request at Ready, stop after --after-ready (or the deadline, or a restart under
    --on-restart stop, or the container exiting)."""

    pod: core.Started
    tg: asyncio.TaskGroup
    probe_client: httpx.AsyncClient
    api: httpx.AsyncClient

    def __init__(self, row: Row, manifest: Manifest, options: Options) -> None:
        self.row, self.manifest, self.o = row, manifest, options
        self.probes = {
            k: s.scaled(options.time_scale, options.min_timeout_s) for k, s in row.probes.items()
        }
        self.kubelet = Kubelet(self.probes)
        self.result = RowResult(
            row.key, row.label, {k: s.describe() for k, s in self.probes.items()}
        )
        self.finished = asyncio.Event()
        self.triggers = {k: asyncio.Event() for k in self.probes}
        self.warmed = asyncio.Event()  # warmup.sh has finished
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> RowResult:
        log = self.o.log_dir / f"{self.row.key}.log" if self.o.log_dir else None
        with core.started(
            self.o.upstream,
            under_warmgate=self.row.under_warmgate,
            warmgate_args=self.o.warmgate_args,
            log_path=log,
        ) as pod:
            self.pod = pod
            # The kubelet opens a connection per probe.
            limits = httpx.Limits(max_keepalive_connections=0)
            async with (
                httpx.AsyncClient(
                    trust_env=False, limits=limits, headers=KUBE_PROBE_HEADERS,
                    follow_redirects=True, max_redirects=10,
                ) as self.probe_client,
                httpx.AsyncClient(timeout=600.0, trust_env=False) as self.api,
            ):  # fmt: skip
                await self._supervise()
        r = self.result
        r.attempts, r.failures = dict(self.kubelet.attempts), dict(self.kubelet.failures)
        r.failure_reasons = {k: dict(c) for k, c in self.kubelet.reasons.items()}
        r.restarts = list(self.kubelet.restarts)
        r.events.sort(key=lambda e: e.t)
        return r

    def now(self) -> float:
        return time.monotonic() - self.pod.began

    async def _supervise(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            self._spawn(self._watch_exit())
            if self.row.warmup_sh:
                self._spawn(self._warmup_sh())
            self._emit(self.kubelet.start(0.0))
            for kind, spec in self.probes.items():
                self._spawn(self._worker(kind, spec, self._check_for(spec)))
            deadline = self.o.deadline_s * self.o.time_scale
            try:
                async with asyncio.timeout(deadline):
                    await self.finished.wait()
            except TimeoutError:
                if self.result.ready_at_s is None:
                    self.result.error = f"not Ready within --deadline ({deadline:.1f} s)"
                elif self.result.first is None:
                    self.result.error = "the first request did not finish within --deadline"
            for task in self._tasks:
                task.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(self.tg.create_task(coro))

    def _emit(self, events: Sequence[Event]) -> None:
        for event in events:
            self.result.events.append(event)
            if event.what == "started" and "readiness" in self.triggers:
                self.triggers["readiness"].set()  # the pod status update probes readiness at once
            elif event.what == "ready" and self.result.ready_at_s is None:
                self.result.ready_at_s = event.t
                self._spawn(self._first_request())
            elif event.what == "restart" and self.o.on_restart == "stop":
                self.finished.set()

    async def _worker(self, kind: str, spec: ProbeSpec, check: Check) -> None:
        tick = 0
        trigger = self.triggers[kind]
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, tick * spec.period_s - self.now())):
                    await trigger.wait()
            trigger.clear()
            if self.kubelet.should_probe(kind, self.now()):
                ok, detail = await check(spec)
                self._emit(self.kubelet.observe(kind, ok, self.now(), detail))
            tick = math.floor(self.now() / spec.period_s) + 1  # ticks missed meanwhile are dropped

    def _check_for(self, spec: ProbeSpec) -> Check:
        action = spec.action
        if isinstance(action, Exec):
            return self._exec_warmup_sh
        port = self._local_port(action.port)
        if isinstance(action, TcpSocket):
            return lambda s: _tcp(port, s.timeout_s)
        url = f"http://127.0.0.1:{port}{action.path}"
        return lambda s: _http(self.probe_client, url, s.timeout_s, dict(action.headers))

    def _local_port(self, port: int | str) -> int:
        """Where a container port of the manifest listens here (`check_ports` vetted it)."""
        if self.manifest.container_port(port) == self.manifest.api_port:
            return self.pod.port
        assert self.pod.probe_port is not None
        return self.pod.probe_port

    async def _exec_warmup_sh(self, spec: ProbeSpec) -> tuple[bool, str]:
        if not self.warmed.is_set():
            return False, "warmup.sh not finished"
        url = f"{self.pod.base}/health"
        return await _http(self.probe_client, url, spec.timeout_s, {})

    async def _warmup_sh(self) -> None:
        await core.warmup_sh(self.api, self.pod.base, poll_s=max(self.o.time_scale, 0.05))
        self.result.events.append(Event(self.now(), "container", "warmup.sh done"))
        self.warmed.set()

    async def _first_request(self) -> None:
        sent = self.now()
        self.result.first_sent_at_s = sent
        self.result.events.append(Event(sent, "request", "sent", self.o.request.name))
        measured = await core.send_first(
            self.api, self.pod.base, self.o.request, model=self.o.model
        )
        self.result.first = measured
        answer = _short(measured.error) if measured.error else "ok"
        self.result.events.append(Event(self.now(), "request", "answered", answer))
        await asyncio.sleep(max(0.0, sent + self.o.after_ready_s * self.o.time_scale - self.now()))
        self.finished.set()

    async def _watch_exit(self) -> None:
        while self.pod.proc.poll() is None:
            await asyncio.sleep(0.05)
        self._emit(
            self.kubelet.restart(self.now(), "container", f"exited with {self.pod.proc.returncode}")
        )
        self.finished.set()  # nothing left to probe


async def _http(
    client: httpx.AsyncClient, url: str, timeout: float, headers: dict[str, str]
) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(timeout):
            reply = await client.get(url, headers=headers)
    except TimeoutError:
        return False, f"timeout after {timeout * 1000:.0f} ms"
    except httpx.HTTPError as exc:
        return False, _connect_error(exc)
    return 200 <= reply.status_code < 400, f"HTTP {reply.status_code}"


async def _tcp(port: int, timeout: float) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except TimeoutError:
        return False, f"timeout after {timeout * 1000:.0f} ms"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    writer.close()
    return True, "connected"


def _connect_error(exc: Exception) -> str:
    return _short(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _short(error: str) -> str:
    """httpx's ConnectError on loopback ("All connection attempts failed") is a refusal."""
    return "connection refused" if error.startswith("ConnectError") else error


async def replay(row: Row, manifest: Manifest, options: Options) -> RowResult:
    return await Replay(row, manifest, options).run()


# --- the report -----------------------------------------------------------------------------------


def table(results: Sequence[RowResult]) -> str:
    lines = [
        "| pod | Ready at s | probe failures (startup / readiness / liveness) | restarts | "
        "first request | its latency ms | sim cost ms (ratio) | keys it compiled |",
        "|---|---:|---|---|---|---:|---:|---|",
    ]
    for r in results:
        dagger = " †" if r.restarted_before_ready else ""
        ready = "never" if r.ready_at_s is None else f"{r.ready_at_s:.2f}{dagger}"
        fails = " / ".join(
            f"{r.failures[k]} of {r.attempts[k]}" if k in r.attempts else "-" for k in KINDS
        )
        restarts = (
            f"{len(r.restarts)} (first at {r.restarts[0].t:.2f} s, {r.restarts[0].probe})"
            if r.restarts
            else "0"
        )
        m = r.first
        if m is None:
            first, latency, cost, keys = (r.error or "not sent"), "-", "-", "-"
        else:
            first = "ok" if m.error is None else f"failed: {_short(m.error)[:60]}"
            latency = "-" if m.first_ms is None else f"{m.first_ms:.0f}"
            cost = "-"
            if m.first_cost_ms is not None:
                ratio = m.cost_ratio
                cost = f"{m.first_cost_ms:.0f}" + (f" (x{ratio:.2f})" if ratio else "")
            keys = "-" if m.error else _keys(m.compiled_after_ready)
        lines.append(
            f"| {r.label} | {ready} | {fails} | {restarts} | {first} | {latency} | {cost} | {keys} |"
        )
    return "\n".join(lines)


def _keys(keys: Sequence[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:4])
    return f"{len(keys)}: {shown}" + (", ..." if len(keys) > 4 else "")


def timeline(result: RowResult) -> str:
    lines = [f"## {result.label}"]
    for kind, spec in result.probes.items():
        reasons = ", ".join(
            f"{n}x {why}" for why, n in result.failure_reasons.get(kind, {}).items()
        )
        lines.append(f"  {kind}: {spec}; failures: {reasons or 'none'}")
    lines += [f"  t={e.t:7.3f}  {e.probe:<9} {e.what:<10} {e.detail}" for e in result.events]
    return "\n".join(lines)


def as_json(results: Sequence[RowResult]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        record = dataclasses.asdict(r)
        if r.first is not None:
            record["first"]["cost_ratio"] = r.first.cost_ratio
        record["first_ok"] = r.first_ok
        record["restarted_before_ready"] = r.restarted_before_ready
        out.append(record)
    return out


# --- command line -------------------------------------------------------------------------------


def _default_request() -> HeldoutRequest:
    mix = load_heldout()
    return next((r for r in mix if "logprobs" in r.body), mix[0])


def _model_hint(command: str | None, sim_args: Sequence[str]) -> str:
    words = shlex.split(command) if command else list(sim_args)
    for flag in ("--served-model-name", "--model"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    if command and "serve" in words[:-1]:
        return words[words.index("serve") + 1]
    return "warmgate/sim" if not command else "model"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=MANIFEST,
        help="kustomization directory or YAML file (default: %(default)s)",
    )
    p.add_argument(
        "--container", help="container whose probes to replay (default: the first with probes)"
    )
    p.add_argument(
        "--rows",
        default=",".join(ROWS),
        help="comma-separated rows (default: all): " + ", ".join(ROWS),
    )
    p.add_argument(
        "--command", help="server command line instead of warmgate sim (no --host/--port)"
    )
    p.add_argument("--sim-args", default="", help="extra `warmgate sim` arguments")
    p.add_argument(
        "--load-seconds",
        type=float,
        default=60.0,
        help="simulator model load, manifest seconds (scaled; default %(default)s)",
    )
    p.add_argument(
        "--warmgate-args", default="", help="extra `warmgate run` arguments (warmgate row)"
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="multiplies every delay, period and timeout"
    )
    p.add_argument(
        "--min-timeout-ms", type=float, default=50.0, help="floor of scaled timeouts and periods"
    )
    p.add_argument(
        "--after-ready",
        type=float,
        default=None,
        help="manifest seconds to keep probing after Ready (default: the liveness probe's "
        "period x failureThreshold, at least 30)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="manifest seconds a row may take to turn Ready (default: the startup probe's "
        "initial delay + period x failureThreshold + 60)",
    )
    p.add_argument(
        "--on-restart",
        choices=("continue", "stop"),
        default="continue",
        help="after a restart the kubelet would do: keep observing, or end the row",
    )
    p.add_argument(
        "--request", help="held-out request sent at Ready (default: the first with logprobs)"
    )
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--log-dir", type=Path, help="write each row's server output here")
    p.add_argument("--timeline", action="store_true", help="print every probe decision per row")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        manifest = load_manifest(a.manifest, a.container)
        chosen = [r.strip() for r in a.rows.split(",") if r.strip()]
        if not chosen or set(chosen) - set(ROWS):
            raise ValueError(f"--rows {a.rows!r}: choose from {', '.join(ROWS)}")
        if a.time_scale <= 0:
            raise ValueError(f"--time-scale {a.time_scale:g} must be > 0")
        table_rows = rows(manifest)
        for key in chosen:
            check_ports(table_rows[key], manifest)
        mix = {r.name: r for r in load_heldout()}
        if a.request and a.request not in mix:
            raise ValueError(f"--request {a.request!r}: not in the held-out mix ({', '.join(mix)})")
    except ValueError as exc:
        print(f"kubelet_replay: {exc}", file=sys.stderr)
        return 2
    request = mix[a.request] if a.request else _default_request()
    sim_args = shlex.split(a.sim_args)
    if a.command:
        upstream = core.command_upstream(a.command)
    else:
        scaled = [
            "--load-seconds",
            f"{a.load_seconds * a.time_scale:g}",
            "--time-scale",
            f"{a.time_scale:g}",
        ]
        upstream = core.sim_upstream(
            [*scaled, *sim_args]
        )  # the user's --sim-args come last and win
    live, startup = manifest.probes.get("liveness"), manifest.probes.get("startup")
    after_ready = a.after_ready
    if after_ready is None:
        after_ready = max(30.0, live.period_s * live.failure_threshold if live else 0.0)
    deadline = a.deadline
    if deadline is None:
        budget = startup.period_s * startup.failure_threshold if startup else 2340.0
        deadline = (startup.initial_delay_s if startup else 0.0) + budget + 60.0
    if a.log_dir:
        a.log_dir.mkdir(parents=True, exist_ok=True)
    options = Options(
        upstream=upstream,
        request=request,
        model=_model_hint(a.command, sim_args),
        time_scale=a.time_scale,
        min_timeout_s=a.min_timeout_ms / 1000,
        after_ready_s=after_ready,
        deadline_s=deadline,
        on_restart=a.on_restart,
        warmgate_args=shlex.split(a.warmgate_args),
        log_dir=a.log_dir,
    )
    results = []
    for key in chosen:
        result = asyncio.run(replay(table_rows[key], manifest, options))
        results.append(result)
        ready = "never" if result.ready_at_s is None else f"{result.ready_at_s:.2f} s"
        print(f"# {result.label}: Ready at {ready}", file=sys.stderr, flush=True)
        if a.timeline:
            print(timeline(result), file=sys.stderr, flush=True)
    server = a.command or f"warmgate sim {shlex.join([*upstream.argv[4:]])}"
    print(f"Kubelet replay of {a.manifest} at --time-scale {a.time_scale:g} over `{server}`;")
    print(
        f"first request at Ready: {request.name}. Times are real seconds since the container's start."
    )
    print()
    print(table(results))
    if any(r.restarted_before_ready for r in results):
        print()
        print("† the kubelet would have restarted the container before this; a real pod never gets here "
              "(--on-restart continue keeps watching the same container).")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(as_json(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
