"""The settings of `warmgate run`, collected once from flags and WARMGATE_* variables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from warmgate.errors import WarmgateError


@dataclass(frozen=True, slots=True)
class RunSettings:
    command: tuple[str, ...]
    stop_timeout: float = 10.0
    signal_group: bool = False
    log_level: str = "info"
    log_format: str = "auto"

    def __post_init__(self) -> None:
        if not self.command:
            raise WarmgateError("no command given (usage: warmgate run [OPTIONS] -- CMD [ARGS...])")
        if self.stop_timeout < 0:
            raise WarmgateError(f"--stop-timeout {self.stop_timeout} must be >= 0")


def child_environment(environ: Mapping[str, str], own_vars: Iterable[str]) -> dict[str, str]:
    """The child's environment: ours, less the variables that configured `warmgate run`.

    Other WARMGATE_* variables (the simulator's WARMGATE_SIM_*, say) pass through.
    """
    drop = set(own_vars)
    return {k: v for k, v in environ.items() if k not in drop}


def environ() -> dict[str, str]:
    return dict(os.environ)
