"""`warmgate run`'s options read with the standard library, so the child starts before typer loads.

typer (with pydantic, which it builds a validator from for every option) takes longer to
import and parse than the whole 300 ms budget from `warmgate run` to the child's exec
allows on a loaded node. `parse` reads the forms people write: `--opt value`, `--opt=value`,
flags, WARMGATE_* variables, `--` or the first non-option ending the options, and values
it can convert exactly as typer does. For anything else (--help, an unknown or repeated
option, an odd value) it returns None and `warmgate run` goes through typer, which then
answers with its own help or error: the two paths never disagree, they only differ in speed.
tests/test_runargs.py holds `OPTIONS` to the typer command and compares the two parsers.

The settings built from parsed options (`run_settings`, `warmup_settings`) are shared by
both paths.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmgate.config import FEATURES
from warmgate.errors import Exit, WarmgateError

if TYPE_CHECKING:
    from warmgate.config import RunSettings, WarmupSettings

ALL_FEATURES = ",".join(FEATURES)


@dataclass(frozen=True, slots=True)
class Option:
    """One option of `warmgate run`: its parameter name, how its value reads, its default."""

    name: str
    kind: str  # str, int, float, path, flag (with --no-X), switch (no --no-X), list, or choice
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "WARMGATE_" + self.name.upper()


# In the order of cli.run's parameters (the order of its --help).
OPTIONS = (
    Option("stop_timeout", "float", 10.0),
    Option("signal_group", "flag", False),
    Option("log_level", "choice", "info", ("debug", "info", "warning", "error")),
    Option("log_format", "choice", "auto", ("auto", "json", "console")),
    Option("upstream", "str"),
    Option("no_warmup", "switch", False),
    Option("host", "str", "0.0.0.0"),
    Option("port", "int", 8080),
    Option("health_path", "str", "/health"),
    Option("health_interval", "float", 0.25),
    Option("startup_timeout", "float", 1200.0),
    Option("model", "list"),
    Option("api_key", "str"),
    Option("plan", "path"),
    Option("converge", "float", 0.10),
    Option("max_repeats", "int", 5),
    Option("max_tokens", "int", 16),
    Option("concurrency", "str", "1,4,16,64"),
    Option("features", "str", ALL_FEATURES),
    Option("max_inflight_tokens", "int", 131_072),
    Option("warmup_timeout", "float", 900.0),
    Option("request_timeout", "float", 120.0),
    Option("on_warmup_failure", "choice", "fail", ("fail", "ready")),
    Option("unhealthy_threshold", "int", 3),
    Option("live_grace", "float", 300.0),
    Option("drain_min", "float", 5.0),
    Option("drain_timeout", "float"),
    Option("grace_period", "float", 30.0),
    Option("cache_dir", "path"),
    Option("cache_key", "str"),
    Option("inflight_metric", "list"),
)
ENVVARS = tuple(option.envvar for option in OPTIONS)

_BY_FLAG = {option.flag: option for option in OPTIONS}
_NEGATED = {"--no-" + o.flag[2:]: o for o in OPTIONS if o.kind == "flag"}
# Numbers both parsers read alike; anything else (signs, exponents, spaces) goes to typer.
_INT = re.compile(r"(?:0|[1-9][0-9]{0,15})")
_FLOAT = re.compile(r"(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,15})?")
_BOOL = {"1": True, "true": True, "0": False, "false": False}


class _Unsure(Exception):
    """A form this reader does not vouch for: typer must parse the command line."""


def parse(args: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any] | None:
    """`run`'s parameters as typer's ctx.params would hold them (choices as str), or None."""
    try:
        return _parse(list(args), environ)
    except _Unsure:
        return None


def _parse(args: list[str], environ: Mapping[str, str]) -> dict[str, Any]:
    given: dict[str, Any] = {}
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            args.insert(0, arg)  # the first non-option ends warmgate's options
            break
        flag, has_value, attached = arg.partition("=")
        option = _BY_FLAG.get(flag) or _NEGATED.get(flag)
        if option is None:
            raise _Unsure  # --help, a typo, a short option
        value: Any
        if option.kind in ("flag", "switch"):
            if has_value:
                raise _Unsure
            value = flag not in _NEGATED
        elif has_value:
            value = _convert(option, attached)
        elif args and not args[0].startswith("-"):
            value = _convert(option, args.pop(0))
        else:
            raise _Unsure
        if option.kind == "list":
            given.setdefault(option.name, []).append(value)
        elif option.name in given:
            raise _Unsure  # typer keeps the last one; say it its way
        else:
            given[option.name] = value
    params: dict[str, Any] = {"command": args or None}
    for option in OPTIONS:
        if option.name in given:
            params[option.name] = given[option.name]
        elif text := environ.get(option.envvar, ""):
            params[option.name] = _from_env(option, text)
        else:
            params[option.name] = option.default
    return params


def _convert(option: Option, text: str) -> Any:
    if not text:
        raise _Unsure
    if option.kind in ("str", "list"):
        return text
    if option.kind == "int" and _INT.fullmatch(text):
        return int(text)
    if option.kind == "float" and _FLOAT.fullmatch(text):
        return float(text)
    if option.kind == "choice" and text in option.choices:
        return text
    if option.kind == "path" and (not os.path.exists(text) or os.access(text, os.R_OK)):
        return Path(text)  # typer refuses only an existing path it cannot read
    raise _Unsure


def _from_env(option: Option, text: str) -> Any:
    if option.kind in ("flag", "switch") and text in _BOOL:
        return _BOOL[text]
    if option.kind not in ("flag", "switch", "list"):  # a list variable splits on whitespace
        return _convert(option, text)
    raise _Unsure


def warmup_settings(params: Mapping[str, Any]) -> WarmupSettings:
    """The warm-up settings from the options `run` and `warmup` share (click's ctx.params)."""
    from warmgate.config import WarmupSettings, parse_buckets, parse_list, read_plan

    plan = params["plan"]
    return WarmupSettings(
        upstream=params["upstream"],
        models=tuple(params["model"] or ()),
        api_key=params["api_key"],
        health_path=params["health_path"],
        plan=read_plan(plan) if plan is not None else None,
        converge=params["converge"],
        max_repeats=params["max_repeats"],
        max_tokens=params["max_tokens"],
        concurrency=parse_buckets(params["concurrency"]),
        features=parse_list(params["features"]),
        max_inflight_tokens=params["max_inflight_tokens"],
        warmup_timeout=params["warmup_timeout"],
        request_timeout=params["request_timeout"],
    )


def run_settings(params: Mapping[str, Any]) -> RunSettings:
    """`warmgate run`'s settings from its parameters (typer's ctx.params or `parse`)."""
    from warmgate.config import DEFAULT_INFLIGHT_METRICS, RunSettings

    return RunSettings(
        command=tuple(params["command"] or ()),
        stop_timeout=params["stop_timeout"],
        signal_group=params["signal_group"],
        log_level=str(params["log_level"]),
        log_format=str(params["log_format"]),
        warmup=warmup_settings(params),
        no_warmup=params["no_warmup"],
        host=params["host"],
        port=params["port"],
        health_interval=params["health_interval"],
        startup_timeout=params["startup_timeout"],
        on_warmup_failure=str(params["on_warmup_failure"]),
        unhealthy_threshold=params["unhealthy_threshold"],
        live_grace=params["live_grace"],
        drain_min=params["drain_min"],
        drain_timeout=params["drain_timeout"],
        grace_period=params["grace_period"],
        inflight_metrics=tuple(params["inflight_metric"] or DEFAULT_INFLIGHT_METRICS),
        cache_dir=params["cache_dir"],
        cache_key=params["cache_key"],
    )


def run(args: Sequence[str], environ: Mapping[str, str]) -> int | None:
    """`warmgate run ARGS` without typer; None when typer must parse them after all."""
    params = parse(args, environ)
    if params is None:
        return None
    try:
        settings = run_settings(params)
    except WarmgateError:
        return None  # typer's path gives the same error, worded and logged the same way
    from warmgate import supervisor

    try:
        return supervisor.run(settings, ENVVARS)
    except WarmgateError as exc:
        return fail(str(exc), exc.code)
    except KeyboardInterrupt:  # what click does before warmgate blocks SIGINT
        print(file=sys.stderr)
        return 130


def fail(message: str, code: int) -> int:
    """One `event=exit` line for an error of ours; returns `code`."""
    from warmgate.supervisor import log_exit

    return log_exit(None, "usage" if code == Exit.USAGE else "error", code, error=message)
