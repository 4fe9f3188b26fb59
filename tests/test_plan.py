"""The warm-up plan, prompts, convergence rule and plan files: pure, no upstream."""

from __future__ import annotations

import ast
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

import warmgate.plan
from warmgate.bench import HELDOUT_CONTEXT, load_heldout
from warmgate.plan import (
    FEATURES,
    WORDS,
    Convergence,
    ModelInfo,
    Plan,
    PlanError,
    PlanSettings,
    Shape,
    UpstreamInfo,
    body_for,
    build_plan,
    covering_rows,
    length_levels,
    parse_plan_file,
    prompt_text,
    prompt_token_ids,
)

TOKENIZING = UpstreamInfo((ModelInfo("m", 2048),), has_tokenize=True, tokens_per_word=1.3)
# The thorough sweep (--coverage pairwise) with its old load cap: the tests of its shape.
PAIRWISE = {"coverage": "pairwise", "max_inflight_tokens": 131_072}


def plan_for(*models: ModelInfo, tokenize: bool = True, **settings: object) -> Plan:
    upstream = UpstreamInfo(models, has_tokenize=tokenize, tokens_per_word=1.3)
    return build_plan(PlanSettings(**settings), upstream)  # type: ignore[arg-type]


def octave(tokens: int) -> int:
    return tokens.bit_length()


# --- the default plan --------------------------------------------------------------


def test_default_plan_for_2048_is_72_shapes_covering_every_octave() -> None:
    plan = build_plan(PlanSettings(**PAIRWISE), TOKENIZING)
    assert len(plan.shapes) == 72  # the lower bound: 9 lengths x 8 features
    assert plan.warnings == ()
    completions = {s.prompt_tokens for s in plan.shapes if s.endpoint == "/v1/completions"}
    assert completions == {7, 15, 31, 63, 127, 254, 508, 1016, 2032}
    assert {octave(n) for n in completions} == set(range(3, 12))  # one per octave, 4..2047


@pytest.mark.parametrize("context", [64, 512, 2048, 4096, 32768, 131072])
def test_never_exceeds_max_model_len(context: int) -> None:
    plan = plan_for(ModelInfo("m", context), tokenize=True)
    for s in plan.shapes:
        assert s.prompt_tokens + s.max_tokens <= context, s.family
        if s.prompt_kind == "text":  # room for the chat template and a 10 % miss
            assert (s.prompt_tokens * 1.1 + 32) + s.max_tokens <= context, s.family
        assert s.prompt_tokens * s.concurrency <= 131_072, s.family
    assert max(s.prompt_tokens for s in plan.shapes) == context - 16


@pytest.mark.parametrize("context", [512, 2048, 131072])
def test_pairwise_coverage_by_brute_force(context: int) -> None:
    plan = plan_for(ModelInfo("m", context), **PAIRWISE)
    factors: dict[str, Callable[[Shape], object]] = {
        "endpoint": lambda s: s.endpoint,
        "stream": lambda s: s.stream,
        "feature": lambda s: s.feature,
        "octave": lambda s: octave(s.prompt_tokens),
        "concurrency": lambda s: s.concurrency,
    }
    levels = {name: {get(s) for s in plan.shapes} for name, get in factors.items()}
    assert levels["feature"] == set(FEATURES) and levels["concurrency"] == {1, 4, 16, 64}
    assert levels["endpoint"] == {"/v1/completions", "/v1/chat/completions"}
    seen = {
        (a, get_a(s), b, get_b(s))
        for s in plan.shapes
        for (a, get_a), (b, get_b) in itertools.combinations(factors.items(), 2)
    }
    for a, b in itertools.combinations(factors, 2):
        for x, y in itertools.product(levels[a], levels[b]):
            if (a, x, b, y) == ("stream", True, "feature", "prompt_logprobs"):
                continue  # refused by vLLM: never planned
            if (a, b) == ("octave", "concurrency"):
                assert isinstance(x, int) and isinstance(y, int)
                longest = max(s.prompt_tokens for s in plan.shapes if octave(s.prompt_tokens) == x)
                if longest * y > 131_072:
                    continue  # above max_inflight_tokens: never planned
            assert (a, x, b, y) in seen, f"pair {a}={x}, {b}={y} never planned"


def test_pairs_that_must_not_happen_never_do() -> None:
    plan = plan_for(ModelInfo("m", 131072))
    assert not [s for s in plan.shapes if s.feature == "prompt_logprobs" and s.stream]
    assert max(s.prompt_tokens * s.concurrency for s in plan.shapes) <= 131_072


def test_covering_rows_brute_force_on_a_small_case() -> None:
    sizes = [3, 3, 2, 2]
    rows = covering_rows(sizes, lambda i, a, j, b: not (i == 0 and j == 1 and a == b == 2))
    assert len(rows) <= 9
    for i, j in itertools.combinations(range(len(sizes)), 2):
        for a, b in itertools.product(range(sizes[i]), range(sizes[j])):
            present = any(r[i] == a and r[j] == b for r in rows)
            assert present == ((i, j, a, b) != (0, 1, 2, 2))


def test_length_levels_halve_from_the_limit() -> None:
    assert length_levels(2032, 4) == (7, 15, 31, 63, 127, 254, 508, 1016, 2032)
    assert length_levels(3, 4) == ()


def test_chat_prompts_are_text_and_leave_room_for_the_template() -> None:
    plan = build_plan(PlanSettings(**PAIRWISE), TOKENIZING)
    chat = [s for s in plan.shapes if s.endpoint == "/v1/chat/completions"]
    assert chat and all(s.prompt_kind == "text" for s in chat)
    assert max(s.prompt_tokens for s in chat) == int((2032 - 32) * 0.9)


def test_without_tokenize_completions_use_text_and_the_rate_is_flagged() -> None:
    plan = build_plan(PlanSettings(), UpstreamInfo((ModelInfo("m", 2048),)))
    assert {s.prompt_kind for s in plan.shapes} == {"text"}
    assert plan.tokens_per_word == 1.5 and "tokens per word" in plan.warnings[0]


def test_settings_narrow_the_plan() -> None:
    plan = plan_for(
        ModelInfo("m", 2048),
        features=("greedy", "logprobs"),
        stream=(False,),
        endpoints=("chat",),
        concurrency=(1, 8),
        **PAIRWISE,
    )
    assert {s.feature for s in plan.shapes} == {"greedy", "logprobs"}
    assert {s.concurrency for s in plan.shapes} == {1, 8}
    assert len(plan.shapes) == 18  # 9 lengths x 2 features


def test_stream_only_drops_prompt_logprobs_with_a_warning() -> None:
    plan = plan_for(ModelInfo("m", 2048), stream=(True,))
    assert "prompt_logprobs" not in {s.feature for s in plan.shapes}
    assert any("prompt_logprobs" in w for w in plan.warnings)


def test_families_are_unique_and_readable() -> None:
    plan = build_plan(PlanSettings(**PAIRWISE), TOKENIZING)
    families = [s.family for s in plan.shapes]
    assert len(set(families)) == len(families)
    assert "completions/nostream/greedy/len7/c1" in families
    assert all(f.count("/") == 4 for f in families)


def test_embedding_model_gets_the_embeddings_endpoint() -> None:
    plan = plan_for(ModelInfo("e5", 512, kind="embed"))
    assert {s.endpoint for s in plan.shapes} == {"/v1/embeddings"}
    # 8 octaves up to 512 x 4 buckets, less those above one step budget (2048 tokens)
    assert len(plan.shapes) == 8 * 4 - 6
    assert max(s.prompt_tokens * s.concurrency for s in plan.shapes) <= 2048
    assert max(s.prompt_tokens for s in plan.shapes) == 512
    body = body_for(plan.shapes[0], [5, 6, 7])
    assert body == {"model": "e5", "input": [5, 6, 7]}


def test_lora_adapters_share_one_kernel_sweep() -> None:
    plan = plan_for(
        ModelInfo("base", 2048),
        ModelInfo("a1", 2048, is_lora=True),
        ModelInfo("a2", 2048, is_lora=True),
        features=("greedy",),
        stream=(False,),
        endpoints=("completions",),
        concurrency=(1,),
    )
    by_model = {m: [s for s in plan.shapes if s.model == m] for m in ("base", "a1", "a2")}
    assert len(by_model["a1"]) == 9 and len(by_model["a2"]) == 1


def test_model_filter_and_unknown_kinds() -> None:
    plan = plan_for(
        ModelInfo("a", 2048),
        ModelInfo("b", 2048),
        ModelInfo("r", 2048, kind="reward"),
        models=("b", "r"),
    )
    assert {s.model for s in plan.shapes} == {"b"}
    assert any("'reward'" in w for w in plan.warnings)
    with pytest.raises(PlanError, match="'zz' is not served"):
        plan_for(ModelInfo("a", 2048), models=("zz",))


def test_nothing_to_warm_is_an_error() -> None:
    with pytest.raises(PlanError, match="nothing to warm up"):
        plan_for(ModelInfo("r", 2048, kind="reward"))
    with pytest.raises(PlanError, match="lists no models"):
        build_plan(PlanSettings(), UpstreamInfo(()))
    with pytest.raises(PlanError, match="too short for text prompts"):
        plan_for(ModelInfo("m", 40), tokenize=False)  # and no /tokenize for token-id prompts
    empty = parse_plan_file('mode = "replace"', source="p.toml")
    with pytest.raises(PlanError, match="nothing to warm up"):
        build_plan(PlanSettings(plan_file=empty), TOKENIZING)


def test_unknown_context_assumes_2048_and_warns() -> None:
    plan = plan_for(ModelInfo("m"))
    assert max(s.prompt_tokens for s in plan.shapes) == 2032
    assert any("max_model_len" in w for w in plan.warnings)
    capped = plan_for(ModelInfo("m", 131072), max_model_len=1024)
    assert max(s.prompt_tokens for s in capped.shapes) == 1008


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("endpoints", ("responses",), "unknown endpoint"),
        ("stream", (), "stream"),
        ("min_prompt_tokens", 0, "min_prompt_tokens"),
        ("max_repeats", 1, "min_repeats"),
    ],
)
def test_bad_plan_settings_name_the_setting(field: str, value: object, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        PlanSettings(**{field: value})  # type: ignore[arg-type]


# --- request bodies and prompts ----------------------------------------------------


def shape_of(plan: Plan, family_part: str) -> Shape:
    return next(s for s in plan.shapes if family_part in s.family)


def test_bodies_per_endpoint_and_feature() -> None:
    plan = build_plan(PlanSettings(**PAIRWISE), TOKENIZING)
    s = next(s for s in plan.shapes if s.endpoint == "/v1/completions" and s.feature == "logprobs")
    body = body_for(s, prompt_token_ids([10, 11, 12], s.prompt_tokens, seed=1))
    assert body["logprobs"] == 5 and len(body["prompt"]) == s.prompt_tokens
    assert body["max_tokens"] == 16 and body["model"] == "m"
    s = next(
        s for s in plan.shapes if s.endpoint == "/v1/chat/completions" and s.feature == "logprobs"
    )
    body = body_for(s, "hello there")
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["messages"] == [{"role": "user", "content": "hello there"}]
    s = next(s for s in plan.shapes if s.stream)
    assert body_for(s, "x" if s.prompt_kind == "text" else [1])["stream_options"] == {
        "include_usage": True
    }
    with pytest.raises(ValueError, match="text prompt"):
        body_for(next(s for s in plan.shapes if s.prompt_kind == "text"), [1, 2])


def test_bodies_do_not_share_state() -> None:
    s = next(s for s in build_plan(PlanSettings(), TOKENIZING).shapes if "json" in s.features)
    body = body_for(s, "a" if s.prompt_kind == "text" else [1])
    body["response_format"]["type"] = "text"
    assert s.fields["response_format"] == {"type": "json_object"}


def test_token_prompts_have_exact_length_and_differ_per_seed() -> None:
    vocab = list(range(1000, 1200))
    prompts = [prompt_token_ids(vocab, 64, seed) for seed in range(200)]
    assert all(len(p) == 64 and set(p) <= set(vocab) for p in prompts)
    assert len({tuple(p) for p in prompts}) == 200
    assert prompt_token_ids(vocab, 64, 7) == prompts[7]  # deterministic per seed
    assert len(prompt_token_ids(vocab, 2032, 1)) == 2032
    with pytest.raises(ValueError):
        prompt_token_ids([], 4, 1)


def test_text_prompts_follow_the_rate_and_differ_per_seed() -> None:
    texts = [prompt_text(WORDS, 130, 1.3, seed) for seed in range(100)]
    assert all(len(t.split()) == 100 for t in texts)
    assert len(set(texts)) == 100
    assert prompt_text(WORDS, 1, 1.5, 0).count(" ") == 0  # at least one word


# --- convergence -------------------------------------------------------------------


def run(c: Convergence, latencies: Sequence[float]) -> int:
    for n, ms in enumerate(latencies, 1):
        if c.record(ms):
            return n
    return -1


def test_convergence_needs_two_runs_within_ten_percent() -> None:
    c = Convergence()
    assert run(c, [900.0, 100.0, 95.0, 1.0]) == 3
    assert c.converged and c.cold_ms == 900.0 and c.warm_ms == 95.0 and c.runs == (900, 100, 95)


def test_convergence_boundary_is_inclusive() -> None:
    assert run(Convergence(0.10), [100.0, 90.0]) == 2
    c = Convergence(0.10)
    assert not c.record(100.0) and not c.record(89.0)  # still getting faster


def test_a_repeat_that_noise_made_slower_converges_but_not_a_far_slower_one() -> None:
    assert run(Convergence(0.10), [2345.0, 2687.0]) == 2  # measured on the CPU build
    assert run(Convergence(0.10), [100.0, 130.0]) == 2
    assert run(Convergence(0.10), [100.0, 131.0, 130.0]) == 3  # met a new cost: once more


def test_convergence_gives_up_after_max_runs_without_converging() -> None:
    c = Convergence(0.10, 2, 5)
    assert run(c, [100.0, 200.0, 100.0, 200.0, 100.0, 999.0]) == 5
    assert c.done and not c.converged and c.warm_ms == 100.0
    with pytest.raises(ValueError, match="after done"):
        c.record(1.0)


def test_convergence_min_runs_and_plan_defaults() -> None:
    assert run(Convergence(0.10, 3, 5), [100.0, 100.0, 100.0]) == 3
    c = Plan(()).convergence()
    assert (c.tolerance, c.min_runs, c.max_runs) == (0.10, 2, 5)
    assert c.cold_ms is None and c.warm_ms is None


# --- plan files ----------------------------------------------------------------------

PLAN_TOML = """
mode = "extend"
replay = "rec.jsonl"

[[shape]]
endpoint = "chat"
prompt_tokens = 1200
stream = true
feature = "logprobs"
concurrency = 8
max_tokens = 64
body = { top_logprobs = 2 }

[[shape]]
endpoint = "/v1/completions"
prompt_tokens = 300
"""

REPLAY = "\n".join(
    [
        json.dumps(
            {
                "endpoint": "/v1/chat/completions",
                "concurrency": 2,
                "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
            }
        ),
        "",
        json.dumps({"model": "old-model", "prompt": "Once upon", "stream": True, "max_tokens": 5}),
        json.dumps({"input": "embed me"}),
    ]
)


def reader(files: dict[str, str]) -> object:
    def read(name: str) -> str:
        if name not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[name]

    return read


def parse(text: str, files: dict[str, str] | None = None) -> warmgate.plan.PlanFileSpec:
    return parse_plan_file(text, source="p.toml", read=reader(files or {}))  # type: ignore[arg-type]


def test_plan_file_extends_the_default_plan() -> None:
    spec = parse(PLAN_TOML, {"rec.jsonl": REPLAY})
    assert spec.mode == "extend" and len(spec.shapes) == 2 and len(spec.replay) == 3
    upstream = UpstreamInfo(
        (ModelInfo("m", 2048), ModelInfo("e", 512, kind="embed")), has_tokenize=True
    )
    plan = build_plan(PlanSettings(plan_file=spec, **PAIRWISE), upstream)
    assert len(plan.shapes) == 72 + 8 * 4 + 2 + 3
    chat = shape_of(plan, "file/chat")
    assert (chat.concurrency, chat.max_tokens, chat.stream) == (8, 64, True)
    assert chat.prompt_kind == "text"
    assert chat.fields == {"logprobs": True, "top_logprobs": 2}
    completion = shape_of(plan, "file/completions")
    assert (completion.prompt_tokens, completion.prompt_kind, completion.feature) == (
        300,
        "tokens",
        "greedy",
    )


def test_replayed_bodies_are_sent_as_recorded_on_a_served_model() -> None:
    spec = parse('mode = "replace"\nreplay = ["rec.jsonl"]', {"rec.jsonl": REPLAY})
    upstream = UpstreamInfo((ModelInfo("m", 2048), ModelInfo("e", 512, kind="embed")))
    plan = build_plan(PlanSettings(plan_file=spec), upstream)
    assert [s.endpoint for s in plan.shapes] == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    ]
    chat, completion, embed = plan.shapes
    assert chat.concurrency == 2 and chat.family == "replay/rec.jsonl:1"
    assert body_for(chat, "ignored") == {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "model": "m",
    }
    assert completion.stream and body_for(completion, "")["model"] == "m"
    assert any("'old-model' is not served" in w for w in plan.warnings)
    assert body_for(embed, "")["model"] == "e"


def test_file_shape_beyond_the_context_is_refused_with_the_fix() -> None:
    spec = parse('[[shape]]\nendpoint = "completions"\nprompt_tokens = 2040')
    with pytest.raises(PlanError, match=r"p.toml \[\[shape\]\] #1.*lower prompt_tokens to 2032"):
        build_plan(PlanSettings(plan_file=spec), TOKENIZING)


def test_file_shape_for_a_missing_endpoint_is_refused() -> None:
    spec = parse('[[shape]]\nendpoint = "embeddings"\nprompt_tokens = 20')
    with pytest.raises(PlanError, match="no served model has the embeddings endpoint"):
        build_plan(PlanSettings(plan_file=spec), TOKENIZING)
    spec = parse('[[shape]]\nendpoint = "chat"\nprompt_tokens = 20\nmodel = "other"')
    with pytest.raises(PlanError, match="model 'other' is not a planned model"):
        build_plan(PlanSettings(plan_file=spec), TOKENIZING)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mode = "extend"\nshape = ?\n', r"p.toml: not valid TOML.*at line 2"),
        ('mode = "merge"', r'p.toml: mode = .merge.; use "extend" or "replace"'),
        ("shapes = 1", r"p.toml: unknown key 'shapes'"),
        ("shape = 1", r"write \[\[shape\]\]"),
        ('[[shape]]\nendpoint = "responses"\nprompt_tokens = 5', r"#1 endpoint = 'responses'; use"),
        ('[[shape]]\nendpoint = "chat"', r"#1: prompt_tokens is required"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 0', r"#1 prompt_tokens must be a positive"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = true', r"prompt_tokens must be a positive"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 5\nfeature = "beam"', r"feature 'beam'"),
        ('[[shape]]\nendpoint = "embeddings"\nprompt_tokens = 5\nfeature = "n"', r"pooling"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 5\nstream = "yes"', r"stream must be"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 5\ntemperature = 1', r"unknown key 'temp"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 5\nbody = 3', r"body must be a table"),
        ('[[shape]]\nendpoint = "chat"\nprompt_tokens = 5\nconcurrency = -2', r"#1 concurrency"),
        ("replay = 5", r"replay must be a file name"),
        ('replay = "gone.jsonl"', r"'gone.jsonl' cannot be read.*relative to the plan file"),
    ],
)
def test_plan_file_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse(text)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"r.jsonl:2: not JSON"),
        ("[1, 2]", r"r.jsonl:2: must be a JSON object"),
        ('{"max_tokens": 5}', r'r.jsonl:2: body has no "messages", "prompt" or "input"'),
        ('{"endpoint": "/v1/responses", "body": {"input": "x"}}', r"r.jsonl:2 endpoint = "),
        ('{"endpoint": "/v1/completions", "body": 3}', r"r.jsonl:2: 'body' must be"),
        ('{"body": {"prompt": "x"}, "concurrency": 0}', r"r.jsonl:2 concurrency must be"),
    ],
)
def test_replay_errors_name_file_and_line(line: str, message: str) -> None:
    files = {"r.jsonl": '{"prompt": "fine"}\n' + line}
    with pytest.raises(PlanError, match=message):
        parse('replay = "r.jsonl"', files)


def test_empty_replay_file_and_missing_reader() -> None:
    with pytest.raises(PlanError, match="holds no requests"):
        parse('replay = "r.jsonl"', {"r.jsonl": "\n\n"})
    with pytest.raises(PlanError, match="no reader"):
        parse_plan_file('replay = "r.jsonl"', source="p.toml")


# --- the held-out benchmark mix ------------------------------------------------------


def test_plan_module_does_not_import_the_heldout_mix() -> None:
    tree = ast.parse(Path(warmgate.plan.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    }
    assert not any(name and "bench" in name for name in imported)


def test_heldout_mix_fits_the_context_and_mixes_factors() -> None:
    requests = load_heldout()
    assert len(requests) >= 20 and len({r.name for r in requests}) == len(requests)
    for r in requests:
        assert "model" not in r.body
        assert r.prompt_tokens + r.max_tokens <= HELDOUT_CONTEXT - 128, r.name
        body = r.render("fresh words", "tiny")
        assert body["model"] == "tiny" and "fresh words" in json.dumps(body), r.name
        assert "{{prompt}}" not in json.dumps(body), r.name
    assert sum(r.concurrency > 1 for r in requests) >= 3
    assert {r.endpoint for r in requests} == {"/v1/chat/completions", "/v1/completions"}


# --- the engine plan (--coverage engine, the default) --------------------------------------

PATHS = ("greedy", "sampling", "seed")
ADDONS = ("penalties", "n", "logprobs", "prompt_logprobs", "json")


def engine_plan(context: int = 2048, **settings: object) -> Plan:
    return plan_for(ModelInfo("m", context), **settings)


def requests_of(s: Shape) -> list[tuple[str, ...]]:
    """The features of each request of a batch of `s`."""
    if not s.variants:
        return [s.features] * s.concurrency
    return [(s.features[i % len(s.features)],) for i in range(s.concurrency)]


def test_engine_plan_warms_every_feature_and_every_pair_of_them() -> None:
    plan = engine_plan()
    carried = [set(r) for s in plan.shapes for r in requests_of(s)]
    assert set().union(*carried) == set(FEATURES)
    for a, b in itertools.combinations(PATHS + ADDONS, 2):
        if {a, b} <= set(PATHS) or {a, b} == {"greedy", "n"}:
            continue  # one path a request; n identical greedy answers are not planned
        assert any({a, b} <= r for r in carried), f"{a} and {b} never in one request"
    on_stream = {f for s in plan.shapes if s.stream for f in s.features}
    assert set(FEATURES) - on_stream == {"prompt_logprobs"}  # vLLM refuses it with stream


def test_engine_plan_is_small_and_stops_at_the_step_budget() -> None:
    """Lengths stop at one step budget: a longer prompt only chunks into such steps.
    So the plan does not grow with the context, but for one chunked prompt."""
    sizes = {}
    for context in (2048, 4096, 32768, 131072):
        plan = engine_plan(context, step_budget=2048)
        long = [s for s in plan.shapes if s.prompt_tokens * s.concurrency > 2048]
        assert [s.family for s in long] == ([] if context == 2048 else [long[0].family])
        if long:
            assert long[0].prompt_tokens == context - 16 and long[0].features == ("greedy",)
        sizes[context] = len(plan.shapes)
    assert sizes[4096] == sizes[32768] == sizes[131072] < 30
    assert len(engine_plan(coverage="pairwise").shapes) == 72  # the sweep, kept


def test_engine_plan_covers_each_length_octave_with_the_length_features() -> None:
    for budget in (512, 2048, 8192):
        plan = engine_plan(16384, step_budget=budget)
        with_both = {
            octave(s.prompt_tokens)
            for s in plan.shapes
            if {"logprobs", "prompt_logprobs"} <= set(s.features)
        }
        assert with_both >= set(range(3, budget.bit_length()))  # 4 .. budget
        assert max(s.prompt_tokens for s in plan.shapes if s.prompt_tokens <= budget) == budget


def test_engine_plan_meets_every_sampling_path_at_every_batch_size() -> None:
    plan = engine_plan(concurrency=(1, 4, 16, 64))
    met = {(f, s.seqs) for s in plan.shapes for r in requests_of(s) for f in r if f in PATHS}
    for size in (1, 2, 4, 8, 16, 32, 64):
        for path in PATHS:
            assert (path, size) in met, f"{path} never in a batch of {size}"
    assert all(s.prompt_tokens * s.concurrency <= 2048 for s in plan.shapes)


def test_batch_sizes_respect_max_num_seqs_and_the_budget() -> None:
    plan = engine_plan(concurrency=(1, 64), max_num_seqs=8)
    assert max(s.concurrency for s in plan.shapes) == 8
    plan = engine_plan(concurrency=(1, 64), step_budget=256)
    chunked = [s for s in plan.shapes if s.prompt_tokens == 2032]
    assert [s.features for s in chunked] == [("greedy",)]  # the one prompt longer than a step
    assert max(s.prompt_tokens * s.concurrency for s in plan.shapes if s not in chunked) <= 256


def test_mixed_batches_give_each_request_its_path() -> None:
    plan = engine_plan()
    mixed = next(s for s in plan.shapes if s.variants and s.concurrency == 4)
    bodies = [body_for(mixed, [1, 2, 3], i) for i in range(4)]
    temperatures = [b["temperature"] for b in bodies]
    assert temperatures[0] == 0.0 and temperatures[1] == temperatures[2] == 0.8
    assert "top_p" in bodies[1] and bodies[2]["seed"] == 1234 and "seed" not in bodies[1]
    assert bodies[3] == {**bodies[0], "prompt": [1, 2, 3]}


def test_combined_features_merge_their_fields_with_the_path_last() -> None:
    plan = engine_plan()
    combo = next(s for s in plan.shapes if {"greedy", "logprobs", "json"} <= set(s.features))
    body = body_for(combo, "hi" if combo.prompt_kind == "text" else [1])
    assert body["temperature"] == 0.0 and body["response_format"] == {"type": "json_object"}
    assert "logprobs" in body
    seeded_n = next(s for s in plan.shapes if {"seed", "n"} <= set(s.features))
    assert seeded_n.seqs == 2 * seeded_n.concurrency
    assert body_for(seeded_n, "hi" if seeded_n.prompt_kind == "text" else [1])["n"] == 2


def test_no_chunked_shape_without_chunked_prefill() -> None:
    plan = engine_plan(8192, step_budget=2048, chunked_prefill=False)
    assert max(s.prompt_tokens * s.concurrency for s in plan.shapes) <= 2048


def test_order_by_value_puts_cheap_broad_shapes_first() -> None:
    plan = engine_plan(4096)
    first = plan.shapes[0]
    assert first.prompt_tokens <= 32 and len(first.features) >= 3  # many features, cheap
    tokens = [s.prompt_tokens * s.concurrency for s in plan.shapes]
    assert tokens.index(max(tokens)) > len(tokens) // 2  # the chunked prompt comes late


def test_order_by_value_is_greedy_over_what_is_new() -> None:
    def shape(family: str, feature: str, tokens: int) -> Shape:
        return Shape(
            family, "/v1/completions", "m", "tokens", tokens, feature=feature, max_tokens=16
        )

    broad = shape("broad", "greedy+logprobs+json", 32)
    same = shape("same", "greedy+logprobs+json", 33)  # nothing new once `broad` ran
    long = shape("long", "greedy", 2000)  # new length, but costly
    short = shape("short", "seed", 32)
    ordered = warmgate.plan.order_by_value([same, long, short, broad])
    # broad touches most; then the new feature; `same` only adds a length octave, as
    # `long` does, but costs a sixtieth as much.
    assert [s.family for s in ordered] == ["broad", "short", "same", "long"]
    assert warmgate.plan.order_by_value([same, same]) == [same, same]  # ties keep the order
    assert warmgate.plan.order_by_value([]) == []


def test_quarantine_of_a_combined_shape_covers_each_of_its_features() -> None:
    from warmgate.plan import ShapeKey, to_quarantine

    def key(family: str, feature: str, tokens: int) -> ShapeKey:
        return ShapeKey("m", family, "/v1/completions", False, feature, tokens, 1)

    crashed = key("a", "seed+logprobs", 2000)
    safe_seed = key("b", "seed", 500)
    bigger_seed = key("c", "greedy,seed", 1000)
    bigger_logprobs = key("d", "logprobs", 3000)
    other = key("e", "json", 4000)
    held = to_quarantine(
        [crashed, safe_seed, bigger_seed, bigger_logprobs, other], [safe_seed], [crashed]
    )
    assert set(held) == {crashed, bigger_seed, bigger_logprobs}


def test_pairwise_leaves_out_prompts_above_its_load_cap_with_a_warning() -> None:
    plan = plan_for(ModelInfo("m", 131072), coverage="pairwise")  # cap: 8 x 2048 tokens
    assert max(s.prompt_tokens * s.concurrency for s in plan.shapes) <= 16384
    assert any("above max_inflight_tokens 16384" in w for w in plan.warnings)


def test_compile_sizes_join_the_length_ladder() -> None:
    plan = engine_plan(compile_sizes=(48, 100, 4096))  # 4096: above the step budget
    lengths = {s.prompt_tokens for s in plan.shapes if "prompt_logprobs" in s.features}
    assert {48, 100} <= lengths and 4096 not in lengths


def test_sampling_carries_min_p() -> None:
    shape = next(s for s in engine_plan().shapes if "sampling" in s.features and not s.variants)
    assert body_for(shape, "hi" if shape.prompt_kind == "text" else [1])["min_p"] == 0.05
