"""The simulator's `--enable-log-requests` line prints vLLM 0.32's whole SamplingParams repr.

warmgate learns a traffic profile from this line (issue 18), so the simulator's must be
the real one: the field names always, and, where the cached vLLM CPU build is installed,
the exact text that vLLM's own request models and SamplingParams give for each request.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from simutil import Sim
from wgutil import wait_for

# SamplingParams.__repr__ of vLLM 0.32, in order.
FIELDS = (
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
    "watermarking", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "bad_words",
    "thinking_token_budget", "include_stop_str_in_output", "ignore_eos", "max_tokens",
    "min_tokens", "logprobs", "prompt_logprobs", "skip_special_tokens",
    "spaces_between_special_tokens", "structured_outputs", "extra_args",
)  # fmt: skip
MESSAGES = [{"role": "user", "content": "Name three colours"}]
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}, "n": {"type": "integer"}}}

# (endpoint, body): each sets a different part of the repr.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("completion", {"prompt": "Hello", "max_tokens": 8}),
    (
        "completion",
        {
            "prompt": "Hello",
            "max_tokens": 6,
            "n": 3,
            "logprobs": 2,
            "echo": True,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.25,
            "repetition_penalty": 1.1,
            "top_k": 5,
            "top_p": 0.9,
            "min_p": 0.05,
            "seed": 7,
            "stop_token_ids": [5, 5, 9],
        },
    ),
    (
        "chat",
        {
            "messages": MESSAGES,
            "max_tokens": 8,
            "stream": True,
            "logprobs": True,
            "top_logprobs": 3,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": SCHEMA},
            },
        },
    ),
    (
        "chat",
        {
            "messages": MESSAGES,
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "response_format": {"type": "json_object"},
            "stop": "END",
            "seed": -1,
        },
    ),
    (
        "chat",
        {
            "messages": MESSAGES,
            "max_completion_tokens": 7,
            "temperature": 0.001,
            "min_tokens": 2,
            "ignore_eos": True,
            "include_stop_str_in_output": True,
            "stop": ["x", "y"],
            "skip_special_tokens": False,
            "prompt_logprobs": 1,
            "vllm_xargs": {"tag": "a"},
        },
    ),
    ("chat", {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "echo": True}),
    ("chat", {"messages": MESSAGES, "max_tokens": 4, "structured_outputs": {"regex": "[a-z]+"}}),
]

# Builds each expected line with vLLM's own request models, as its API server does.
REFERENCE = """
import json, sys
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.lora.request import LoRARequest
for line in sys.stdin:
    kind, max_tokens, body = json.loads(line)
    if kind == "lora":
        print(repr(LoRARequest(**body)), flush=True)
        continue
    request = (ChatCompletionRequest if kind == "chat" else CompletionRequest)(**body)
    print(repr(request.to_sampling_params(max_tokens, {})), flush=True)
"""


def received(sim: Sim, count: int) -> list[tuple[str, str]]:
    """(params, lora_request) of the first `count` `Received request` lines."""
    pattern = re.compile(r"Received request \S+: params: (.*), lora_request: (.*)\.$")
    found = wait_for(
        lambda: (
            (m := [p.groups() for ln in sim.out_lines if (p := pattern.search(ln))])
            and len(m) >= count
            and m
        ),
        timeout=10,
    )
    return [(params, lora) for params, lora in found[:count]]


def send(sim: Sim, endpoint: str, body: dict[str, Any]) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    response = sim.post(path, body)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def logged(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, list[tuple[str, str]]]]:
    """Every case sent once, then one request to an adapter; their logged params."""
    adapter = tmp_path_factory.mktemp("adapters") / "sql"
    adapter.mkdir()
    flags = ("--enable-log-requests", "--enable-lora", "--lora-modules", f"sql={adapter}")
    with Sim(*flags, stdout=True) as sim:
        for endpoint, body in CASES:
            send(sim, endpoint, body)
        send(sim, "completion", {"model": "sql", "prompt": "Hi", "max_tokens": 3})
        yield adapter, received(sim, len(CASES) + 1)


def test_every_field_vllm_prints_in_its_order(logged: tuple[Path, list[tuple[str, str]]]) -> None:
    _, lines = logged
    for params, _ in lines:
        assert params.startswith("SamplingParams(") and params.endswith(")")
        names = re.findall(r"(?:\(|, )(\w+)=", params)
        assert [n for n in names if n in FIELDS] == list(FIELDS), params
    assert "structured_outputs=StructuredOutputsParams(json={'type': 'object'" in lines[2][0]
    assert "logprobs=3" in lines[2][0] and "logprobs=2, prompt_logprobs=2" in lines[1][0]


def test_an_adapter_request_logs_its_lora_request(
    logged: tuple[Path, list[tuple[str, str]]],
) -> None:
    adapter, lines = logged
    assert [lora for _, lora in lines[:-1]] == ["None"] * len(CASES)
    assert lines[-1][1] == (
        f"LoRARequest(lora_name='sql', lora_int_id=1, lora_path='{adapter}', "
        "base_model_name=None, load_inplace=False, is_3d_lora_weight=False)"
    )


def vllm_python() -> str:
    """The cached vLLM CPU build's interpreter, as tests/e2e/conftest.py finds vLLM."""
    command = os.environ.get("WARMGATE_VLLM_CMD")
    if not command:
        if os.environ.get("CI"):
            pytest.fail("WARMGATE_VLLM_CMD is not set: run the suite with scripts/test")
        pytest.skip("WARMGATE_VLLM_CMD not set (scripts/test sets it from scripts/real_vllm.sh)")
    argv = shlex.split(command)
    return argv[argv.index("-m") - 1]


def test_the_line_is_vllm_s_own_repr(logged: tuple[Path, list[tuple[str, str]]]) -> None:
    adapter, lines = logged
    queries = [(kind, _max_tokens(body), body) for kind, body in CASES]
    queries.append(("lora", 0, {"lora_name": "sql", "lora_int_id": 1, "lora_path": str(adapter)}))
    done = subprocess.run(
        [vllm_python(), "-c", REFERENCE],
        input="".join(json.dumps(q) + "\n" for q in queries),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = done.stdout.splitlines()
    assert [params for params, _ in lines[: len(CASES)]] == expected[: len(CASES)]
    assert lines[-1][1] == expected[-1]


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    assert isinstance(value, int)  # every case asks for few tokens: no clamping to the context
    return value


def test_a_failed_load_uses_up_an_adapter_id(tmp_path: Path) -> None:
    """vLLM numbers an adapter before its engine tries it (seen on the real CPU build)."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with Sim("--enable-log-requests", "--enable-lora", env=env, stdout=True) as sim:
        missing = {"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}
        assert sim.post("/v1/load_lora_adapter", missing).status_code == 404
        loaded = {"lora_name": "sql", "lora_path": str(tmp_path)}
        assert sim.post("/v1/load_lora_adapter", loaded).status_code == 200
        send(sim, "completion", {"model": "sql", "prompt": "Hi", "max_tokens": 2})
        [(_, lora)] = received(sim, 1)
        assert "lora_name='sql', lora_int_id=2," in lora
