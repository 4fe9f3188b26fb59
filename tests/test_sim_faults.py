"""Injected faults, and load: each against a real simulator process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time

import httpx
import pytest
from simutil import Sim, run_sim, sse_events, token_prompt

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_crash_after_exits_with_the_crash_code() -> None:
    result = run_sim(["--crash-after", "0.3", "--crash-code", "7"])
    assert result.returncode == 7
    assert '"crash"' in result.stderr


def test_crash_during_load_never_listens() -> None:
    result = run_sim(["--load-seconds", "0.4", "--crash-during-load", "--crash-code", "3"])
    assert result.returncode == 3
    assert '"listening"' not in result.stderr


SEEDED = {"prompt": token_prompt(300), "max_tokens": 4, "temperature": 0.8, "seed": 1234}
CRASH_ON_SEED = ("--crash-on-feature", "seed", "--crash-above-tokens", "512", "--crash-code", "0")


def test_crash_on_feature_spares_other_features_and_small_prefills() -> None:
    with Sim(*CRASH_ON_SEED) as sim:
        assert sim.post("/v1/completions", SEEDED).status_code == 200  # 300 tokens: not above
        unseeded = {**SEEDED, "prompt": token_prompt(900)}
        del unseeded["seed"]
        assert sim.post("/v1/completions", unseeded).status_code == 200
        with pytest.raises(httpx.HTTPError):  # two prompts of 300: 600 tokens scheduled
            sim.post("/v1/completions", {**SEEDED, "prompt": [token_prompt(300, 1)] * 2})
        assert sim.wait_exit() == 0
    (crash,) = sim.events("crash")
    assert "--crash-on-feature seed: 600 prompt tokens scheduled" in crash["reason"]


def test_crash_on_feature_counts_the_prompts_already_scheduled() -> None:
    with Sim(*CRASH_ON_SEED, "--time-scale", "1") as sim, sim.client(timeout=60) as client:
        held = {"prompt": token_prompt(300, 2), "max_tokens": 2000, "ignore_eos": True}
        with client.stream("POST", "/v1/completions", json={**held, "stream": True}) as stream:
            lines = stream.iter_lines()  # held: a collected iterator would close the stream
            next(lines)  # the first token: the long request is running
            with pytest.raises(httpx.HTTPError):
                sim.post("/v1/completions", SEEDED)  # 300 running + 300 arriving
        assert sim.wait_exit() == 0
    assert "600 prompt tokens scheduled" in sim.events("crash")[0]["reason"]


def test_crash_on_feature_needs_a_feature_the_plan_knows() -> None:
    wrong = run_sim(["--crash-on-feature", "temperature"])
    assert wrong.returncode == 2 and "use one of greedy, sampling" in wrong.stderr
    orphan = run_sim(["--crash-above-tokens", "10"])
    assert orphan.returncode == 2 and "needs --crash-on-feature" in orphan.stderr


def test_health_flaps_between_200_and_503() -> None:
    with Sim("--health-flap", "0.3,0.3") as sim, sim.client() as client:
        statuses = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            statuses.append(client.get("/health").status_code)
            time.sleep(0.03)
        assert set(statuses) == {200, 503}
        changes = sum(1 for a, b in itertools.pairwise(statuses) if a != b)
        assert changes >= 2  # it comes back, and fails again: a flap, not a one-off


def test_fail_first_answers_500_then_recovers() -> None:
    with Sim("--fail-first", "2") as sim, sim.client() as client:
        body = {"prompt": "x", "max_tokens": 2}
        failed = [client.post("/v1/completions", json=body) for _ in range(2)]
        assert [r.status_code for r in failed] == [500, 500]
        assert failed[0].json()["error"]["type"] == "InternalServerError"
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert client.get("/health").status_code == 200


def test_malformed_answers_200_with_garbage() -> None:
    with Sim("--malformed") as sim:
        response = sim.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert response.status_code == 200
        with pytest.raises(ValueError):
            json.loads(response.content)
        assert sim.get("/health").status_code == 200


def test_slow_holds_back_generation_only() -> None:
    with Sim("--slow", "60") as sim:
        replies: list[int] = []

        def chat() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the simulator stops first
                replies.append(sim.post("/v1/chat/completions", CHAT, timeout=90).status_code)

        held = threading.Thread(target=chat, daemon=True)
        held.start()
        held.join(timeout=1.0)  # at --time-scale 0 a chat is answered at once
        assert sim.get("/health").status_code == 200
        assert sim.get("/v1/models").status_code == 200
        assert held.is_alive() and not replies  # the chat is still held back


def test_hang_health_after_stops_answering_health_only() -> None:
    with Sim("--hang-health-after", "1.0") as sim:
        assert sim.get("/health").status_code == 200
        time.sleep(1.1)
        with pytest.raises(httpx.ReadTimeout):
            sim.get("/health", timeout=0.5)
        assert sim.get("/v1/models").status_code == 200


def test_64_concurrent_requests_are_served_without_errors() -> None:
    with Sim("--time-scale", "0.2") as sim:

        async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
            if i % 3 == 0:
                response = await client.post("/v1/chat/completions", json=CHAT)
            elif i % 3 == 1:
                body = {"prompt": f"p{i}", "max_tokens": 8, "stream": True}
                response = await client.post("/v1/completions", json=body)
                assert sse_events(response.text)[-1] == "[DONE]"
            else:
                response = await client.post("/v1/completions", json={"prompt": f"q{i}"})
            return response.status_code, int(response.headers["x-sim-batch-max"])

        async def all_at_once() -> list[tuple[int, int]]:
            async with sim.async_client() as client:
                return list(await asyncio.gather(*(one(client, i) for i in range(64))))

        results = asyncio.run(all_at_once())
        assert [status for status, _ in results] == [200] * 64
        assert max(batch for _, batch in results) > 8  # they really ran together
