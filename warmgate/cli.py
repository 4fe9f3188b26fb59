"""The command line: argument parsing only; every command hands off to its module."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from warmgate import __version__
from warmgate.errors import Exit, WarmgateError

app = typer.Typer(
    add_completion=False,
    help="In-container warm-up supervisor for vLLM and OpenAI-compatible servers.",
    pretty_exceptions_enable=False,
)

_RUN_HELP = """Run CMD as a supervised child: forward signals, reap zombies, exit with its status.

The first argument that is not an option ends warmgate's options; `--` is accepted.
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


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    auto = "auto"
    json = "json"
    console = "console"


def _env(name: str) -> str:
    return f"WARMGATE_{name}"


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
            help="Seconds between SIGTERM and SIGKILL of the child's group.",
        ),
    ] = 10.0,
    signal_group: Annotated[
        bool,
        typer.Option(
            envvar=_env("SIGNAL_GROUP"), help="Forward signals to the child's whole process group."
        ),
    ] = False,
    log_level: Annotated[LogLevel, typer.Option(envvar=_env("LOG_LEVEL"))] = LogLevel.info,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            envvar=_env("LOG_FORMAT"), help="auto: JSON lines unless stderr is a terminal."
        ),
    ] = LogFormat.auto,
) -> int:
    from warmgate.config import RunSettings

    settings = RunSettings(
        command=tuple(command or ()),
        stop_timeout=stop_timeout,
        signal_group=signal_group,
        log_level=log_level.value,
        log_format=log_format.value,
    )
    own_vars = [p.envvar for p in ctx.command.params if isinstance(p.envvar, str)]
    from warmgate.supervisor import run as supervise

    return supervise(settings, own_vars)


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
        return _fail(f"{exc.format_message()}{hint}", int(getattr(exc, "exit_code", Exit.USAGE)))
    except WarmgateError as exc:
        return _fail(str(exc), exc.code)
    return result if isinstance(result, int) else 0


def _fail(message: str, code: int) -> int:
    from warmgate.supervisor import log_exit

    return log_exit(None, "usage" if code == Exit.USAGE else "error", code, error=message)
