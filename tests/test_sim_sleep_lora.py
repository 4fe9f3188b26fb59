"""The simulator's sleep mode and runtime LoRA adapters, over a real simulator process.

The contract is vLLM 0.32's: the sleep routes exist only with VLLM_SERVER_DEV_MODE=1, the
adapter routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 or true. While asleep /health
stays 200 and generation requests wait. An adapter's first request, and each batch size's
first step after a wake-up that freed memory, show up as lazily compiled keys.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from simutil import Sim, cost, run_sim, sse_events

DEV = {"VLLM_SERVER_DEV_MODE": "1"}
RUNTIME_LORA = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
SLEEP_MODE = ("--profile", "h100", "--enable-sleep-mode")


def complete(sim: Sim, model: str | None = None, **body: Any) -> httpx.Response:
    request = {"prompt": "Tell me a story", "max_tokens": 4, **body}
    if model is not None:
        request["model"] = model
    response = sim.post("/v1/completions", request, timeout=20)
    assert response.status_code == 200, response.text
    return response


def compiled(response: httpx.Response) -> list[str]:
    return cost(response)[2]


def load(sim: Sim, name: str, path: Path | str, **extra: Any) -> httpx.Response:
    return sim.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), **extra})


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    info: dict[str, Any] = response.json()["error"]
    assert info["code"] == status
    return info


# -- sleep mode ---------------------------------------------------------------------------


def test_sleep_routes_exist_only_in_dev_mode() -> None:
    with Sim(*SLEEP_MODE, env={"VLLM_SERVER_DEV_MODE": "0"}) as sim:
        assert sim.post("/sleep", {}).status_code == 404
        assert sim.get("/is_sleeping").status_code == 404
        assert sim.post("/wake_up", {}).json() == {"detail": "Not Found"}


def test_sleep_wake_cycle_bodies_health_and_metrics() -> None:
    with Sim(*SLEEP_MODE, env=DEV) as sim:
        assert sim.get("/is_sleeping").json() == {"is_sleeping": False}
        asleep = sim.post("/sleep?level=1", None)
        assert (asleep.status_code, asleep.json()) == (200, {"status": "sleeping", "level": 1})
        assert sim.get("/is_sleeping").json() == {"is_sleeping": True}
        assert sim.get("/health").status_code == 200  # vLLM's /health only checks the engine
        metrics = sim.get("/metrics").text
        assert 'sleep_state="awake"} 0.0' in metrics
        assert 'sleep_state="weights_offloaded"} 1.0' in metrics
        awake = sim.post("/wake_up", None)
        assert (awake.status_code, awake.json()) == (200, {"status": "awake", "tags": None})
        assert sim.get("/is_sleeping").json() == {"is_sleeping": False}
        assert 'sleep_state="awake"} 1.0' in sim.get("/metrics").text


def test_partial_wake_up_by_tags() -> None:
    with Sim(*SLEEP_MODE, env=DEV) as sim:
        sim.post("/sleep?level=2", None)
        assert 'sleep_state="discard_all"} 1.0' in sim.get("/metrics").text
        weights = sim.post("/wake_up?tags=weights", None).json()
        assert weights == {"status": "sleeping", "tags": ["weights"]}
        assert sim.get("/is_sleeping").json() == {"is_sleeping": True}
        kv = sim.post("/wake_up?tags=kv_cache", None).json()
        assert kv == {"status": "awake", "tags": ["kv_cache"]}
        # Level 0 only pauses the scheduler; the tag "scheduling" resumes it.
        sim.post("/sleep?level=0", None)
        assert sim.get("/is_sleeping").json() == {"is_sleeping": True}
        assert sim.post("/wake_up?tags=scheduling", None).json()["status"] == "awake"
        assert sim.get("/is_sleeping").json() == {"is_sleeping": False}


@pytest.mark.parametrize(
    ("query", "loc", "kind"),
    [
        ("level=3", "query.level", "less_than_equal"),
        ("level=-1", "query.level", "greater_than_equal"),
        ("level=one", "query.level", "int_parsing"),
        ("mode=later", "query.mode", "literal_error"),
    ],
)
def test_bad_sleep_query_is_a_400(query: str, loc: str, kind: str) -> None:
    with Sim(env=DEV) as sim:
        info = error(sim.post(f"/sleep?{query}", None), 400)
        assert (info["type"], info["param"]) == ("Bad Request", loc)
        assert f"'type': '{kind}'" in info["message"]
        assert sim.get("/is_sleeping").json() == {"is_sleeping": False}


def test_a_request_sent_while_asleep_waits_for_wake_up() -> None:
    with Sim(env=DEV) as sim, concurrent.futures.ThreadPoolExecutor(1) as pool:
        sim.post("/sleep?level=1", None)
        pending = pool.submit(complete, sim)
        time.sleep(0.5)
        assert not pending.done()  # queued behind the paused scheduler, not refused
        sim.post("/wake_up", None)
        assert pending.result(timeout=10).json()["choices"][0]["text"]


def test_sleep_aborts_requests_in_flight() -> None:
    body = {"prompt": "Go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with Sim("--time-scale", "1", env=DEV) as sim, sim.client(timeout=20) as client:
        with client.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert sim.post("/sleep", None).json() == {"status": "sleeping", "level": 1}
            rest = "\n".join(lines)
        reasons = [e["choices"][0]["finish_reason"] for e in sse_events(rest) if e != "[DONE]"]
        assert reasons[-1] == "abort"


def stream_around_sleep(
    sim: Sim, query: str, while_asleep: Callable[[], None] = lambda: None
) -> list[str]:
    """A long stream, with a sleep sent once its first token is out; `while_asleep` runs
    after that, then a wake-up. The stream's finish reasons."""
    body = {"prompt": "Go on", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with (
        sim.client(timeout=20) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        client.stream("POST", "/v1/completions", json=body) as stream,
    ):
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        asleep = pool.submit(sim.post, f"/sleep?{query}", None)
        while_asleep()
        assert asleep.result(timeout=20).status_code == 200
        sim.post("/wake_up", None)
        rest = "\n".join(lines)
    reasons = [e["choices"][0]["finish_reason"] for e in sse_events(rest) if e != "[DONE]"]
    return [r for r in reasons if r is not None]


def finished(sim: Sim) -> float:
    """Requests finished so far, whatever the reason (vllm:request_success_total)."""
    lines = sim.get("/metrics").text.splitlines()
    return sum(float(ln.split()[-1]) for ln in lines if ln.startswith("vllm:request_success_total"))


def test_sleep_mode_wait_lets_requests_in_flight_finish() -> None:
    with Sim("--time-scale", "1", env=DEV) as sim:
        assert stream_around_sleep(sim, "mode=wait") == ["length"]


def test_sleep_mode_keep_pauses_requests_in_flight_until_wake_up() -> None:
    def asleep() -> None:
        time.sleep(1.5)  # the whole stream takes ~1 s when not paused
        assert sim.get("/is_sleeping").json() == {"is_sleeping": True}
        assert finished(sim) == 0  # neither done nor aborted: held

    with Sim("--time-scale", "1", env=DEV) as sim:
        assert stream_around_sleep(sim, "mode=keep", asleep) == ["length"]


def test_wake_up_after_sleep_mode_reallocates_each_batch_bucket_once() -> None:
    with Sim(*SLEEP_MODE, env=DEV) as sim:
        complete(sim)
        assert compiled(complete(sim)) == []  # warm
        sim.post("/sleep?level=1", None)
        sim.post("/wake_up", None)
        after = complete(sim)
        assert compiled(after) == ["realloc:1"]
        assert "realloc:1" in sim.jit_keys()  # the same line a lazy compile prints
        assert compiled(complete(sim)) == []
        assert int(after.headers["x-sim-cached-tokens"]) == 0  # the prefix cache was dropped


def test_without_sleep_mode_sleeping_only_pauses() -> None:
    """vLLM's CPU build (and a GPU without --enable-sleep-mode) frees nothing: wake-up
    reallocates nothing, though the prefix cache is still cleared at level 1."""
    with Sim(env=DEV) as sim:
        complete(sim)
        assert compiled(complete(sim)) == []
        sim.post("/sleep?level=1", None)
        sim.post("/wake_up", None)
        assert compiled(complete(sim)) == []


def test_waking_from_level_2_takes_longer_than_from_level_1() -> None:
    # h100 profile at time scale 0.1: level 1 wakes in 40 ms, level 2 reloads in 200 ms.
    with Sim(*SLEEP_MODE, "--time-scale", "0.1", env=DEV) as sim:
        sim.post("/sleep?level=2", None)
        started = time.monotonic()
        sim.post("/wake_up", None)
        assert time.monotonic() - started >= 0.2


def test_sleep_mode_is_refused_on_the_cpu_profile() -> None:
    done = run_sim(["--enable-sleep-mode"])
    assert done.returncode == 2
    assert "Sleep mode is not supported on current platform" in done.stderr
    assert "Traceback" not in done.stderr


def test_dev_mode_must_be_an_integer() -> None:
    done = run_sim([], env={"VLLM_SERVER_DEV_MODE": "yes"})
    assert done.returncode == 2
    assert "VLLM_SERVER_DEV_MODE='yes' must be an integer" in done.stderr


# -- LoRA adapters ------------------------------------------------------------------------


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    path = tmp_path / "sql-lora"
    path.mkdir()
    return path


def test_lora_routes_exist_only_with_runtime_updating(adapter_dir: Path) -> None:
    with Sim("--enable-lora") as sim:
        assert load(sim, "a", adapter_dir).status_code == 404


def test_loading_without_enable_lora_is_a_500(adapter_dir: Path) -> None:
    with Sim(env=RUNTIME_LORA) as sim:
        info = error(load(sim, "a", adapter_dir), 500)
        assert info["message"] == "LoRA is not enabled. Use --enable-lora to enable LoRA."
        assert info["type"] == "InternalServerError"


def test_load_serve_and_unload_an_adapter(adapter_dir: Path) -> None:
    with Sim("--model", "base", "--enable-lora", env=RUNTIME_LORA) as sim:
        loaded = load(sim, "sql", adapter_dir)
        assert loaded.status_code == 200
        assert loaded.text == "Success: LoRA adapter 'sql' added successfully."
        cards = sim.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["base", "sql"]
        assert (cards[1]["root"], cards[1]["parent"]) == (str(adapter_dir), "base")
        assert cards[1]["max_model_len"] is None

        complete(sim)  # the base model's shape is warm ...
        first = complete(sim, "sql")
        assert compiled(first) == ["lora:sql"]  # ... the adapter's first request is not
        assert first.json()["model"] == "sql"
        assert compiled(complete(sim, "sql")) == []

        unloaded = sim.post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert unloaded.text == "Success: LoRA adapter 'sql' removed successfully."
        gone = sim.post("/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1})
        assert error(gone, 404)["type"] == "NotFoundError"
        assert [c["id"] for c in sim.get("/v1/models").json()["data"]] == ["base"]

        # Loaded anew, its weights may differ: its first request is cold again.
        assert load(sim, "sql", adapter_dir).status_code == 200
        assert compiled(complete(sim, "sql")) == ["lora:sql"]


def test_adapter_errors_as_vllm_answers_them(adapter_dir: Path, tmp_path: Path) -> None:
    with Sim("--model", "base", "--enable-lora", env=RUNTIME_LORA) as sim:
        assert load(sim, "sql", adapter_dir).status_code == 200
        again = error(load(sim, "sql", adapter_dir), 400)
        assert again["type"] == "InvalidUserInput"
        assert "has already been loaded" in again["message"]
        assert load(sim, "sql", adapter_dir, load_inplace=True).status_code == 200
        base = error(load(sim, "base", adapter_dir), 400)
        assert base["message"] == "The lora adapter 'base' conflicts with a served base model."
        missing = error(load(sim, "x", tmp_path / "nowhere"), 404)
        # vLLM strips paths from the messages it answers.
        assert missing["message"] == "Loading lora x failed: No adapter found for <path>"
        empty = error(load(sim, "", adapter_dir), 400)
        assert empty["message"] == "Both 'lora_name' and 'lora_path' must be provided."
        no_path = error(sim.post("/v1/load_lora_adapter", {"lora_name": "y"}), 400)
        assert (no_path["type"], no_path["param"]) == ("Bad Request", "body.lora_path")
        unknown = error(sim.post("/v1/unload_lora_adapter", {"lora_name": "y"}), 404)
        assert unknown["message"] == "The lora adapter 'y' cannot be found."


def test_lora_modules_are_served_from_the_start(adapter_dir: Path) -> None:
    with Sim("--enable-lora", "--lora-modules", f"sql={adapter_dir}") as sim:
        assert [c["id"] for c in sim.get("/v1/models").json()["data"]][1:] == ["sql"]
        assert sim.post("/v1/load_lora_adapter", {}).status_code == 404  # not at run time
        assert "lora:sql" in compiled(complete(sim, "sql"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-modules", "sql=/no/such/dir"], "No adapter found for /no/such/dir"),
        (["--enable-lora", "--lora-modules", "sql"], "expected name=path"),
        (["--enable-lora", "--lora-modules", "sql=/no/such/dir"], "not a directory"),
        (["--enable-lora", "--max-loras", "0"], "--max-loras must be at least 1"),
    ],
)
def test_bad_lora_flags_exit_2(args: list[str], message: str) -> None:
    done = run_sim(args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_lora_modules_need_enable_lora(adapter_dir: Path) -> None:
    done = run_sim(["--lora-modules", f"sql={adapter_dir}"])
    assert done.returncode == 2
    assert "--lora-modules needs --enable-lora" in done.stderr


@pytest.mark.parametrize(("max_loras", "shared"), [(1, False), (2, True)])
def test_max_loras_bounds_the_adapters_of_one_batch(
    adapter_dir: Path, max_loras: int, shared: bool
) -> None:
    modules = ("--lora-modules", f"a={adapter_dir}", "--lora-modules", f"b={adapter_dir}")
    args = ("--enable-lora", "--max-loras", str(max_loras), "--time-scale", "1", *modules)
    body = {"max_tokens": 40, "ignore_eos": True}
    with Sim(*args) as sim, concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda name: complete(sim, name, **body), ["a", "b"]))
        widest = max(int(r.headers["x-sim-batch-max"]) for r in results)
        assert (widest > 1) is shared
