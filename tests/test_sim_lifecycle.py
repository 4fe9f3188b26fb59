"""Start-up, shutdown modes and options of a real simulator process."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from simutil import Sim, cost, poll, refused, run_sim, sse_events
from wgutil import free_port

LONG = {"prompt": "tell me everything", "max_tokens": 3000, "ignore_eos": True}


def running_requests(sim: Sim) -> int:
    for line in sim.get("/metrics").text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no vllm:num_requests_running in /metrics")


def in_background(
    sim: Sim, body: dict[str, Any]
) -> tuple[ThreadPoolExecutor, Future[httpx.Response]]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(sim.post, "/v1/completions", body, 20.0)


def test_port_refuses_connections_until_loaded() -> None:
    port = free_port()
    with Sim("--port", str(port), "--load-seconds", "2.5", wait_listening=False) as sim:
        sim.wait_event("starting")
        assert refused(port)
        time.sleep(0.3)
        assert refused(port)
        listening = sim.wait_event("listening", timeout=8)
        assert (listening["port"], listening["loaded"]) == (port, True)
        sim.port = port
        assert sim.get("/health").status_code == 200
        sim.wait_line(lambda line: line == "INFO:     Application startup complete.")


def test_listen_early_answers_503_until_loaded() -> None:
    with Sim("--listen-early", "--load-seconds", "2.5") as sim:
        assert sim.wait_event("listening")["loaded"] is False
        health = sim.get("/health")
        assert (health.status_code, health.content) == (503, b"")
        busy = sim.post("/v1/completions", {"prompt": "x"})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == 503
        assert sim.get("/v1/models").status_code == 503
        sim.wait_event("loaded", timeout=8)
        assert sim.get("/health").status_code == 200


def test_sigterm_abort_ends_in_flight_requests_with_finish_reason_abort() -> None:
    with Sim("--time-scale", "1") as sim:
        pool, waiting = in_background(sim, LONG)
        stream = {**LONG, "stream": True}
        with (
            sim.client(timeout=20) as client,
            client.stream("POST", "/v1/completions", json=stream) as r,
        ):
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert poll(lambda: running_requests(sim) == 2)
            sim.signal(signal.SIGTERM)
            rest = "\n".join(lines)
        events = sse_events(rest)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "abort"
        response = waiting.result(timeout=10)
        pool.shutdown()
        assert response.status_code == 200
        payload = response.json()
        assert payload["choices"][0]["finish_reason"] == "abort"
        assert 0 < payload["usage"]["completion_tokens"] < 3000
        assert sim.wait_exit(5) == 0
        assert sim.wait_event("stopped")["mode"] == "abort"


def test_sigterm_hang_never_finishes_and_exits_when_clients_leave() -> None:
    with Sim("--time-scale", "1", "--on-sigterm", "hang") as sim:
        timeout = httpx.Timeout(10, read=1.0)
        with httpx.Client(base_url=sim.url, timeout=timeout) as client:
            try:
                with client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
                    lines = r.iter_lines()
                    assert next(line for line in lines if line.startswith("data: "))
                    sim.signal(signal.SIGTERM)
                    sim.wait_event("shutting_down")
                    assert poll(lambda: refused(sim.port))  # stops accepting
                    sim.signal(signal.SIGTERM)  # a second SIGTERM is ignored too
                    sim.wait_event("signal_ignored")
                    for _ in lines:  # tokens stop; the read times out instead of ending
                        pass
                    raise AssertionError("the stream ended although the engine hangs")
            except httpx.ReadTimeout:
                pass
            assert sim.proc is not None and sim.proc.poll() is None
        # The client has gone: now the process exits.
        assert sim.wait_exit(5) == 0


def test_sigterm_drain_finishes_in_flight_and_refuses_new_work() -> None:
    with Sim("--time-scale", "1", "--on-sigterm", "drain") as sim:
        body = {"prompt": "drain me", "max_tokens": 400, "ignore_eos": True}
        pool, waiting = in_background(sim, body)
        assert poll(lambda: running_requests(sim) == 1)
        sim.signal(signal.SIGTERM)
        sim.wait_event("shutting_down")
        refused_work = sim.post("/v1/completions", {"prompt": "new"})
        assert refused_work.status_code == 500
        assert refused_work.json()["error"] == {
            "message": "cannot schedule new futures after shutdown",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
        assert sim.get("/health").status_code == 200  # as vLLM while it drains
        response = waiting.result(timeout=10)
        pool.shutdown()
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "length"
        assert response.json()["usage"]["completion_tokens"] == 400
        assert sim.wait_exit(5) == 0


def test_idle_sigterm_and_sigint_exit_zero() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        with Sim() as sim:
            sim.signal(signum)
            assert sim.wait_exit(5) == 0
            assert sim.wait_event("stopped")["exit_code"] == 0


def test_sigterm_during_loading_exits_zero() -> None:
    with Sim("--load-seconds", "30", wait_listening=False) as sim:
        sim.wait_event("starting")
        sim.signal(signal.SIGTERM)
        assert sim.wait_exit(5) == 0


def test_options_from_environment_variables() -> None:
    env = {"WARMGATE_SIM_MODEL": "env/model", "WARMGATE_SIM_MAX_MODEL_LEN": "1234"}
    with Sim(env=env) as sim:
        card = sim.get("/v1/models").json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("env/model", 1234)


def test_engine_config_line_shows_the_step_budget_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # vLLM's engine core prints it on stdout before loading; --crash-after ends the run.
    default = run_sim(["--crash-after", "0.3", "--max-model-len", "2048"])
    (line,) = [x for x in default.stdout.splitlines() if "Initializing a V1 LLM engine" in x]
    assert "max_seq_len=2048, " in line and "enable_chunked_prefill=True, " in line
    assert "'compile_ranges_endpoints': [2048], " in line  # the CPU build's default budget
    monkeypatch.setenv("WARMGATE_SIM_ENABLE_CHUNKED_PREFILL", "false")
    monkeypatch.setenv("WARMGATE_SIM_MAX_NUM_BATCHED_TOKENS", "4096")
    from_env = run_sim(["--crash-after", "0.3", "--max-model-len", "4096"])
    assert "enable_chunked_prefill=False, " in from_env.stdout
    assert "'compile_ranges_endpoints': [4096], " in from_env.stdout


def test_costs_file_overrides_the_profile(tmp_path: Path) -> None:
    costs = tmp_path / "costs.toml"
    costs.write_text('[compile_ms]\n"logprobs" = 1000\n')
    with Sim("--costs", str(costs)) as sim:
        response = sim.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "logprobs": 1})
        assert cost(response)[1] >= 1000


def test_bad_options_exit_2_with_a_message(tmp_path: Path) -> None:
    flap = run_sim(["--health-flap", "often"])
    assert flap.returncode == 2
    assert "--health-flap" in flap.stderr
    assert run_sim(["--on-sigterm", "explode"]).returncode == 2
    budget = run_sim(["--max-num-batched-tokens", "512", "--no-enable-chunked-prefill"])
    assert budget.returncode == 2
    assert budget.stderr.strip().splitlines() == [
        "warmgate sim: --max-num-batched-tokens 512 is smaller than --max-model-len 4096 with "
        "--no-enable-chunked-prefill, which makes vLLM reject longer prompts: raise "
        "--max-num-batched-tokens, lower --max-model-len or enable chunked prefill"
    ]
    bad_costs = tmp_path / "bad.json"
    bad_costs.write_text(json.dumps({"warp_speed": 9}))
    result = run_sim(["--costs", str(bad_costs)])
    assert result.returncode == 2
    assert "warp_speed" in result.stderr


def test_port_in_use_is_reported() -> None:
    with Sim() as first:
        result = run_sim(["--port", str(first.port)])
        assert result.returncode == 1
        assert "listen_failed" in result.stderr
