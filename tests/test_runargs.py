"""`warmgate run`'s stdlib option reader reads as the typer command it stands in for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmgate import cli, options, runargs, supervisor
from warmgate.config import RunSettings, run_settings


def _typer_settings(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> RunSettings:
    captured: list[RunSettings] = []

    def fake_supervise(settings: RunSettings, own_vars: object) -> int:
        captured.append(settings)
        return 0

    monkeypatch.setattr(supervisor, "supervise", fake_supervise)
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith("WARMGATE_")]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        assert cli.main(["run", *args]) == 0
    (settings,) = captured
    return settings


def _every_option(cache: Path) -> list[str]:
    return [
        "--stop-timeout", "2.5", "--signal-group", "--log-level", "debug", "--log-format=json",
        "--upstream", "http://127.0.0.1:9", "--no-warmup", "--host=127.0.0.1", "--port", "9000",
        "--health-path", "/h", "--health-interval", "0.5", "--startup-timeout", "30",
        "--model", "a", "--model=b", "--api-key", "k", "--converge", "0.2",
        "--max-repeats", "3", "--max-tokens", "8", "--concurrency", "1,4",
        "--features", "greedy,json", "--max-inflight-tokens", "1000", "--warmup-timeout", "10",
        "--request-timeout", "5.5", "--on-warmup-failure", "ready",
        "--unhealthy-threshold", "2", "--live-grace", "0", "--drain-min", "0",
        "--drain-timeout", "3", "--grace-period", "60", "--cache-dir", str(cache),
        "--cache-key", "tag", "--inflight-metric", "m1", "--inflight-metric", "m2",
    ]  # fmt: skip


def _every_variable(cache: Path) -> dict[str, str]:
    return {
        "WARMGATE_STOP_TIMEOUT": "2.5", "WARMGATE_SIGNAL_GROUP": "1",
        "WARMGATE_LOG_LEVEL": "warning", "WARMGATE_LOG_FORMAT": "console",
        "WARMGATE_UPSTREAM": "http://127.0.0.1:9", "WARMGATE_NO_WARMUP": "true",
        "WARMGATE_HOST": "::1", "WARMGATE_PORT": "0", "WARMGATE_HEALTH_PATH": "/h",
        "WARMGATE_HEALTH_INTERVAL": "1", "WARMGATE_STARTUP_TIMEOUT": "30",
        "WARMGATE_API_KEY": "k", "WARMGATE_CONVERGE": "0.05", "WARMGATE_MAX_REPEATS": "9",
        "WARMGATE_MAX_TOKENS": "1", "WARMGATE_CONCURRENCY": "1, 2", "WARMGATE_FEATURES": "n",
        "WARMGATE_MAX_INFLIGHT_TOKENS": "7", "WARMGATE_WARMUP_TIMEOUT": "10",
        "WARMGATE_REQUEST_TIMEOUT": "5", "WARMGATE_ON_WARMUP_FAILURE": "ready",
        "WARMGATE_UNHEALTHY_THRESHOLD": "1", "WARMGATE_LIVE_GRACE": "0",
        "WARMGATE_DRAIN_MIN": "0", "WARMGATE_DRAIN_TIMEOUT": "0",
        "WARMGATE_GRACE_PERIOD": "45", "WARMGATE_CACHE_DIR": str(cache),
        "WARMGATE_CACHE_KEY": "tag",
    }  # fmt: skip


CASES: list[tuple[str, list[str], dict[str, str]]] = [
    ("defaults", ["--", "cmd"], {}),
    ("first non-option ends options", ["cmd", "--port", "1"], {}),
    ("options after --", ["--port", "1", "--", "cmd", "--", "--port", "2"], {}),
    ("negated flag", ["--no-signal-group", "cmd"], {}),
    ("known server", ["vllm", "serve", "m", "--port", "8001"], {}),
    ("flag from env: 0", ["cmd"], {"WARMGATE_SIGNAL_GROUP": "0"}),
    ("flag from env: false", ["cmd"], {"WARMGATE_NO_WARMUP": "false"}),
    ("empty env is unset", ["cmd"], {"WARMGATE_PORT": "", "WARMGATE_HOST": ""}),
    ("command line wins", ["--port", "2", "--no-signal-group", "cmd"],
     {"WARMGATE_PORT": "1", "WARMGATE_SIGNAL_GROUP": "1"}),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reads_as_typer_does(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    params = runargs.parse(args, env)
    assert params is not None
    assert run_settings(params) == _typer_settings(args, env, monkeypatch)


def test_every_option_and_every_variable_read_as_typer_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*_every_option(tmp_path), "--", "cmd"]
    params = runargs.parse(args, {})
    assert params is not None
    assert run_settings(params) == _typer_settings(args, {}, monkeypatch)
    env = _every_variable(tmp_path)
    params = runargs.parse(["cmd"], env)
    assert params is not None
    assert run_settings(params) == _typer_settings(["cmd"], env, monkeypatch)


def test_a_plan_file_reads_as_typer_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text('mode = "extend"\n')
    for args, env in (
        (["--plan", str(plan_file), "cmd"], {}),
        (["cmd"], {"WARMGATE_PLAN": str(plan_file)}),
    ):
        params = runargs.parse(args, env)
        assert params is not None
        assert run_settings(params) == _typer_settings(args, env, monkeypatch)


UNSURE: list[tuple[str, list[str], dict[str, str]]] = [
    ("help", ["--help"], {}),
    ("short option", ["-h"], {}),
    ("unknown option", ["--prot", "1", "cmd"], {}),
    ("missing value", ["--port"], {}),
    ("value looks like an option", ["--port", "--host", "x", "cmd"], {}),
    ("negative number", ["--drain-min", "-1", "cmd"], {}),
    ("not a number", ["--port", "x", "cmd"], {}),
    ("leading zero", ["--port=08", "cmd"], {}),
    ("exponent", ["--converge", "1e-1", "cmd"], {}),
    ("empty value", ["--upstream=", "cmd"], {}),
    ("choice in another case", ["--log-level", "DEBUG", "cmd"], {}),
    ("flag with a value", ["--signal-group=1", "cmd"], {}),
    ("repeated option", ["--port", "1", "--port", "2", "cmd"], {}),
    ("Kubernetes service variable", ["cmd"], {"WARMGATE_PORT": "tcp://10.0.0.1:8080"}),
    ("list variable", ["cmd"], {"WARMGATE_MODEL": "a b"}),
    ("other boolean spelling", ["cmd"], {"WARMGATE_SIGNAL_GROUP": "yes"}),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env"), [c[1:] for c in UNSURE], ids=[c[0] for c in UNSURE])
def test_leaves_other_forms_to_typer(args: list[str], env: dict[str, str]) -> None:
    assert runargs.parse(args, env) is None


def test_invalid_settings_go_to_typer_for_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(settings: RunSettings, own_vars: object) -> int:
        raise AssertionError("supervised despite invalid settings")

    monkeypatch.setattr(supervisor, "supervise", must_not_run)
    assert runargs.run_without_typer(["--converge", "2", "cmd"], {}) is None
    assert runargs.run_without_typer(["--port", "1"], {}) is None  # no command


HEAVY = ("typer", "pydantic", "asyncio", "structlog", "httpx", "prometheus_client", "warmgate.plan")


def test_nothing_heavy_is_imported_before_the_spawn() -> None:
    """The fast path reaches supervisor.supervise with typer, pydantic, asyncio and structlog unloaded."""
    script = (
        "import sys\n"
        "from warmgate import runargs, supervisor\n"
        f"supervisor.supervise = lambda s, v: print(sorted(m for m in {HEAVY!r} if m in sys.modules)) or 0\n"
        "sys.exit(runargs.run_without_typer(['--', 'true'], {}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_help_still_comes_from_typer_and_names_every_env_var_whole() -> None:
    """At 80 columns, as `docker run IMAGE --help` prints it: a name cut short is no use."""
    out = subprocess.run(
        [sys.executable, "-m", "warmgate", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    words = set(out.stdout.replace(";", " ").replace("]", " ").split())
    for option in options.for_command("run"):
        assert option.flag in words and option.envvar in words, option.name
