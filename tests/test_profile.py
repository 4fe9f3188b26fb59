"""The traffic profile's core (warmgate.profile) and its readers (warmgate.traffic): vLLM
0.32's request-log lines and /metrics pages in, combinations and marginals out, and the
plan a start builds from them. No processes, no sleeps."""

from __future__ import annotations

import pytest

from warmgate import plan, profile
from warmgate.profile import Combo, Profile, ProfileError
from warmgate.traffic import RequestShapes, parse_metrics

# SamplingParams reprs printed by the vLLM 0.32 CPU build itself.
DEFAULT = (
    "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, "
    "temperature=1.0, watermarking=None, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], "
    "stop_token_ids=[], bad_words=[], thinking_token_budget=None, "
    "include_stop_str_in_output=False, ignore_eos=False, max_tokens=16, min_tokens=0, "
    "logprobs=None, prompt_logprobs=None, skip_special_tokens=True, "
    "spaces_between_special_tokens=True, structured_outputs=None, extra_args=None)"
)
RICH = (
    "SamplingParams(n=2, presence_penalty=0.5, frequency_penalty=0.0, repetition_penalty=1.1, "
    "temperature=1.0, watermarking=None, top_p=0.9, top_k=40, min_p=0.05, seed=3, stop=[], "
    "stop_token_ids=[], bad_words=[], thinking_token_budget=None, "
    "include_stop_str_in_output=False, ignore_eos=False, max_tokens=16, min_tokens=0, "
    "logprobs=2, prompt_logprobs=1, skip_special_tokens=True, "
    "spaces_between_special_tokens=True, structured_outputs=None, extra_args=None)"
)
JSON_GREEDY = (
    "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, "
    "temperature=0.0, watermarking=None, top_p=1.0, top_k=0, min_p=0.0, seed=None, "
    "stop=['a\"b, seed=5', \"x'y), logprobs=3\"], stop_token_ids=[], bad_words=[], "
    "thinking_token_budget=None, include_stop_str_in_output=False, ignore_eos=False, "
    "max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None, "
    "skip_special_tokens=True, spaces_between_special_tokens=True, "
    "structured_outputs=StructuredOutputsParams(json={'type': 'object'}, regex=None, "
    "choice=None, grammar=None, json_object=None, disable_any_whitespace=False, "
    "disable_additional_properties=False, whitespace_pattern=None, structural_tag=None, "
    "_backend=None, _backend_was_auto=False), extra_args=None)"
)
PREFIX = "(APIServer pid=7) INFO 12-04 01:30:00 [request_logger.py:65] "


def received(request_id: str, params: str) -> bytes:
    return (
        f"{PREFIX}Received request {request_id}: params: {params}, lora_request: None.\n".encode()
    )


def generated(request_id: str, stream: str = "") -> bytes:
    info = f" (streaming {stream})" if stream else ""
    return f"{PREFIX}Generated response {request_id}{info}: output: 'x', finish_reason: stop\n".encode()


# --- the log's SamplingParams -------------------------------------------------------------


def test_the_default_repr_is_plain_random_sampling() -> None:
    params = profile.parse_sampling_params(DEFAULT)
    assert params is not None
    combo = profile.combo_from_params("chat", params, None)
    assert combo.feature == "sampling"
    assert dict(combo.knobs) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0.0, "min_p": 0.0}


def test_every_feature_of_a_rich_request_is_named_with_the_plans_words() -> None:
    params = profile.parse_sampling_params(RICH)
    assert params is not None
    combo = profile.combo_from_params("completions", params, False)
    assert combo.feature == "seed+penalties+n+logprobs+prompt_logprobs"
    assert all(f in plan.FEATURES for f in plan.split_features(combo.feature))
    knobs = dict(combo.knobs)
    assert knobs["seed"] == 1.0  # that there was a seed, never its value
    body = combo.body()
    assert body["logprobs"] == 2 and body["prompt_logprobs"] == 1 and body["n"] == 2
    assert body["seed"] == 1234 and body["top_k"] == 40 and body["repetition_penalty"] == 1.1


def test_strings_in_the_repr_are_skipped_and_cannot_pose_as_fields() -> None:
    params = profile.parse_sampling_params(JSON_GREEDY)
    assert params is not None
    assert params["seed"] == "None" and params["logprobs"] == "None"
    assert "stop" not in params and params["structured_outputs"] == "set"
    combo = profile.combo_from_params("chat", params, True)
    assert combo.feature == "greedy+json"
    assert combo.body() == {"temperature": 0, "response_format": {"type": "json_object"}}


def test_not_a_repr_and_a_cut_line() -> None:
    assert profile.parse_sampling_params("Something(n=1)") is None
    assert profile.parse_sampling_params("SamplingParams(n=3, temperature=0.5, st") == {
        "n": "3",
        "temperature": "0.5",
    }


def test_ids_give_the_endpoint_and_warmgates_own_requests() -> None:
    assert profile.endpoint_of("chatcmpl-abc") == "chat"
    assert profile.endpoint_of("cmpl-abc-0") == "completions"
    assert profile.endpoint_of("embd-abc") is None
    assert profile.is_warmgate_request("chatcmpl-warmgate-00ff")
    assert profile.is_warmgate_request("cmpl-warmgate-00ff-0")
    assert not profile.is_warmgate_request("chatcmpl-client-warmgate-00ff")


# --- the scanner ---------------------------------------------------------------------------


def test_the_scanner_counts_after_ready_only_and_leaves_warmgates_requests_out() -> None:
    shapes = RequestShapes(outputs_logged=False)
    shapes.feed(1, received("chatcmpl-early", DEFAULT))  # before Ready: the warm-up's time
    shapes.learning = True
    shapes.feed(1, received("chatcmpl-warmgate-0123456789abcdef", DEFAULT))
    line = received("cmpl-c1-0", RICH)
    shapes.feed(1, line[:50])  # split anywhere
    shapes.feed(1, line[50:] + received("chatcmpl-c2", JSON_GREEDY))
    counts = shapes.take()
    assert sum(counts.values()) == 2 and shapes.own == 1
    assert {c.endpoint for c in counts} == {"chat", "completions"}
    assert all(c.stream is None for c in counts)  # without output logging: unknown
    assert shapes.take() == {}


def test_with_output_logging_a_chat_request_counts_when_its_stream_is_known() -> None:
    shapes = RequestShapes(outputs_logged=True)
    shapes.learning = True
    shapes.feed(2, received("chatcmpl-s", DEFAULT) + received("chatcmpl-n", DEFAULT))
    shapes.feed(2, received("chatcmpl-gone", DEFAULT))
    assert shapes.take() == {}  # waiting for their closing lines
    shapes.feed(2, generated("chatcmpl-s", "delta") + generated("chatcmpl-s", "complete"))
    shapes.feed(2, generated("chatcmpl-n"))
    shapes.feed(2, f"{PREFIX}Request chatcmpl-gone aborted.\n".encode())
    streams = sorted((c.stream for c, n in shapes.take().items() for _ in range(n)), key=str)
    assert streams == [False, None, True]


# --- /metrics: marginals --------------------------------------------------------------------

PAGE = """\
# HELP vllm:request_prompt_tokens Number of prefill tokens processed.
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_bucket{engine="0",le="1.0",model_name="m"} 0.0
vllm:request_prompt_tokens_bucket{engine="0",le="100.0",model_name="m"} %d
vllm:request_prompt_tokens_bucket{engine="0",le="200.0",model_name="m"} %d
vllm:request_prompt_tokens_bucket{engine="0",le="+Inf",model_name="m"} %d
vllm:request_prompt_tokens_count{engine="0",model_name="m"} %d
vllm:request_prompt_tokens_sum{engine="0",model_name="m"} 0.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_metrics_give_the_lengths_since_ready_in_octaves() -> None:
    at_ready = parse_metrics(PAGE % (5, 5, 5, 5))  # the warm-up's five requests
    later = parse_metrics(PAGE % (5, 15, 15, 15))
    assert at_ready is not None and later is not None and later.running == 3.0
    ranges = profile.bucket_counts(later.prompt_tokens, at_ready.prompt_tokens)
    assert ranges == {(100.0, 200.0): 10.0}
    octaves = profile.octaves_of(ranges)
    assert set(octaves) == {128, 256}  # (100, 200] spans two octaves
    assert octaves[128] == pytest.approx(10 * 0.356, abs=0.01)
    assert sum(octaves.values()) == pytest.approx(10.0)
    assert parse_metrics("garbage {") is None


def test_a_counter_that_went_back_counts_from_zero() -> None:
    ranges = profile.bucket_counts({100.0: 2.0, float("inf"): 2.0}, {100.0: 9.0})
    assert ranges == {(0.0, 100.0): 2.0}
    assert profile.octave(100) == 128 and profile.octave(1) == 1 and profile.octave(128) == 128


# --- the profile, its file form, merging --------------------------------------------------


def sample_profile(key: str = "k", pod: str = "a") -> Profile:
    p = Profile(key, pods=(pod,))
    chat = Combo("chat", True, "sampling+logprobs+json", (("logprobs", 2.0), ("temperature", 1.0)))
    p.count(chat, 100.0, 30)
    p.count(Combo("completions", None, "greedy", (("temperature", 0.0),)), 101.0, 10)
    p.prompt_tokens = {128: 20.0, 1024: 20.0}
    p.concurrency = {1: 9, 4: 1}
    p.updated = 150.0
    return p


def test_the_file_form_round_trips_and_merges_add_up() -> None:
    p = sample_profile()
    again = Profile.from_json(p.to_json(), "x")
    assert again.combos == p.combos and again.prompt_tokens == p.prompt_tokens
    both = profile.merge([p, Profile.from_json(sample_profile(pod="b").to_json(), "y")])
    assert both.requests == 80 and both.concurrency == {1: 18, 4: 2}
    assert both.pods == ("a", "b") and both.first_seen == 100.0
    assert both.summary(160.0)["age_s"] == 60.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a warmgate profile"),
        ({"format": "warmgate-profile", "version": 99}, "profile version 99"),
        ({"format": "warmgate-profile", "version": 1, "key": "k"}, "malformed"),
        (
            {"format": "warmgate-profile", "version": 1, "key": "k", "combos": [{"count": -1}]},
            "malformed",
        ),
    ],
)
def test_a_file_that_is_not_a_profile_is_named(data: object, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        Profile.from_json(data, "f.json")


# --- the plan it gives ----------------------------------------------------------------------


def test_combinations_cross_lengths_and_concurrency_pairwise_most_frequent_first() -> None:
    specs = profile.plan_specs(sample_profile(), max_prompt_tokens=4000, max_inflight_tokens=2048)
    names = [(s.endpoint, s.stream, s.feature, s.prompt_tokens, s.concurrency) for s in specs]
    # chat at both lengths; completions (streaming unknown) both ways; every level paired
    assert ("chat", True, "sampling+logprobs+json", 96, 1) in names
    assert ("chat", True, "sampling+logprobs+json", 768, 1) in names
    assert {s.stream for s in specs if s.endpoint == "completions"} == {True, False}
    assert any(s.concurrency == 4 for s in specs)
    assert all(s.prompt_tokens * s.concurrency <= 2048 or s.concurrency == 1 for s in specs)
    assert specs[0].endpoint == "chat" and specs[0].weight >= specs[-1].weight


def test_a_length_too_long_for_every_observed_batch_is_planned_alone() -> None:
    p = sample_profile()
    p.prompt_tokens, p.concurrency = {2048: 1.0, 64: 9.0}, {4: 2}  # only batches of 4 seen
    specs = profile.plan_specs(p, max_prompt_tokens=4000, max_inflight_tokens=2048)
    assert any(s.prompt_tokens > 1000 and s.concurrency == 1 for s in specs)
    assert all(s.prompt_tokens * s.concurrency <= 2048 or s.concurrency == 1 for s in specs)


def test_a_start_plans_the_profile_first_then_the_default_within_its_order() -> None:
    info = plan.UpstreamInfo((plan.ModelInfo("m", 2048),), has_tokenize=True)
    specs = profile.plan_specs(sample_profile(), max_prompt_tokens=4000)
    plain = plan.build_plan(plan.PlanSettings(), info)
    learned = plan.build_plan(plan.PlanSettings(profile=specs), info)
    sources = [plan.source_of(s.family) for s in learned.shapes]
    first_default = sources.index("default")
    assert set(sources[:first_default]) == {"profile"}
    assert "default" not in sources[:first_default] and "profile" not in sources[first_default:]
    assert len(learned.shapes) - first_default == len(plain.shapes)
    top = learned.shapes[0]
    assert top.stream and top.endpoint == "/v1/chat/completions"
    assert top.fields["response_format"] == {"type": "json_object"}
    assert top.fields["top_logprobs"] == 2 and top.fields["top_k"] == 0  # the client's path
    body = plan.body_for(top, "hello")
    assert body["logprobs"] is True and body["stream"] is True


def test_a_trusted_profile_keeps_only_default_shapes_for_what_clients_sent() -> None:
    info = plan.UpstreamInfo((plan.ModelInfo("m", 2048),), has_tokenize=True)
    specs = profile.plan_specs(sample_profile(), max_prompt_tokens=4000)
    plain = plan.build_plan(plan.PlanSettings(), info)
    young = plan.build_plan(plan.PlanSettings(profile=specs, profile_requests=99), info)
    trusted = plan.build_plan(plan.PlanSettings(profile=specs, profile_requests=100), info)
    learned = [s for s in trusted.shapes if plan.source_of(s.family) == "profile"]
    defaults = [s for s in trusted.shapes if plan.source_of(s.family) == "default"]
    used = {(s.endpoint, f) for s in learned for f in s.features}
    assert len(young.shapes) == len(learned) + len(plain.shapes)  # a young one only goes first
    assert len(defaults) < len(plain.shapes)
    assert all((s.endpoint, f) in used for s in defaults for f in s.features)
    assert not any("penalties" in s.features for s in trusted.shapes)  # no client sent them


def test_a_shape_longer_than_the_context_is_clamped_and_export_is_a_plan_file() -> None:
    p = sample_profile()
    p.prompt_tokens = {1 << 20: 1.0}
    info = plan.UpstreamInfo((plan.ModelInfo("m", 2048),), has_tokenize=True)
    specs = profile.plan_specs(p, max_prompt_tokens=1 << 30)
    built = plan.build_plan(plan.PlanSettings(profile=specs), info)
    assert all(s.prompt_tokens + s.max_tokens <= 2048 for s in built.shapes)
    spec = plan.parse_plan_file(profile.to_plan_toml(sample_profile()), source="p.toml")
    assert spec.mode == "extend" and spec.shapes[0].feature == "sampling+logprobs+json"
    assert spec.shapes[0].body["top_logprobs"] == 2
    assert (
        plan.build_plan(plan.PlanSettings(plan_file=spec), info)
        .shapes[-1]
        .family.startswith("file/")
    )


def test_source_of_a_family() -> None:
    assert plan.source_of("profile/chat/stream/greedy/len24/c1") == "profile"
    assert plan.source_of("file/chat/nostream/greedy/len24/c1") == "plan"
    assert plan.source_of("replay/rec.jsonl:1") == "plan"
    assert plan.source_of("chat/stream/greedy/len24/c1") == "default"
