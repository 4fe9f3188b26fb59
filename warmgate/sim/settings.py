"""The simulator's settings: collected once from flags/env, validated, then frozen."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
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
    max_num_seqs: int = 256
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

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, f"--port {self.port} is not a TCP port (0-65535)")
        _check(self.max_model_len >= 2, "--max-model-len must be at least 2")
        _check(self.load_seconds >= 0, "--load-seconds must be >= 0")
        _check(self.compile_seconds >= 0, "--compile-seconds must be >= 0")
        _check(self.time_scale >= 0, "--time-scale must be >= 0 (0: do not sleep at all)")
        _check(self.max_num_seqs >= 1, "--max-num-seqs must be at least 1")
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
