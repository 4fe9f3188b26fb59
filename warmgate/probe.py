"""The probe server the kubelet talks to: /ready, /live, /startup, /status, /metrics.

Answers come from a `ProbeView`: the latest `ProbeSnapshot` the main loop published, and
the /metrics text. This module only maps paths to answers, so a probe costs two dictionary
lookups: the answers to /ready, /live and /startup are built once per (path, outcome, phase).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from warmgate.httpserver import Request, Response, Server, SyncHandler, start_sync_server

if TYPE_CHECKING:
    from warmgate.telemetry import Counters

PROBES = ("/ready", "/live", "/startup")
PATHS = (*PROBES, "/status", "/metrics")
SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True, slots=True)
class ProbeSnapshot:
    """Everything the probe thread may read, as of one moment; replaced, never changed."""

    phase: str
    ready: bool  # /ready
    started: bool  # /startup
    live_until: float  # /live is 200 while time.monotonic() <= this (inf: no limit)
    status: bytes  # the /status JSON body
    counters: Counters  # what /metrics shows besides the phase

    def live(self) -> bool:
        return time.monotonic() <= self.live_until


class ProbeView(Protocol):
    @property
    def published(self) -> ProbeSnapshot:
        """The latest snapshot: one attribute read, swapped whole by the main loop."""
        ...

    def metrics(self) -> bytes: ...


def make_handler(view: ProbeView) -> SyncHandler:
    checks: dict[str, Callable[[ProbeSnapshot], bool]] = {
        "/ready": lambda snap: snap.ready,
        "/live": ProbeSnapshot.live,
        "/startup": lambda snap: snap.started,
    }
    # At most 3 paths x 2 outcomes x 10 phases; the server only reads a Response.
    answers: dict[tuple[str, bool, str], Response] = {}

    def handle(request: Request) -> Response:
        check = checks.get(request.path)
        if check is not None and request.method in ("GET", "HEAD"):
            snap = view.published
            ok, phase = check(snap), snap.phase
            answer = answers.get((request.path, ok, phase))
            if answer is None:
                answer = Response.json({"ok": ok, "phase": phase}, 200 if ok else 503)
                answers[request.path, ok, phase] = answer
            return answer
        if request.path not in PATHS:
            return Response.json(
                {"error": f"no such path: {request.path}", "paths": list(PATHS)}, 404
            )
        if request.method not in ("GET", "HEAD"):
            return Response.json({"error": "method not allowed"}, 405, [("Allow", "GET, HEAD")])
        if request.path == "/status":
            return Response(200, view.published.status, content_type="application/json")
        return Response(
            200, view.metrics(), content_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return handle


# Open probe connections at most. warmgate's whole process (the probe thread, the main loop,
# the child's pipes, the worker, NVML) must stay under the default `ulimit -n` of 1024, so
# this leaves FDS_FOR_THE_REST free and the kernel's listen backlog queues what is beyond;
# a full server evicts idle or head-less connections, so the cap is never a probe's limit.
MAX_CONNECTIONS = 768
FDS_FOR_THE_REST = 256  # the rest of warmgate, one accept batch beyond the cap, and room
HEAD_TIMEOUT_S = 2.0  # the kubelet sends its whole request at once
IDLE_TIMEOUT_S = 1.0  # the kubelet never reuses a connection; a scraper reconnects cheaply
# The kubelet sends its request as soon as it connects (a tcpSocket probe sends nothing and
# needs only the handshake): a connection that stays silent is held by the kernel this long.
DEFER_ACCEPT_S = 5


async def serve(view: ProbeView, *, sock: socket.socket) -> Server:
    """Serve probes on an already bound socket (bound early, so a port clash fails fast)."""
    import resource

    # A lower `ulimit -n` than the default lowers the cap with it.
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit != resource.RLIM_INFINITY:
        max_connections = max(16, min(MAX_CONNECTIONS, soft_limit - FDS_FOR_THE_REST))
    else:
        max_connections = MAX_CONNECTIONS
    # The kubelet opens a fresh connection per probe, sends a small head and no body.
    return await start_sync_server(
        make_handler(view),
        sock=sock,
        max_connections=max_connections,
        max_header_bytes=8192,
        max_body_bytes=0,
        header_timeout=HEAD_TIMEOUT_S,
        idle_timeout=IDLE_TIMEOUT_S,
        defer_accept=DEFER_ACCEPT_S,
    )


def check(host: str, port: int, path: str, timeout: float) -> int:
    """`warmgate probe`: GET the path with a bare socket (fast to start); 0 on 200, else 1."""
    import time

    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(request)
            head = b""
            while b"\r\n" not in head and time.monotonic() < deadline:
                chunk = conn.recv(256)
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        print(f"warmgate probe: {host}:{port}{path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    status = head.split(b" ", 2)[1:2]
    ok = status == [b"200"]
    if not ok:
        first_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        print(f"warmgate probe: {host}:{port}{path}: {first_line or 'no answer'}", file=sys.stderr)
    return 0 if ok else 1


class ProbeThread:
    """The probe server on an event loop of its own, in its own thread.

    A probe then never queues behind the main loop's work (health polls, the warm-up
    worker's events, drain polls); docs/benchmarks.md has the measurements. The thread
    shares no mutable state with the main loop: it reads the view's latest published
    `ProbeSnapshot`, one reference that the main loop replaces whole.
    """

    def __init__(self, view: ProbeView, sock: socket.socket) -> None:
        import threading

        self._view, self._sock = view, sock
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._server: Server | None = None
        self.host, self.port = "", 0

    def closed_connections(self) -> dict[str, int]:
        """Connections the server closed before a request, by why. Call it on the probe
        thread only (a /metrics scrape): the server's counts are that thread's."""
        server = self._server
        if server is None:
            return {}
        return {"evicted": server.evicted, "refused": server.refused, "silent": server.silent}

    def start(self) -> None:
        # A thread that wants the GIL asks the holder to let go only after a whole switch
        # interval (5 ms by default): a probe would wait so at each loop wake-up (accept,
        # read) while the main thread or a pump thread works. A shorter interval costs
        # only while some thread waits.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._thread.start()
        self._started.wait(timeout=10)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        import uvloop

        try:
            uvloop.run(self._serve())
        except BaseException as exc:  # reported to start(), which raises it in the main thread
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = self._server = await serve(self._view, sock=self._sock)
        self.host, self.port = server.host, server.port
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
