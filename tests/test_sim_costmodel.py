"""The cost model as clients see it: the x-sim-* headers of a real simulator process.

Assertions are on the simulated costs the simulator reports, never on wall-clock time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from simutil import Sim, cost, poll, token_prompt


def body(salt: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": token_prompt(50, salt), "max_tokens": 16, "ignore_eos": True, **extra}


def test_first_request_of_a_kind_pays_once_and_jit_lines_name_each_key() -> None:
    with Sim() as sim, sim.client() as client:
        seen: list[str] = []

        def send(path: str, payload: dict[str, Any]) -> tuple[float, float, list[str]]:
            response = client.post(path, json=payload)
            assert response.status_code == 200, response.text
            result = cost(response)
            seen.extend(result[2])
            return result

        _, warm_compile, warm_keys = send("/v1/completions", body(1))
        assert warm_compile > 0
        assert {"prefill:64", "sampling:random", "decode:1"} <= set(warm_keys)

        first = send("/v1/completions", body(2, logprobs=1))
        later = send("/v1/completions", body(3, logprobs=1))
        assert first[2] == ["logprobs", "logprobs_prefill:64"]
        assert first[1] > 0
        assert later[1:] == (0.0, [])
        assert first[0] / later[0] == pytest.approx(3.0, rel=0.1)  # vLLM CPU: 378 vs 128 ms

        json_first = send("/v1/completions", body(4, response_format={"type": "json_object"}))
        json_later = send("/v1/completions", body(5, response_format={"type": "json_object"}))
        assert json_first[2] == ["json", "json_grammar:object"]
        assert json_later[2] == []

        greedy = send("/v1/completions", body(6, temperature=0))
        assert greedy[2] == ["sampling:greedy", "sampling_batch:greedy@1"]

        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert "chat_template" in send("/v1/chat/completions", chat)[2]
        assert "chat_template" not in send("/v1/chat/completions", chat)[2]

        with client.stream("POST", "/v1/completions", json=body(7, stream=True)) as streamed:
            assert "stream" in cost(streamed)[2]
            seen.extend(cost(streamed)[2])
            streamed.read()

        # Each key compiled after start-up printed one JIT-monitor line, nothing more.
        assert poll(lambda: sorted(sim.jit_keys()) == sorted(seen))
        assert len(set(seen)) == len(seen)


def test_prefix_cache_makes_a_repeated_prompt_cheaper() -> None:
    with Sim() as sim, sim.client() as client:

        def send(tokens: list[int]) -> httpx.Response:
            response = client.post("/v1/completions", json={"prompt": tokens, "max_tokens": 1})
            assert response.status_code == 200
            return response

        send(token_prompt(600, 1))  # compiles the long prefill bucket
        send(token_prompt(10, 1))  # and the short one a cache hit leaves to compute
        fresh = send(token_prompt(600, 2))
        repeat = send(token_prompt(600, 2))
        assert fresh.headers["x-sim-cached-tokens"] == "0"
        assert repeat.headers["x-sim-cached-tokens"] == "592"  # 37 whole blocks of 16
        assert cost(repeat)[0] < cost(fresh)[0] / 4


def test_concurrent_requests_are_batched() -> None:
    # Real time here (--time-scale 1), so that four requests sent at once overlap.
    with Sim("--time-scale", "1") as sim:
        with sim.client() as client:
            client.post("/v1/completions", json=body(1, max_tokens=48))
            single = client.post("/v1/completions", json=body(2, max_tokens=48))
        single_cost = cost(single)[0]

        async def together() -> list[httpx.Response]:
            async with sim.async_client() as client:
                sends = [
                    client.post("/v1/completions", json=body(10 + i, max_tokens=48))
                    for i in range(4)
                ]
                return list(await asyncio.gather(*sends))

        responses = asyncio.run(together())
        assert all(r.status_code == 200 for r in responses)
        assert max(int(r.headers["x-sim-batch-max"]) for r in responses) == 4
        compiled = {key for r in responses for key in cost(r)[2]}
        assert "decode:4" in compiled
        # Four requests in one batch cost each little more than one alone (not 4x).
        assert max(cost(r)[0] for r in responses) < 1.6 * single_cost


def test_a_prompt_longer_than_the_step_budget_compiles_only_chunk_sized_prefills() -> None:
    with Sim("--max-num-batched-tokens", "1024") as sim, sim.client() as client:
        response = client.post(
            "/v1/completions", json={"prompt": token_prompt(3000, 1), "max_tokens": 1}
        )
        assert response.status_code == 200, response.text
        assert [k for k in cost(response)[2] if k.startswith("prefill:")] == ["prefill:1024"]
        metrics = client.get("/metrics").text
        assert 'vllm:iteration_tokens_total_sum{engine="0",model_name="warmgate/sim"} 3001.0' in (
            metrics
        )
        assert "warmgate_sim:engine_steps_total" in metrics
