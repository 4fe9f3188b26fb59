"""The simulator's HTTP contract against the real vLLM CPU build (issue 3).

The same requests, valid and invalid, go to both servers. Statuses, content types and
the JSON *shape* of every answer must match: key sets recursively, value types, and
null-ness. Values that legitimately differ (ids, text, numbers, timestamps, token
strings) are not compared; error `type`, `param` and `code` are, since clients branch
on them. Runs on the shared `served` vLLM, before test_vllm.py stops it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import Served
from simutil import Sim, sse_events

MODEL = "tiny-llama"
MAX_MODEL_LEN = 2048
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi"},
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name"],
}
# Dicts keyed by data (token strings, token ids): their values' shapes are compared,
# their keys are not. `[]` stands for any list index.
MAPS = (
    "choices[].logprobs.top_logprobs[]",
    "choices[].prompt_logprobs[]",
    "prompt_logprobs[]",
)
# Lists whose length is part of the contract (one choice per prompt and per n).
SAME_LENGTH = ("choices", "data", "data[].permission")
METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:request_success_total",
)


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: Any = None  # JSON body, or bytes sent as-is
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


def completion(name: str, **fields: Any) -> Case:
    return Case(name, "/v1/completions", {"model": MODEL, "max_tokens": 5, **fields})


def chat(name: str, **fields: Any) -> Case:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 5, **fields}
    return Case(name, "/v1/chat/completions", body)


USAGE = {"stream": True, "stream_options": {"include_usage": True}}
LONG_TEXT = "hello world " * 1100  # over 2048 tokens once tokenised

CASES = [
    Case("health", "/health", method="GET"),
    Case("models", "/v1/models", method="GET"),
    Case("version", "/version", method="GET"),
    Case("tokenize-prompt", "/tokenize", {"model": MODEL, "prompt": "hello world"}),
    Case("tokenize-messages", "/tokenize", {"model": MODEL, "messages": CHAT}),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [1, 798, 496]}),
    completion("prompt-string", prompt="Hello, my name is"),
    completion("prompt-strings", prompt=["Hello", "The sky is"]),
    completion("prompt-ids", prompt=[1, 798, 496, 300]),
    completion("prompt-id-lists", prompt=[[1, 798, 496], [1, 300, 301, 302]]),
    completion("n-2", prompt="Two answers", n=2),
    completion("logprobs-2", prompt="Score these", logprobs=2),
    completion("echo", prompt="Echo me", echo=True),
    completion("echo-logprobs", prompt="Echo me", echo=True, logprobs=1),
    completion("prompt-logprobs", prompt="Score the prompt", prompt_logprobs=1),
    completion("seed", prompt="Seeded", seed=42, temperature=1.0),
    # Common one-character stops, so that random weights hit one within 64 tokens.
    completion("stop", prompt="Stop soon", stop=[" ", "e", "a", "o"], max_tokens=64),
    completion("ignore-eos-min-tokens", prompt="Go on", ignore_eos=True, min_tokens=5),
    completion("json-object", prompt="JSON:", response_format={"type": "json_object"}),
    completion("stream", prompt="Streaming test", max_tokens=6, **USAGE),
    chat("chat"),
    chat("chat-logprobs", logprobs=True, top_logprobs=2),
    chat("chat-json-object", response_format={"type": "json_object"}),
    chat(
        "chat-json-schema",
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
    ),
    chat("chat-stream", max_tokens=6, **USAGE),
    # Found different once; kept so they stay alike.
    completion("stream-n-2", prompt="Two streams", n=2, stream=True),
    # Not with n=2: vLLM 0.32 then fails mid-stream ({"error": {"message": "1", ...}}).
    completion("stream-echo-logprobs", prompt="Echo", echo=True, logprobs=1, stream=True),
    completion(
        "stream-continuous-usage",
        prompt="Count",
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ),
    chat("chat-echo", messages=[*CHAT, {"role": "assistant", "content": "Hi"}], echo=True),
    # Errors.
    completion("unknown-model", prompt="hi", model="nope"),
    completion("prompt-too-long", prompt=LONG_TEXT),
    completion("max-tokens-too-big", prompt="hi", max_tokens=MAX_MODEL_LEN + 1),
    completion("negative-temperature", prompt="hi", temperature=-1),
    completion("n-0", prompt="hi", n=0),
    completion("too-many-stops", prompt="hi", stop=list("abcde")),
    completion("min-tokens-over-max-tokens", prompt="hi", min_tokens=9),
    completion("logprobs-of-the-whole-vocabulary", prompt="hi", logprobs=-1),
    completion("prompt-of-mixed-types", prompt=["a", 1]),
    completion("seed-beyond-64-bits", prompt="hi", seed=2**64),
    Case("invalid-json", "/v1/completions", b'{"model": "tiny-llama", "prompt": }'),
    Case("missing-prompt", "/v1/completions", {"model": MODEL, "max_tokens": 5}),
    Case("chat-missing-messages", "/v1/chat/completions", {"model": MODEL}),
    Case("unknown-path", "/v1/nope", method="GET"),
    Case("wrong-method", "/v1/completions", method="GET"),
    Case("wrong-method-health", "/health", {}),
]


# -- the comparison ---------------------------------------------------------------------


def _pattern(path: str) -> str:
    """`choices[0].logprobs` -> `choices[].logprobs`, to match MAPS and SAME_LENGTH."""
    return re.sub(r"\[\d+\]", "[]", path)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), "?")


def shape_diff(real: Any, sim: Any, path: str = "") -> str | None:
    """The first place where `sim` is shaped unlike `real`, as `path: what`; None if none."""
    where = path or "<top>"
    if isinstance(real, dict) and isinstance(sim, dict):
        if _pattern(path) in MAPS:
            return _map_diff(real, sim, path)
        if real.keys() != sim.keys():
            missing = sorted(real.keys() - sim.keys())
            extra = sorted(sim.keys() - real.keys())
            return f"{where}: sim lacks keys {missing}, has extra keys {extra}"
        for key in real:
            found = shape_diff(real[key], sim[key], f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(real, list) and isinstance(sim, list):
        if _pattern(path) in SAME_LENGTH and len(real) != len(sim):
            return f"{where}: real has {len(real)} items, sim {len(sim)}"
        for index, (r, s) in enumerate(zip(real, sim, strict=False)):
            found = shape_diff(r, s, f"{path}[{index}]")
            if found:
                return found
        return None
    real_kind = "object" if isinstance(real, dict) else "list" if isinstance(real, list) else None
    sim_kind = "object" if isinstance(sim, dict) else "list" if isinstance(sim, list) else None
    real_kind = real_kind or _kind(real)
    sim_kind = sim_kind or _kind(sim)
    if real_kind != sim_kind:
        return f"{where}: real is {real_kind} ({real!r:.60}), sim is {sim_kind} ({sim!r:.60})"
    return None


def _map_diff(real: dict[str, Any], sim: dict[str, Any], path: str) -> str | None:
    """A data-keyed dict: both empty or both not, and every value shaped like real's first."""
    if bool(real) != bool(sim):
        return f"{path}: real has {len(real)} entries, sim {len(sim)}"
    if not real:
        return None
    model = next(iter(real.values()))
    for key, value in sim.items():
        found = shape_diff(model, value, f"{path}[{key!r}]")
        if found:
            return found
    return None


# -- the servers ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str | None
    body: Any  # decoded JSON, SSE events, or text


def send(base: str, case: Case) -> Answer:
    headers = dict(case.headers)
    content: bytes | None = None
    if isinstance(case.body, bytes):
        content = case.body
        headers.setdefault("content-type", "application/json")
    elif case.body is not None:
        content = json.dumps(case.body).encode()
        headers.setdefault("content-type", "application/json")
    response = httpx.request(
        case.method, base + case.path, content=content, headers=headers, timeout=120
    )
    content_type = response.headers.get("content-type")
    if content_type and content_type.startswith("text/event-stream"):
        return Answer(response.status_code, content_type, sse_events(response.text))
    if content_type == "application/json":
        return Answer(response.status_code, content_type, response.json())
    return Answer(response.status_code, content_type, response.text)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    args = ("--model", MODEL, "--max-model-len", str(MAX_MODEL_LEN))
    with Sim(*args) as running:
        yield running


@pytest.fixture(scope="module")
def real(served: Served) -> str:
    return served.base


# -- the tests --------------------------------------------------------------------------


def _describe(case: Case) -> str:
    body = case.body if isinstance(case.body, bytes | None) else json.dumps(case.body)[:200]
    return f"{case.method} {case.path} {body!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_answer_shape(case: Case, real: str, sim: Sim) -> None:
    want = send(real, case)
    got = send(sim.url, case)
    context = f"{_describe(case)}\nreal: {want.body!r:.1500}\nsim:  {got.body!r:.1500}"
    assert got.status == want.status, f"status {got.status} != real {want.status}\n{context}"
    assert got.content_type == want.content_type, f"content-type differs\n{context}"
    if case.stream:
        found = stream_diff(want.body, got.body)
    else:
        found = shape_diff(want.body, got.body)
        if found is None and isinstance(want.body, dict) and "error" in want.body:
            found = error_diff(want.body["error"], got.body["error"])
    assert found is None, f"{found}\n{context}"


def error_diff(real: dict[str, Any], sim: dict[str, Any]) -> str | None:
    for key in ("type", "param", "code"):
        if real[key] != sim[key]:
            return f"error.{key}: real {real[key]!r}, sim {sim[key]!r}"
    return None


def _event_kind(event: Any) -> tuple[str, int | None]:
    """(kind, choice index) of one SSE event: role, token, finish, usage, error or done."""
    if event == "[DONE]":
        return "done", None
    if "error" in event:
        return "error", None
    if not event["choices"]:
        return "usage", None
    choice = event["choices"][0]
    if choice.get("delta", {}).get("role"):
        return "role", choice["index"]
    return ("token" if choice["finish_reason"] is None else "finish"), choice["index"]


def _runs(kinds: list[str]) -> list[str]:
    """`token token finish` -> `token finish`: how many tokens a chunk holds may differ."""
    return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]


def stream_diff(real: list[Any], sim: list[Any]) -> str | None:
    """Per choice, the same run of event kinds (role, token..., finish) with each kind's
    first event and a middle token shaped alike; then the same trailer (usage, [DONE])."""

    def by_choice(events: list[Any]) -> dict[Any, list[tuple[str, Any]]]:
        grouped: dict[Any, list[tuple[str, Any]]] = {}
        for event in events:
            kind, index = _event_kind(event)
            grouped.setdefault(index, []).append((kind, event))
        return grouped

    real_choices, sim_choices = by_choice(real), by_choice(sim)
    if real_choices.keys() != sim_choices.keys():
        return f"choice indexes: real {sorted(real_choices, key=str)}, sim {sorted(sim_choices, key=str)}"
    for index, real_events in real_choices.items():
        sim_events = sim_choices[index]
        real_runs = _runs([k for k, _ in real_events])
        sim_runs = _runs([k for k, _ in sim_events])
        name = "after the choices" if index is None else f"choice {index}"
        if real_runs != sim_runs:
            return f"events of {name}: real {real_runs}, sim {sim_runs}"
        for kind in dict.fromkeys(real_runs):
            r = [e for k, e in real_events if k == kind]
            s = [e for k, e in sim_events if k == kind]
            picks = [(0, "first")] + ([(len(r) // 2, "middle")] if kind == "token" else [])
            for at, label in picks:
                found = shape_diff(r[at], s[min(at, len(s) - 1)])
                if found:
                    return f"<{label} {kind} chunk of {name}> {found}"
    if _event_kind(real[-1])[0] != "done" or _event_kind(sim[-1])[0] != "done":
        return "the stream does not end with [DONE]"
    return None


def test_metrics_expose_the_same_series(real: str, sim: Sim) -> None:
    want = httpx.get(real + "/metrics", timeout=30)
    got = httpx.get(sim.url + "/metrics", timeout=30)
    assert want.status_code == got.status_code == 200
    assert got.headers["content-type"] == want.headers["content-type"]
    for name in METRICS:
        assert re.search(rf"^{re.escape(name)}\{{", want.text, re.M), f"real lacks {name}"
        assert re.search(rf"^{re.escape(name)}\{{", got.text, re.M), f"sim lacks {name}"


def test_shape_diff_names_the_path_of_the_first_difference() -> None:
    real = {"choices": [{"logprobs": {"top_logprobs": [{"a": -1.0}]}, "text": "x"}]}
    same = {"choices": [{"logprobs": {"top_logprobs": [{"zz": -3.5, "b": -2.0}]}, "text": ""}]}
    assert shape_diff(real, same) is None
    other = {"choices": [{"logprobs": {"top_logprobs": [{"a": None}]}, "text": "x"}]}
    assert shape_diff(real, other) == (
        "choices[0].logprobs.top_logprobs[0]['a']: real is float (-1.0), sim is null (None)"
    )
    fewer = {"choices": [{"logprobs": None}]}
    assert shape_diff(real, fewer) == "choices[0]: sim lacks keys ['text'], has extra keys []"
