"""Deployment snippets read the way warmgate itself reads them: shared by the tests of
docker/ (the images, the manifests) and of docs/platforms.md (the platform recipes).

A Dockerfile's ENTRYPOINT, CMD and ENV, and `warmgate run`'s options as its typer CLI
builds them; `settings` turns an argv and an environment into the RunSettings that
`warmgate run` would run with, without running anything.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from warmgate import cli, supervisor
from warmgate.config import RunSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VLLM_IMAGE = DOCKER / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, rest) of each Dockerfile instruction, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):  # comments may sit inside a continued line
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, rest = (pending + text).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def only(path: Path, keyword: str) -> str:
    values = [rest for kw, rest in instructions(path) if kw == keyword]
    assert len(values) == 1, f"{path.name}: expected one {keyword}, found {len(values)}"
    return values[0]


def exec_form(path: Path, keyword: str) -> list[str]:
    value = json.loads(only(path, keyword))
    assert isinstance(value, list), f"{path.name}: {keyword} must be the JSON exec form"
    return value


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in instructions(path):
        if keyword != "ENV":
            continue
        words = shlex.split(rest)
        if "=" not in words[0]:  # legacy `ENV KEY value with spaces`
            env[words[0]] = rest.split(None, 1)[1]
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def command(name: str) -> Any:
    """The click command typer builds for `warmgate NAME` (typer vendors click: duck-typed)."""
    return typer.main.get_command(cli.app).commands[name]  # type: ignore[attr-defined]


def envvars(name: str) -> dict[str, Any]:
    return {p.envvar: p for p in command(name).params if isinstance(p.envvar, str)}


def default(name: str, envvar: str) -> Any:
    cmd = command(name)
    return envvars(name)[envvar].get_default(cmd.context_class(cmd))


def default_startup_budget() -> float:
    """Default seconds from spawn to Ready: --startup-timeout plus --warmup-timeout."""
    startup, warmup = (default("run", f"WARMGATE_{n}_TIMEOUT") for n in ("STARTUP", "WARMUP"))
    return float(startup + warmup)


def settings(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> RunSettings:
    """The RunSettings `warmgate run` builds from this argv and environment (nothing runs)."""
    captured: list[RunSettings] = []

    def fake_supervise(settings: RunSettings, own_vars: object) -> int:
        captured.append(settings)
        return 0

    for key in [k for k in os.environ if k.startswith("WARMGATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(supervisor, "supervise", fake_supervise)
    assert argv[:2] == ["warmgate", "run"], f"not a `warmgate run` command: {argv}"
    assert cli.main(argv[1:]) == 0, f"`{shlex.join(argv)}` was refused (see stderr)"
    (found,) = captured
    return found
