"""The command line: argument parsing only; every command hands off to its module.

Each command's options are warmgate/options.py's rows, turned into the signature typer
reads; each is also read from its WARMGATE_* variable, and `warmgate run` removes those
variables from its child's environment.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from warmgate import __version__, options
from warmgate.config import run_settings, warmup_settings
from warmgate.errors import Exit, WarmgateError
from warmgate.runargs import ENVVARS, fail

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


# --- options: from the table to typer ------------------------------------------------------

_TYPES: dict[options.Kind, Any] = {
    "str": str,
    "int": int,
    "float": float,
    "path": Path,
    "flag": bool,
    "switch": bool,
    "list": list[str],
}


def _parameter(row: options.Option) -> inspect.Parameter:
    """`name: Annotated[type, typer.Option(...)] = default`, as typer reads a parameter."""
    default = row.default
    if row.kind == "choice":  # an enum gives typer's <a|b> metavar and its error for others
        choices = StrEnum(row.name, {c: c for c in row.choices})  # type: ignore[misc]
        hint, default = choices, choices(default)
    else:
        hint = _TYPES[row.kind]
        if default is None and not row.required:
            hint = hint | None
    decls = [row.flag] if row.kind == "switch" else []  # a switch has no --no-X
    info = typer.Option(*decls, envvar=row.envvar, help=row.help or None)
    return inspect.Parameter(
        row.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if row.required else default,
        annotation=Annotated[hint, info],
    )


_Callback = Callable[..., int]


def _with_options(
    command: options.Command, *first: inspect.Parameter
) -> Callable[[_Callback], _Callback]:
    """Give `func(ctx, **params)` the signature typer reads: `first`, then the table's options."""

    def give(func: _Callback) -> _Callback:
        ctx = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        rows = [_parameter(row) for row in options.for_command(command)]
        signature = inspect.Signature([ctx, *first, *rows], return_annotation=int)
        func.__signature__ = signature  # type: ignore[attr-defined]
        func.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return func

    return give


def _argument(
    name: str, annotation: Any, default: Any = inspect.Parameter.empty
) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


# --- commands ---------------------------------------------------------------------------------


@app.command("run", context_settings={"allow_interspersed_args": False}, help=_RUN_HELP)
@_with_options(
    "run",
    _argument(
        "command",
        Annotated[list[str] | None, typer.Argument(metavar="CMD [ARGS]...", show_default=False)],
        None,
    ),
)
def run_command(ctx: typer.Context, **_: Any) -> int:
    settings = run_settings(ctx.params)
    from warmgate.supervisor import supervise

    return supervise(settings, ENVVARS)


@app.command()
@_with_options("warmup")
def warmup(ctx: typer.Context, **_: Any) -> int:
    """Warm up an already running server once (init containers, manual use): exit 0 when warm, 1 when not."""
    from warmgate.oneshot import warm_once

    settings = warmup_settings(ctx.params)
    return warm_once(settings, str(ctx.params["log_level"]), str(ctx.params["log_format"]))


class ProbeName(StrEnum):
    ready = "ready"
    live = "live"
    startup = "startup"


@app.command()
@_with_options(
    "probe", _argument("which", Annotated[ProbeName, typer.Argument(help="ready, live or startup")])
)
def probe(ctx: typer.Context, **_: Any) -> int:
    """Exec-probe client for images without curl: exit 0 on 200, 1 otherwise."""
    from warmgate.probe import check

    params = ctx.params
    return check(params["host"], params["port"], f"/{params['which'].value}", params["timeout"])


@app.command()
@_with_options("bench")
def bench(ctx: typer.Context, **_: Any) -> int:
    """Compare readiness strategies side by side: time to Ready and first/warm ratios of the held-out mix."""
    from warmgate.bench.main import bench_main

    return bench_main(**ctx.params)


profile_app = typer.Typer(
    help="The traffic profile learned after Ready under --cache-dir: show, export, import.",
    no_args_is_help=True,
)
app.add_typer(profile_app, name="profile")
_CacheDir = Annotated[
    Path,
    typer.Option(envvar="WARMGATE_CACHE_DIR", help="The volume `warmgate run --cache-dir` uses."),
]
_Key = Annotated[
    str | None,
    typer.Option(help="The profile key (model and served arguments); default: the only one."),
]


@profile_app.command("show")
def profile_show(
    cache_dir: _CacheDir,
    key: _Key = None,
    as_json: Annotated[bool, typer.Option("--json", help="The merged profile as JSON.")] = False,
) -> int:
    """Print the merged profile of every pod: combinations most frequent first, lengths, concurrency."""
    import json
    import time

    from warmgate.profile import render
    from warmgate.profilestore import load_for_command

    found = load_for_command(cache_dir, key)
    print(json.dumps(found.to_json(), indent=1) if as_json else render(found, time.time()), end="")
    return 0


@profile_app.command("export")
def profile_export(
    cache_dir: _CacheDir,
    key: _Key = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here; default: stdout.")
    ] = None,
) -> int:
    """Write the profile as a --plan TOML file (mode = "extend") to review, commit or replay."""
    from warmgate.profile import to_plan_toml
    from warmgate.profilestore import load_for_command

    text = to_plan_toml(load_for_command(cache_dir, key))
    if output is None:
        print(text, end="")
        return 0
    try:
        output.write_text(text)
    except OSError as exc:
        raise WarmgateError(f"--output {output}: {exc.strerror or exc}") from None
    return 0


@profile_app.command("import")
def profile_import(
    file: Annotated[Path, typer.Argument(help="A profile file: a pod's, or `show --json`.")],
    cache_dir: _CacheDir,
    key: Annotated[
        str | None, typer.Option(help="File it under this key; default: the file's own.")
    ] = None,
) -> int:
    """Merge a profile file into --cache-dir, so that the next start of that deployment warms from it."""
    from warmgate.profilestore import import_profile

    path = import_profile(cache_dir, file, key)
    print(f"imported {file} into {path}")
    return 0


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
