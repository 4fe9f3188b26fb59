"""The settings of `warmgate run` and `warmgate warmup`, collected once and validated up front."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from warmgate.errors import WarmgateError

if TYPE_CHECKING:  # the plan module loads after the child is spawned
    from warmgate.plan import PlanFileSpec

# The sampling features a plan can warm: warmgate.plan.FEATURES (a test holds them equal),
# named here so that validating the settings does not import the plan.
FEATURES = ("greedy", "sampling", "penalties", "seed", "n", "logprobs", "prompt_logprobs", "json")
ON_WARMUP_FAILURE = ("fail", "ready")
# vLLM's gauges of requests it holds; SGLang users pass theirs with --inflight-metric.
DEFAULT_INFLIGHT_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")


@dataclass(frozen=True, slots=True)
class WarmupSettings:
    """How to warm an upstream up: shared by `warmgate run` and `warmgate warmup`."""

    upstream: str | None = None
    models: tuple[str, ...] = ()
    api_key: str | None = None
    health_path: str = "/health"
    plan: PlanFileSpec | None = None  # the parsed --plan file (read_plan)
    converge: float = 0.10
    max_repeats: int = 5
    max_tokens: int = 16
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    features: tuple[str, ...] = FEATURES
    max_inflight_tokens: int = 131_072
    warmup_timeout: float = 900.0
    request_timeout: float = 120.0

    def __post_init__(self) -> None:
        _require(
            0 < self.converge < 1,
            f"--converge {self.converge} must be between 0 and 1 (0.1 = 10 %)",
        )
        _require(self.max_repeats >= 2, f"--max-repeats {self.max_repeats} must be >= 2")
        _require(self.max_tokens >= 1, f"--max-tokens {self.max_tokens} must be >= 1")
        _require(bool(self.concurrency), "--concurrency needs at least one bucket, e.g. 1,4,16,64")
        _require(
            all(c >= 1 for c in self.concurrency),
            f"--concurrency {self.concurrency}: buckets must be >= 1",
        )
        unknown = sorted(set(self.features) - set(FEATURES))
        _require(
            not unknown,
            f"--features: unknown {', '.join(unknown)}; choose from {','.join(FEATURES)}",
        )
        _require(bool(self.features), f"--features needs at least one of {','.join(FEATURES)}")
        _require(
            self.max_inflight_tokens >= 1,
            f"--max-inflight-tokens {self.max_inflight_tokens} must be >= 1",
        )
        _require(self.warmup_timeout > 0, f"--warmup-timeout {self.warmup_timeout} must be > 0")
        _require(self.request_timeout > 0, f"--request-timeout {self.request_timeout} must be > 0")
        _require(
            self.health_path.startswith("/"),
            f"--health-path {self.health_path!r} must start with /",
        )
        if self.upstream is not None:
            _require(
                self.upstream.startswith(("http://", "https://")),
                f"--upstream {self.upstream!r} must be a URL such as http://127.0.0.1:8000",
            )


@dataclass(frozen=True, slots=True)
class RunSettings:
    command: tuple[str, ...]
    stop_timeout: float = 10.0
    signal_group: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    # warm-up mode
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    no_warmup: bool = False
    host: str = "0.0.0.0"
    port: int = 8080
    health_interval: float = 0.25
    startup_timeout: float = 1200.0
    on_warmup_failure: str = "fail"
    unhealthy_threshold: int = 3
    live_grace: float = 300.0
    # drain
    drain_min: float = 5.0
    drain_timeout: float | None = None
    grace_period: float = 30.0
    inflight_metrics: tuple[str, ...] = DEFAULT_INFLIGHT_METRICS
    # compile caches that survive restarts
    cache_dir: Path | None = None
    cache_key: str | None = None

    def __post_init__(self) -> None:
        _require(
            bool(self.command), "no command given (usage: warmgate run [OPTIONS] -- CMD [ARGS...])"
        )
        _require(self.stop_timeout >= 0, f"--stop-timeout {self.stop_timeout} must be >= 0")
        _require(0 <= self.port <= 65535, f"--port {self.port} is not a TCP port")
        _require(self.health_interval > 0, f"--health-interval {self.health_interval} must be > 0")
        _require(self.startup_timeout > 0, f"--startup-timeout {self.startup_timeout} must be > 0")
        _require(
            self.on_warmup_failure in ON_WARMUP_FAILURE,
            f"--on-warmup-failure {self.on_warmup_failure!r}: use fail or ready",
        )
        _require(
            self.unhealthy_threshold >= 1,
            f"--unhealthy-threshold {self.unhealthy_threshold} must be >= 1",
        )
        _require(self.live_grace >= 0, f"--live-grace {self.live_grace} must be >= 0")
        _require(self.drain_min >= 0, f"--drain-min {self.drain_min} must be >= 0")
        _require(self.grace_period > 0, f"--grace-period {self.grace_period} must be > 0")
        if self.drain_timeout is not None:
            _require(self.drain_timeout >= 0, f"--drain-timeout {self.drain_timeout} must be >= 0")

    @property
    def drain_deadline(self) -> float:
        """Seconds a drain may last: --drain-timeout, else what the grace period leaves.

        The kubelet SIGKILLs the pod `--grace-period` seconds after SIGTERM; the child
        needs `--stop-timeout` of that to stop, and 2 s are kept in reserve.
        """
        if self.drain_timeout is not None:
            return self.drain_timeout
        return max(0.0, self.grace_period - self.stop_timeout - 2.0)

    def drain_warnings(self) -> list[str]:
        """Explicit values that cannot fit inside the kubelet's grace period."""
        warnings = []
        budget = self.grace_period - self.stop_timeout - 2.0
        if self.drain_timeout is not None and self.drain_timeout > budget:
            warnings.append(
                f"--drain-timeout {self.drain_timeout:g} + --stop-timeout {self.stop_timeout:g} + 2 s "
                f"exceeds --grace-period {self.grace_period:g}: the kubelet may SIGKILL mid-drain; "
                "raise terminationGracePeriodSeconds and --grace-period together"
            )
        if budget < self.drain_min:
            warnings.append(
                f"--grace-period {self.grace_period:g} leaves {max(budget, 0):g} s for draining, "
                f"less than --drain-min {self.drain_min:g}"
            )
        return warnings


def child_environment(environ: Mapping[str, str], own_vars: Iterable[str]) -> dict[str, str]:
    """The child's environment: ours, less the variables that configured `warmgate run`.

    Other WARMGATE_* variables (the simulator's WARMGATE_SIM_*, say) pass through.
    """
    drop = set(own_vars)
    return {k: v for k, v in environ.items() if k not in drop}


def read_plan(path: Path) -> PlanFileSpec:
    """Read and check a --plan file up front, so a bad one fails before the child starts."""
    from warmgate.plan import PlanError, parse_plan_file

    try:
        text = path.read_text()
        return parse_plan_file(
            text, source=str(path), read=lambda name: (path.parent / name).read_text()
        )
    except OSError as exc:
        raise WarmgateError(f"--plan {path}: cannot read it ({exc.strerror})") from None
    except PlanError as exc:
        raise WarmgateError(f"--plan {path}: {exc}") from None


def parse_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,4,16,64' -> (1, 4, 16, 64), with an error that names the flag."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise WarmgateError(
            f"--concurrency {text!r}: use comma-separated integers such as 1,4,16,64"
        ) from None


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise WarmgateError(message)
