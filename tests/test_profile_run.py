"""The traffic profile end to end over the simulator: learned after Ready, written at the
drain, planned first at the next start; and no prompt text reaches the file."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from wgutil import Running, free_port, http_get, wait_for

from warmgate import traffic
from warmgate.profilestore import ProfileStore
from warmgate.upstream import Upstream

SECRET = "zebra-quartz-marmalade-7731"  # a prompt no profile may hold
# A mix the default plan covers poorly: streamed chat, json and logprobs together.
MIX: dict[str, Any] = {
    "stream": True,
    "logprobs": True,
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
    "max_tokens": 4,
}


def start(cache_dir: Path, sim_port: int) -> tuple[Running, int]:
    gate = Running(
        [
            *("run", "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(cache_dir)),
            *("--features", "greedy", "--concurrency", "1", "--max-repeats", "2"),
            *("--max-tokens", "1", "--health-interval", "0.1", "--drain-min", "1"),
            *("--profile-interval", "600"),  # so the file below is the drain's write
            *("--", sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1"),
            *("--port", str(sim_port), "--load-seconds", "0", "--time-scale", "0"),
            *("--enable-log-requests", "--enable-log-outputs"),
        ],
        env={"HOSTNAME": "pod-a"},
    )
    port = int(gate.wait_event("listening", timeout=30)["port"])
    wait_for(
        lambda: http_get(port, "/ready")[0] == 200 or gate.proc.poll() is not None,
        timeout=60,
        interval=0.1,
    )
    assert gate.proc.poll() is None, f"warmgate exited:\n{gate.stderr[-3000:]}"
    return gate, port


def send_mix(sim_port: int, requests: int) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{sim_port}", timeout=20) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(requests):
            words = " ".join([SECRET] * (1 + 20 * (i % 3)))  # three lengths
            body = {"model": model, "messages": [{"role": "user", "content": words}], **MIX}
            reply = client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text


def stop(gate: Running) -> None:
    gate.proc.send_signal(signal.SIGTERM)
    assert gate.wait(timeout=30) == 0, gate.stderr[-3000:]


def test_a_restart_warms_the_learned_shapes_first_and_no_prompt_is_stored(tmp_path: Path) -> None:
    sim_port = free_port()
    gate, port = start(tmp_path, sim_port)
    try:
        send_mix(sim_port, 12)
        wait_for(  # the log's lines have reached the learner
            lambda: http_get(port, "/status")[1]["profile"]["learned"]["seen"] >= 12,
            timeout=20,
            interval=0.2,
        )
        stop(gate)
    finally:
        gate.stop()
    files = list((tmp_path / "profiles").glob("*/pod-a.json"))
    assert len(files) == 1, list(tmp_path.rglob("*"))
    raw = files[0].read_text()
    assert SECRET not in raw and "zebra" not in raw
    data = json.loads(raw)
    assert data["requests"] == 12, data  # the warm-up's own requests are left out
    (combo,) = data["combos"]
    assert combo["endpoint"] == "chat" and combo["stream"] is True
    assert combo["feature"] == "sampling+logprobs+json", combo

    gate, port = start(tmp_path, free_port())
    try:
        status = http_get(port, "/status")[1]
        shapes = status["shapes"]
        assert shapes[0]["source"] == "profile", shapes[:3]
        assert "sampling+logprobs+json" in shapes[0]["family"]
        assert "/stream/" in shapes[0]["family"]
        assert {s["source"] for s in shapes} == {"profile", "default"}
        loaded = status["profile"]["loaded"]
        assert loaded["requests"] == 12 and loaded["age_s"] is not None
        stop(gate)
    finally:
        gate.stop()


class MetricsPage(http.server.BaseHTTPRequestHandler):
    """An upstream's /metrics: the warm-up's 5 requests, then 10 clients' of 150 tokens."""

    page = ""

    def do_GET(self) -> None:
        body = MetricsPage.page.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def metrics(under_200: int, running: int) -> str:
    return (
        "# TYPE vllm:request_prompt_tokens histogram\n"
        f'vllm:request_prompt_tokens_bucket{{le="100.0"}} 5\n'
        f'vllm:request_prompt_tokens_bucket{{le="200.0"}} {5 + under_200}\n'
        f'vllm:request_prompt_tokens_bucket{{le="+Inf"}} {5 + under_200}\n'
        f"vllm:request_prompt_tokens_count {5 + under_200}\n"
        "vllm:request_prompt_tokens_sum 0\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f"vllm:num_requests_running {running}\n"
    )


def learn_from(
    learner: traffic.Learner, after_ready: Callable[[Upstream], Awaitable[None]]
) -> dict[str, Any]:
    """Run `learner` against a loopback /metrics page (the warm-up's five at Ready), with
    `after_ready` changing the page meanwhile; then the drain's write. The file it wrote."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MetricsPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    MetricsPage.page = metrics(0, 0)

    async def scenario() -> None:
        upstream = Upstream(f"http://127.0.0.1:{server.server_port}")
        task = asyncio.create_task(learner.learn(upstream))
        await asyncio.sleep(0.1)  # the baseline at Ready: the warm-up's five
        assert learner.requests.learning
        await after_ready(upstream)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await learner.save(upstream)
        await upstream.aclose()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        server.shutdown()
    return dict(json.loads(learner.store.own.read_text()))


def test_the_learner_counts_from_ready_samples_concurrency_and_writes(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path, "k", "pod")
    learner = traffic.Learner(store, outputs_logged=False, interval=0.2)
    learner.load()
    assert learner.loaded is None

    async def clients(upstream: Upstream) -> None:
        MetricsPage.page = metrics(10, 3)
        learner.requests.feed(1, f"Received request chatcmpl-x: params: {PARAMS}\n".encode())
        await asyncio.sleep(0.7)

    data = learn_from(learner, clients)
    assert data["requests"] == 1
    assert sum(data["prompt_tokens"].values()) == pytest.approx(10.0)  # not the warm-up's 5
    assert set(data["prompt_tokens"]) == {"128", "256"}
    assert set(data["concurrency"]) == {"4"} and data["concurrency"]["4"] >= 2
    status = learner.status(time.time())
    assert status["learned"]["lengths_known"] and status["learned"]["written_s_ago"] < 5
    again = traffic.Learner(store, outputs_logged=False, interval=1)
    again.load()  # a restarted container: what it finds, and its own counts carried on
    assert again.loaded is not None and again.loaded.requests == 1
    assert again.mine.requests == 1


def test_warmgates_own_warm_ups_after_ready_are_left_out(tmp_path: Path) -> None:
    """A re-warm or an adapter's warm-up after Ready (Learner.own_traffic): its requests
    are not the clients' lengths, and its batches not the clients' concurrency."""
    learner = traffic.Learner(ProfileStore(tmp_path, "k", "pod"), False, interval=0.2)

    async def own_then_clients(upstream: Upstream) -> None:
        async with learner.own_traffic(upstream):
            MetricsPage.page = metrics(4, 4)  # four of warmgate's, all at once
            await asyncio.sleep(0.5)  # the learner samples meanwhile, and must not count
        MetricsPage.page = metrics(4 + 10, 0)  # then ten clients', one at a time
        await asyncio.sleep(0.3)

    data = learn_from(learner, own_then_clients)
    assert sum(data["prompt_tokens"].values()) == pytest.approx(10.0)
    assert data["concurrency"] == {}


PARAMS = (
    "SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, "
    "logprobs=None, prompt_logprobs=None, structured_outputs=None), lora_request: None."
)
