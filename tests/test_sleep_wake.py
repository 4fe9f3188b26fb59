"""Sleep and wake: the short re-warm plan (pure), then the whole program over
`warmgate sim --enable-sleep-mode`: /ready follows the engine's sleep, /live stays 200."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from wgutil import WARMGATE, Running, exit_event, free_port, http_get, wait_for

from warmgate import plan

UPSTREAM = plan.UpstreamInfo((plan.ModelInfo("m", 2048),), has_tokenize=True, tokens_per_word=1.3)


def test_rewarm_plan_is_every_batch_bucket_and_one_short_request_per_endpoint() -> None:
    startup = plan.build_plan(plan.PlanSettings(), UPSTREAM)
    rewarm = plan.rewarm_plan(startup)
    shapes = rewarm.shapes
    assert len(shapes) < len(startup.shapes) / 2
    assert set(shapes) <= set(startup.shapes)
    order = [startup.shapes.index(s) for s in shapes]
    assert order == sorted(order)  # the start-up plan's order, most valuable first
    # Every batch size the start-up plan warmed meets its reallocation again...
    assert {s.concurrency for s in shapes} == {s.concurrency for s in startup.shapes}
    # ...and each endpoint its first request, once, and short.
    singles = [s for s in shapes if s.concurrency == 1]
    assert sorted(s.endpoint for s in singles) == ["/v1/chat/completions", "/v1/completions"]
    for s in singles:
        same = [t for t in startup.shapes if (t.endpoint, t.concurrency) == (s.endpoint, 1)]
        assert s.key.load == min(t.key.load for t in same)
    assert (rewarm.converge, rewarm.max_repeats) == (startup.converge, startup.max_repeats)


def test_rewarm_plan_of_the_pairwise_sweep_keeps_one_shape_per_bucket_and_endpoint() -> None:
    startup = plan.build_plan(plan.PlanSettings(coverage="pairwise"), UPSTREAM)
    shapes = plan.rewarm_plan(startup).shapes
    where = [(s.endpoint, s.concurrency) for s in shapes]
    assert len(where) == len(set(where))
    assert set(where) == {(s.endpoint, s.concurrency) for s in startup.shapes}


# --- the whole program over the simulator -----------------------------------------------------

HEALTH_INTERVAL = 0.25
# A small plan: two buckets, a 1024-token context; the h100 profile has sleep mode (the CPU
# build refuses --enable-sleep-mode, as vLLM's does).
ARGS = ["--concurrency", "1,4", "--max-repeats", "3", "--drain-min", "0"]
SIM = ["--max-model-len", "1024", "--time-scale", "0.02", "--load-seconds", "1"]


def _post(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _gate(
    *sim_args: str, wg: Sequence[str] = (), env: dict[str, str] | None = None
) -> tuple[Running, int, int]:
    """warmgate run over the simulator: (it, its probe port, the simulator's port)."""
    sim_port = free_port()
    argv = ["run", "--host", "127.0.0.1", "--port", "0", *ARGS, *wg]
    argv += ["--health-interval", str(HEALTH_INTERVAL), "--", *WARMGATE, "sim"]
    argv += ["--host", "127.0.0.1", "--port", str(sim_port), *SIM, *sim_args]
    running = Running(argv, env=env)
    return running, int(running.wait_event("listening", timeout=15)["port"]), sim_port


def _probe_until(
    port: int, done: Callable[[int, str], bool], timeout: float
) -> list[tuple[int, str, int]]:
    """(/ready status, phase, /live status) every 20 ms until `done(ready, phase)`."""
    seen: list[tuple[int, str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, body = http_get(port, "/ready")
        live, _ = http_get(port, "/live")
        seen.append((ready, body["phase"], live))
        if done(ready, body["phase"]):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"not done within {timeout} s; last answers {seen[-5:]}")


def test_sleep_makes_ready_503_and_wake_rewarms_before_200_live_throughout() -> None:
    running, port, sim_port = _gate(
        "--enable-sleep-mode", "--profile", "h100", env={"VLLM_SERVER_DEV_MODE": "1"}
    )
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=90)
        assert _post(sim_port, "/sleep?level=1")[0] == 200
        slept = time.monotonic()
        seen = _probe_until(port, lambda ready, _: ready == 503, timeout=10)
        took = time.monotonic() - slept
        # Two health intervals, and room for a busy 2-core machine's scheduling.
        assert took < 2 * HEALTH_INTERVAL + 1.0, took
        assert seen[-1] == (503, "sleeping", 200)
        assert http_get(port, "/startup")[0] == 200
        time.sleep(3 * HEALTH_INTERVAL)  # it stays asleep: no flapping back to ready
        assert http_get(port, "/ready") == (503, {"ok": False, "phase": "sleeping"})

        asleep = http_get(port, "/status")[1]
        assert _post(sim_port, "/wake_up")[0] == 200
        seen = _probe_until(port, lambda ready, _: ready == 200, timeout=60)
        before = seen[:-1]
        assert before and all(ready == 503 for ready, _, _ in before)
        assert "rewarming" in {phase for _, phase, _ in before}
        assert all(live == 200 for _, _, live in seen)
        status = http_get(port, "/status")[1]
        assert status["phase"] == "ready" and status["rewarm"]["wakes"] == 1
        shapes = status["rewarm"]["shapes"]
        startup = {s["concurrency"] for s in status["shapes"]}
        assert shapes and {s["concurrency"] for s in shapes} == startup
        assert len(shapes) < len(status["shapes"]) / 2
        assert all(s["status"] in ("converged", "verified", "out_of_repeats") for s in shapes)
        phases = [e["phase"] for e in running.events("phase")]
        assert phases[-3:] == ["sleeping", "rewarming", "ready"]
        assert running.events("rewarm_done")[-1]["ok"] is True

        # The re-warm paid the reallocations (the simulator logs each as a JIT line), and
        # those are not misses: no client was let in meanwhile.
        assert status["jit_lines_total"] > asleep["jit_lines_total"]
        misses = status["jit_misses_after_ready"]
        assert misses == asleep["jit_misses_after_ready"]
        # Warm again: a client request after the re-warm compiles nothing.
        body = {"model": "warmgate/sim", "prompt": "a plain question", "max_tokens": 4}
        assert _post(sim_port, "/v1/completions", body)[0] == 200
        time.sleep(0.5)
        assert http_get(port, "/status")[1]["jit_misses_after_ready"] == misses

        # A SIGTERM while asleep drains as from Ready.
        assert _post(sim_port, "/sleep?level=1")[0] == 200
        _probe_until(port, lambda _, phase: phase == "sleeping", timeout=10)
        running.proc.send_signal(signal.SIGTERM)
        assert running.wait(timeout=30) == 0
        assert running.events("drain")
        assert exit_event(running.stderr)["reason"] == "stopped"
    finally:
        running.stop()


def test_a_server_without_sleep_mode_is_not_asked_again() -> None:
    running, port, _ = _gate(wg=("--log-level", "debug"))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=90)
        running.wait_event("sleep_mode", timeout=10)
        time.sleep(4 * HEALTH_INTERVAL)
        assert http_get(port, "/ready")[0] == 200
        assert len(running.events("sleep_mode")) == 1
    finally:
        running.stop()
