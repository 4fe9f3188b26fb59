"""The simulator's OpenAI-compatible surface, against one real simulator process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from simutil import Sim, sse_events, token_prompt

from warmgate.sim.tokenizer import Tokenizer

MODEL = "test/model"
MAX_LEN = 512

# Key sets of the real vLLM 0.32 responses (captured in /tmp/vllm_reference.md).
COMPLETION_KEYS = {
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
    "usage", "kv_transfer_params", "ec_transfer_params", "metrics",
}  # fmt: skip
COMPLETION_CHOICE_KEYS = {
    "index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
    "prompt_logprobs", "prompt_token_ids", "routed_experts",
}  # fmt: skip
USAGE_KEYS = {
    "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
    "completion_tokens_details",
}  # fmt: skip
CHAT_KEYS = {
    "id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
    "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
    "ec_transfer_params", "metrics",
}  # fmt: skip
CHAT_CHOICE_KEYS = {
    "index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts",
}  # fmt: skip
MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
STREAM_CHOICE_KEYS = {
    "index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids",
}  # fmt: skip


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    with Sim("--model", MODEL, "--max-model-len", str(MAX_LEN)) as running:
        yield running


def completion(sim: Sim, **body: Any) -> dict[str, Any]:
    response = sim.post("/v1/completions", {"prompt": "Hello there", "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def chat(sim: Sim, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Say something"}]
    response = sim.post("/v1/chat/completions", {"messages": messages, "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def error(sim: Sim, path: str, body: Any, status: int = 400) -> dict[str, Any]:
    response = sim.post(path, body)
    assert response.headers["content-type"] == "application/json"
    assert response.status_code == status, response.text
    info: dict[str, Any] = response.json()["error"]
    assert set(info) == {"message", "type", "param", "code"}
    assert info["code"] == status
    return info


# -- simple endpoints -------------------------------------------------------------------


def test_health_is_200_with_empty_body(sim: Sim) -> None:
    response = sim.get("/health")
    assert (response.status_code, response.content) == (200, b"")


def test_models_lists_the_served_model_with_max_model_len(sim: Sim) -> None:
    payload = sim.get("/v1/models").json()
    assert payload["object"] == "list"
    (card,) = payload["data"]
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL, "model", "vllm")
    assert card["max_model_len"] == MAX_LEN
    assert card["permission"][0]["object"] == "model_permission"


def test_version(sim: Sim) -> None:
    assert sim.get("/version").json()["version"].startswith("0.")


def test_tokenize_and_detokenize_round_trip(sim: Sim) -> None:
    text = "Hello world, ünïcode and <|im_start|> specials."
    tokens = sim.post("/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert set(tokens) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == MAX_LEN
    assert tokens["tokens"][0] == 1  # BOS, as vLLM adds by default
    assert tokens["token_strs"][0] == "<s>"
    assert len(tokens["token_strs"]) == tokens["count"]
    assert sim.post("/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "<s>" + text}
    plain = sim.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tokens["tokens"][1:]
    assert sim.post("/detokenize", {"tokens": plain["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages_applies_the_chat_template(sim: Sim) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with_prompt = sim.post("/tokenize", {"messages": messages}).json()
    without = sim.post("/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert with_prompt["count"] > without["count"] > 1
    assert with_prompt["token_strs"] is None


def test_generated_text_round_trips_through_the_tokenizer(sim: Sim) -> None:
    text = completion(sim, max_tokens=40, ignore_eos=True)["choices"][0]["text"]
    tokens = sim.post("/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert sim.post("/detokenize", {"tokens": tokens}).json()["prompt"] == text
    assert len(tokens) == 40


def test_ping_and_load(sim: Sim) -> None:
    assert (sim.get("/ping").status_code, sim.get("/ping").content) == (200, b"")
    assert sim.get("/load").json() == {"server_load": 0}


def test_unknown_path_and_wrong_method(sim: Sim) -> None:
    assert sim.get("/nope").json() == {"detail": "Not Found"}
    assert sim.get("/nope").status_code == 404
    wrong = sim.get("/v1/completions")
    assert (wrong.status_code, wrong.json()) == (405, {"detail": "Method Not Allowed"})
    assert sim.post("/health", {}).headers["allow"] == "GET"


def test_metrics_expose_vllm_gauges_and_counters(sim: Sim) -> None:
    completion(sim)
    response = sim.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    text = response.text
    for name in (
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:request_success_total{",
        "vllm:prompt_tokens_total{",
        "vllm:generation_tokens_total{",
        'finished_reason="abort"',
        'vllm:iteration_tokens_total_bucket{engine="0",le="16384.0",model_name=',
        "vllm:iteration_tokens_total_count{",
        "warmgate_sim:engine_steps_total{",
    ):
        assert name in text
    assert f'model_name="{MODEL}"' in text


# -- completions ------------------------------------------------------------------------


def test_completion_shape_and_usage(sim: Sim) -> None:
    payload = completion(sim, ignore_eos=True)
    assert set(payload) == COMPLETION_KEYS
    assert payload["object"] == "text_completion"
    assert payload["id"].startswith("cmpl-")
    assert len(payload["id"]) == len("cmpl-") + 16
    assert payload["model"] == MODEL
    (choice,) = payload["choices"]
    assert set(choice) == COMPLETION_CHOICE_KEYS
    assert set(payload["usage"]) == USAGE_KEYS
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["stop_reason"] is None
    assert choice["logprobs"] is None
    usage = payload["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


@pytest.mark.parametrize(
    ("prompt", "choices"),
    [
        ("one string", 1),
        (["two", "strings"], 2),
        (token_prompt(10), 1),
        ([token_prompt(5), token_prompt(6, salt=1), token_prompt(7, salt=2)], 3),
    ],
)
def test_completion_prompt_forms(sim: Sim, prompt: Any, choices: int) -> None:
    payload = completion(sim, prompt=prompt, n=2)
    assert [c["index"] for c in payload["choices"]] == list(range(2 * choices))


def test_completion_is_deterministic_for_a_seed_and_for_greedy(sim: Sim) -> None:
    first = completion(sim, seed=7, max_tokens=20)["choices"][0]["text"]
    assert completion(sim, seed=7, max_tokens=20)["choices"][0]["text"] == first
    assert completion(sim, seed=8, max_tokens=20)["choices"][0]["text"] != first
    greedy = completion(sim, temperature=0, n=2, max_tokens=20, ignore_eos=True)["choices"]
    assert greedy[0]["text"] == greedy[1]["text"]


def test_max_tokens_defaults_to_the_remaining_context(sim: Sim) -> None:
    prompt = token_prompt(MAX_LEN - 8)
    payload = completion(sim, prompt=prompt, max_tokens=None, ignore_eos=True)
    assert payload["usage"]["completion_tokens"] == 8


def test_max_tokens_beyond_the_context_left_is_clamped(sim: Sim) -> None:
    payload = completion(sim, prompt=token_prompt(MAX_LEN - 5), max_tokens=50, ignore_eos=True)
    assert payload["usage"]["total_tokens"] == MAX_LEN
    assert payload["choices"][0]["finish_reason"] == "length"


def test_return_token_ids(sim: Sim) -> None:
    choice = completion(sim, prompt=[5, 6, 7], return_token_ids=True, max_tokens=3)["choices"][0]
    assert choice["prompt_token_ids"] == [5, 6, 7]
    assert len(choice["token_ids"]) == 3


def test_ignore_eos_gives_exactly_max_tokens_and_eos_may_stop_early(sim: Sim) -> None:
    exact = completion(sim, max_tokens=300, ignore_eos=True)["choices"][0]
    assert exact["finish_reason"] == "length"
    assert exact["text"]
    assert completion(sim, max_tokens=300, ignore_eos=True)["usage"]["completion_tokens"] == 300
    reasons = {
        completion(sim, prompt=f"p{i}", max_tokens=300)["choices"][0]["finish_reason"]
        for i in range(8)
    }
    assert "stop" in reasons  # a simulated EOS ends some of them early


def test_min_tokens_holds_eos_back(sim: Sim) -> None:
    for i in range(4):
        payload = completion(sim, prompt=f"m{i}", max_tokens=60, min_tokens=50)
        assert payload["usage"]["completion_tokens"] >= 50


def test_stop_string_ends_the_output(sim: Sim) -> None:
    text = completion(sim, max_tokens=30, ignore_eos=True, seed=3)["choices"][0]["text"]
    word = text.split()[5]
    choice = completion(sim, max_tokens=30, ignore_eos=True, seed=3, stop=[word])["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == word
    assert word not in choice["text"]
    assert text.startswith(choice["text"])


def test_logprobs_and_prompt_logprobs(sim: Sim) -> None:
    choice = completion(sim, logprobs=3, prompt_logprobs=2, ignore_eos=True)["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 8
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) == 4 for top in logprobs["top_logprobs"])  # sampled + 3
    assert logprobs["text_offset"][0] == 0
    prompt_logprobs = choice["prompt_logprobs"]
    assert prompt_logprobs[0] is None
    first = next(iter(prompt_logprobs[1].values()))
    assert set(first) == {"logprob", "rank", "decoded_token"}


def test_echo_prepends_the_prompt(sim: Sim) -> None:
    choice = completion(sim, echo=True, logprobs=1, max_tokens=3, ignore_eos=True)["choices"][0]
    assert choice["text"].startswith("Hello there")
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][0] == "<s>"
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    # vLLM scores the echoed prompt too, with the same k (prompt_logprobs = logprobs).
    prompt_logprobs = choice["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(logprobs["tokens"]) - 3
    assert completion(sim, echo=True, max_tokens=3)["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "person",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                },
            },
        },
    ],
)
def test_response_format_gives_json(sim: Sim, response_format: dict[str, Any]) -> None:
    choice = completion(sim, max_tokens=100, response_format=response_format)["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["text"])
    if response_format["type"] == "json_schema":
        assert set(value) == {"name", "age"}
        assert isinstance(value["age"], int)


def test_sampling_parameters_are_accepted(sim: Sim) -> None:
    completion(
        sim,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        seed=1,
        stop_token_ids=[5],
        include_stop_str_in_output=True,
    )


# -- chat -------------------------------------------------------------------------------


def test_chat_shape(sim: Sim) -> None:
    payload = chat(sim, ignore_eos=True)
    assert set(payload) == CHAT_KEYS
    assert payload["object"] == "chat.completion"
    assert payload["id"].startswith("chatcmpl-")
    (choice,) = payload["choices"]
    assert set(choice) == CHAT_CHOICE_KEYS
    assert set(choice["message"]) == MESSAGE_KEYS
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert payload["usage"]["completion_tokens"] == 8


def test_chat_default_max_tokens_is_the_remaining_context(sim: Sim) -> None:
    messages = [{"role": "user", "content": "x"}]
    prompt_tokens = sim.post("/tokenize", {"messages": messages}).json()["count"]
    payload = chat(sim, messages=messages, max_tokens=None, ignore_eos=True)
    assert payload["usage"]["completion_tokens"] == MAX_LEN - prompt_tokens


def test_chat_logprobs_and_n(sim: Sim) -> None:
    payload = chat(sim, logprobs=True, top_logprobs=2, n=3, max_completion_tokens=5)
    assert len(payload["choices"]) == 3
    content = payload["choices"][0]["logprobs"]["content"]
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert len(content[0]["top_logprobs"]) == 2


def test_chat_content_parts(sim: Sim) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat(sim, messages=messages)["choices"][0]["message"]["content"] is not None


# -- streaming --------------------------------------------------------------------------


def stream(sim: Sim, path: str, body: dict[str, Any]) -> list[Any]:
    with sim.client() as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_completion_stream(sim: Sim) -> None:
    body = {"prompt": "s", "max_tokens": 6, "ignore_eos": True, "stream": True, "n": 2}
    chunks = stream(sim, "/v1/completions", body)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(set(c["choices"][0]) == STREAM_CHOICE_KEYS for c in chunks)
    # Each choice's finish chunk carries the fingerprint (no usage chunk follows).
    finishes = [c["choices"][0]["finish_reason"] is not None for c in chunks]
    assert [("system_fingerprint" in c) for c in chunks] == finishes
    assert finishes.count(True) == 2
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert len(mine) == 6
        assert [c["finish_reason"] for c in mine] == [None] * 5 + ["length"]
    whole = completion(sim, prompt="s", max_tokens=6, ignore_eos=True, n=2)["choices"]
    first = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == 0)
    assert first == whole[0]["text"]  # the same request says the same thing streamed


def test_chat_stream_with_usage(sim: Sim) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
    }
    chunks = stream(sim, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert set(chunks[0]) == {
        "id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text",
    }  # fmt: skip
    assert set(chunks[0]["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0] for c in chunks[1:-1]]
    assert len(deltas) == 4
    assert set(deltas[0]) == {"index", "delta", "logprobs", "finish_reason", "token_ids"}
    assert set(deltas[-1]) == {
        "index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids",
    }  # fmt: skip
    assert deltas[-1]["finish_reason"] == "length"
    assert set(chunks[-1]["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens"}
    assert chunks[-1]["system_fingerprint"]
    assert deltas[0]["logprobs"]["content"][0]["token"] == deltas[0]["delta"]["content"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_stream_echo_puts_the_prompt_in_each_choices_first_chunk(sim: Sim) -> None:
    body = {"prompt": "Echo", "max_tokens": 3, "ignore_eos": True, "stream": True, "n": 2}
    chunks = stream(sim, "/v1/completions", {**body, "echo": True, "logprobs": 1})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["text"].startswith("Echo")
        prompt_ids = mine[0]["prompt_token_ids"]
        assert prompt_ids and prompt_ids[0] == 1
        assert mine[0]["logprobs"]["token_logprobs"][0] is None  # the BOS has no score
        assert len(mine[0]["logprobs"]["tokens"]) == len(prompt_ids) + 1
        assert all(c["prompt_token_ids"] is None for c in mine[1:])
    # Asking for token ids instead of text: the ids come, the prompt text does not.
    chunks = stream(sim, "/v1/completions", {**body, "echo": True, "return_token_ids": True})
    assert not chunks[0]["choices"][0]["text"].startswith("Echo")
    assert chunks[0]["choices"][0]["prompt_token_ids"]


def test_echo_of_token_ids_shows_special_tokens(sim: Sim) -> None:
    choice = completion(sim, prompt=[1, 300], echo=True)["choices"][0]
    assert choice["text"].startswith("<s>")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_usage_on_every_chunk(sim: Sim, path: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {
        "prompt": "u",
        "messages": [{"role": "user", "content": "u"}],
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": options,
    }
    chunks = stream(sim, path, body)
    assert all("usage" in c for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[-1] == 3
    chat = path.endswith("chat/completions")
    assert ("completion_tokens_details" in chunks[0]["usage"]) is chat


def test_chat_echo_repeats_a_last_message_in_the_replys_role(sim: Sim) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}]
    body = {"messages": messages, "echo": True, "max_tokens": 2}
    reply = chat(sim, **body)
    assert reply["choices"][0]["message"]["content"].startswith("Sure")
    assert reply["prompt_logprobs"][0] is None  # echo scores the prompt (top_logprobs of 0)
    chunks = stream(sim, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[1]["choices"][0]["delta"] == {"content": "Sure"}
    user_last = chat(sim, messages=messages[:1], echo=True, add_generation_prompt=False)
    assert user_last["choices"][0]["message"]["role"] == "user"
    assert user_last["choices"][0]["message"]["content"].startswith("hi")


def test_stream_reports_first_token_cost_in_headers_and_total_in_a_comment(sim: Sim) -> None:
    body = {"prompt": "c", "max_tokens": 3, "stream": True}
    with sim.client() as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["x-sim-cost-scope"] == "first-token"
        text = "".join(r.iter_text())
    comment = next(ln for ln in text.splitlines() if ln.startswith(": sim-cost "))
    total = json.loads(comment[len(": sim-cost ") :])
    assert total["cost_ms"] >= float(r.headers["x-sim-cost-ms"])


# -- errors -----------------------------------------------------------------------------


def test_unknown_model_is_404(sim: Sim) -> None:
    info = error(sim, "/v1/completions", {"model": "other", "prompt": "x"}, 404)
    assert info == {
        "message": f"The model `other` does not exist. Valid aliases: {MODEL}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    chat_body = {"model": "other", "messages": [{"role": "user", "content": "x"}]}
    assert error(sim, "/v1/chat/completions", chat_body, 404)["type"] == "NotFoundError"
    assert error(sim, "/tokenize", {"model": "other", "prompt": "x"}, 404)["param"] == "model"


def test_served_model_name_is_accepted(sim: Sim) -> None:
    completion(sim, model=MODEL)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": MAX_LEN + 1}, "max_tokens"),
        ({"prompt": token_prompt(MAX_LEN + 1)}, "input_tokens"),
        ({"prompt": "word " * (2 * MAX_LEN)}, "input_tokens"),
        ({"prompt": token_prompt(MAX_LEN)}, "max_tokens"),  # no room left for one token
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, None),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, None),  # some of vLLM's checks name no parameter
        ({"temperature": 3}, "temperature"),
        ({"top_k": -5}, None),
        ({"stop": [""]}, None),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),  # the whole vocabulary, over the default max of 20
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"min_tokens": 9}, None),
        ({"prompt": [[1], []]}, None),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 5000]}, None),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            None,
        ),
    ],
)
def test_invalid_completion_is_a_bad_request_error(
    sim: Sim, body: dict[str, Any], param: str | None
) -> None:
    info = error(sim, "/v1/completions", {"prompt": "x", "max_tokens": 8, **body})
    assert info["type"] == "BadRequestError"
    assert info["param"] == param
    if param is not None:
        assert f"(parameter={param}" in info["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"prompt": "x", "max_tokens": MAX_LEN + 1},
            f"max_tokens={MAX_LEN + 1} cannot be greater than max_model_len={MAX_LEN}. Please "
            f"request fewer output tokens. (parameter=max_tokens, value={MAX_LEN + 1})",
        ),
        (
            {"prompt": token_prompt(MAX_LEN + 3)},
            f"This model's maximum context length is {MAX_LEN} tokens. However, your prompt "
            f"contains {MAX_LEN + 3} input tokens, which exceeds this limit even without any "
            f"output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={MAX_LEN + 3})",
        ),
        (
            {"prompt": "x", "temperature": -1},
            "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
        ),
        ({"prompt": "x", "n": 0}, "n must be at least 1, got 0."),
        (
            {"prompt": "x", "logprobs": 50},
            "Requested sample logprobs of 50, which is greater than max allowed: 20 "
            "(parameter=logprobs, value=50)",
        ),
        (
            {"max_tokens": 2},
            "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
        ),
        ({"prompt": [1, 5000]}, "Token id 5000 is out of vocabulary"),
    ],
)
def test_error_messages_are_vllms(sim: Sim, body: dict[str, Any], message: str) -> None:
    assert error(sim, "/v1/completions", body)["message"] == message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 2}, "body.messages"),
        ({"messages": "not a list"}, "body.messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "body.max_tokens"),
        (
            {"messages": [{"content": "no role"}]},
            "body.messages.0.ChatCompletionDeveloperMessageParam.role",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "bogus"}},
            "body.response_format.type",
        ),
    ],
)
def test_malformed_chat_is_a_request_validation_error(
    sim: Sim, body: dict[str, Any], param: str
) -> None:
    info = error(sim, "/v1/chat/completions", body)
    assert info["type"] == "Bad Request"
    assert info["param"] == param
    assert info["message"].startswith("1 validation error:\n  {'type': ")


def test_request_validation_messages_are_vllms(sim: Sim) -> None:
    info = error(sim, "/v1/completions", {"prompt": "hi", "max_tokens": "ten"})
    assert info["message"] == (
        "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': "
        "'Input should be a valid integer, unable to parse string as an integer', 'input': 'ten'}"
    )
    assert completion(sim, max_tokens="3", ignore_eos=True)["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("stop", "errors"),
    [
        (list("abcde"), [("string_type", "<list of 5 items>"), ("too_long", "<list of 5 items>")]),
        (["a", 1], [("string_type", "<list of 2 items>"), ("string_type", "1")]),
        (5, [("string_type", "5"), ("list_type", "5")]),
    ],
)
def test_stop_is_a_string_or_at_most_four_strings(
    sim: Sim, stop: Any, errors: list[tuple[str, str]]
) -> None:
    info = error(sim, "/v1/completions", {"prompt": "hi", "stop": stop})
    assert (info["type"], info["param"]) == ("Bad Request", "body.stop")
    assert info["message"].startswith("2 validation errors:\n  {'type': ")
    for kind, shown in errors:
        assert f"'type': '{kind}'" in info["message"]
        assert f"'input': '{shown}'" in info["message"]
    completion(sim, stop=["a", "b", "c", "d"])


@pytest.mark.parametrize(
    ("prompt", "param", "count"),
    [
        (["a", 1], "body.prompt.0", 5),
        ([-1], "body.prompt.0", 4),
        ([[1, -2]], "body.prompt.0", 4),
        (5, "body.prompt", 4),
    ],
)
def test_malformed_prompt_reports_every_member_of_the_union(
    sim: Sim, prompt: Any, param: str, count: int
) -> None:
    info = error(sim, "/v1/completions", {"prompt": prompt})
    assert (info["type"], info["param"]) == ("Bad Request", param)
    assert info["message"].startswith(f"{count} validation errors:")


def test_prompt_token_ids_are_lax_ints(sim: Sim) -> None:
    assert completion(sim, prompt=[True, 2.0, "3"])["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(("seed", "kind"), [(2**64, "less_than_equal"), (-(2**64), "greater")])
def test_seed_beyond_64_bits_is_a_request_validation_error(sim: Sim, seed: int, kind: str) -> None:
    info = error(sim, "/v1/completions", {"prompt": "x", "seed": seed})
    assert (info["type"], info["param"]) == ("Bad Request", "body.seed")
    assert f"'type': '{kind}" in info["message"]


def test_chat_tool_choice_auto_is_refused(sim: Sim) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "auto"}
    info = error(sim, "/v1/chat/completions", body)
    assert (info["type"], info["param"]) == ("BadRequestError", None)


@pytest.mark.parametrize(
    ("content", "headers", "param"),
    [
        (b'{"model": "test/model", "prompt": ', {"content-type": "application/json"}, "body.34"),
        (b"", {"content-type": "application/json"}, "body"),
        (b"[1, 2]", {"content-type": "application/json"}, "body"),
        (b'{"prompt": "x"}', {"content-type": "text/plain"}, None),
        (b'{"prompt": "x"}', {}, None),
    ],
)
def test_body_that_is_not_a_json_object_is_400(
    sim: Sim, content: bytes, headers: dict[str, str], param: str | None
) -> None:
    with sim.client() as client:
        response = client.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == 400
    info = response.json()["error"]
    assert (info["type"], info["param"], info["code"]) == ("Bad Request", param, 400)


def test_detokenize_drops_ids_outside_the_vocabulary(sim: Sim) -> None:
    response = sim.post("/detokenize", {"tokens": [1, Tokenizer.vocab_size + 5]})
    assert response.json() == {"prompt": "<s>"}


def test_unknown_fields_are_ignored(sim: Sim) -> None:
    completion(sim, user="u1", totally_unknown_field=1)


@pytest.mark.parametrize("coverage", ["engine", "pairwise"])
def test_each_plan_shape_uses_its_own_feature_as_the_simulator_reads_it(coverage: str) -> None:
    """--crash-on-feature FEATURE must hit the requests warmgate's plan says carry FEATURE
    (several at once in the engine plan's combined shapes; one each in a mixed batch)."""
    from warmgate import plan
    from warmgate.sim import api

    ctx = api.Context("m", 1024, Tokenizer())
    info = plan.UpstreamInfo((plan.ModelInfo("m", 1024),), has_tokenize=True)
    settings = plan.PlanSettings(concurrency=(1, 4), coverage=coverage)
    shapes = plan.build_plan(settings, info).shapes
    assert {f for s in shapes for f in s.features} == set(plan.FEATURES)
    for shape in shapes:
        for i in range(shape.concurrency):
            prompt: list[int] | str = [300] * 4 if shape.prompt_kind == "tokens" else "a b c"
            body = plan.body_for(shape, prompt, i)
            chat = shape.endpoint == plan.ENDPOINTS["chat"]
            gen = (api.parse_chat if chat else api.parse_completion)(body, ctx)
            used = api.plan_features(gen.features)
            carried = (
                {shape.features[i % len(shape.features)]} if shape.variants else set(shape.features)
            )
            assert carried <= used, (shape.family, i, used)
            assert "greedy" in carried or "greedy" not in used, (shape.family, i, used)
