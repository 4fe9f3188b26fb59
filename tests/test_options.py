"""The option table: every default, list, help text and check is written there once.

The typer commands, the settings classes and README's option table are held to it, and an
AST scan of the package fails when a default or a list is written a second time.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import typer

from warmgate import cli, options, plan
from warmgate.config import RunSettings, WarmupSettings, run_settings
from warmgate.errors import WarmgateError
from warmgate.options import FEATURES, OPTIONS, Option

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "warmgate"
COMMANDS: tuple[options.Command, ...] = ("run", "warmup", "probe", "bench")
KINDS: dict[str, Any] = {"str": str, "int": int, "float": float, "path": Path, "list": list[str]}


# --- the table and what is built from it --------------------------------------------------


def test_each_command_names_each_option_once() -> None:
    for command in COMMANDS:
        names = [row.name for row in options.for_command(command)]
        assert len(names) == len(set(names)), command


def test_rows_filling_one_setting_agree() -> None:
    """A `warmup` variant of a `run` option may differ in help and requiredness, nothing else."""
    same = ("kind", "default", "choices", "check", "parse", "env")
    rows: dict[str, Option] = {}
    for row in OPTIONS:
        if {"run", "warmup"} & set(row.commands):
            first = rows.setdefault(row.settings_field, row)
            assert [getattr(row, a) for a in same] == [getattr(first, a) for a in same], row.name


@pytest.mark.parametrize("command", COMMANDS)
def test_typer_commands_are_the_table(command: options.Command) -> None:
    click_command = typer.main.get_command(cli.app).commands[command]  # type: ignore[attr-defined]
    ctx = click_command.context_class(click_command)
    params = [p for p in click_command.params if p.param_type_name == "option"]
    rows = options.for_command(command)
    assert [p.name for p in params] == [row.name for row in rows]
    for param, row in zip(params, rows, strict=True):
        assert param.opts == [row.flag], row.name
        assert param.envvar == row.envvar, row.name
        assert param.help == (row.help or None), row.name
        assert param.required == row.required, row.name
        assert param.multiple == (row.kind == "list"), row.name
        annotation = param.type_descriptor.annotation
        default = param.get_default(ctx)
        if row.kind == "choice":
            assert [m.value for m in annotation] == list(row.choices), row.name
            assert default.value == row.default, row.name
            continue
        if not row.required:
            assert default == row.default, row.name
        if row.kind in ("flag", "switch"):
            assert annotation is bool, row.name
            negated = ["--no-" + row.flag[2:]] if row.kind == "flag" else []
            assert param.secondary_opts == negated, row.name
        else:
            assert annotation == KINDS[row.kind], row.name


def test_settings_classes_hold_every_setting_with_the_tables_default() -> None:
    filled = {row.settings_field for row in OPTIONS if {"run", "warmup"} & set(row.commands)}
    held: set[str] = set()
    for settings in (RunSettings, WarmupSettings):
        for f in fields(settings):
            not_options = ("command", "warmup", "engine", "budget_from", "rewarm", "adapter")
            if f.name in (*not_options, "profile", "profile_requests"):
                continue
            held.add(f.name)
            assert f.default is not MISSING and f.default == options.DEFAULTS[f.name], f.name
    assert held == filled == set(options.DEFAULTS)


def test_feature_bodies_are_the_features() -> None:
    assert tuple(plan._FEATURE_FIELDS) == FEATURES


# --- one error line per option --------------------------------------------------------------

BAD: list[tuple[str, Any, str]] = [
    ("stop_timeout", -1.0, "--stop-timeout -1.0 must be >= 0"),
    ("port", 70000, "--port 70000 is not a TCP port"),
    ("health_interval", 0.0, "--health-interval 0.0 must be > 0"),
    ("startup_timeout", 0.0, "--startup-timeout 0.0 must be > 0"),
    ("health_path", "h", "--health-path 'h' must start with /"),
    ("upstream", "ftp://x", "--upstream 'ftp://x' must be a URL such as http://127.0.0.1:8000"),
    ("converge", 2.0, "--converge 2.0 must be between 0 and 1 (0.1 = 10 %)"),
    ("max_repeats", 1, "--max-repeats 1 must be >= 2"),
    ("max_tokens", 0, "--max-tokens 0 must be >= 1"),
    ("concurrency", "x", "--concurrency 'x': use comma-separated integers such as 1,4,16,64"),
    ("concurrency", ",", "--concurrency needs at least one bucket, e.g. 1,4,16,64"),
    ("concurrency", "1,0", "--concurrency (1, 0): buckets must be >= 1"),
    ("features", "beam,greedy", f"--features: unknown beam; choose from {','.join(FEATURES)}"),
    ("features", ",", f"--features needs at least one of {','.join(FEATURES)}"),
    ("max_inflight_tokens", 0, "--max-inflight-tokens 0 must be >= 1"),
    ("warmup_timeout", 0.0, "--warmup-timeout 0.0 must be > 0"),
    ("request_timeout", 0.0, "--request-timeout 0.0 must be > 0"),
    ("on_warmup_failure", "maybe", "--on-warmup-failure 'maybe': use fail or ready"),
    ("log_level", "loud", "--log-level 'loud': use debug, info, warning or error"),
    ("unhealthy_threshold", 0, "--unhealthy-threshold 0 must be >= 1"),
    ("live_grace", -1.0, "--live-grace -1.0 must be >= 0"),
    ("drain_min", -1.0, "--drain-min -1.0 must be >= 0"),
    ("drain_timeout", -1.0, "--drain-timeout -1.0 must be >= 0"),
    ("grace_period", 0.0, "--grace-period 0.0 must be > 0"),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_a_bad_value_gets_its_options_error_line(name: str, value: Any, error: str) -> None:
    params = {row.name: row.default for row in options.for_command("run")}
    params |= {"command": ["cmd"], name: value}
    with pytest.raises(WarmgateError) as caught:
        run_settings(params)
    assert str(caught.value) == error


def test_defaults_are_valid_and_no_command_is_refused() -> None:
    params = {row.name: row.default for row in options.for_command("run")}
    assert run_settings({**params, "command": ["cmd"]}) == RunSettings(command=("cmd",))
    with pytest.raises(WarmgateError, match="no command given"):
        run_settings({**params, "command": None})


# --- README's option table ------------------------------------------------------------------


def _readme_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## `warmgate run`\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `--"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def _readme_default_ok(row: Option, text: str) -> bool:
    if row.default is None:  # README says where the value comes from instead
        return not re.fullmatch(r"[0-9.]+|off|on", text)
    if isinstance(row.default, bool):
        return text == ("on" if row.default else "off")
    if isinstance(row.default, int | float):
        return re.fullmatch(r"[0-9.]+", text) is not None and float(text) == row.default
    if row.default == options.ALL_FEATURES:
        return text.startswith("all ")
    return bool(text == row.default)


def test_readme_option_table_is_the_tables() -> None:
    by_flag = {row.flag: row for row in options.for_command("run")}
    seen = []
    for option_cell, default_cell, meaning in _readme_rows():
        flags = re.findall(r"`(--[a-z-]+)", option_cell)
        defaults = default_cell.split(", ") if len(flags) > 1 and default_cell else [default_cell]
        defaults += [""] * (len(flags) - len(defaults))
        for flag, default in zip(flags, defaults, strict=True):
            row = by_flag[flag]
            assert _readme_default_ok(row, default), (flag, default, row.default)
            if row.choices and "\\|" in option_cell:
                assert tuple(option_cell.strip("`").split()[1].split("\\|")) == row.choices
            if row.name == "features":
                assert tuple(meaning.split(": ", 1)[1].split(", ")) == FEATURES
            seen.append(flag)
    assert sorted(seen) == sorted(by_flag)


# --- nothing is written twice -----------------------------------------------------------------


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(ROOT)), ast.parse(path.read_text())


def _bound_constants(tree: ast.Module) -> Iterator[tuple[str, ast.Constant]]:
    """(name, constant) for every parameter default, and every module or class attribute,
    that is a constant: the places a default is defined (not a function's local values)."""
    definitions: list[ast.stmt] = list(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            definitions += node.body
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = [
                *zip(
                    positional[len(positional) - len(args.defaults) :], args.defaults, strict=True
                ),
                *zip(args.kwonlyargs, args.kw_defaults, strict=True),
            ]
            yield from ((a.arg, d) for a, d in pairs if isinstance(d, ast.Constant))
    for node in definitions:
        if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Constant):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            yield from ((t.id, node.value) for t in targets if isinstance(t, ast.Name))


def _same(constant: object, default: object) -> bool:
    return bool(constant == default) and isinstance(constant, bool) == isinstance(default, bool)


def test_no_module_restates_an_options_default() -> None:
    """`converge: float = 0.10`, `unhealthy_threshold=3` outside the table, and any copy of a
    distinctive default (a number >= 1000, a comma list) anywhere, are second definitions.
    The simulator is a program of its own: its --host and --port are not warmgate run's."""
    by_name: dict[str, list[object]] = {}
    for row in OPTIONS:
        if row.envvar and row.default is not None:  # probe's --timeout is too common a name
            values = [row.default, row.setting_default]
            if isinstance(row.default, str) and row.default.isdigit():  # bench's "5" is 5
                values.append(int(row.default))
            for name in (row.name, row.settings_field):
                by_name.setdefault(name, []).extend(values)
    distinctive = [
        value
        for row in OPTIONS
        for value in (row.default, row.setting_default)
        if (isinstance(value, int) and not isinstance(value, bool) and value >= 1000)
        or (isinstance(value, str) and "," in value)
    ]
    found = []
    for where, tree in _modules():
        if where == "warmgate/options.py":
            continue
        if not where.startswith("warmgate/sim/"):
            for name, constant in _bound_constants(tree):
                if any(_same(constant.value, d) for d in by_name.get(name.lower(), ())):
                    found.append(f"{where}:{constant.lineno} {name} = {constant.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and any(_same(node.value, d) for d in distinctive):
                found.append(f"{where}:{node.lineno} {node.value!r}")
    assert not found, "defaults written outside warmgate/options.py:\n" + "\n".join(found)


def _string_lists(tree: ast.Module) -> Iterator[tuple[int, frozenset[str]]]:
    """Tuple, list and set literals (Literal[...] too) and enum-like classes of 2+ strings."""
    for node in ast.walk(tree):
        items: list[ast.expr] = []
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = node.elts
        elif isinstance(node, ast.ClassDef):
            body = [s for s in node.body if not (isinstance(s, ast.Expr))]
            if body and all(isinstance(s, ast.Assign) for s in body):
                items = [s.value for s in body if isinstance(s, ast.Assign)]
        strings = [i.value for i in items if isinstance(i, ast.Constant)]
        if (
            len(items) >= 2
            and len(strings) == len(items)
            and all(isinstance(s, str) for s in strings)
        ):
            yield node.lineno, frozenset(strings)


def test_no_list_is_written_twice() -> None:
    """A list of the table's (choices, FEATURES, ...) written outside it, or one list of 3+
    names written in two modules (a tuple and an enum of the same names count as the same)."""
    table_lists = {
        frozenset(value)
        for row in OPTIONS
        for value in (row.choices, row.setting_default)
        if isinstance(value, tuple) and len(value) >= 2
    }
    where_seen: dict[frozenset[str], set[str]] = {}
    found = []
    for where, tree in _modules():
        for line, names in _string_lists(tree):
            if where != "warmgate/options.py" and names in table_lists:
                found.append(f"{where}:{line} {sorted(names)} is the option table's")
            elif len(names) >= 3:
                where_seen.setdefault(names, set()).add(f"{where}:{line}")
    found += [
        f"{sorted(names)} in {sorted(places)}"
        for names, places in where_seen.items()
        if len({p.split(":")[0] for p in places}) > 1
    ]
    assert not found, "one list, defined in two places:\n" + "\n".join(found)


def test_help_texts_are_the_tables_alone() -> None:
    helps = {row.help for row in OPTIONS if row.help}
    found = [
        f"{where}:{node.lineno}"
        for where, tree in _modules()
        if where != "warmgate/options.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in helps
    ]
    assert not found, f"help texts written outside warmgate/options.py: {found}"
