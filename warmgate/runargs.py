"""`warmgate run`'s options read with the standard library, so the child starts before typer loads.

typer (with pydantic, which it builds a validator from for every option) takes longer to
import and parse than the whole 300 ms budget from `warmgate run` to the child's exec
allows on a loaded node. `parse` reads the forms people write: `--opt value`, `--opt=value`,
flags, WARMGATE_* variables, `--` or the first non-option ending the options, and values
it can convert exactly as typer does. For anything else (--help, an unknown or repeated
option, an odd value) it returns None and `warmgate run` goes through typer, which then
answers with its own help or error: the two paths never disagree, they only differ in speed.
tests/test_runargs.py compares the two parsers.

The options themselves, and the settings they become, are warmgate/options.py's table.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from warmgate.config import run_settings
from warmgate.errors import Exit, WarmgateError
from warmgate.options import ENVVARS as ENVVARS
from warmgate.options import Option, for_command

OPTIONS = for_command("run")
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
        elif option.envvar and (text := environ.get(option.envvar, "")):
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


def run_without_typer(args: Sequence[str], environ: Mapping[str, str]) -> int | None:
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
        return supervisor.supervise(settings, ENVVARS)
    except WarmgateError as exc:
        return fail(str(exc), exc.code)
    except KeyboardInterrupt:  # what click does before warmgate blocks SIGINT
        print(file=sys.stderr)
        return 130


def fail(message: str, code: int) -> int:
    """One `event=exit` line for an error of ours; returns `code`."""
    from warmgate.supervisor import log_exit

    return log_exit(None, "usage" if code == Exit.USAGE else "error", code, error=message)
