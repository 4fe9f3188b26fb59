"""What the engine specialises on: its step budget, batch width, compile and CUDA-graph sizes.

vLLM compiles kernels for ranges of tokens per step up to `max_num_batched_tokens` (the step
budget), captures CUDA graphs for a list of batch sizes, and runs at most `max_num_seqs`
requests per step. A warm-up plan that knows these reaches every specialisation and no more.

Three sources, best first, and a function for each (pure: the shells read the text):
- `from_log`: the engine's own start-up line (`LOG_MARKER`), which holds the values it settled
  on. warmgate sees the child's output only when it is not on a terminal.
- `from_argv`: the child's command line, read as vLLM 0.32's parser reads it.
- `defaults`: vLLM 0.32's defaults for the OpenAI API server (what `vllm serve` runs), on the
  CPU build or on a GPU of a given memory.

`resolve` takes each field from the best source that has it, then applies vLLM's own rules to
the fields that fell to a default (a defaulted step budget shrinks to max_num_seqs x
max_model_len, the default graph sizes follow the batch width, ...), so a default is what
vLLM would compute from the rest. The partial dicts may carry hints beside the fields (keys
in `HINTS`); `resolve` reads them, `EngineConfig` does not keep them.

Citations (`file:line`) are to vLLM 0.32.0's sources under `site-packages/vllm/`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "FIELDS",
    "HINTS",
    "LOG_MARKER",
    "EngineConfig",
    "defaults",
    "from_argv",
    "from_log",
    "resolve",
]

# v1/engine/core.py:133-137 logs this, then str(VllmConfig) (config/vllm.py:2703-2738).
LOG_MARKER = b"Initializing a V1 LLM engine"

FIELDS: Final = (
    "step_budget",
    "max_num_seqs",
    "chunked_prefill",
    "compile_sizes",
    "cudagraph_sizes",
    "max_model_len",
)
_REQUIRED: Final = ("step_budget", "max_num_seqs", "chunked_prefill")

# Keys that are not fields. From the argv: world_size (tp x pp), performance_mode,
# max_cudagraph_capture_size, compile_graph_sizes (compile_sizes named
# "cudagraph_capture_sizes"). From the defaults: platform ("cpu" | "gpu") and graph_cap (the
# platform's ceiling on default graph sizes).
HINTS: Final = frozenset(
    {
        "world_size",
        "performance_mode",
        "max_cudagraph_capture_size",
        "compile_graph_sizes",
        "platform",
        "graph_cap",
    }
)


def _no_sources() -> Mapping[str, str]:
    return {}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    step_budget: int  # max_num_batched_tokens
    max_num_seqs: int
    chunked_prefill: bool
    compile_sizes: tuple[int, ...] = ()
    # () when CUDA graphs are off (CPU, --enforce-eager, cudagraph_mode NONE)
    cudagraph_sizes: tuple[int, ...] = ()
    max_model_len: int | None = None
    # field name -> "log" | "argv" | "default"; read-only, and left out of the hash
    sources: Mapping[str, str] = field(default_factory=_no_sources, hash=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able, for a log line and /status."""
        return {
            "step_budget": self.step_budget,
            "max_num_seqs": self.max_num_seqs,
            "chunked_prefill": self.chunked_prefill,
            "compile_sizes": list(self.compile_sizes),
            "cudagraph_sizes": list(self.cudagraph_sizes),
            "max_model_len": self.max_model_len,
            "sources": dict(self.sources),
        }


# --- numbers, read as vLLM reads them, never raising ----------------------------------------

_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only, and short enough that int() cannot refuse
_HUMAN = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,15})?)([kKmMgGtT])")


def _count(value: object) -> int | None:
    """A positive int from an int or a string of digits (JSON, log text); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value.strip())
        return number if number >= 1 else None
    return None


def _human_count(text: str | None) -> int | None:
    """utils/argparse_utils.py:29-73 `human_readable_int`: 1k = 1000, 1K = 1024, 25.6k = 25600
    (no decimals with binary suffixes); positive results only (so `auto` and -1 give None)."""
    if text is None:
        return None
    text = text.strip()
    match = _HUMAN.fullmatch(text)
    if match is None:
        return _count(text)
    number, suffix = match.groups()
    if suffix.islower():
        return _count(int(float(number) * 10 ** (3 * ("kmgt".index(suffix) + 1))))
    if "." in number:
        return None
    return _count(int(number) * 2 ** (10 * ("KMGT".index(suffix) + 1)))


def _counts(items: object) -> tuple[int, ...]:
    """The positive ints of a JSON list, sorted and unique; anything else in it is dropped."""
    if not isinstance(items, list):
        return ()
    return tuple(sorted({n for n in map(_count, items) if n is not None}))


# --- the start-up line ------------------------------------------------------------------------

_MARKER_TEXT = LOG_MARKER.decode()
_COMPILATION = ", compilation_config="
_LIST_OR_NONE = r"(None|\[[^\]]*\])"
_GRAPH_MODE = re.compile(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)")


def _setting(head: str, key: str) -> str | None:
    """`key=value` from VllmConfig.__str__'s top level; a key inside another name is not it."""
    match = re.search(rf"(?<![\w.]){key}=(\w+)", head)
    return match.group(1) if match else None


def _log_list(compilation: str, key: str) -> tuple[int, ...] | None:
    """`'key': [1, 2]` or `'key': None` in the compilation dict's repr; None if absent or odd."""
    match = re.search(rf"'{key}': {_LIST_OR_NONE}", compilation)
    if match is None:
        return None
    if match.group(1) == "None":
        return ()
    items = [item.strip() for item in match.group(1)[1:-1].split(",") if item.strip()]
    numbers = [_count(item) for item in items]
    if None in numbers:
        return None
    return tuple(sorted({n for n in numbers if n is not None}))


def from_log(line: str) -> dict[str, Any]:
    """The fields one start-up line gives; {} for any other line. Never raises.

    The line holds no max_num_seqs. It holds no max_num_batched_tokens either, but
    config/vllm.py:2552-2627 (`_set_compile_ranges`) starts `compile_ranges_endpoints` with
    it (:2557-2560) and adds only endpoints below it (fusion thresholds :2582/:2595/:2609, the
    user's own :2619-2624), sorted (:2625). compile_sizes are not endpoints (single-size
    ranges, config/compilation.py:583-595). So the step budget is the list's largest entry.
    """
    if _MARKER_TEXT not in line:
        return {}
    head, _, compilation = line.partition(_COMPILATION)
    found: dict[str, Any] = {}
    endpoints = _log_list(compilation, "compile_ranges_endpoints")
    if endpoints:
        found["step_budget"] = endpoints[-1]
    chunked = _setting(head, "enable_chunked_prefill")
    if chunked in ("True", "False"):
        found["chunked_prefill"] = chunked == "True"
    length = _count(_setting(head, "max_seq_len"))  # max_model_len, under another name
    if length is not None:
        found["max_model_len"] = length
    compile_sizes = _log_list(compilation, "compile_sizes")
    if compile_sizes is not None:
        found["compile_sizes"] = compile_sizes
    graph_sizes = _log_graph_sizes(head, compilation)
    if graph_sizes is not None:
        found["cudagraph_sizes"] = graph_sizes
    return found


def _log_graph_sizes(head: str, compilation: str) -> tuple[int, ...] | None:
    """Eager mode or cudagraph_mode NONE mean no graphs, whatever the sizes list says."""
    mode = _GRAPH_MODE.search(compilation)
    if _setting(head, "enforce_eager") == "True" or (mode and mode.group(1) == "NONE"):
        return ()
    return _log_list(compilation, "cudagraph_capture_sizes")


# --- the command line -------------------------------------------------------------------------

# Short forms (engine/arg_utils.py:1140, :1177, :1853; -O: utils/argparse_utils.py:358-370).
_SHORT: Final = {
    "-cc": "compilation-config",
    "-tp": "tensor-parallel-size",
    "-pp": "pipeline-parallel-size",
    "-O": "optimization-level",
}
_VALUED: Final = frozenset(
    {
        "max-num-batched-tokens",
        "max-num-seqs",
        "max-model-len",
        "compilation-config",
        "optimization-level",
        "tensor-parallel-size",
        "pipeline-parallel-size",
        "performance-mode",
    }
)
# argparse.BooleanOptionalAction flags (engine/arg_utils.py:380): --x and --no-x.
_SWITCHES: Final = frozenset({"enable-chunked-prefill", "enforce-eager"})
_NEGATIVE = re.compile(r"-[0-9]+")
_PERFORMANCE_MODES: Final = frozenset({"balanced", "interactivity", "throughput"})


def _is_vllm(argv: Sequence[str]) -> bool:
    """The rule: a word before the first `--option` is the `vllm` program (any directory) or
    names a `vllm.` module (`python -m vllm.entrypoints.openai.api_server`). So `vllm serve`,
    `uv run vllm serve` and `python -m vllm...` count; SGLang, the simulator and a shell
    script (`sh -c "vllm serve ..."`, one word we do not split) do not."""
    for word in argv:
        if word.startswith("--"):
            return False
        if word.rsplit("/", 1)[-1] == "vllm" or word.startswith("vllm."):
            return True
    return False


def _option(word: str) -> tuple[str, str | None] | None:
    """(name, value given with `=`) for an option word, as FlexibleArgumentParser normalises
    it (utils/argparse_utils.py:340-370): `--max_num_seqs` is `max-num-seqs`, `-O3` is
    `optimization-level` 3, `--no-enforce-eager` is `enforce-eager` "false"."""
    if word.startswith("-O") and len(word) > 2 and word[2] != ".":
        return "optimization-level", word[3:] if word[2] == "=" else word[2:]
    key, eq, inline = word.partition("=")
    head, dot, rest = key.partition(".")
    if head.startswith("--"):
        head = head[2:].replace("_", "-")
    elif head in _SHORT:
        head = _SHORT[head]
    else:
        return None
    for switch in _SWITCHES:
        if head in (switch, f"no-{switch}") and not dot:
            return switch, "false" if head.startswith("no-") else "true"
    return head + dot + rest, inline if eq else None


def _options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """Every option in order with its value; a value is the next word unless that is an option
    (argparse takes no `-x` word as a value, but a negative number)."""
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        parsed = _option(argv[i])
        i += 1
        if parsed is None:
            continue
        name, value = parsed
        wants_value = name in _VALUED or "." in name
        if wants_value and value is None and i < len(argv):
            following = argv[i]
            if not following.startswith("-") or _NEGATIVE.fullmatch(following):
                value = following
                i += 1
        options.append((name, value))
    return options


def _json_object(text: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _dotted_value(text: str | None, plus: bool) -> Any:
    """utils/argparse_utils.py:435-448: `key+ a,b` is a list of strings; else JSON, else a
    human-readable int, else the text."""
    if text is None:
        return None
    if plus:
        return text.split(",")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        number = _human_count(text)
        return text if number is None else number


def _compilation_config(options: list[tuple[str, str | None]]) -> dict[str, Any]:
    """The compilation config vLLM ends with: the last `--compilation-config JSON` wins; the
    dotted ones (`-cc.key value`) merge into one more, passed last (argparse_utils.py:461-463),
    so any of them replace the JSON whole (checked against vLLM 0.32's parser)."""
    whole: dict[str, Any] = {}
    dotted: dict[str, Any] = {}
    for name, value in options:
        head, _, key = name.partition(".")
        # Old vLLM took `-O JSON` as the compilation config; 0.32 refuses it (exits).
        level_json = head == "optimization-level" and (value or "").lstrip().startswith("{")
        if not key and (head == "compilation-config" or level_json):
            whole = _json_object(value) or {}
        elif head == "compilation-config" and key and "." not in key.rstrip("+"):
            plus = key.endswith("+")
            item = _dotted_value(value, plus)
            key = key.rstrip("+")
            if isinstance(item, list) and isinstance(dotted.get(key), list):
                dotted[key] = dotted[key] + item  # lists merge (argparse_utils.py:396-397)
            else:
                dotted[key] = item
    return dotted or whole


def from_argv(argv: Sequence[str]) -> dict[str, Any]:
    """The fields (and hints) the child's command line sets; {} for a command that is not
    vLLM (see `_is_vllm`). A value vLLM would refuse is skipped, never raised."""
    if not _is_vllm(argv):
        return {}
    options = _options(argv)
    last = {name: value for name, value in options if "." not in name}  # the last one wins
    compilation = _compilation_config(options)
    return {
        **_scheduler_fields(last),
        **_graph_fields(last, compilation),
        **_compile_fields(compilation),
        **_argv_hints(last, compilation),
    }


def _scheduler_fields(last: Mapping[str, str | None]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    # max_num_batched_tokens and max_model_len take 1k/1K (engine/arg_utils.py:391-403).
    values = {
        "step_budget": _human_count(last.get("max-num-batched-tokens")),
        "max_num_seqs": _count(last.get("max-num-seqs")),
        "max_model_len": _human_count(last.get("max-model-len")),  # -1 and auto: not set
    }
    found.update({name: value for name, value in values.items() if value is not None})
    if "enable-chunked-prefill" in last:
        found["chunked_prefill"] = last["enable-chunked-prefill"] == "true"
    return found


def _graph_fields(last: Mapping[str, str | None], compilation: Mapping[str, Any]) -> dict[str, Any]:
    """No graphs under --enforce-eager (config/vllm.py:1927-1933) or cudagraph_mode NONE, which
    -O0 implies unless the compilation config names a mode (config/vllm.py:247-261, :1779-1780;
    a user's value beats a level's default, :1009-1018)."""
    mode = compilation.get("cudagraph_mode")
    if "cudagraph_mode" in compilation:
        graphs_off = _is_none_mode(mode)
    else:
        graphs_off = (last.get("optimization-level") or "").strip() == "0"
    if last.get("enforce-eager") == "true" or graphs_off:
        return {"cudagraph_sizes": ()}
    sizes = _counts(compilation.get("cudagraph_capture_sizes"))
    return {"cudagraph_sizes": sizes} if sizes else {}


def _is_none_mode(mode: object) -> bool:
    """CUDAGraphMode NONE as JSON gives it: a name in any case (config/compilation.py:873-879)
    or the value 0."""
    if isinstance(mode, str):
        return mode.strip().upper() == "NONE"
    return mode == 0 and not isinstance(mode, bool)


def _compile_fields(compilation: Mapping[str, Any]) -> dict[str, Any]:
    items = compilation.get("compile_sizes")
    if not isinstance(items, list):
        return {}
    return {"compile_sizes": _counts(items)}


def _argv_hints(last: Mapping[str, str | None], compilation: Mapping[str, Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    tp = _count(last.get("tensor-parallel-size"))
    pp = _count(last.get("pipeline-parallel-size"))
    if tp is not None or pp is not None:
        hints["world_size"] = (tp or 1) * (pp or 1)
    mode = (last.get("performance-mode") or "").strip()
    if mode in _PERFORMANCE_MODES:
        hints["performance_mode"] = mode
    ceiling = _count(compilation.get("max_cudagraph_capture_size"))
    if ceiling is not None:
        hints["max_cudagraph_capture_size"] = ceiling
    items = compilation.get("compile_sizes")
    if isinstance(items, list) and "cudagraph_capture_sizes" in items:
        hints["compile_graph_sizes"] = True  # config/compilation.py:1138-1145
    return hints


# --- vLLM 0.32's defaults ---------------------------------------------------------------------

_GIB = 1 << 30  # utils/mem_constants.py:18
# is_device_capability_family(100) (config/vllm.py:2357-2359) is data-centre Blackwell:
# B100/B200/B300 and the GB200/GB300 boards. We see only the name.
_BLACKWELL_DC = re.compile(r"\bg?b[123]00\b")


def defaults(gpu_memory_bytes: int | None, gpu_name: str = "") -> dict[str, Any]:
    """vLLM 0.32's defaults for `vllm serve` (UsageContext.OPENAI_API_SERVER,
    entrypoints/cli/serve.py:191): None = the CPU build. `gpu_name` (as NVML gives it) matters
    only for an A100 of 80 GB and for Blackwell's graph ceiling.

    Chunked prefill is on for decoder-only generating models (engine/arg_utils.py:2990-2994,
    config/model.py:2175-2218); compile_sizes are None (config/compilation.py:578);
    max_model_len comes from the model's own config, which this module cannot read.
    """
    if gpu_memory_bytes is None:
        # engine/arg_utils.py:2975-2983 (x world size: `resolve` applies it); no graphs on the
        # CPU (platforms/cpu.py:353). The real CPU log: compile_ranges_endpoints [2048].
        return {
            "step_budget": 2048,
            "max_num_seqs": 128,
            "chunked_prefill": True,
            "compile_sizes": (),
            "cudagraph_sizes": (),
            "platform": "cpu",
        }
    step_budget, max_num_seqs = _gpu_batch_defaults(gpu_memory_bytes, gpu_name.lower())
    graph_cap = 1024 if _BLACKWELL_DC.search(gpu_name.lower()) else 512
    return {
        "step_budget": step_budget,
        "max_num_seqs": max_num_seqs,
        "chunked_prefill": True,
        "compile_sizes": (),
        "cudagraph_sizes": _capture_sizes(max_num_seqs, step_budget, graph_cap),
        "platform": "gpu",
        "graph_cap": graph_cap,
    }


def _gpu_batch_defaults(memory: int, name: str) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) by device memory (engine/arg_utils.py:2923-2952)."""
    if memory >= 160 * _GIB:  # B200/B300 class: :2923-2932
        return 16384, 1024
    if memory >= 70 * _GIB and "a100" not in name:  # H100/H200: :2933-2942 (A100 regressed)
        return 8192, 1024
    return 2048, 256  # every other GPU: :2943-2952


def _capture_sizes(
    max_num_seqs: int,
    step_budget: int,
    graph_cap: int,
    ceiling: int | None = None,
    interactive: bool = False,
) -> tuple[int, ...]:
    """vLLM's default CUDA-graph sizes, one token per request (no speculative decoding):
    config/vllm.py:2346-2499. `ceiling` is the user's max_cudagraph_capture_size."""
    decode: list[int] = []
    if ceiling is None:
        ceiling = min(max_num_seqs * 2, graph_cap)  # :2362-2364
        decode = [max_num_seqs] if max_num_seqs <= ceiling else []  # :2443-2444
    ceiling = min(step_budget, ceiling)  # :2446
    if ceiling < 1:
        return ()
    every_one = range(1, min(ceiling, 32) + 1)  # interactivity mode: :2467-2471
    sizes = list(every_one) if interactive else [n for n in (1, 2, 4) if n <= ceiling]
    sizes += range(8, min(ceiling + 1, 256), 8)  # :2476-2480
    sizes += range(256, ceiling + 1, 16)  # :2481-2485
    if step_budget <= ceiling:  # :2487-2491
        sizes.append(step_budget)
    sizes += [n for n in decode if n <= step_budget]  # :2495-2497
    return tuple(sorted(set(sizes)))


# --- resolving --------------------------------------------------------------------------------


def resolve(
    log: Mapping[str, Any], argv: Mapping[str, Any], default: Mapping[str, Any]
) -> EngineConfig:
    """log > argv > default, per field, recording each field's source; then vLLM's rules for
    the fields that fell to a default. Raises ValueError when no source gives a required
    field (pass `defaults(...)` as `default`)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in FIELDS:
        for source, given in (("log", log), ("argv", argv), ("default", default)):
            if name in given:
                values[name], sources[name] = given[name], source
                break
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        raise ValueError(f"no source gives {', '.join(missing)}: pass defaults(...) as default")
    _batch_rules(values, sources, argv, default)
    _graph_rules(values, sources, argv, default)
    return EngineConfig(
        step_budget=values["step_budget"],
        max_num_seqs=values["max_num_seqs"],
        chunked_prefill=values["chunked_prefill"],
        compile_sizes=tuple(values.get("compile_sizes", ())),
        cudagraph_sizes=tuple(values.get("cudagraph_sizes", ())),
        max_model_len=values.get("max_model_len"),
        sources=sources,  # a plain dict: the settings that carry it cross a pipe as a pickle
    )


def _batch_rules(
    values: dict[str, Any],
    sources: Mapping[str, str],
    argv: Mapping[str, Any],
    default: Mapping[str, Any],
) -> None:
    """engine/arg_utils.py:3097-3188, in its order, on the defaulted step budget and width."""
    budget_defaulted = sources["step_budget"] == "default"
    seqs_defaulted = sources["max_num_seqs"] == "default"
    scale = argv.get("world_size", 1) if default.get("platform") == "cpu" else 1  # :2975-2983
    if argv.get("performance_mode") == "throughput":  # :3130-3135
        scale *= 2
    if budget_defaulted:
        values["step_budget"] *= scale
    if seqs_defaulted:
        values["max_num_seqs"] *= scale
    length = values.get("max_model_len")
    if budget_defaulted and length is not None:
        if not values["chunked_prefill"]:  # a whole prompt must fit one step: :3140-3146
            values["step_budget"] = max(length, values["step_budget"])
        values["step_budget"] = min(values["max_num_seqs"] * length, values["step_budget"])
    if seqs_defaulted:  # :3178-3180
        values["max_num_seqs"] = min(values["max_num_seqs"], values["step_budget"])


def _graph_rules(
    values: dict[str, Any],
    sources: dict[str, str],
    argv: Mapping[str, Any],
    default: Mapping[str, Any],
) -> None:
    """Graph sizes as vLLM derives them from the resolved batch (config/vllm.py:2341-2499)."""
    source = sources.get("cudagraph_sizes")
    if default.get("platform") == "cpu" and source == "argv" and values["cudagraph_sizes"]:
        values["cudagraph_sizes"], sources["cudagraph_sizes"] = (), "default"  # cpu.py:353
    elif source == "default" and "graph_cap" in default:
        values["cudagraph_sizes"] = _capture_sizes(
            values["max_num_seqs"],
            values["step_budget"],
            default["graph_cap"],
            argv.get("max_cudagraph_capture_size"),
            argv.get("performance_mode") == "interactivity",
        )
    elif source == "argv":  # the user's sizes, up to the step budget: :2460-2465
        budget = values["step_budget"]
        values["cudagraph_sizes"] = tuple(n for n in values["cudagraph_sizes"] if n <= budget)
    if sources.get("compile_sizes") == "argv" and argv.get("compile_graph_sizes"):
        # "cudagraph_capture_sizes" in compile_sizes means those sizes too (compilation.py:1144)
        graphs = values.get("cudagraph_sizes", ())
        values["compile_sizes"] = tuple(sorted({*values["compile_sizes"], *graphs}))
