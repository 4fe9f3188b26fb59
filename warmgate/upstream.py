"""The model server as warmgate sees it: an httpx client for /health, /v1/models,
/tokenize, /metrics and the generation endpoints. No decisions are made here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from warmgate.drain import Reading, Unread

SleepAnswer = Literal["sleeping", "awake", "absent", "unknown"]


class UpstreamError(Exception):
    """The upstream answered something warmgate cannot use (garbage, wrong shape)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One answered request: status, parsed JSON (None if not JSON) and latency."""

    status: int
    body: Any
    ms: float
    text: str = ""


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str
    max_model_len: int | None
    parent: str | None  # set for a LoRA adapter: the base model's id


class Upstream:
    """A thin async client; every method bounds its own time with `timeout`."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float = 120.0
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        # No connection-pool limit: a concurrency bucket of 64 must really be 64 in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # Loading the CA bundle costs ~3 MB of RSS; a plain-http upstream (the usual
        # 127.0.0.1, paths only, no redirects followed) never uses it.
        verify = self.base_url.startswith("https://")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            limits=limits,
            trust_env=False,
            verify=verify,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def health(self, path: str = "/health", timeout: float = 5.0) -> tuple[bool, str]:
        """(healthy, why not): healthy means HTTP 200."""
        try:
            response = await self._client.get(path, timeout=timeout)
        except httpx.HTTPError as exc:
            return False, type(exc).__name__
        return response.status_code == 200, f"HTTP {response.status_code}"

    async def is_sleeping(self, timeout: float = 5.0) -> SleepAnswer:
        """vLLM's dev-mode `GET /is_sleeping` ({"is_sleeping": bool}): "sleeping" or
        "awake"; "absent" on 404/405 (no sleep mode there); "unknown" on anything else."""
        try:
            response = await self._client.get("/is_sleeping", timeout=timeout)
        except httpx.HTTPError:
            return "unknown"
        if response.status_code in (404, 405):
            return "absent"
        try:
            sleeping = response.json().get("is_sleeping") if response.status_code == 200 else None
        except (ValueError, AttributeError):
            return "unknown"
        if not isinstance(sleeping, bool):
            return "unknown"
        return "sleeping" if sleeping else "awake"

    async def models(self) -> list[ServedModel]:
        body = (await self.request("GET", "/v1/models", timeout=10.0)).body
        try:
            return [
                ServedModel(
                    id=str(item["id"]),
                    max_model_len=_int_or_none(item.get("max_model_len")),
                    parent=item.get("parent") if item.get("parent") != item.get("id") else None,
                )
                for item in body["data"]
            ]
        except (KeyError, TypeError) as exc:
            raise UpstreamError(f"/v1/models answered an unexpected shape: {body!r:.200}") from exc

    async def tokenize(self, model: str, text: str) -> list[int] | None:
        """Token ids of `text`, or None when the server has no /tokenize."""
        reply = await self.request(
            "POST", "/tokenize", {"model": model, "prompt": text}, timeout=30.0
        )
        if reply.status != 200:
            return None
        tokens = reply.body.get("tokens") if isinstance(reply.body, dict) else None
        if not isinstance(tokens, list):
            return None
        return [int(t) for t in tokens]

    async def inflight(self, metric_names: Iterable[str], timeout: float = 5.0) -> Reading:
        """Sum of the named gauges over all label sets, or why there is none: NO_ANSWER when
        /metrics did not answer within `timeout` seconds in all (connect, send, read), or
        could not be reached; NO_GAUGES when it answered without them (or with no page)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            async with asyncio.timeout(timeout):  # httpx's own bounds each phase apart
                response = await self._client.get("/metrics", timeout=timeout)
        except (httpx.TransportError, TimeoutError):
            return Unread.NO_ANSWER
        except httpx.HTTPError:  # an answer it could not decode
            return Unread.NO_GAUGES
        if response.status_code != 200:
            return Unread.NO_GAUGES
        wanted = set(metric_names)
        total, seen = 0.0, False
        try:
            for family in text_string_to_metric_families(response.text):
                for sample in family.samples:
                    if sample.name in wanted:
                        total += sample.value
                        seen = True
        except ValueError:
            return Unread.NO_GAUGES
        return total if seen else Unread.NO_GAUGES

    async def metrics_page(self, timeout: float = 5.0) -> str | None:
        """The text of /metrics, or None when it did not answer 200 within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.get("/metrics", timeout=timeout)
        except (httpx.HTTPError, TimeoutError):
            return None
        return response.text if response.status_code == 200 else None

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send one request and time it to the last byte (streams are read whole)."""
        headers = {"X-Request-Id": request_id} if request_id else {}
        began = time.perf_counter()
        response = await self._client.request(
            method, path, json=body, headers=headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT
        )
        ms = (time.perf_counter() - began) * 1000
        return Reply(response.status_code, _json_or_none(response), ms, response.text)


def _json_or_none(response: httpx.Response) -> Any:
    if "text/event-stream" in response.headers.get("content-type", ""):
        return _sse_events(response.text)
    try:
        return response.json()
    except ValueError:
        return None


def _sse_events(text: str) -> list[Any] | None:
    """The JSON payloads of a server-sent-events stream, `[DONE]` excluded."""
    import json

    events = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        try:
            events.append(json.loads(data))
        except ValueError:
            return None
    return events


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
