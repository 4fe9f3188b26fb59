"""The command line: argument parsing only; every command hands off to its module.

Each option is also read from WARMGATE_<OPTION>; `warmgate run` removes those
variables from its child's environment.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from warmgate import __version__
from warmgate.errors import Exit, WarmgateError
from warmgate.runargs import ALL_FEATURES, fail, run_settings, warmup_settings

app = typer.Typer(
    add_completion=False,
    help="In-container warm-up supervisor for vLLM and OpenAI-compatible servers.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: wraps long env var names instead of cutting them
)

_RUN_HELP = """Run CMD as a supervised child: forward signals, reap zombies, exit with its status.

Warm-up mode is on when --upstream is given or CMD is a server warmgate knows (vllm serve,
python -m vllm.entrypoints.openai.api_server, warmgate sim): /ready then answers 200 only once
the upstream is healthy and warmed up. The first argument that is not an option ends
warmgate's options; `--` is accepted.
"""


def _env(name: str) -> str:
    return f"WARMGATE_{name}"


def _version(value: bool) -> None:
    if value:
        print(f"warmgate {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """warmgate: Ready means the first request is as fast as the thousandth."""
    if ctx.invoked_subcommand is None:
        print(ctx.get_help(), file=sys.stderr)
        raise typer.Exit(Exit.USAGE)


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


class OnFailure(StrEnum):
    fail = "fail"
    ready = "ready"


# Options shared by `run` and `warmup`, declared once. `warmgate run` reads its options without
# typer when it can (warmgate/runargs.py, which tests hold to these declarations).
Upstream = Annotated[
    str | None,
    typer.Option(
        envvar=_env("UPSTREAM"), help="Upstream URL; default: the child's own --host/--port."
    ),
]
Model = Annotated[
    list[str] | None,
    typer.Option(
        envvar=_env("MODEL"), help="Warm only this served model (repeatable); default: all."
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar=_env("API_KEY"),
        show_default=False,
        help="Bearer key for the upstream; else VLLM_API_KEY, else the child's --api-key. Never logged.",
    ),
]
HealthPath = Annotated[str, typer.Option(envvar=_env("HEALTH_PATH"), help="Upstream health path.")]
PlanFile = Annotated[
    Path | None,
    typer.Option(
        "--plan", envvar=_env("PLAN"), help="TOML plan that extends or replaces the default plan."
    ),
]
Converge = Annotated[
    float,
    typer.Option(
        envvar=_env("CONVERGE"),
        help="A shape is warm when a run is within this fraction of the last.",
    ),
]
MaxRepeats = Annotated[
    int, typer.Option(envvar=_env("MAX_REPEATS"), help="Most runs per shape (running out warns).")
]
MaxTokens = Annotated[
    int, typer.Option(envvar=_env("MAX_TOKENS"), help="max_tokens of warm-up requests.")
]
Concurrency = Annotated[
    str,
    typer.Option(
        envvar=_env("CONCURRENCY"), help="Concurrency buckets: requests in flight at once."
    ),
]
Features = Annotated[
    str,
    typer.Option(
        envvar=_env("FEATURES"),
        help="Sampling features to warm (comma list); drop what clients never send.",
    ),
]
MaxInflightTokens = Annotated[
    int,
    typer.Option(
        envvar=_env("MAX_INFLIGHT_TOKENS"), help="Cap on prompt tokens x concurrency of one shape."
    ),
]
WarmupTimeout = Annotated[
    float, typer.Option(envvar=_env("WARMUP_TIMEOUT"), help="Seconds the whole warm-up may take.")
]
RequestTimeout = Annotated[
    float,
    typer.Option(envvar=_env("REQUEST_TIMEOUT"), help="Seconds one warm-up request may take."),
]
LogLevelOpt = Annotated[LogLevel, typer.Option(envvar=_env("LOG_LEVEL"))]
LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(envvar=_env("LOG_FORMAT"), help="auto: JSON lines unless stderr is a terminal."),
]


@app.command(context_settings={"allow_interspersed_args": False}, help=_RUN_HELP)
def run(
    ctx: typer.Context,
    command: Annotated[
        list[str] | None, typer.Argument(metavar="CMD [ARGS]...", show_default=False)
    ] = None,
    stop_timeout: Annotated[
        float,
        typer.Option(
            envvar=_env("STOP_TIMEOUT"),
            help="Seconds from SIGTERM to SIGKILL of the child's group.",
        ),
    ] = 10.0,
    signal_group: Annotated[
        bool,
        typer.Option(
            envvar=_env("SIGNAL_GROUP"), help="Forward signals to the child's whole process group."
        ),
    ] = False,
    log_level: LogLevelOpt = LogLevel.info,
    log_format: LogFormatOpt = LogFormat.auto,
    upstream: Upstream = None,
    no_warmup: Annotated[
        bool,
        typer.Option(
            "--no-warmup", envvar=_env("NO_WARMUP"), help="Plain-init mode even for a known server."
        ),
    ] = False,
    host: Annotated[
        str,
        typer.Option(
            envvar=_env("HOST"), help="Probe server address (the kubelet probes the pod IP)."
        ),
    ] = "0.0.0.0",
    port: Annotated[
        int,
        typer.Option(
            envvar=_env("PORT"), help="Probe server port: /ready /live /startup /status /metrics."
        ),
    ] = 8080,
    health_path: HealthPath = "/health",
    health_interval: Annotated[
        float,
        typer.Option(envvar=_env("HEALTH_INTERVAL"), help="Seconds between upstream health polls."),
    ] = 0.25,
    startup_timeout: Annotated[
        float,
        typer.Option(
            envvar=_env("STARTUP_TIMEOUT"),
            help="Seconds the upstream may take to turn healthy (exit 69).",
        ),
    ] = 1200.0,
    model: Model = None,
    api_key: ApiKey = None,
    plan: PlanFile = None,
    converge: Converge = 0.10,
    max_repeats: MaxRepeats = 5,
    max_tokens: MaxTokens = 16,
    concurrency: Concurrency = "1,4,16,64",
    features: Features = ALL_FEATURES,
    max_inflight_tokens: MaxInflightTokens = 131_072,
    warmup_timeout: WarmupTimeout = 900.0,
    request_timeout: RequestTimeout = 120.0,
    on_warmup_failure: Annotated[
        OnFailure,
        typer.Option(
            envvar=_env("ON_WARMUP_FAILURE"),
            help="fail: exit 70 (pod restarts); ready: serve anyway.",
        ),
    ] = OnFailure.fail,
    unhealthy_threshold: Annotated[
        int,
        typer.Option(
            envvar=_env("UNHEALTHY_THRESHOLD"),
            help="Failed health polls after Ready before /ready is 503.",
        ),
    ] = 3,
    live_grace: Annotated[
        float,
        typer.Option(
            envvar=_env("LIVE_GRACE"), help="Seconds unhealthy after Ready before /live is 503."
        ),
    ] = 300.0,
    drain_min: Annotated[
        float,
        typer.Option(
            envvar=_env("DRAIN_MIN"),
            help="Least seconds between SIGTERM and stopping (endpoint propagation).",
        ),
    ] = 5.0,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            envvar=_env("DRAIN_TIMEOUT"), help="Most seconds to drain; default: grace - stop - 2."
        ),
    ] = None,
    grace_period: Annotated[
        float,
        typer.Option(envvar=_env("GRACE_PERIOD"), help="The pod's terminationGracePeriodSeconds."),
    ] = 30.0,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("CACHE_DIR"),
            help="Volume for the engine's compile caches (kept across restarts).",
        ),
    ] = None,
    cache_key: Annotated[
        str | None,
        typer.Option(
            envvar=_env("CACHE_KEY"),
            help="Extra cache key, e.g. the image tag (with command line and GPU).",
        ),
    ] = None,
    inflight_metric: Annotated[
        list[str] | None,
        typer.Option(
            envvar=_env("INFLIGHT_METRIC"),
            help="Upstream gauge of requests in flight (repeatable); default: vLLM's.",
        ),
    ] = None,
) -> int:
    settings = run_settings(ctx.params)
    own_vars = [p.envvar for p in ctx.command.params if isinstance(p.envvar, str)]
    from warmgate.supervisor import run as supervise

    return supervise(settings, own_vars)


@app.command()
def warmup(
    ctx: typer.Context,
    upstream: Annotated[
        str, typer.Option(envvar=_env("UPSTREAM"), help="URL of the running server.")
    ],
    model: Model = None,
    api_key: ApiKey = None,
    health_path: HealthPath = "/health",
    plan: PlanFile = None,
    converge: Converge = 0.10,
    max_repeats: MaxRepeats = 5,
    max_tokens: MaxTokens = 16,
    concurrency: Concurrency = "1,4,16,64",
    features: Features = ALL_FEATURES,
    max_inflight_tokens: MaxInflightTokens = 131_072,
    warmup_timeout: WarmupTimeout = 900.0,
    request_timeout: RequestTimeout = 120.0,
    log_level: LogLevelOpt = LogLevel.info,
    log_format: LogFormatOpt = LogFormat.auto,
) -> int:
    """Warm up an already running server once (init containers, manual use): exit 0 when warm, 1 when not."""
    from warmgate.oneshot import warm_once

    settings = warmup_settings(ctx.params)
    return warm_once(settings, log_level.value, log_format.value)


class ProbeName(StrEnum):
    ready = "ready"
    live = "live"
    startup = "startup"


@app.command()
def probe(
    which: Annotated[ProbeName, typer.Argument(help="ready, live or startup")],
    port: Annotated[int, typer.Option(envvar=_env("PORT"), help="warmgate's probe port.")] = 8080,
    host: Annotated[
        str, typer.Option(envvar=_env("PROBE_HOST"), help="Address to probe.")
    ] = "127.0.0.1",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 2.0,
) -> int:
    """Exec-probe client for images without curl: exit 0 on 200, 1 otherwise."""
    from warmgate.probe import check

    return check(host, port, f"/{which.value}", timeout)


def _bench_opt(name: str, help_text: str) -> Any:
    return typer.Option(envvar=_env(f"BENCH_{name}"), help=help_text)


@app.command()
def bench(
    command: Annotated[
        str | None,
        _bench_opt(
            "COMMAND",
            "Server command line to benchmark (host/port appended); default: warmgate sim.",
        ),
    ] = None,
    sim_args: Annotated[str, _bench_opt("SIM_ARGS", "Arguments for the simulator.")] = (
        "--max-model-len 2048 --time-scale 0.05 --load-seconds 2"
    ),
    strategies: Annotated[
        str,
        _bench_opt(
            "STRATEGIES",
            "Comma list of none, health, warmup.sh, warmgate, plan (plan needs --plan).",
        ),
    ] = "none,health,warmup.sh,warmgate",
    plan: Annotated[Path | None, _bench_opt("PLAN", "The user plan of the plan strategy.")] = None,
    warm_runs: Annotated[
        str,
        _bench_opt(
            "WARM_RUNS",
            "Warm runs per held-out request (their median): N, or N,STRATEGY=M,... "
            "(e.g. 3,warmgate=5).",
        ),
    ] = "5",
    warmgate_args: Annotated[
        str, _bench_opt("WARMGATE_ARGS", "Extra `warmgate run` options for its strategies.")
    ] = "",
    starts: Annotated[
        str,
        _bench_opt(
            "STARTS",
            "Fresh starts per strategy: N, or N,STRATEGY=M,... (e.g. 1,warmgate=3); each "
            "request's ratio is the median over them.",
        ),
    ] = "1",
    pin_output: Annotated[
        bool,
        _bench_opt(
            "PIN_OUTPUT",
            "Send min_tokens = max_tokens, so first and warm runs generate as many tokens.",
        ),
    ] = True,
    out: Annotated[
        Path | None,
        _bench_opt(
            "OUT", "Directory for report.md, report.json, timeline.png and the servers' logs."
        ),
    ] = None,
) -> int:
    """Compare readiness strategies side by side: time to Ready and first/warm ratios of the held-out mix."""
    from warmgate.bench.main import bench_main

    return bench_main(
        command, sim_args, strategies, plan, warm_runs, warmgate_args, out, pin_output, starts
    )


def _register_sim() -> None:
    from warmgate.sim.cli import sim_command

    app.command("sim", help=sim_command.__doc__)(sim_command)


_register_sim()


def main(argv: list[str]) -> int:
    """Run the CLI; usage errors become one line on stderr and exit code 2."""
    try:
        result = app(args=argv, prog_name="warmgate", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        return 130
    except typer.TyperException as exc:  # click's UsageError and friends, vendored by typer
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return fail(f"{exc.format_message()}{hint}", int(getattr(exc, "exit_code", Exit.USAGE)))
    except WarmgateError as exc:
        return fail(str(exc), exc.code)
    return result if isinstance(result, int) else 0
