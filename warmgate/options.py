"""Every option of `warmgate run`, `warmup`, `probe` and `bench`, each written once.

A row holds an option's flag, kind, default, help, WARMGATE_* variable, check and the
settings field it fills. Everything else reads this table: the fast argv reader
(runargs), the typer commands and their --help (cli), the settings dataclasses and their
validation (config), the plan's defaults (plan), and a test holds README's option table to
it. To add an option, add a row here and a field to its settings class.

Standard library only: `warmgate run` reads this before it spawns the child, long before
typer loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal, get_args

Kind = Literal["str", "int", "float", "path", "flag", "switch", "list", "choice"]
Command = Literal["run", "warmup", "probe", "bench"]
Check = Callable[[str, Any], str | None]  # (flag, settings value) -> the error, or None

# The sampling features a plan can warm; warmgate.plan maps each to its request fields.
FEATURES = ("greedy", "sampling", "penalties", "seed", "n", "logprobs", "prompt_logprobs", "json")
ALL_FEATURES = ",".join(FEATURES)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
COVERAGES = ("engine", "pairwise")  # warmgate.plan builds each
BENCH_MIXES = ("heldout", "json_logprobs_stream")  # warmgate/bench/<mix>.jsonl
OnWarmupFailure = Literal["fail", "ready"]
ON_WARMUP_FAILURE: tuple[OnWarmupFailure, ...] = get_args(OnWarmupFailure)
# vLLM's gauges of requests it holds; SGLang users pass theirs with --inflight-metric.
DEFAULT_INFLIGHT_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")
_BUCKETS = "1,4,16,64"

RUN: tuple[Command, ...] = ("run",)
WARMUP: tuple[Command, ...] = ("warmup",)
RUN_AND_WARMUP: tuple[Command, ...] = ("run", "warmup")
PROBE: tuple[Command, ...] = ("probe",)
BENCH: tuple[Command, ...] = ("bench",)


class OptionError(ValueError):
    """A value that cannot become a setting; the message names the option."""


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Option:
    """One option: how it is written, read, shown, checked, and which setting it fills.

    `kind`: str, int, float, path, flag (with --no-X), switch (no --no-X), list (repeatable)
    or choice. `default` is the value as given on the command line; `parse` turns a given
    value into the settings value (and `setting_default` is the default parsed so).
    """

    name: str  # the parameter name; the flag is --name-with-dashes
    kind: Kind
    default: Any
    help: str
    commands: tuple[Command, ...] = RUN
    choices: tuple[str, ...] = ()
    check: Check | None = None
    parse: Callable[[Any], Any] = _same
    field: str = ""  # the settings field when it is not `name`
    env: str | None = "WARMGATE_{NAME}"
    required: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str | None:
        return self.env.format(NAME=self.name.upper()) if self.env else None

    @property
    def settings_field(self) -> str:
        return self.field or self.name

    @property
    def setting_default(self) -> Any:
        return self.parse(self.default)

    def problem(self, value: Any) -> str | None:
        """What is wrong with this settings value, in one line naming the flag; None if nothing."""
        if value is None:  # unset: the option's own default rule applies
            return None
        if self.choices and value not in self.choices:
            return f"{self.flag} {value!r}: use {_either(self.choices)}"
        return self.check(self.flag, value) if self.check else None


# --- checks and parsers (the error lines users see) ---------------------------------------


def _at_least(low: int) -> Check:
    return lambda flag, value: None if value >= low else f"{flag} {value} must be >= {low}"


def _positive(flag: str, value: float) -> str | None:
    return None if value > 0 else f"{flag} {value} must be > 0"


def _fraction(flag: str, value: float) -> str | None:
    return None if 0 < value < 1 else f"{flag} {value} must be between 0 and 1 (0.1 = 10 %)"


def _tcp_port(flag: str, value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"{flag} {value} is not a TCP port"


def _url(flag: str, value: str) -> str | None:
    if value.startswith(("http://", "https://")):
        return None
    return f"{flag} {value!r} must be a URL such as http://127.0.0.1:8000"


def _url_path(flag: str, value: str) -> str | None:
    return None if value.startswith("/") else f"{flag} {value!r} must start with /"


def _buckets_ok(flag: str, value: tuple[int, ...]) -> str | None:
    if not value:
        return f"{flag} needs at least one bucket, e.g. {_BUCKETS}"
    return None if all(c >= 1 for c in value) else f"{flag} {value}: buckets must be >= 1"


def _features_ok(flag: str, value: tuple[str, ...]) -> str | None:
    if unknown := sorted(set(value) - set(FEATURES)):
        return f"{flag}: unknown {', '.join(unknown)}; choose from {ALL_FEATURES}"
    return None if value else f"{flag} needs at least one of {ALL_FEATURES}"


def parse_list(text: str) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_buckets(text: str) -> tuple[int, ...]:
    """'1,4,16,64' -> (1, 4, 16, 64)."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise OptionError(f"{text!r}: use comma-separated integers such as {_BUCKETS}") from None


def parse_budget(text: str | float) -> float | None:
    """'auto' -> None (decided once the upstream is healthy); '45' -> 45.0."""
    if isinstance(text, float | int) or text.strip() != "auto":
        try:
            return float(text)
        except ValueError:
            raise OptionError(f"{text!r}: use auto or a number of seconds such as 30") from None
    return None


def _names(values: Iterable[str] | None) -> tuple[str, ...]:
    return tuple(values or ())


def _gauges(values: Iterable[str] | None) -> tuple[str, ...]:
    return tuple(values or DEFAULT_INFLIGHT_METRICS)


def _either(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


# --- the table ------------------------------------------------------------------------------
# In the order of `warmgate run --help`; `warmup`, `probe` and `bench` list theirs in this
# order too. A command's option differing only in help or requiredness is a `replace` row.


def _bench(name: str, kind: Kind, default: Any, help: str) -> Option:
    return Option(name, kind, default, help, BENCH, env="WARMGATE_BENCH_{NAME}")


_UPSTREAM = Option(
    "upstream", "str", None, "Upstream URL; default: the child's own --host/--port.", check=_url
)
_PORT = Option(
    "port",
    "int",
    8080,
    "Probe server port: /ready /live /startup /status /metrics.",
    check=_tcp_port,
)

OPTIONS: tuple[Option, ...] = (
    Option(
        "stop_timeout",
        "float",
        10.0,
        "Seconds from SIGTERM to SIGKILL of the child's group.",
        check=_at_least(0),
    ),
    Option("signal_group", "flag", False, "Forward signals to the child's whole process group."),
    Option("log_level", "choice", "info", "", RUN_AND_WARMUP, choices=LOG_LEVELS, parse=str),
    Option(
        "log_format",
        "choice",
        "auto",
        "auto: JSON lines unless stderr is a terminal.",
        RUN_AND_WARMUP,
        choices=LOG_FORMATS,
        parse=str,
    ),
    _UPSTREAM,
    replace(_UPSTREAM, help="URL of the running server.", commands=WARMUP, required=True),
    Option("no_warmup", "switch", False, "Plain-init mode even for a known server."),
    Option(
        "leader",
        "str",
        None,
        "Worker mode (multi-node): URL of the group leader's warmgate probe server; no "
        "warm-up, probes watch the leader's /status, SIGTERM waits for its drain.",
        check=_url,
    ),
    Option("host", "str", "0.0.0.0", "Probe server address (the kubelet probes the pod IP)."),
    _PORT,
    Option(
        "health_path", "str", "/health", "Upstream health path.", RUN_AND_WARMUP, check=_url_path
    ),
    Option(
        "health_interval", "float", 0.25, "Seconds between upstream health polls.", check=_positive
    ),
    Option(
        "adapter_interval",
        "float",
        5.0,
        "Seconds between /v1/models polls after Ready for new LoRA adapters to warm (0: off).",
        check=_at_least(0),
    ),
    Option(
        "startup_timeout",
        "float",
        1200.0,
        "Seconds the upstream may take to turn healthy (exit 69).",
        check=_positive,
    ),
    Option(
        "model",
        "list",
        None,
        "Warm only this served model (repeatable); default: all.",
        RUN_AND_WARMUP,
        parse=_names,
        field="models",
    ),
    Option(
        "api_key",
        "str",
        None,
        "Bearer key for the upstream; else VLLM_API_KEY, else the child's --api-key. Never logged.",
        RUN_AND_WARMUP,
    ),
    Option(
        "plan", "path", None, "TOML plan that extends or replaces the default plan.", RUN_AND_WARMUP
    ),
    Option(
        "converge",
        "float",
        0.10,
        "A cold shape is warm when a run is at most this fraction faster than the last.",
        RUN_AND_WARMUP,
        check=_fraction,
    ),
    Option(
        "max_repeats",
        "int",
        5,
        "Most runs per shape (running out warns).",
        RUN_AND_WARMUP,
        check=_at_least(2),
    ),
    Option(
        "max_tokens",
        "int",
        16,
        "max_tokens of warm-up requests.",
        RUN_AND_WARMUP,
        check=_at_least(1),
    ),
    Option(
        "concurrency",
        "str",
        _BUCKETS,
        "Concurrency buckets: requests in flight at once.",
        RUN_AND_WARMUP,
        check=_buckets_ok,
        parse=parse_buckets,
    ),
    Option(
        "features",
        "str",
        ALL_FEATURES,
        "Sampling features to warm (comma list); drop what clients never send.",
        RUN_AND_WARMUP,
        check=_features_ok,
        parse=parse_list,
    ),
    Option(
        "max_inflight_tokens",
        "int",
        None,
        "Cap on prompt tokens x concurrency of one shape; default: the engine's step "
        "budget (pairwise: 8 budgets).",
        RUN_AND_WARMUP,
        check=_at_least(1),
    ),
    Option(
        "coverage",
        "choice",
        "engine",
        "engine: each specialisation of the engine once; pairwise: the thorough sweep.",
        RUN_AND_WARMUP,
        choices=COVERAGES,
        parse=str,
    ),
    Option(
        "warmup_budget",
        "str",
        "auto",
        "Seconds of warm-up, most valuable shapes first; then Ready with a warning. "
        "auto: max(30, 0.25 x the seconds to healthy).",
        RUN_AND_WARMUP,
        check=_positive,
        parse=parse_budget,
    ),
    Option(
        "warmup_timeout",
        "float",
        900.0,
        "Seconds the whole warm-up may take (exit 70); the budget never exceeds it.",
        RUN_AND_WARMUP,
        check=_positive,
    ),
    Option(
        "request_timeout",
        "float",
        120.0,
        "Seconds one warm-up request may take.",
        RUN_AND_WARMUP,
        check=_positive,
    ),
    Option(
        "on_warmup_failure",
        "choice",
        "fail",
        "fail: exit 70 (pod restarts); ready: serve anyway.",
        choices=ON_WARMUP_FAILURE,
        parse=str,
    ),
    Option(
        "unhealthy_threshold",
        "int",
        3,
        "Failed health polls after Ready before /ready is 503.",
        check=_at_least(1),
    ),
    Option(
        "live_grace",
        "float",
        300.0,
        "Seconds unhealthy after Ready before /live is 503.",
        check=_at_least(0),
    ),
    Option(
        "drain_min",
        "float",
        5.0,
        "Least seconds between SIGTERM and stopping (endpoint propagation).",
        check=_at_least(0),
    ),
    Option(
        "drain_timeout",
        "float",
        None,
        "Most seconds to drain; default: grace - stop - 2.",
        check=_at_least(0),
    ),
    Option(
        "grace_period", "float", 30.0, "The pod's terminationGracePeriodSeconds.", check=_positive
    ),
    Option(
        "cache_dir", "path", None, "Volume for the engine's compile caches (kept across restarts)."
    ),
    Option(
        "cache_key", "str", None, "Extra cache key, e.g. the image tag (with command line and GPU)."
    ),
    Option(
        "profile_interval",
        "float",
        180.0,
        "Seconds between writes of the traffic profile learned after Ready, under --cache-dir "
        "(also at drain; 0: learn none).",
        check=_at_least(0),
    ),
    Option(
        "inflight_metric",
        "list",
        None,
        "Upstream gauge of requests in flight (repeatable); default: vLLM's.",
        parse=_gauges,
        field="inflight_metrics",
    ),
    # warmgate probe
    replace(_PORT, help="warmgate's probe port.", commands=PROBE),
    Option("host", "str", "127.0.0.1", "Address to probe.", PROBE, env="WARMGATE_PROBE_HOST"),
    Option("timeout", "float", 2.0, "Seconds to wait for the answer.", PROBE, env=None),
    # warmgate bench
    _bench(
        "command",
        "str",
        None,
        "Server command line to benchmark (host/port appended); default: warmgate sim.",
    ),
    _bench(
        "sim_args",
        "str",
        "--max-model-len 2048 --time-scale 0.05 --load-seconds 2",
        "Arguments for the simulator.",
    ),
    _bench(
        "strategies",
        "str",
        "none,health,warmup.sh,warmgate",
        "Comma list of none, health, warmup.sh, warmgate, warmgate-pairwise, plan (plan "
        "needs --plan), profile (warmgate on a profile learned from the mix by a first start).",
    ),
    Option(
        "mix",
        "choice",
        "heldout",
        "The held-out requests: heldout (a broad mix) or json_logprobs_stream (narrow).",
        BENCH,
        env="WARMGATE_BENCH_MIX",
        choices=BENCH_MIXES,
        parse=str,
    ),
    _bench(
        "profile_requests",
        "int",
        200,
        "Requests of the mix the profile strategy's first start serves before it drains.",
    ),
    _bench("plan", "path", None, "The user plan of the plan strategy."),
    _bench(
        "warm_runs",
        "str",
        "5",
        "Warm runs per held-out request (their median): N, or N,STRATEGY=M,... "
        "(e.g. 3,warmgate=5).",
    ),
    _bench("warmgate_args", "str", "", "Extra `warmgate run` options for its strategies."),
    _bench(
        "starts",
        "str",
        "1",
        "Fresh starts per strategy: N, or N,STRATEGY=M,... (e.g. 1,warmgate=3); each "
        "request's ratio is the median over them.",
    ),
    _bench(
        "budgets",
        "str",
        "",
        "Also start the warmgate strategy once per --warmup-budget (comma list of seconds "
        "and auto, e.g. 2,5,10,auto): budget.md and budget.png, warmth against warm-up time.",
    ),
    _bench(
        "pin_output",
        "flag",
        True,
        "Send min_tokens = max_tokens, so first and warm runs generate as many tokens.",
    ),
    _bench(
        "out",
        "path",
        None,
        "Directory for report.md, report.json, timeline.png and the servers' logs.",
    ),
)


def for_command(command: Command) -> tuple[Option, ...]:
    """The options of `warmgate COMMAND`, in --help order."""
    return tuple(row for row in OPTIONS if command in row.commands)


def option(command: Command, name: str) -> Option:
    """The option `name` of `warmgate COMMAND`."""
    (row,) = [row for row in for_command(command) if row.name == name]
    return row


def _fills() -> dict[str, Option]:
    """The rows that fill RunSettings and WarmupSettings, one per settings field, in table
    order (`run`'s row where `warmup` has a variant of it)."""
    fills: dict[str, Option] = {}
    for row in OPTIONS:
        if set(row.commands) & set(RUN_AND_WARMUP):
            fills.setdefault(row.settings_field, row)
    return fills


_FILLS: Mapping[str, Option] = MappingProxyType(_fills())
# Settings field -> its default, as config's settings classes and the plan take it.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {name: _FILLS[name].setting_default for name in sorted(_FILLS)}
)
ENVVARS = tuple(row.envvar for row in for_command("run") if row.envvar)


def settings_values(params: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Settings values for `fields` from command parameters (typer's ctx.params or runargs)."""
    values = {}
    for name in fields:
        row = _FILLS.get(name)
        if row is None:
            continue
        try:
            values[name] = row.parse(params[row.name])
        except OptionError as exc:
            raise OptionError(f"{row.flag} {exc}") from None
    return values


def first_problem(values: Mapping[str, Any]) -> str | None:
    """The first error among these settings values (by field, in table order), or None."""
    for name, row in _FILLS.items():
        if name in values and (message := row.problem(values[name])) is not None:
            return message
    return None
