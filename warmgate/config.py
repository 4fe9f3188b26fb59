"""The settings of `warmgate run` and `warmgate warmup`, collected once and validated up front."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmgate import options
from warmgate.errors import WarmgateError
from warmgate.options import DEFAULT_INFLIGHT_METRICS as DEFAULT_INFLIGHT_METRICS
from warmgate.options import OnWarmupFailure

if TYPE_CHECKING:  # the plan module loads after the child is spawned
    from warmgate.engineconfig import EngineConfig
    from warmgate.plan import PlanFileSpec, ShapeSpec

# Every default is the option table's (warmgate/options.py); so is every check.
_DEFAULT = options.DEFAULTS
AUTO_BUDGET_FLOOR_S = 30.0
AUTO_BUDGET_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class WarmupSettings:
    """How to warm an upstream up: shared by `warmgate run` and `warmgate warmup`."""

    upstream: str | None = _DEFAULT["upstream"]
    models: tuple[str, ...] = _DEFAULT["models"]
    api_key: str | None = _DEFAULT["api_key"]
    health_path: str = _DEFAULT["health_path"]
    plan: PlanFileSpec | None = _DEFAULT["plan"]  # the parsed --plan file (read_plan)
    converge: float = _DEFAULT["converge"]
    max_repeats: int = _DEFAULT["max_repeats"]
    max_tokens: int = _DEFAULT["max_tokens"]
    concurrency: tuple[int, ...] = _DEFAULT["concurrency"]
    features: tuple[str, ...] = _DEFAULT["features"]
    max_inflight_tokens: int | None = _DEFAULT["max_inflight_tokens"]
    coverage: str = _DEFAULT["coverage"]
    warmup_budget: float | None = _DEFAULT["warmup_budget"]  # None: auto (budget_seconds)
    warmup_timeout: float = _DEFAULT["warmup_timeout"]
    request_timeout: float = _DEFAULT["request_timeout"]
    # Not options: what `warmgate run` learns once the upstream is healthy.
    engine: EngineConfig | None = None  # what the engine specialises on (warmgate.engineconfig)
    # time.monotonic() when the budget started (the gate saw health; CLOCK_MONOTONIC is one
    # clock for every process of the host); None: when the warm-up itself starts.
    budget_from: float | None = None
    # Not options either: which plan after Ready (warmgate.plan.rewarm_plan, adapter_plan).
    rewarm: bool = False  # the short re-warm after the engine woke from sleep
    adapter: str | None = None  # a LoRA adapter loaded at run time, warmed alone
    # The traffic profile's shapes (warmgate.profile.plan_specs), planned first; not an option.
    profile: tuple[ShapeSpec, ...] = ()
    profile_requests: int = 0  # the client requests the profile counted

    def budget_seconds(self, healthy_after: float | None) -> float:
        """The warm-up budget: --warmup-budget, or auto = max(30 s, a quarter of the time
        the upstream took to turn healthy): a warm-up that costs a small share of the
        start it follows. Never more than --warmup-timeout, which means failure."""
        if self.warmup_budget is not None:
            budget = self.warmup_budget
        else:
            budget = max(AUTO_BUDGET_FLOOR_S, AUTO_BUDGET_SHARE * (healthy_after or 0.0))
        return min(budget, self.warmup_timeout)

    def __post_init__(self) -> None:
        _check(self)


@dataclass(frozen=True, slots=True)
class RunSettings:
    command: tuple[str, ...]
    stop_timeout: float = _DEFAULT["stop_timeout"]
    signal_group: bool = _DEFAULT["signal_group"]
    log_level: str = _DEFAULT["log_level"]
    log_format: str = _DEFAULT["log_format"]
    # warm-up mode
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    no_warmup: bool = _DEFAULT["no_warmup"]
    leader: str | None = _DEFAULT["leader"]  # worker mode: the leader's probe server URL
    host: str = _DEFAULT["host"]
    port: int = _DEFAULT["port"]
    health_interval: float = _DEFAULT["health_interval"]
    adapter_interval: float = _DEFAULT["adapter_interval"]
    startup_timeout: float = _DEFAULT["startup_timeout"]
    on_warmup_failure: OnWarmupFailure = _DEFAULT["on_warmup_failure"]
    unhealthy_threshold: int = _DEFAULT["unhealthy_threshold"]
    live_grace: float = _DEFAULT["live_grace"]
    # drain
    drain_min: float = _DEFAULT["drain_min"]
    drain_timeout: float | None = _DEFAULT["drain_timeout"]
    grace_period: float = _DEFAULT["grace_period"]
    inflight_metrics: tuple[str, ...] = _DEFAULT["inflight_metrics"]
    # compile caches that survive restarts
    cache_dir: Path | None = _DEFAULT["cache_dir"]
    cache_key: str | None = _DEFAULT["cache_key"]
    profile_interval: float = _DEFAULT["profile_interval"]  # the traffic profile (0: off)

    def __post_init__(self) -> None:
        if not self.command:
            raise WarmgateError("no command given (usage: warmgate run [OPTIONS] -- CMD [ARGS...])")
        _check(self)

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


def warmup_settings(params: Mapping[str, Any]) -> WarmupSettings:
    """The warm-up settings from the options `run` and `warmup` share (typer's ctx.params or
    runargs.parse), with the --plan file read and checked."""
    values = _values(WarmupSettings, params)
    if values["plan"] is not None:
        values["plan"] = read_plan(values["plan"])
    return WarmupSettings(**values)


def run_settings(params: Mapping[str, Any]) -> RunSettings:
    """`warmgate run`'s settings from its parameters (typer's ctx.params or runargs.parse)."""
    return RunSettings(
        command=tuple(params["command"] or ()),
        warmup=warmup_settings(params),
        **_values(RunSettings, params),
    )


def _values(
    settings: type[RunSettings | WarmupSettings], params: Mapping[str, Any]
) -> dict[str, Any]:
    try:
        return options.settings_values(params, (f.name for f in fields(settings)))
    except options.OptionError as exc:
        raise WarmgateError(str(exc)) from None


def _check(settings: RunSettings | WarmupSettings) -> None:
    problem = options.first_problem({f.name: getattr(settings, f.name) for f in fields(settings)})
    if problem is not None:
        raise WarmgateError(problem)
