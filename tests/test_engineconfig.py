"""What the engine specialises on, from its start-up line, its argv and vLLM 0.32's defaults.

Pure: no engine runs. REAL_CPU_LINE is the line the real vLLM 0.32 CPU build printed
(scripts/real_vllm.sh, default flags), the model path trimmed. The CPU numbers in
test_cpu_rules_match_vllm came from that build's own `EngineArgs.create_engine_config`.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from warmgate.engineconfig import (
    FIELDS,
    HINTS,
    LOG_MARKER,
    EngineConfig,
    defaults,
    from_argv,
    from_log,
    resolve,
)

REAL_CPU_LINE = (
    "(EngineCore pid=18758) INFO 12-03 21:52:09 [core.py:133] Initializing a V1 LLM engine (v"
    "0.32.0) with config: model='/models/tiny', speculative_config=None, tokenizer='/models/t"
    "iny', skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, tokenizer_revision="
    "None, trust_remote_code=False, dtype=torch.bfloat16, max_seq_len=2048, download_dir=None"
    ", load_format=dummy, tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_siz"
    "e=1, decode_context_parallel_size=1, dcp_comm_backend=ag_rs, disable_custom_all_reduce=T"
    "rue, quantization=None, quantization_config=None, enforce_eager=False, aux_output_config"
    "=AuxOutputConfig(enable_return_routed_experts=False, max_bytes=None), kv_cache_dtype=aut"
    "o, device_config=cpu, structured_outputs_config=StructuredOutputsConfig(backend='auto', "
    "disable_any_whitespace=False, disable_additional_properties=False, reasoning_parser='', "
    "reasoning_parser_plugin='', enable_in_reasoning=False), observability_config=Observabili"
    "tyConfig(show_hidden_metrics_for_version=None, otlp_traces_endpoint=None, collect_detail"
    "ed_traces=None, per_request_spec_decode_metrics='none', kv_cache_metrics=False, kv_cache"
    "_metrics_sample=0.01, custom_histogram_buckets=None, cudagraph_metrics=False, enable_lay"
    "erwise_nvtx_tracing=False, enable_mfu_metrics=False, enable_mm_processor_stats=False, en"
    "able_logging_iteration_details=False, jit_monitor_mode='warn', jit_monitor_verbose=False"
    "), seed=0, served_model_name=tiny-llama, enable_prefix_caching=True, enable_chunked_pref"
    "ill=True, pooler_config=None, compilation_config={'mode': <CompilationMode.DYNAMO_TRACE_"
    "ONCE: 2>, 'debug_dump_path': None, 'cache_dir': '', 'compile_cache_save_format': 'binary"
    "', 'backend': 'inductor', 'custom_ops': ['none'], 'ir_enable_torch_wrap': False, 'splitt"
    "ing_ops': [], 'compile_mm_encoder': False, 'cudagraph_mm_encoder': False, 'encoder_cudag"
    "raph_token_budgets': [], 'encoder_cudagraph_max_vision_items_per_batch': 0, 'encoder_cud"
    "agraph_max_frames_per_batch': None, 'cudagraph_decoder_replay': True, 'decoder_replay_cu"
    "dagraph_capture_sizes': [], 'decoder_replay_trim_threshold': 768, 'compile_sizes': None,"
    " 'compile_ranges_endpoints': [2048], 'inductor_compile_config': {'enable_auto_functional"
    "ized_v2': False, 'dce': True, 'size_asserts': False, 'nan_asserts': False, 'epilogue_fus"
    "ion': True, 'cpp.dynamic_threads': True}, 'inductor_passes': {}, 'cudagraph_mode': <CUDA"
    "GraphMode.NONE: 0>, 'cudagraph_num_of_warmups': 0, 'cudagraph_capture_sizes': [], 'cudag"
    "raph_copy_inputs': False, 'cudagraph_specialize_lora': True, 'use_inductor_graph_partiti"
    "on': False, 'pass_config': {'fuse_norm_quant': False, 'fuse_act_quant': False, 'fuse_att"
    "n_quant': False, 'fuse_allreduce_rms': False, 'enable_qk_norm_rope_fusion': False, 'fuse"
    "_rope_kvcache_cat_mla': False, 'fuse_act_padding': False, 'fuse_qk_norm_rope_kvcache': F"
    "alse}, 'max_cudagraph_capture_size': None, 'dynamic_shapes_config': {'type': <DynamicSha"
    "pesType.BACKED: 'backed'>, 'evaluate_guards': False, 'assume_32_bit_indexing': False}, '"
    "local_cache_dir': None, 'fast_moe_cold_start': False, 'static_all_moe_layers': []}, kern"
    "el_config=KernelConfig(ir_op_priority=IrOpPriorityConfig(rms_norm=['native'], fused_add_"
    "rms_norm=['native'], gelu_and_mul_sparse=['native']), enable_flashinfer_autotune=True, e"
    "nable_rocm_segmented_attn_autotune=False, enable_cutedsl_warmup=True, enable_jit_warmup="
    "True, moe_backend='auto', sparse_indexer_topk_backend='auto', linear_backend='auto', lin"
    "ear_backend_per_quant=None)"
)

# The same line as a GPU build prints it: graphs on, compile sizes, a fusion endpoint below
# the step budget, and a decoder-replay list whose name ends like the capture sizes'.
GPU_LINE = (
    REAL_CPU_LINE.replace("device_config=cpu", "device_config=cuda")
    .replace("max_seq_len=2048", "max_seq_len=32768")
    .replace("'compile_sizes': None", "'compile_sizes': [1, 2, 4]")
    .replace("'compile_ranges_endpoints': [2048]", "'compile_ranges_endpoints': [2048, 8192]")
    .replace(
        "'cudagraph_mode': <CUDAGraphMode.NONE: 0>",
        "'cudagraph_mode': <CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>",
    )
    .replace("'cudagraph_capture_sizes': []", "'cudagraph_capture_sizes': [1, 2, 4, 8, 16, 24]")
    .replace(
        "'decoder_replay_cudagraph_capture_sizes': []",
        "'decoder_replay_cudagraph_capture_sizes': [999]",
    )
    .replace("'max_cudagraph_capture_size': None", "'max_cudagraph_capture_size': 24")
)
H100 = 81559 * 2**20  # what NVML reports for an H100 80GB
GPU_SIZES_512 = (1, 2, 4, *range(8, 256, 8), *range(256, 513, 16))


def vllm(*flags: str) -> dict[str, Any]:
    return from_argv(["vllm", "serve", "/models/tiny", *flags])


# --- from_log --------------------------------------------------------------------------------


def test_the_real_cpu_line() -> None:
    assert LOG_MARKER.decode() in REAL_CPU_LINE
    assert from_log(REAL_CPU_LINE) == {
        "step_budget": 2048,  # compile_ranges_endpoints [2048]
        "chunked_prefill": True,
        "max_model_len": 2048,  # max_seq_len
        "compile_sizes": (),  # None
        "cudagraph_sizes": (),  # CUDAGraphMode.NONE
    }


def test_a_gpu_line() -> None:
    assert all(old not in GPU_LINE for old in ("'compile_sizes': None", "CUDAGraphMode.NONE"))
    assert from_log(GPU_LINE) == {
        "step_budget": 8192,  # the largest endpoint; 2048 is a fusion threshold below it
        "chunked_prefill": True,
        "max_model_len": 32768,
        "compile_sizes": (1, 2, 4),
        "cudagraph_sizes": (1, 2, 4, 8, 16, 24),
    }


def test_eager_or_mode_none_means_no_graphs_whatever_the_list() -> None:
    eager = GPU_LINE.replace("enforce_eager=False", "enforce_eager=True")
    assert from_log(eager)["cudagraph_sizes"] == ()
    none = GPU_LINE.replace("FULL_AND_PIECEWISE: (2, 1)", "NONE: 0")
    assert from_log(none)["cudagraph_sizes"] == ()


def test_chunked_prefill_off_in_the_line() -> None:
    line = REAL_CPU_LINE.replace("enable_chunked_prefill=True", "enable_chunked_prefill=False")
    assert from_log(line)["chunked_prefill"] is False


def test_a_line_cut_short_gives_what_it_holds() -> None:
    cut = REAL_CPU_LINE[: REAL_CPU_LINE.index("compilation_config=") + 200]
    assert from_log(cut) == {"chunked_prefill": True, "max_model_len": 2048}


@pytest.mark.parametrize(
    "line",
    [
        "",
        "INFO 12-03 21:52:09 [api_server.py:1] Starting vLLM API server",
        "max_seq_len=2048, enable_chunked_prefill=True, 'compile_ranges_endpoints': [2048]",
        "\x00\xff\ufffd" * 100,
    ],
)
def test_any_other_line_gives_nothing(line: str) -> None:
    assert from_log(line) == {}


MARKER = LOG_MARKER.decode()


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (MARKER, {}),
        (MARKER + " (v0.32.0) with config: garbage", {}),
        (MARKER + " max_seq_len=" + "9" * 5000, {}),  # int() refuses > 4300 digits
        (MARKER + " max_seq_len=0, enable_chunked_prefill=maybe", {}),
        (MARKER + " max_seq_len=\uff12\uff10\uff14\uff18", {}),  # not ASCII digits
        (MARKER + " decoder_max_seq_len=77, x.max_seq_len=78", {}),  # other names
        (MARKER + ", compilation_config={'compile_ranges_endpoints': [abc]", {}),
        (MARKER + ", compilation_config={'compile_ranges_endpoints': [1, 2", {}),
        (MARKER + ", compilation_config={'compile_ranges_endpoints': []}", {}),
        (
            MARKER + ", compilation_config={'compile_ranges_endpoints': [" + "1" * 400 + "]}",
            {},
        ),
        (
            MARKER + ", compilation_config={'cudagraph_mode': <CUDAGraphMode.NONE",
            {"cudagraph_sizes": ()},
        ),
        (MARKER + " " + "[" * 100_000, {}),
        (MARKER + "'" * 10_000 + "=" * 10_000, {}),
    ],
)
def test_garbage_after_the_marker_never_raises(line: str, expected: dict[str, Any]) -> None:
    assert from_log(line) == expected


# --- from_argv -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-num-seqs", "64"], {"max_num_seqs": 64}),
        (["--max-num-seqs=64"], {"max_num_seqs": 64}),
        (["--max_num_seqs", "64"], {"max_num_seqs": 64}),
        (["--max_num_seqs=64"], {"max_num_seqs": 64}),
        (["--max-num-seqs", "8", "--max-num-seqs", "16"], {"max_num_seqs": 16}),  # last wins
        (["--max-num-batched-tokens", "4096"], {"step_budget": 4096}),
        (["--max-num-batched-tokens=2k"], {"step_budget": 2000}),
        (["--max_num_batched_tokens", "2K"], {"step_budget": 2048}),
        (["--max-num-batched-tokens", "25.6k"], {"step_budget": 25600}),
        (["--max-model-len", "32768"], {"max_model_len": 32768}),
        (["--max-model-len", "1k"], {"max_model_len": 1000}),
        (["--max-model-len=2K"], {"max_model_len": 2048}),
        (["--max-model-len", "auto"], {}),  # vLLM reads it from the model
        (["--max-model-len", "-1"], {}),
        (["--enable-chunked-prefill"], {"chunked_prefill": True}),
        (["--no-enable-chunked-prefill"], {"chunked_prefill": False}),
        (["--no_enable_chunked_prefill"], {"chunked_prefill": False}),
        (["--no-enable-chunked-prefill", "--enable-chunked-prefill"], {"chunked_prefill": True}),
        (["--enforce-eager"], {"cudagraph_sizes": ()}),
        (["--enforce_eager", "--no-enforce-eager"], {}),
    ],
)
def test_scheduler_flags(flags: list[str], expected: dict[str, Any]) -> None:
    assert vllm(*flags) == expected


CC = '{"cudagraph_capture_sizes": [4, 1, 2, 2], "compile_sizes": [8, 16]}'
CC_FIELDS = {"cudagraph_sizes": (1, 2, 4), "compile_sizes": (8, 16)}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--compilation-config", CC], CC_FIELDS),
        ([f"--compilation-config={CC}"], CC_FIELDS),
        (["--compilation_config", CC], CC_FIELDS),
        (["-cc", CC], CC_FIELDS),
        ([f"-cc={CC}"], CC_FIELDS),
        (["-O", CC], CC_FIELDS),  # older vLLM's -O JSON (0.32 exits on it)
        (["-cc", '{"compile_sizes": [1]}', "-cc", CC], CC_FIELDS),  # the last one wins
        (["-cc.cudagraph_capture_sizes", "[4, 8]"], {"cudagraph_sizes": (4, 8)}),
        (["--compilation-config.cudagraph_capture_sizes=[4,8]"], {"cudagraph_sizes": (4, 8)}),
        # the dotted ones replace the JSON whole, as vLLM 0.32's parser does
        (["-cc", CC, "-cc.cudagraph_capture_sizes", "[4, 8]"], {"cudagraph_sizes": (4, 8)}),
        (
            ["-cc.cudagraph_capture_sizes+", "1,2", "-cc.cudagraph_capture_sizes+", "3"],
            {"cudagraph_sizes": (1, 2, 3)},  # `key+ a,b` lists merge
        ),
        (
            ["-cc", '{"cudagraph_mode": "NONE", "cudagraph_capture_sizes": [1]}'],
            {"cudagraph_sizes": ()},
        ),
        (["-cc", '{"cudagraph_mode": "none"}'], {"cudagraph_sizes": ()}),
        (["-cc", '{"cudagraph_mode": 0}'], {"cudagraph_sizes": ()}),
        (["-cc", '{"cudagraph_mode": "PIECEWISE"}'], {}),
        (["-cc.cudagraph_mode", "NONE"], {"cudagraph_sizes": ()}),
        (["--enforce-eager", "-cc", CC], {**CC_FIELDS, "cudagraph_sizes": ()}),
        (["-cc", '{"max_cudagraph_capture_size": 64}'], {"max_cudagraph_capture_size": 64}),
        (
            ["-cc", '{"compile_sizes": [32, "cudagraph_capture_sizes"]}'],
            {"compile_sizes": (32,), "compile_graph_sizes": True},
        ),
        # a level alone sets nothing, but -O0 turns CUDA graphs off (config/vllm.py:261)
        (["-O3"], {}),
        (["-O", "2"], {}),
        (["--optimization-level", "1"], {}),
        (["-O0"], {"cudagraph_sizes": ()}),
        (["-O=0"], {"cudagraph_sizes": ()}),
        (["-O", "0"], {"cudagraph_sizes": ()}),
        (["--optimization-level=0"], {"cudagraph_sizes": ()}),
        (["-O0", "-cc", '{"cudagraph_mode": "PIECEWISE"}'], {}),  # the user's mode wins
        (["-O0", "-O3"], {}),
    ],
)
def test_compilation_flags(flags: list[str], expected: dict[str, Any]) -> None:
    assert vllm(*flags) == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["-tp", "2"], {"world_size": 2}),
        (["--tensor-parallel-size", "2", "--pipeline_parallel_size=3"], {"world_size": 6}),
        (["-pp", "2"], {"world_size": 2}),
        (["--performance-mode", "throughput"], {"performance_mode": "throughput"}),
        (["--performance-mode", "fast"], {}),
    ],
)
def test_hints(flags: list[str], expected: dict[str, Any]) -> None:
    assert vllm(*flags) == expected
    assert set(expected) <= HINTS


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "serve", "m", "--max-num-seqs", "8"],
        ["/opt/venv/bin/vllm", "serve", "m", "--max-num-seqs", "8"],
        ["uv", "run", "vllm", "serve", "m", "--max-num-seqs", "8"],
        [
            "python3",
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "m",
            "--max-num-seqs",
            "8",
        ],
        ["python", "-m", "vllm.entrypoints.cli.main", "serve", "m", "--max-num-seqs", "8"],
        ["vllm", "serve", "--model", "m", "--max-num-seqs", "8"],
    ],
)
def test_vllm_commands(argv: list[str]) -> None:
    assert from_argv(argv) == {"max_num_seqs": 8}


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["python", "-m", "sglang.launch_server", "--model-path", "/m/vllm", "--max-num-seqs", "8"],
        ["sh", "-c", "vllm serve m --max-num-seqs 8"],  # a script: not split
        ["warmgate", "sim", "--max-num-seqs", "8"],
        ["/bin/run-server", "--max-num-seqs", "8", "vllm"],  # vllm only as a value
        ["vllm-tiny", "--max-num-seqs", "8"],
        ["sleep", "10"],
    ],
)
def test_other_commands_give_nothing(argv: list[str]) -> None:
    assert from_argv(argv) == {}


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-num-seqs", "abc"],
        ["--max-num-seqs", "0"],
        ["--max-num-seqs", "-3"],
        ["--max-num-seqs", "1.5"],
        ["--max-num-seqs", "9" * 5000],
        ["--max-num-seqs"],
        ["--max-num-seqs="],
        ["--max-num-batched-tokens", "1.5K"],  # vLLM: no decimals with binary suffixes
        ["--max-num-batched-tokens", "2x"],
        ["--max-num-batched-tokens", "99999999999999999999999T"],
        ["--max-model-len", "lots"],
        ["--compilation-config", "{bad"],
        ["--compilation-config", "[1, 2]"],
        ["--compilation-config", "[" * 100_000],
        ["--compilation-config"],
        ["-cc", '{"cudagraph_capture_sizes": "x", "compile_sizes": 7}'],
        ["-cc", '{"cudagraph_capture_sizes": [true, -1, 0, "x", 1.5]}'],
        ["-cc", '{"max_cudagraph_capture_size": "big"}'],
        ["-cc.cudagraph_capture_sizes"],
        ["-O"],
        ["-tp", "two"],
    ],
)
def test_bad_values_are_skipped(flags: list[str]) -> None:
    assert vllm(*flags) == {}


def test_a_missing_value_does_not_swallow_the_next_flag() -> None:
    assert vllm("--max-num-seqs", "--enforce-eager") == {"cudagraph_sizes": ()}
    assert vllm("--max-model-len", "--max-num-seqs", "4") == {"max_num_seqs": 4}


# --- defaults --------------------------------------------------------------------------------


def test_cpu_defaults() -> None:
    # engine/arg_utils.py:2975-2983; the real CPU log showed compile_ranges_endpoints [2048]
    assert defaults(None) == {
        "step_budget": 2048,
        "max_num_seqs": 128,
        "chunked_prefill": True,
        "compile_sizes": (),
        "cudagraph_sizes": (),
        "platform": "cpu",
    }
    assert resolve({}, {}, defaults(None)).step_budget == from_log(REAL_CPU_LINE)["step_budget"]


def test_80gb_gpu_defaults() -> None:
    found = defaults(H100, "NVIDIA H100 80GB HBM3")
    assert found["step_budget"] == 8192  # engine/arg_utils.py:2933-2942
    assert found["max_num_seqs"] == 1024
    assert found["chunked_prefill"] is True
    assert found["compile_sizes"] == ()
    # min(1024 x 2, 512) = 512; 1024 requests exceed it, so no decode size is added
    assert found["cudagraph_sizes"] == GPU_SIZES_512
    assert len(GPU_SIZES_512) == 51


def test_an_a100_of_80gb_keeps_the_small_defaults() -> None:
    found = defaults(H100, "NVIDIA A100-SXM4-80GB")
    assert (found["step_budget"], found["max_num_seqs"]) == (2048, 256)


def test_24gb_gpu_defaults() -> None:
    found = defaults(24 * 2**30, "NVIDIA L4")
    assert (found["step_budget"], found["max_num_seqs"]) == (2048, 256)  # :2943-2952
    assert found["cudagraph_sizes"] == GPU_SIZES_512  # min(256 x 2, 512), and 256 is in it


def test_big_gpu_defaults() -> None:
    h200 = defaults(141 * 10**9, "NVIDIA H200")
    assert (h200["step_budget"], h200["max_num_seqs"], h200["graph_cap"]) == (8192, 1024, 512)
    b200 = defaults(183 * 2**30, "NVIDIA B200")
    assert (b200["step_budget"], b200["max_num_seqs"]) == (16384, 1024)  # :2923-2932
    assert b200["cudagraph_sizes"][-1] == 1024  # data-centre Blackwell's ceiling
    assert b200["cudagraph_sizes"][-3:] == (992, 1008, 1024)


def test_a_gpu_whose_memory_could_not_be_read() -> None:
    assert defaults(0)["step_budget"] == 2048  # vLLM falls back to 0 bytes too (:2913-2918)


# --- resolve ---------------------------------------------------------------------------------


def test_log_beats_argv_beats_default_per_field() -> None:
    argv = vllm(
        "--max-num-seqs", "64", "--max-num-batched-tokens", "4096", "--max-model-len", "512"
    )
    config = resolve(from_log(REAL_CPU_LINE), argv, defaults(None))
    assert config == EngineConfig(
        step_budget=2048,
        max_num_seqs=64,
        chunked_prefill=True,
        compile_sizes=(),
        cudagraph_sizes=(),
        max_model_len=2048,
        sources={
            "step_budget": "log",
            "max_num_seqs": "argv",
            "chunked_prefill": "log",
            "compile_sizes": "log",
            "cudagraph_sizes": "log",
            "max_model_len": "log",
        },
    )


def test_argv_then_default() -> None:
    config = resolve({}, vllm("--max-num-batched-tokens", "512"), defaults(None))
    assert (config.step_budget, config.max_num_seqs) == (512, 128)
    assert dict(config.sources) == {
        "step_budget": "argv",
        "max_num_seqs": "default",
        "chunked_prefill": "default",
        "compile_sizes": "default",
        "cudagraph_sizes": "default",
    }
    assert config.max_model_len is None


def test_a_gpu_log_resolves_to_its_own_sizes() -> None:
    config = resolve(from_log(GPU_LINE), {}, defaults(H100))
    assert config.cudagraph_sizes == (1, 2, 4, 8, 16, 24)
    assert config.compile_sizes == (1, 2, 4)
    assert (config.step_budget, config.max_num_seqs) == (8192, 1024)


@pytest.mark.parametrize(
    ("flags", "budget", "seqs"),
    [
        ([], 2048, 128),
        (["--no-enable-chunked-prefill", "--max-model-len", "1536"], 2048, 128),
        (["--no-enable-chunked-prefill", "--max-model-len", "4096"], 4096, 128),
        (["--max-model-len", "8"], 1024, 128),  # min(128 x 8, 2048)
        (["--performance-mode", "throughput"], 4096, 256),
        (["--max-num-seqs", "64", "--max-model-len", "16"], 1024, 64),
        (["--max-num-batched-tokens", "100"], 100, 100),  # max_num_seqs <= the budget
        (["-tp", "2"], 4096, 256),  # the CPU's defaults scale with the world size
    ],
)
def test_cpu_rules_match_vllm(flags: list[str], budget: int, seqs: int) -> None:
    config = resolve({}, vllm(*flags), defaults(None))
    assert (config.step_budget, config.max_num_seqs) == (budget, seqs)


def test_the_cpu_never_captures_graphs() -> None:
    config = resolve({}, vllm("-cc", CC), defaults(None))
    assert config.cudagraph_sizes == ()
    assert config.sources["cudagraph_sizes"] == "default"
    assert config.compile_sizes == (8, 16)


def test_gpu_graph_sizes_follow_the_batch() -> None:
    config = resolve({}, vllm("--max-num-seqs", "16"), defaults(H100))
    assert config.cudagraph_sizes == (1, 2, 4, 8, 16, 24, 32)  # up to min(16 x 2, 512)
    assert config.sources["cudagraph_sizes"] == "default"
    small = resolve({}, vllm("--max-num-batched-tokens", "20"), defaults(H100))
    assert small.cudagraph_sizes == (1, 2, 4, 8, 16, 20)  # the budget itself is captured
    assert small.max_num_seqs == 20


def test_gpu_graph_ceiling_and_modes() -> None:
    capped = resolve({}, vllm("-cc", '{"max_cudagraph_capture_size": 64}'), defaults(H100))
    assert capped.cudagraph_sizes == (1, 2, 4, *range(8, 65, 8))
    quick = resolve({}, vllm("--performance-mode", "interactivity"), defaults(H100))
    assert quick.cudagraph_sizes[:33] == (*range(1, 33), 40)
    assert quick.cudagraph_sizes[-1] == 512
    eager = resolve({}, vllm("--enforce-eager"), defaults(H100))
    assert eager.cudagraph_sizes == ()
    assert eager.sources["cudagraph_sizes"] == "argv"


def test_the_users_graph_sizes_stop_at_the_budget() -> None:
    argv = vllm("--max-num-batched-tokens", "16", "-cc", '{"cudagraph_capture_sizes": [1, 8, 32]}')
    assert resolve({}, argv, defaults(H100)).cudagraph_sizes == (1, 8)


def test_compile_sizes_may_name_the_graph_sizes() -> None:
    argv = vllm("--max-num-seqs", "4", "-cc", '{"compile_sizes": [64, "cudagraph_capture_sizes"]}')
    config = resolve({}, argv, defaults(H100))
    assert config.cudagraph_sizes == (1, 2, 4, 8)
    assert config.compile_sizes == (1, 2, 4, 8, 64)


def test_resolve_needs_a_step_budget_somewhere() -> None:
    with pytest.raises(ValueError, match="step_budget, max_num_seqs, chunked_prefill"):
        resolve({}, {}, {})


def test_as_dict_is_json_and_the_config_is_frozen() -> None:
    config = resolve(from_log(GPU_LINE), vllm("--max-num-seqs", "8"), defaults(H100))
    shown = json.loads(json.dumps(config.as_dict()))
    assert set(shown) == {*FIELDS, "sources"}
    assert shown["cudagraph_sizes"] == [1, 2, 4, 8, 16, 24]
    assert shown["sources"]["max_num_seqs"] == "argv"
    with pytest.raises(AttributeError):
        config.step_budget = 1  # type: ignore[misc]
    assert hash(config) == hash(config)
    # It crosses the pipe to the warm-up worker inside the pickled settings.
    assert pickle.loads(pickle.dumps(config)) == config
