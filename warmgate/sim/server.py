"""The simulator process: routes, start-up and shutdown like vLLM's, injected faults.

Lifecycle: loading (port closed, or 503 on everything with --listen-early) -> serving ->
on SIGTERM one of: abort (vLLM's default: in-flight requests end with finish_reason
"abort", exit 0), hang (stop accepting, never finish, exit once every client is gone),
drain (finish in-flight, 503 to new requests, exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from warmgate import log as wglog
from warmgate.httpserver import Request, Response, Server, start_server
from warmgate.sim import api, compilecache, configline, requestlog, responses
from warmgate.sim.control import LoraControl, SleepControl
from warmgate.sim.engine import Engine, EngineRequest, SeqState, Update
from warmgate.sim.generate import plan_sequence
from warmgate.sim.group import LeaderGroup
from warmgate.sim.lora import Adapters
from warmgate.sim.metrics import CONTENT_TYPE, SimMetrics
from warmgate.sim.settings import VERSION, SimSettings
from warmgate.sim.tokenizer import Tokenizer

SSE_TYPE = "text/event-stream; charset=utf-8"
_MAX_CONNECTIONS = 1024
_ABORT_FLUSH_S = 5.0  # after SIGTERM (abort), how long aborted responses may take to go out
_CLOSE_GRACE_S = 2.0
_GARBAGE = b"<html><body>502 Bad Gateway</body></html>\x00\xff{not json"
# Endpoints that need vLLM's engine or its tokenizer pool, refused after SIGTERM.
_ENGINE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})


def jit_line(key: str, ms: float) -> str:
    """The line a supervisor counts: shaped like vLLM's JIT compilation monitor."""
    return (
        f"Triton kernel JIT compilation during inference: {key}. "
        f"Simulated compile time {ms:.1f} ms; warm this shape up before serving traffic."
    )


class _Batch:
    """The engine requests of one HTTP request (one per prompt), sharing one queue.
    Progress is tracked on the consumer's side: the engine may be steps ahead."""

    def __init__(self, engine: Engine, jobs: list[EngineRequest], request_ms: float) -> None:
        self._engine = engine
        self.jobs = jobs
        self._request_ms = request_ms
        self._started: set[int] = set()
        self._finished: set[int] = set()

    @property
    def finished(self) -> bool:
        """Every job's last update has been taken from the queue."""
        return len(self._finished) == len(self.jobs)

    @property
    def results(self) -> list[list[SeqState]]:
        return [job.seqs for job in self.jobs]

    async def next_update(self) -> Update:
        update = await self.jobs[0].sink.get()
        self._started.add(update.job)
        if update.done:
            self._finished.add(update.job)
        return update

    async def wait_done(self) -> None:
        while not self.finished:
            await self.next_update()

    async def first_updates(self) -> list[Update]:
        """Updates up to the point where every job has produced its first token."""
        updates: list[Update] = []
        while len(self._started) < len(self.jobs):
            updates.append(await self.next_update())
        return updates

    def cancel(self) -> None:
        for job in self.jobs:
            self._engine.cancel(job)

    def cost_headers(self, first_token: bool = False) -> list[tuple[str, str]]:
        def end(job: EngineRequest) -> float:
            mark = job.first_token_ms if first_token else job.finish_ms
            return mark if mark is not None else job.arrival_ms

        cost = max(end(job) - job.arrival_ms for job in self.jobs) + self._request_ms
        compiled = [key for job in self.jobs for key in job.compiled]
        return [
            ("x-sim-cost-ms", f"{cost:.3f}"),
            ("x-sim-compile-ms", f"{sum(job.compile_ms for job in self.jobs):.3f}"),
            ("x-sim-compiled", ",".join(compiled)),
            ("x-sim-cached-tokens", str(sum(job.cached_tokens for job in self.jobs))),
            ("x-sim-batch-max", str(max(job.batch_max for job in self.jobs))),
            ("x-sim-cost-scope", "first-token" if first_token else "total"),
        ]


Route = Callable[[Request], Awaitable[Response]]


class Simulator:
    def __init__(self, settings: SimSettings) -> None:
        self._s = settings
        self._log = wglog.get("warmgate.sim")
        self._tok = Tokenizer()
        self._ctx = api.Context(settings.model, settings.max_model_len, self._tok)
        self._engine = Engine(
            settings.costs,
            time_scale=settings.time_scale,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_chunked_prefill=settings.enable_chunked_prefill,
            max_loras=settings.max_loras,
            on_compile=self._on_compile,
            on_finish=self._on_finish,
            on_iteration=self._on_iteration,
        )
        self._metrics = SimMetrics(settings.model, self._engine, settings.max_model_len)
        self._adapters = Adapters(settings.model, settings.enable_lora)
        for name, path in settings.lora_modules:  # checked at start: each is a directory
            self._adapters.add(name, path)
        self._adapters_changed()
        self._server: Server | None = None
        self._phase = "loading"  # loading | serving | draining | stopping
        self._loaded_at = 0.0
        self._generation_requests = 0
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._signalled = asyncio.Event()
        self._signals = 0
        # A multi-node leader: its engine needs every worker of the group (sim/group.py).
        self._group = (
            LeaderGroup(settings.group_size, settings.host, settings.group_port, self._engine_lost)
            if settings.group_size > 1
            else None
        )
        self._engine_dead: str | None = None  # why, once a lost worker killed the engine
        self._routes: dict[str, tuple[str, Route]] = {
            "/health": ("GET", self._health),
            "/ping": ("GET", self._health),
            "/load": ("GET", self._load_page),
            "/version": ("GET", self._version),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics_page),
            "/tokenize": ("POST", self._tokenize),
            "/detokenize": ("POST", self._detokenize),
            "/v1/completions": ("POST", self._completions),
            "/v1/chat/completions": ("POST", self._chat),
        }
        self._sleep = SleepControl(settings, self._engine, self._metrics)
        if settings.dev_mode:  # vLLM registers its dev routes only in dev mode
            self._routes["/sleep"] = ("POST", self._sleep.sleep)
            self._routes["/wake_up"] = ("POST", self._sleep.wake_up)
            self._routes["/is_sleeping"] = ("GET", self._sleep.is_sleeping)
        if settings.runtime_lora_updating:
            lora = LoraControl(settings, self._engine, self._adapters, self._adapters_changed)
            self._routes["/v1/load_lora_adapter"] = ("POST", lora.load)
            self._routes["/v1/unload_lora_adapter"] = ("POST", lora.unload)

    # -- process lifecycle ---------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(self._engine.run())]
            if self._s.crash_after is not None:
                background.append(tg.create_task(self._crash_later(self._s.crash_after)))
            try:
                return await self._lifecycle()
            finally:
                for task in background:
                    task.cancel()

    async def _lifecycle(self) -> int:
        s = self._s
        self._log.info(
            "starting", model=s.model, max_model_len=s.max_model_len,
            load_seconds=s.load_seconds, on_sigterm=s.on_sigterm, time_scale=s.time_scale,
        )  # fmt: skip
        if self._group is not None and not await self._group.listen():
            return 1
        if s.listen_early and not await self._listen():
            return 1
        if not await self._load():
            self._log.info("stopped", reason="signal during loading", exit_code=0)
            if self._server is not None:
                self._server.close()
            return 0
        self._phase = "serving"
        self._loaded_at = time.monotonic()
        self._log.info("loaded", model=s.model)
        if self._server is None and not await self._listen():
            return 1
        # uvicorn's line, which people (and supervisors) look for in vLLM's output.
        print("INFO:     Application startup complete.", file=sys.stderr, flush=True)
        await self._signalled.wait()
        return await self._shutdown()

    async def _load(self) -> bool:
        """Sleep through model loading and compilation; False when a signal ends it first."""
        # vLLM's engine core prints its whole config before it loads the weights.
        stamp = time.strftime("%m-%d %H:%M:%S")
        self._vllm_log(configline.line(self._s, os.getpid(), stamp))
        # vLLM over Ray waits for its placement group (every worker) before loading.
        if self._group is not None and not await self._group.wait_formed(self._signalled):
            return False
        if self._s.crash_during_load:
            if await self._wait_signal(self._s.load_seconds / 2):
                return False
            self._crash("--crash-during-load")
        if await self._wait_signal(self._s.load_seconds):
            return False
        return await self._compile()

    async def _compile(self) -> bool:
        """--compile-seconds of compilation, or the artifact from the compile cache."""
        if self._s.compile_seconds <= 0:
            return True
        path = compilecache.artifact_path(self._s.model, self._s.max_model_len)
        why = compilecache.load(path)
        if why is None:
            self._vllm_log(compilecache.log_line(f"Directly load AOT compilation from path {path}"))
            return True
        if why:
            self._vllm_log(compilecache.log_line(
                f"Compiling model again due to a load failure from {path}, reason: {why}"
            ))  # fmt: skip
        if await self._wait_signal(self._s.compile_seconds):
            return False
        try:
            compilecache.save(path)
            self._vllm_log(compilecache.log_line(f"saved AOT compiled function to {path}"))
        except OSError as exc:  # a read-only or full cache: vLLM compiles again next time
            self._log.warning("compile_cache_unwritable", path=str(path), error=str(exc))
        return True

    async def _wait_signal(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._signalled.wait()
                return True
        return False

    async def _listen(self) -> bool:
        s = self._s
        try:
            self._server = await start_server(
                self._handle, s.host, s.port, max_connections=_MAX_CONNECTIONS
            )
        except OSError as exc:
            self._log.error(
                "listen_failed",
                error=f"--host {s.host} --port {s.port}: {exc.strerror} (another server?)",
            )
            return False
        loaded = self._phase != "loading"
        self._log.info("listening", host=s.host, port=self._server.port, loaded=loaded)
        return True

    async def _shutdown(self) -> int:
        server = self._server
        assert server is not None
        mode = self._s.on_sigterm
        self._log.info("shutting_down", mode=mode, in_flight=self._in_flight)
        if mode == "hang":
            self._phase = "stopping"
            self._engine.freeze()
            server.close()
            await server.wait_connections_closed()
        elif mode == "drain":
            self._phase = "draining"
            await self._idle.wait()
        else:
            self._phase = "stopping"
            server.close()
            self._engine.abort_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ABORT_FLUSH_S):
                    await self._idle.wait()
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await server.wait_connections_closed()
        self._log.info("stopped", mode=mode, exit_code=0)
        return 0

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            self._log.info("signal", signal=name, mode=self._s.on_sigterm)
            self._signalled.set()
        elif signum == signal.SIGTERM and self._s.on_sigterm == "hang":
            self._log.info("signal_ignored", signal=name, reason="--on-sigterm hang")
        else:
            self._log.warning("forced_exit", signal=name, exit_code=128 + signum)
            os._exit(128 + signum)

    async def _crash_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._crash("--crash-after")

    def _crash_on_feature(self, gen: api.Generation) -> None:
        """--crash-on-feature: die as the request arrives, as vLLM CPU's engine does on a
        seeded prefill that gets chunked (with --crash-above-tokens: only then)."""
        feature, above = self._s.crash_on_feature, self._s.crash_above_tokens
        if feature is None or feature not in api.plan_features(gen.features):
            return
        scheduled = self._engine.scheduled_prompt_tokens + sum(len(p.ids) for p in gen.prompts)
        if above is not None and scheduled <= above:
            return
        bound = "" if above is None else f", above --crash-above-tokens {above}"
        self._crash(f"--crash-on-feature {feature}: {scheduled} prompt tokens scheduled{bound}")

    def _crash(self, reason: str) -> None:
        self._log.error("crash", reason=reason, exit_code=self._s.crash_code)
        os._exit(self._s.crash_code)  # a crash: no cleanup, no flushing of responses

    def _on_compile(self, key: str, ms: float) -> None:
        print(jit_line(key, ms), file=sys.stderr, flush=True)
        self._metrics.observe_compile(key, ms)

    def _on_iteration(self, tokens: int) -> None:
        self._metrics.observe_iteration(tokens)

    def _on_finish(self, request: EngineRequest, reason: str) -> None:
        self._metrics.observe_finish(reason, request)
        if reason == "abort" and self._s.enable_log_requests and request.request_id:
            for line in requestlog.aborted(request.request_id, request.engine_id):
                self._vllm_log(line)

    def _vllm_log(self, line: str) -> None:
        print(line, flush=True)  # vLLM's logger writes to stdout

    # -- routing -------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return Response.json({"detail": "Not Found"}, 404)
        method, handler = route
        if request.method != method:
            return Response.json({"detail": "Method Not Allowed"}, 405, [("allow", method)])
        if self._phase == "loading":
            return self._loading(request)
        if self._phase != "serving" and request.path in _ENGINE_PATHS:
            # vLLM after SIGTERM: its executors are shut down, so work is refused with a
            # 500 while /health and the other cheap endpoints keep answering.
            body = api.error_body(
                "cannot schedule new futures after shutdown", "InternalServerError", 500
            )
            return Response.json(body, 500)
        if self._engine_dead is not None and request.path in _ENGINE_PATHS:
            return self._dead()
        return await handler(request)

    def _loading(self, request: Request) -> Response:
        # --listen-early: SGLang and llama.cpp answer 503 to everything while loading.
        if request.path in ("/health", "/ping"):
            return Response(503)
        body = api.error_body("The server is loading the model.", "ServiceUnavailableError", 503)
        return Response.json(body, 503)

    async def _health(self, request: Request) -> Response:
        if self._engine_dead is not None:
            return Response(503)
        up = time.monotonic() - self._loaded_at
        hang_after = self._s.hang_health_after
        if hang_after is not None and up >= hang_after:
            await asyncio.get_running_loop().create_future()  # until the client gives up
        flap = self._s.health_flap
        if flap is not None and up % (flap[0] + flap[1]) >= flap[0]:
            return Response(503)
        return Response(200)

    async def _load_page(self, request: Request) -> Response:
        return Response.json({"server_load": self._in_flight})

    async def _version(self, request: Request) -> Response:
        return Response.json({"version": VERSION})

    async def _models(self, request: Request) -> Response:
        adapters = [(a.name, a.path) for a in self._adapters.all()]
        return Response.json(responses.models_response(self._ctx, adapters))

    def _adapters_changed(self) -> None:
        """Requests may name the adapters loaded now as their model."""
        self._ctx = dataclasses.replace(self._ctx, adapters=self._adapters.names())

    async def _metrics_page(self, request: Request) -> Response:
        return Response(200, self._metrics.render(), content_type=CONTENT_TYPE)

    async def _tokenize(self, request: Request) -> Response:
        return self._json_call(request, api.tokenize)

    async def _detokenize(self, request: Request) -> Response:
        return self._json_call(request, api.detokenize)

    def _json_call(
        self, request: Request, fn: Callable[[dict[str, Any], api.Context], dict[str, Any]]
    ) -> Response:
        try:
            return Response.json(fn(_body(request), self._ctx))
        except api.ApiError as exc:
            return Response.json(exc.body(), exc.status)

    # -- generation ----------------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, api.parse_completion)

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, api.parse_chat)

    async def _generate(
        self, request: Request, parse: Callable[[dict[str, Any], api.Context], api.Generation]
    ) -> Response:
        self._generation_requests += 1
        number = self._generation_requests
        self._begin()
        handed_to_stream = False
        try:
            if self._s.slow:
                await asyncio.sleep(self._s.slow)
            if number <= self._s.fail_first:
                body = api.error_body(
                    f"Simulated failure {number} of {self._s.fail_first} (--fail-first).",
                    "InternalServerError",
                    500,
                )
                return Response.json(body, 500)
            if self._s.malformed:
                return Response(200, _GARBAGE, content_type="application/json")
            try:
                gen = parse(_body(request), self._ctx)
            except api.ApiError as exc:
                return Response.json(exc.body(), exc.status)
            table = self._s.costs
            await asyncio.sleep(table.request_ms / 1000 * self._s.time_scale)
            self._crash_on_feature(gen)
            ids = _ids(gen.chat, request.headers.get("x-request-id"))
            batch = self._submit(gen, ids.id)
            try:
                if gen.stream:
                    response = await self._start_stream(gen, batch, ids)
                    handed_to_stream = True
                    return response
                await batch.wait_done()
            finally:
                if not handed_to_stream:
                    batch.cancel()  # no-op once finished; the client left otherwise
            if self._engine_dead is not None:
                return self._dead()
            build = responses.chat_response if gen.chat else responses.completion_response
            payload = build(gen, batch.results, ids, self._tok)
            if gen.chat and self._s.enable_log_outputs:
                for choice in payload["choices"]:
                    if choice["message"]["content"]:  # vLLM logs no empty output
                        self._vllm_log(
                            requestlog.generated(
                                ids.id, choice["message"]["content"], choice["finish_reason"]
                            )
                        )
            return Response.json(payload, headers=batch.cost_headers())
        finally:
            if not handed_to_stream:
                self._end()

    def _submit(self, gen: api.Generation, request_id: str) -> _Batch:
        sink: asyncio.Queue[Update] = asyncio.Queue()
        jobs = []
        log_requests = self._s.enable_log_requests
        for job, (prompt, spec) in enumerate(zip(gen.prompts, gen.specs, strict=True)):
            seqs = [SeqState(plan_sequence(self._tok, prompt.ids, spec, i)) for i in range(gen.n)]
            request = EngineRequest(job, prompt.ids, seqs, gen.features, sink)
            request.max_tokens = spec.max_tokens
            request.request_id = request_id if gen.chat else f"{request_id}-{job}"
            request.engine_id = requestlog.engine_id(request.request_id)
            if log_requests:
                adapter = self._adapters.get(gen.lora) if gen.lora else None
                lora = adapter.request_repr() if adapter else None
                line = requestlog.received(request.request_id, gen.params, spec.max_tokens, lora)
                self._vllm_log(line)
            self._engine.submit(request)
            if log_requests:
                for child in range(gen.n) if gen.n > 1 else (None,):
                    prefix = "" if child is None else f"{child}_"
                    self._vllm_log(requestlog.added(prefix + request.engine_id))
            jobs.append(request)
        return _Batch(self._engine, jobs, self._s.costs.request_ms)

    async def _start_stream(
        self, gen: api.Generation, batch: _Batch, ids: responses.Ids
    ) -> Response:
        # Headers wait for the first token, so they can carry the one-time costs paid.
        first = await batch.first_updates()
        body = self._sse(gen, batch, ids, first)
        return Response(200, body, batch.cost_headers(first_token=True), SSE_TYPE)

    async def _sse(
        self, gen: api.Generation, batch: _Batch, ids: responses.Ids, first: list[Update]
    ) -> AsyncIterator[bytes]:
        texts: dict[int, str] = {}  # chat: each choice's output so far, for the log
        try:
            for chunk in responses.role_chunks(gen, ids):
                yield responses.sse(chunk)
            for update in first:
                yield self._update_events(gen, batch, ids, update, texts)
            while not batch.finished:
                yield self._update_events(gen, batch, ids, await batch.next_update(), texts)
            if self._engine_dead is not None:
                yield responses.sse(self._dead_body())
                return
            if gen.chat and self._s.enable_log_outputs:
                for index in range(gen.n):
                    self._vllm_log(
                        requestlog.generated(
                            ids.id, texts.get(index, ""), "streaming_complete", "complete"
                        )
                    )
            if gen.include_usage:
                usage = responses.usage_chunk(gen, ids, batch.results)
                yield responses.sse({**usage, "system_fingerprint": responses.SYSTEM_FINGERPRINT})
            yield _cost_comment(batch)
            yield responses.sse("[DONE]")
        finally:
            batch.cancel()
            self._end()

    def _update_events(
        self,
        gen: api.Generation,
        batch: _Batch,
        ids: responses.Ids,
        update: Update,
        texts: dict[int, str],
    ) -> bytes:
        positions = {index: range(pos, pos + 1) for index, pos in update.emitted}
        reasons = dict(update.finished)
        seqs = batch.jobs[update.job].seqs
        chunks = []
        for index in sorted(positions.keys() | reasons.keys()):
            span = positions.get(index, range(seqs[index].emitted, seqs[index].emitted))
            chunks.append(
                responses.delta_chunk(
                    gen, ids, update.job, index, seqs[index], span, reasons.get(index), self._tok
                )
            )
        if gen.chat and self._s.enable_log_outputs:
            for chunk in chunks:
                choice = chunk["choices"][0]
                delta = choice["delta"].get("content") or ""
                texts[choice["index"]] = texts.get(choice["index"], "") + delta
                if delta:
                    line = requestlog.generated(ids.id, delta, choice["finish_reason"], "delta")
                    self._vllm_log(line)
        if not gen.include_usage:
            # vLLM stamps the fingerprint on each choice's finish chunk (the usage chunk
            # carries it instead when there is one).
            for chunk in chunks:
                if chunk["choices"][0]["finish_reason"] is not None:
                    chunk["system_fingerprint"] = responses.SYSTEM_FINGERPRINT
        return b"".join(responses.sse(chunk) for chunk in chunks)

    def _engine_lost(self, why: str) -> None:
        """A worker of the group is gone: the engine dies with it, its requests with it."""
        self._engine_dead = why
        self._log.error("engine_dead", reason=why, in_flight=self._in_flight)
        self._engine.abort_all()

    def _dead_body(self) -> dict[str, Any]:
        message = f"EngineCore encountered an issue: {self._engine_dead}"
        return api.error_body(message, "EngineDeadError", 500)

    def _dead(self) -> Response:
        return Response.json(self._dead_body(), 500)

    def _begin(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


def _ids(chat: bool, request_id_header: str | None) -> responses.Ids:
    """vLLM names a request after its X-Request-Id header, when it has one."""
    if request_id_header:
        return responses.Ids(requestlog.request_id(request_id_header, chat), int(time.time()))
    return responses.Ids.new(chat)


def _body(request: Request) -> dict[str, Any]:
    body: dict[str, Any] = api.parse_body(request.body, request.headers.get("content-type"))
    return body


def _cost_comment(batch: _Batch) -> bytes:
    """The whole stream's cost as an SSE comment: clients ignore it, tests read it."""
    headers = dict(batch.cost_headers())
    cost = {
        "cost_ms": float(headers["x-sim-cost-ms"]),
        "compile_ms": float(headers["x-sim-compile-ms"]),
        "compiled": [k for k in headers["x-sim-compiled"].split(",") if k],
    }
    return f": sim-cost {json.dumps(cost)}\n\n".encode()


async def run_sim(settings: SimSettings) -> int:
    return await Simulator(settings).run()
