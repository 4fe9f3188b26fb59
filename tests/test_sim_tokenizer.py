"""The simulator's tokenizer and deterministic output plans (pure, no processes)."""

from __future__ import annotations

import json

import pytest

from warmgate.sim.generate import SamplingSpec, plan_sequence, top_logprobs
from warmgate.sim.tokenizer import BOS, EOS, VOCAB_SIZE, Tokenizer, render_chat

TOK = Tokenizer()
PROMPT = TOK.encode("Tell me a story")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Hello world, how are you today?",
        "Ünïcödé 日本語 🎉 and\ttabs\n\nnewlines",
        "<|im_start|>user\nhi<|im_end|>\n</s><s>",
        "   leading and trailing   ",
        "x" * 1000,
    ],
)
def test_decode_inverts_encode(text: str) -> None:
    ids = TOK.encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert TOK.decode(ids) == text


def test_common_words_are_single_tokens() -> None:
    assert len(TOK.encode(" the world")) == 2


def test_generated_ids_survive_a_round_trip() -> None:
    ids = list(plan_sequence(TOK, PROMPT, SamplingSpec(200, ignore_eos=True), 0).token_ids)
    assert TOK.encode(TOK.decode(ids)) == ids


def test_skip_special_tokens() -> None:
    assert TOK.decode([BOS, *TOK.encode("hi"), EOS], skip_special_tokens=True) == "hi"


def test_chat_template_starts_with_bos_and_ends_with_the_assistant_turn() -> None:
    text = render_chat([("system", "Be brief."), ("user", "hi")])
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert TOK.encode(text)[0] == BOS


def test_plans_are_deterministic() -> None:
    spec = SamplingSpec(50, seed=3)
    assert plan_sequence(TOK, PROMPT, spec, 0) == plan_sequence(TOK, PROMPT, spec, 0)
    assert plan_sequence(TOK, PROMPT, spec, 0) != plan_sequence(TOK, PROMPT, spec, 1)
    greedy = SamplingSpec(50, temperature=0, seed=3)
    assert plan_sequence(TOK, PROMPT, greedy, 0) == plan_sequence(TOK, PROMPT, greedy, 1)


def test_ignore_eos_runs_to_max_tokens_and_eos_stops_early() -> None:
    exact = plan_sequence(TOK, PROMPT, SamplingSpec(500, ignore_eos=True), 0)
    assert (len(exact.token_ids), exact.finish_reason) == (500, "length")
    stopped = [plan_sequence(TOK, PROMPT, SamplingSpec(500), i) for i in range(10)]
    early = [p for p in stopped if p.finish_reason == "stop"]
    assert early
    assert all(p.token_ids[-1] == EOS and p.stop_reason is None for p in early)


def test_min_tokens_holds_back_eos() -> None:
    for index in range(10):
        plan = plan_sequence(TOK, PROMPT, SamplingSpec(300, min_tokens=200), index)
        assert len(plan.token_ids) >= 200


def test_stop_string_cuts_the_text_at_the_match() -> None:
    base = plan_sequence(TOK, PROMPT, SamplingSpec(40, ignore_eos=True), 0)
    word = base.text.split()[4]
    stopped = plan_sequence(TOK, PROMPT, SamplingSpec(40, ignore_eos=True, stop=(word,)), 0)
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", word)
    assert base.text.startswith(stopped.text + " " + word) or word not in stopped.text
    kept = SamplingSpec(40, ignore_eos=True, stop=(word,), include_stop_str_in_output=True)
    assert plan_sequence(TOK, PROMPT, kept, 0).text.endswith(word)


def test_stop_token_id_reports_the_id() -> None:
    base = plan_sequence(TOK, PROMPT, SamplingSpec(40, ignore_eos=True), 0)
    target = base.token_ids[3]
    spec = SamplingSpec(40, ignore_eos=True, stop_token_ids=(target,))
    stopped = plan_sequence(TOK, PROMPT, spec, 0)
    assert stopped.stop_reason == target
    assert len(stopped.token_ids) == base.token_ids.index(target) + 1


def test_json_modes_give_valid_json() -> None:
    obj = plan_sequence(TOK, PROMPT, SamplingSpec(100, json_mode="object"), 0)
    assert obj.finish_reason == "stop"
    assert isinstance(json.loads(obj.text), dict)
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ok": {"type": "boolean"},
            "kind": {"enum": ["a", "b"]},
        },
    }
    value = json.loads(
        plan_sequence(
            TOK, PROMPT, SamplingSpec(200, json_mode="schema", json_schema=schema), 0
        ).text
    )
    assert set(value) == {"name", "tags", "ok", "kind"}
    assert value["kind"] == "a"
    truncated = plan_sequence(TOK, PROMPT, SamplingSpec(3, json_mode="object"), 0)
    assert (len(truncated.token_ids), truncated.finish_reason) == (3, "length")


def test_top_logprobs_put_the_sampled_token_first() -> None:
    top = top_logprobs(500, 3, 4, VOCAB_SIZE)
    assert top[0][0] == 500
    assert len({t for t, _ in top}) == 4
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_top_logprobs_always_gives_k_distinct_tokens() -> None:
    # A multiplicative walk once cycled early here and spun forever on chat logprobs.
    from warmgate.sim.generate import top_logprobs

    for token_id in range(0, 1024, 7):
        for position in range(0, 400, 11):
            alternatives = top_logprobs(token_id, position, 20, 1024)
            assert len({t for t, _ in alternatives}) == 20
            assert alternatives[0][0] == token_id
