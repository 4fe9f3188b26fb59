"""The simulator's control endpoints: sleep mode and runtime LoRA, as vLLM 0.32 serves them.

- `POST /sleep?level=0|1|2&mode=abort|wait|keep` -> 200 {"status": "sleeping", "level": L}
- `POST /wake_up[?tags=weights&tags=kv_cache|scheduling]` -> 200 {"status": "awake" or
  "sleeping" (tags still asleep), "tags": [...] or null}
- `GET /is_sleeping` -> 200 {"is_sleeping": bool}
  (vllm/entrypoints/serve/dev/sleep/api_router.py; only with VLLM_SERVER_DEV_MODE=1)
- `POST /v1/load_lora_adapter` {"lora_name", "lora_path"} -> 200 text
  "Success: LoRA adapter 'NAME' added successfully."
- `POST /v1/unload_lora_adapter` {"lora_name"} -> 200 text
  "Success: LoRA adapter 'NAME' removed successfully."
  (vllm/entrypoints/serve/lora/api_router.py; only with VLLM_ALLOW_RUNTIME_LORA_UPDATING)

While asleep /health stays 200 and a generation request waits, queued, until wake-up:
vLLM's scheduler is paused, not gone. With --enable-sleep-mode, sleeping and waking take
the cost table's time and each batch bucket's first step afterwards pays `realloc:<size>`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qs

from warmgate import log as wglog
from warmgate.httpserver import Request, Response
from warmgate.sim import api
from warmgate.sim.engine import Engine, Pause
from warmgate.sim.lora import Adapters
from warmgate.sim.metrics import SimMetrics
from warmgate.sim.settings import SimSettings
from warmgate.sim.sleep import LEVELS, MODES, SleepState

_MODES_TEXT = "'abort', 'wait' or 'keep'"


class SleepControl:
    def __init__(self, settings: SimSettings, engine: Engine, metrics: SimMetrics) -> None:
        self._s = settings
        self._engine = engine
        self._metrics = metrics
        self.state = SleepState()
        self._lock = asyncio.Lock()  # vLLM's engine core runs one utility call at a time
        self._log = wglog.get("warmgate.sim")

    async def sleep(self, request: Request) -> Response:
        try:
            level, mode = _sleep_query(request.query)
        except api.ApiError as exc:
            return Response.json(exc.body(), exc.status)
        async with self._lock:
            self.state.paused = True  # asleep for /is_sleeping while `wait` drains
            await self._pause(mode)
            if level >= 1:
                self._engine.reset_prefix_cache()
            if self.state.sleep(level) and self._s.enable_sleep_mode:
                table = self._s.costs
                await self._take(table.sleep_ms if level == 1 else table.discard_ms)
                self._engine.free_memory()
            self._metrics.record_sleep_state(asleep=True, level=level)
        self._log.info("sleeping", level=level, mode=mode)
        return Response.json({"status": "sleeping", "level": level})

    async def wake_up(self, request: Request) -> Response:
        tags = parse_qs(request.query).get("tags") or None
        async with self._lock:
            level = self.state.level
            woken, fully_awake = self.state.wake(tags)
            if "weights" in woken and self._s.enable_sleep_mode:
                await self._take(self._s.costs.reload_ms if level == 2 else self._s.costs.wake_ms)
            if fully_awake:
                self._engine.resume()
                self._metrics.record_sleep_state(asleep=False, level=0)
        self._log.info("wake_up", tags=tags, woken=sorted(woken), fully_awake=fully_awake)
        return Response.json({"status": "awake" if fully_awake else "sleeping", "tags": tags})

    async def is_sleeping(self, request: Request) -> Response:
        return Response.json({"is_sleeping": self.state.is_sleeping})

    async def _pause(self, mode: str) -> None:
        """vLLM's pause_scheduler: every mode queues new requests."""
        if mode == "abort":
            self._engine.abort_all()
            self._engine.pause(Pause.new)
        elif mode == "wait":
            self._engine.pause(Pause.new)
            await self._engine.running_drained()
        else:
            self._engine.pause(Pause.all)

    async def _take(self, ms: float) -> None:
        await asyncio.sleep(ms / 1000 * self._s.time_scale)


def _sleep_query(query: str) -> tuple[int, str]:
    """`level` (0-2, default 1) and `mode` (default abort), checked as FastAPI does."""
    values = parse_qs(query)
    level_text = values.get("level", ["1"])[-1]
    try:
        level = int(level_text.strip())
    except ValueError:
        raise api.request_error(
            "query.level",
            "int_parsing",
            "Input should be a valid integer, unable to parse string as an integer",
            level_text,
        ) from None
    if level < LEVELS.start:
        raise api.request_error(
            "query.level", "greater_than_equal", "Input should be greater than or equal to 0",
            level_text, {"ge": 0},
        )  # fmt: skip
    if level >= LEVELS.stop:
        raise api.request_error(
            "query.level", "less_than_equal", "Input should be less than or equal to 2",
            level_text, {"le": 2},
        )  # fmt: skip
    mode = values.get("mode", ["abort"])[-1]
    if mode not in MODES:
        raise api.request_error(
            "query.mode", "literal_error", f"Input should be {_MODES_TEXT}", mode,
            {"expected": _MODES_TEXT},
        )  # fmt: skip
    return level, mode


class LoraControl:
    def __init__(
        self,
        settings: SimSettings,
        engine: Engine,
        adapters: Adapters,
        changed: Callable[[], None],
    ) -> None:
        self._s = settings
        self._engine = engine
        self._adapters = adapters
        self._changed = changed  # the server's view of the served names follows
        self._lock = asyncio.Lock()  # vLLM locks per name; one lock is simpler and enough
        self._log = wglog.get("warmgate.sim")

    async def load(self, request: Request) -> Response:
        try:
            body = api.parse_body(request.body, request.headers.get("content-type"))
            async with self._lock:
                name, path = self._adapters.check_load(body)
                await asyncio.sleep(self._s.costs.lora_load_ms / 1000 * self._s.time_scale)
                adapter = self._adapters.add(name, path)
                self._engine.forget_kernel(f"lora:{name}")  # new weights: a cold first request
                self._changed()
        except api.ApiError as exc:
            return Response.json(exc.body(), exc.status)
        self._log.info("lora_loaded", name=name, path=path, lora_int_id=adapter.int_id)
        return Response(200, f"Success: LoRA adapter '{name}' added successfully.".encode())

    async def unload(self, request: Request) -> Response:
        try:
            body = api.parse_body(request.body, request.headers.get("content-type"))
            async with self._lock:
                name = self._adapters.remove(body)
                self._changed()
        except api.ApiError as exc:
            return Response.json(exc.body(), exc.status)
        self._log.info("lora_unloaded", name=name)
        return Response(200, f"Success: LoRA adapter '{name}' removed successfully.".encode())
