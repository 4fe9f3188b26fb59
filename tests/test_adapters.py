"""LoRA adapters loaded at run time: the bookkeeping and the short plan (pure), then the
whole program over `warmgate sim --enable-lora`: a new adapter is warm within seconds."""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from wgutil import WARMGATE, Running, free_port, http_get, wait_for

from warmgate import plan
from warmgate.adapters import AdapterBook

BASE = plan.ModelInfo("base", 2048)
UPSTREAM = plan.UpstreamInfo(
    (BASE, plan.ModelInfo("sql", None, is_lora=True)), has_tokenize=True, tokens_per_word=1.3
)


# --- the book ----------------------------------------------------------------------------


def test_new_adapters_wait_in_the_order_seen_and_startup_ones_count_as_warm() -> None:
    book = AdapterBook()
    assert book.served({"a": "base", "b": "base"}, 10.0, warmed_at_startup={"a"}) == ["a", "b"]
    assert book.counts() == {"pending": 1, "warming": 0, "warm": 1, "failed": 0}
    assert book.served({"a": "base", "b": "base", "c": "base"}, 11.0) == ["c"]
    assert book.next_pending() == "b"
    book.started("b")
    assert (book.warming(), book.next_pending()) == ("b", "c")
    book.finished("b", 14.5)
    book.started("c")
    book.finished("c", 15.0, error="HTTP 404: no such adapter")
    status = {a["name"]: a for a in book.as_status(started=0.0)}
    assert status["a"]["at_startup"] is True and status["a"]["state"] == "warm"
    assert (status["b"]["state"], status["b"]["warm_after_s"]) == ("warm", 4.5)
    assert status["c"]["state"] == "failed" and "404" in str(status["c"]["error"])
    assert book.next_pending() is None


def test_a_stopped_warmup_waits_again_and_an_unloaded_adapter_is_forgotten() -> None:
    book = AdapterBook()
    book.served({"a": "base"}, 1.0)
    book.started("a")
    book.stopped("a")
    assert book.next_pending() == "a"
    book.started("a")
    assert book.served({}, 2.0) == [] and book.adapters == ()
    book.finished("a", 3.0)  # its warm-up ending after the unload records nothing
    assert book.adapters == ()
    assert book.served({"a": "base"}, 4.0) == ["a"]  # reloaded: a new adapter
    assert book.next_pending() == "a"


# --- the short plan ------------------------------------------------------------------------


def test_adapter_plan_is_one_short_request_per_endpoint_one_at_a_time() -> None:
    the_plan = plan.adapter_plan(plan.PlanSettings(), UPSTREAM, "sql")
    shapes = the_plan.shapes
    assert {s.model for s in shapes} == {"sql"}
    assert sorted(s.endpoint for s in shapes) == ["/v1/chat/completions", "/v1/completions"]
    assert {s.concurrency for s in shapes} == {1}
    assert max(s.prompt_tokens for s in shapes) <= 32
    assert the_plan.warnings == ()  # the base model's max_model_len stood in for the card's


def test_adapter_plan_of_an_unloaded_adapter_is_a_plan_error() -> None:
    with pytest.raises(plan.PlanError, match="no longer in /v1/models"):
        plan.adapter_plan(plan.PlanSettings(), UPSTREAM, "gone")


# --- the whole program over the simulator -----------------------------------------------------

ARGS = ["--concurrency", "1,4", "--max-repeats", "3", "--drain-min", "0"]
ARGS += ["--health-interval", "0.1", "--adapter-interval", "1"]
SIM = ["--max-model-len", "1024", "--time-scale", "0.02", "--load-seconds", "1", "--enable-lora"]
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def _post(port: int, path: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _adapters(port: int) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in http_get(port, "/status")[1]["adapters"]}


def _metric(port: int, state: str) -> float | None:
    text = http_get(port, "/metrics")[1]
    found = re.search(rf'^warmgate_adapters{{state="{state}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


@contextlib.contextmanager
def ready_over_sim() -> Iterator[tuple[Running, int, int]]:
    """warmgate over a simulator that loads adapters at run time, once Ready: (warmgate,
    its probe port, the simulator's port); stopped on the way out."""
    sim_port = free_port()
    argv = ["run", "--host", "127.0.0.1", "--port", "0", *ARGS, "--", *WARMGATE, "sim"]
    argv += ["--host", "127.0.0.1", "--port", str(sim_port), *SIM]
    running = Running(argv, env=RUNTIME_LORA)
    try:
        port = int(running.wait_event("listening", timeout=15)["port"])
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=90)
        yield running, port, sim_port
    finally:
        running.stop()


def test_an_adapter_loaded_after_ready_is_warm_within_seconds(tmp_path: Path) -> None:
    with ready_over_sim() as (running, port, sim_port):
        assert _adapters(port) == {} and _metric(port, "warm") == 0.0

        weights = tmp_path / "sql-lora"
        weights.mkdir()
        load = {"lora_name": "sql", "lora_path": str(weights)}
        before = http_get(port, "/status")[1]["jit_lines_total"]
        assert _post(sim_port, "/v1/load_lora_adapter", load)[0] == 200
        loaded = time.monotonic()
        wait_for(lambda: _adapters(port).get("sql", {}).get("state") == "warm", timeout=10)
        took = time.monotonic() - loaded
        sql = _adapters(port)["sql"]
        assert sql["parent"] == "warmgate/sim" and not sql["at_startup"] and took <= 10
        assert _metric(port, "warm") == 1.0 and _metric(port, "failed") == 0.0
        assert http_get(port, "/ready")[0] == 200  # Ready all along: low priority
        assert all(e["phase"] == "ready" for e in running.events("phase")[-1:])

        # Its next request compiles nothing: the adapter's own key was paid by the warm-up.
        lines = http_get(port, "/status")[1]["jit_lines_total"]
        assert lines > before
        ask = {"model": "sql", "prompt": "select the rows", "max_tokens": 4}
        assert _post(sim_port, "/v1/completions", ask)[0] == 200
        chat = {"model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert _post(sim_port, "/v1/chat/completions", chat)[0] == 200
        time.sleep(0.5)
        assert http_get(port, "/status")[1]["jit_lines_total"] == lines

        # Unloaded: forgotten at the next poll.
        assert _post(sim_port, "/v1/unload_lora_adapter", {"lora_name": "sql"})[0] == 200
        wait_for(lambda: "sql" not in _adapters(port), timeout=5)
        assert _metric(port, "warm") == 0.0


def test_two_adapters_warm_one_at_a_time_in_the_order_seen(tmp_path: Path) -> None:
    with ready_over_sim() as (running, port, sim_port):
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            load = {"lora_name": name, "lora_path": str(tmp_path / name)}
            assert _post(sim_port, "/v1/load_lora_adapter", load)[0] == 200
        wait_for(
            lambda: (
                {a["state"] for a in _adapters(port).values()} == {"warm"}
                and len(_adapters(port)) == 2
            ),
            timeout=15,
        )
        warmed = [e["adapter"] for e in running.events("adapter_warmup") if e["state"] == "warm"]
        assert warmed == ["a", "b"]  # one at a time, in the order seen
        assert _metric(port, "warm") == 2.0
