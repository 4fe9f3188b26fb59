"""The simulator's settings: collected once from flags/env, validated, then frozen."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from warmgate.options import FEATURES
from warmgate.sim.costs import PROFILES, CostTable, table_from_mapping


class OnSigterm(StrEnum):
    """What the simulated server does on SIGTERM (`--on-sigterm`)."""

    abort = "abort"
    hang = "hang"
    drain = "drain"


SIGTERM_MODES = tuple(mode.value for mode in OnSigterm)
VERSION = "0.32.0+warmgate.sim"  # what GET /version answers


class SettingsError(ValueError):
    """A setting is wrong; the message names the option and the fix."""


@dataclass(frozen=True, slots=True)
class SchedulerDefaults:
    """vLLM 0.32's step limits for an OpenAI API server when the flags are not given."""

    max_num_seqs: int
    max_num_batched_tokens: int


# vllm/engine/arg_utils.py EngineArgs.get_batch_defaults (0.32.0): the CPU platform's
# OPENAI_API_SERVER values (2048 tokens, 128 sequences per worker), and a >= 70 GiB
# non-A100 GPU's (H100/H200: 8192 tokens, 1024 sequences).
SCHEDULER_DEFAULTS = MappingProxyType(
    {"cpu": SchedulerDefaults(128, 2048), "h100": SchedulerDefaults(1024, 8192)}
)
_CPU = SCHEDULER_DEFAULTS["cpu"]


@dataclass(frozen=True, slots=True)
class SimSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    model: str = "warmgate/sim"
    max_model_len: int = 4096
    load_seconds: float = 2.0
    compile_seconds: float = 0.0  # paid at start unless the compile cache has the artifact
    listen_early: bool = False
    time_scale: float = 1.0
    costs: CostTable = PROFILES["cpu"]
    profile: str = "cpu"  # also the hardware the engine-config line describes
    max_num_seqs: int = _CPU.max_num_seqs
    max_num_batched_tokens: int = _CPU.max_num_batched_tokens  # the step's token budget
    enable_chunked_prefill: bool = True
    on_sigterm: str = "abort"
    crash_after: float | None = None
    crash_code: int = 1
    crash_during_load: bool = False
    crash_on_feature: str | None = None  # a feature name of warmgate's plan (options.FEATURES)
    crash_above_tokens: int | None = None  # ... only with more prompt tokens scheduled than this
    health_flap: tuple[float, float] | None = None  # (healthy seconds, unhealthy seconds)
    hang_health_after: float | None = None
    fail_first: int = 0
    malformed: bool = False
    slow: float = 0.0
    enable_log_requests: bool = False  # vLLM's request logging, line for line
    enable_log_outputs: bool = False
    enable_sleep_mode: bool = False  # sleeping frees memory: waking costs time and reallocation
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE: /sleep, /wake_up and /is_sleeping exist
    enable_lora: bool = False
    max_loras: int = 1  # distinct adapters in one batch
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    runtime_lora_updating: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load routes
    group_size: int = 1  # a multi-node leader: 1 + the workers it waits for (sim/group.py)
    group_port: int = 6379  # where a leader's workers join (the Ray head's port)
    group_leader: str | None = None  # a multi-node worker: the leader's HOST:PORT

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, f"--port {self.port} is not a TCP port (0-65535)")
        _check(self.max_model_len >= 2, "--max-model-len must be at least 2")
        _check(self.load_seconds >= 0, "--load-seconds must be >= 0")
        _check(self.compile_seconds >= 0, "--compile-seconds must be >= 0")
        _check(self.time_scale >= 0, "--time-scale must be >= 0 (0: do not sleep at all)")
        _check(self.max_num_seqs >= 1, "--max-num-seqs must be at least 1")
        _check(
            self.profile in SCHEDULER_DEFAULTS,
            f"--profile {self.profile!r}: use one of {', '.join(SCHEDULER_DEFAULTS)}",
        )
        self._check_budget()
        _check(
            self.on_sigterm in SIGTERM_MODES,
            f"--on-sigterm {self.on_sigterm!r}: use one of {', '.join(SIGTERM_MODES)}",
        )
        _check(self.crash_after is None or self.crash_after >= 0, "--crash-after must be >= 0")
        _check(0 <= self.crash_code < 256, "--crash-code must be 0-255")
        _check(
            self.crash_on_feature is None or self.crash_on_feature in FEATURES,
            f"--crash-on-feature {self.crash_on_feature!r}: use one of {', '.join(FEATURES)}",
        )
        _check(
            self.crash_above_tokens is None or self.crash_on_feature is not None,
            "--crash-above-tokens needs --crash-on-feature (which feature crashes)",
        )
        _check(
            self.crash_above_tokens is None or self.crash_above_tokens >= 0,
            "--crash-above-tokens must be >= 0",
        )
        _check(self.fail_first >= 0, "--fail-first must be >= 0")
        _check(self.slow >= 0, "--slow must be >= 0")
        _check(  # vLLM's own rule
            self.enable_log_requests or not self.enable_log_outputs,
            "--enable-log-outputs requires --enable-log-requests",
        )
        _check(
            self.hang_health_after is None or self.hang_health_after >= 0,
            "--hang-health-after must be >= 0",
        )
        self._check_sleep_and_lora()
        self._check_group()

    def _check_sleep_and_lora(self) -> None:
        _check(  # vLLM's ModelConfig: the CPU platform has no sleep mode
            not self.enable_sleep_mode or self.profile != "cpu",
            "--enable-sleep-mode: Sleep mode is not supported on current platform "
            "(vLLM's CPU build refuses it; use --profile h100)",
        )
        _check(self.max_loras >= 1, "--max-loras must be at least 1")
        names = [name for name, _ in self.lora_modules]
        _check(
            not names or self.enable_lora,
            "--lora-modules needs --enable-lora (vLLM: LoRA is not enabled. "
            "Use --enable-lora to enable LoRA.)",
        )
        _check(
            len(set(names)) == len(names),
            f"--lora-modules: each name once (got {', '.join(names)})",
        )
        _check(
            self.model not in names,
            f"--lora-modules {self.model}: conflicts with the served model's name",
        )

    def _check_group(self) -> None:
        _check(self.group_size >= 1, f"--group-size {self.group_size} must be at least 1")
        _check(0 <= self.group_port < 65536, f"--group-port {self.group_port} is not a TCP port")
        _check(
            self.group_leader is None or self.group_size == 1,
            "--group-leader (a worker) and --group-size (a leader) exclude each other",
        )
        if self.group_leader is not None:
            from warmgate.sim.group import parse_address

            try:
                parse_address(self.group_leader)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None

    def _check_budget(self) -> None:
        """vLLM's SchedulerConfig.verify_max_model_len, as one line naming the flags."""
        budget, seqs, context = self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len
        _check(budget >= 1, f"--max-num-batched-tokens {budget} must be at least 1")
        _check(
            budget >= context or self.enable_chunked_prefill,
            f"--max-num-batched-tokens {budget} is smaller than --max-model-len {context} "
            "with --no-enable-chunked-prefill, which makes vLLM reject longer prompts: "
            "raise --max-num-batched-tokens, lower --max-model-len or enable chunked prefill",
        )
        _check(
            budget >= seqs,
            f"--max-num-batched-tokens {budget} must be at least --max-num-seqs {seqs} "
            "(every running sequence takes one token of a step)",
        )


def scheduler_limits(
    profile: str,
    max_model_len: int,
    max_num_seqs: int | None,
    max_num_batched_tokens: int | None,
    enable_chunked_prefill: bool,
) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) as vLLM fills in the ones not given
    (EngineArgs._set_default_max_num_seqs_and_batched_tokens_args)."""
    if profile not in SCHEDULER_DEFAULTS:
        raise SettingsError(f"--profile {profile!r}: use one of {', '.join(SCHEDULER_DEFAULTS)}")
    defaults = SCHEDULER_DEFAULTS[profile]
    seqs = defaults.max_num_seqs if max_num_seqs is None else max_num_seqs
    if max_num_batched_tokens is not None:
        return seqs, max_num_batched_tokens
    budget = defaults.max_num_batched_tokens
    if not enable_chunked_prefill:
        budget = max(budget, max_model_len)  # a whole prompt must fit in one step
    # vLLM keeps a default budget within what max_num_seqs full contexts could use.
    return seqs, min(budget, seqs * max_model_len)


def vllm_env(environ: Mapping[str, str]) -> tuple[bool, bool]:
    """(VLLM_SERVER_DEV_MODE, VLLM_ALLOW_RUNTIME_LORA_UPDATING), parsed as vllm/envs.py
    does: the first as an integer, the second as 1 or true."""
    dev = environ.get("VLLM_SERVER_DEV_MODE", "0")
    try:
        dev_mode = bool(int(dev))
    except ValueError:
        raise SettingsError(
            f"VLLM_SERVER_DEV_MODE={dev!r} must be an integer (0 or 1), as vLLM reads it"
        ) from None
    runtime = environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower()
    return dev_mode, runtime in ("1", "true")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)


def load_costs(path: Path | None, profile: str) -> CostTable:
    """The named profile, overridden by a TOML or JSON costs file if one is given."""
    if profile not in PROFILES:
        raise SettingsError(f"--profile {profile!r}: use one of {', '.join(PROFILES)}")
    base = PROFILES[profile]
    if path is None:
        return base
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"--costs {path}: cannot read ({exc.strerror})") from None
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"--costs {path}: not valid TOML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"--costs {path}: expected a table of costs")
    try:
        return table_from_mapping(data, base)
    except ValueError as exc:
        raise SettingsError(f"--costs {path}: {exc}") from None


def parse_flap(text: str | None) -> tuple[float, float] | None:
    """`--health-flap "OK_S,BAD_S"`: healthy for OK_S seconds, then failing for BAD_S."""
    if not text:
        return None
    try:
        ok, bad = (float(part) for part in text.split(","))
    except ValueError:
        raise SettingsError(
            f'--health-flap {text!r}: expected "OK_SECONDS,BAD_SECONDS", e.g. "2,1"'
        ) from None
    if ok <= 0 or bad <= 0:
        raise SettingsError("--health-flap: both periods must be > 0")
    return ok, bad
