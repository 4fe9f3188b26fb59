"""docs/platforms.md: every recipe runs warmgate as the page says, with numbers that fit.

Every ```yaml block of the page and its `docker run` command are read here, the
container's command line is rebuilt as the platform builds it (the production-stack
chart's template, KServe's runtime, llm-d-modelservice's `imageDefault`, docker's
ENTRYPOINT + arguments), and warmgate's own CLI parses it. Then, as tests/test_deploy.py
checks docker/kubernetes/: the probes hit warmgate's paths on its port, the grace period
is WARMGATE_GRACE_PERIOD and fits the drain, the startup probe outlasts warmgate's own
limits, and warmgate warms the port the platform sends traffic to. The page's table of
numbers is checked against the settings too.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployutil import ROOT, VLLM_IMAGE, default_startup_budget, exec_form, image_env, settings

from warmgate import probe, supervisor
from warmgate.config import RunSettings

DOC = ROOT / "docs" / "platforms.md"
IMAGE = "warmgate-vllm"  # docker/Dockerfile's image, whatever the registry
PROBE_PATHS = {"startupProbe": "/startup", "readinessProbe": "/ready", "livenessProbe": "/live"}


# --- the page --------------------------------------------------------------------------


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)


def _documents() -> list[dict[str, Any]]:
    return [d for block in _blocks("yaml") for d in yaml.safe_load_all(block) if d]


def _recipe(document: dict[str, Any]) -> str | None:
    """Which recipe a YAML document belongs to, by what only that platform writes."""
    if "servingEngineSpec" in document:
        return "production-stack"
    if "patches" in document:
        return "production-stack post-renderer"
    if document.get("apiVersion", "").startswith("serving.kserve.io/"):
        return f"kserve {document['kind']}"
    if "decode" in document and "modelArtifacts" in document:
        return "llm-d"
    return None


def _only(recipe: str) -> dict[str, Any]:
    (document,) = [d for d in _documents() if _recipe(d) == recipe]
    return document


def _table() -> dict[str, list[str]]:
    """The rows of the page's numbers table, by platform."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and "drain deadline" not in line and not set(cells[0]) <= {"-"}:
            rows[cells[0].strip("`")] = cells
    return rows


# --- a pod as the platform runs it -----------------------------------------------------


@dataclass
class Pod:
    """One recipe's container, as the platform would start it."""

    argv: list[str]  # the whole command line: command + args, after templating
    env: dict[str, str]  # the container's env: the image's ENV, then the recipe's
    container: dict[str, Any]
    grace: int  # terminationGracePeriodSeconds
    api_port: int  # where the platform sends clients
    image: str
    named_ports: dict[str, int] = field(default_factory=dict)

    def port(self, port: int | str) -> int:
        return port if isinstance(port, int) else self.named_ports[port]

    def settings(self, monkeypatch: pytest.MonkeyPatch) -> RunSettings:
        return settings(self.argv, self.env, monkeypatch)


def _env(container: dict[str, Any]) -> dict[str, str]:
    own = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return {**image_env(VLLM_IMAGE), **own}


def _named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: the production-stack recipe is a kustomize patch")
    return found


def production_stack(tmp_path: Path) -> Pod:
    """The chart's engine Deployment as its template renders these values (command, env,
    probes, ports), next to its router, then through the page's post-renderer for real."""
    values = _only("production-stack")["servingEngineSpec"]
    (model,) = values["modelSpec"]
    port = values.get("containerPort", 8000)
    vllm = {
        "name": "vllm",
        "image": f"{model['repository']}:{model['tag']}",
        # helm/templates/deployment-vllm-multi.yaml: the chart writes the command itself.
        "command": ["vllm", "serve", model["modelURL"], "--host", "0.0.0.0", "--port", str(port)],
        "env": [{"name": "HF_HOME", "value": "/tmp"}, *model.get("env", [])],
        "ports": [
            {"name": "container-port", "containerPort": port},
            {"name": "zmq-port", "containerPort": 55555},
            {"name": "ucx-port", "containerPort": 9999},
        ],
        **{kind: values[kind] for kind in PROBE_PATHS if kind in values},
    }
    chart = [_deployment(f"rel-{model['name']}-deployment-vllm", vllm)]
    chart.append(_deployment("rel-deployment-router", {"name": "router", "image": "router:1"}))
    (tmp_path / "all.yaml").write_text(yaml.safe_dump_all(chart))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(_only(_POST)))
    result = subprocess.run(
        [_kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize:\n{result.stderr}"
    rendered = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout)}
    router = rendered["rel-deployment-router"]["spec"]["template"]["spec"]
    assert "command" not in router["containers"][0], "the patch must leave the router alone"
    pod = rendered[f"rel-{model['name']}-deployment-vllm"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    return Pod(
        argv=container["command"] + container.get("args", []),
        env=_env(container),
        container=container,
        grace=pod.get("terminationGracePeriodSeconds", 30),
        api_port=port,
        image=container["image"],
        named_ports=_named_ports(container),
    )


_POST = "production-stack post-renderer"


def _deployment(name: str, container: dict[str, Any]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def kserve(tmp_path: Path) -> Pod:
    runtime, isvc = _only("kserve ServingRuntime"), _only("kserve InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    # Serverless (Knative) allows one port and rewrites the probes: the recipe needs raw.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    name = isvc["metadata"]["name"]  # KServe fills {{.Name}} in the runtime's args
    argv = [w.replace("{{.Name}}", name) for w in container["command"] + container["args"]]
    return Pod(
        argv=argv,
        env=_env(container),
        container=container,
        grace=predictor["terminationGracePeriodSeconds"],
        api_port=container["ports"][0]["containerPort"],  # KServe's Service targets the first
        image=container["image"],
        named_ports=_named_ports(container),
    )


def llm_d(tmp_path: Path) -> Pod:
    values = _only("llm-d")
    decode, routing = values["decode"], values["routing"]
    (container,) = decode["containers"]
    assert container["modelCommand"] == "imageDefault", "the image's ENTRYPOINT runs warmgate"
    assert routing["proxy"]["enabled"] is False, "without the sidecar vLLM takes servicePort"
    protocol, model = values["modelArtifacts"]["uri"].split("://", 1)
    assert protocol == "hf"
    # llm-d-modelservice's imageDefaultModelCommand: args only, after the ENTRYPOINT.
    args = [
        *("--model", model, "--port", str(routing["servicePort"])),
        *("--served-model-name", values["modelArtifacts"]["name"], *container.get("args", [])),
    ]
    return Pod(
        argv=[*exec_form(VLLM_IMAGE, "ENTRYPOINT"), *args],
        env=_env(container),
        container=container,
        grace=decode["extraConfig"]["terminationGracePeriodSeconds"],
        api_port=routing["servicePort"],
        image=container["image"],
        named_ports=_named_ports(container),
    )


RECIPES: dict[str, Callable[[Path], Pod]] = {
    "production-stack": production_stack,
    "KServe": kserve,
    "llm-d": llm_d,
}


# --- docker run ------------------------------------------------------------------------

_DOCKER_VALUE_FLAGS = {"-p", "-v", "-e", "--name", "--gpus", "--ipc", "--stop-timeout"}


@dataclass
class DockerRun:
    flags: list[tuple[str, str]]  # (flag, value) in order; switches have ""
    image: str
    args: list[str]

    def values(self, flag: str) -> list[str]:
        return [v for f, v in self.flags if f == flag]


def docker_run() -> DockerRun:
    (block,) = [b for b in _blocks("sh") if "docker run" in b]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["docker", "run"], words
    flags: list[tuple[str, str]] = []
    rest = words[2:]
    while rest and rest[0].startswith("-"):
        flag = rest.pop(0)
        if "=" in flag:
            name, _, value = flag.partition("=")
            flags.append((name, value))
        elif flag in _DOCKER_VALUE_FLAGS:
            flags.append((flag, rest.pop(0)))
        else:
            assert flag in {"-d", "--rm", "-it", "-i", "-t"}, f"unknown docker run flag {flag}"
            flags.append((flag, ""))
    return DockerRun(flags, rest[0], rest[1:])


# --- the checks ------------------------------------------------------------------------


def test_every_yaml_block_belongs_to_a_recipe_this_test_checks() -> None:
    found = [_recipe(d) for d in _documents()]
    recipes = [r for r in found if r is not None]
    assert len(recipes) == len(found), "a YAML block this test does not check: add its recipe"
    assert sorted(recipes) == sorted(
        ["production-stack", _POST, "kserve ServingRuntime", "kserve InferenceService", "llm-d"]
    ), "each recipe once"


@pytest.fixture(params=sorted(RECIPES))
def pod(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Pod]:
    name: str = request.param
    return name, RECIPES[name](tmp_path)


def test_the_container_runs_vllm_under_warmgate_in_warm_up_mode(
    pod: tuple[str, Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, p = pod
    assert p.image.rsplit("/", 1)[-1].startswith(f"{IMAGE}:"), f"{name}: use the warmgate image"
    assert p.argv[:2] == ["warmgate", "run"], f"{name}: warmgate must be PID 1: {p.argv}"
    s = p.settings(monkeypatch)
    assert s.command[:2] == ("vllm", "serve"), f"{name}: {s.command}"
    target = supervisor.warmup_target(s, p.env)
    assert target is not None, f"{name}: warm-up mode must be on"
    assert target.url == f"http://127.0.0.1:{p.api_port}", f"{name}: warm the port clients use"
    assert "--shutdown-timeout" not in " ".join(p.argv), f"{name}: warmgate drains, not vLLM"


def test_probes_hit_warmgate_paths_on_its_port(
    pod: tuple[str, Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, p = pod
    s = p.settings(monkeypatch)
    for kind, path in PROBE_PATHS.items():
        get = p.container[kind]["httpGet"]
        assert get["path"] == path and path in probe.PATHS, f"{name} {kind}"
        assert p.port(get["port"]) == s.port, f"{name} {kind}: warmgate's port {s.port}"
        assert get.get("scheme", "HTTP") == "HTTP", f"{name} {kind}"
    assert s.port != p.api_port, f"{name}: the probes are not vLLM's port"


def test_grace_period_is_warmgates_and_fits_drain_and_stop(
    pod: tuple[str, Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, p = pod
    s = p.settings(monkeypatch)
    assert "preStop" not in p.container.get("lifecycle", {}), f"{name}: warmgate replaces it"
    assert s.grace_period == p.grace, f"{name}: WARMGATE_GRACE_PERIOD must equal the pod's grace"
    assert p.grace >= s.drain_deadline + s.stop_timeout + 2, name
    assert s.drain_deadline >= s.drain_min and s.drain_warnings() == [], name


def test_startup_probe_outlasts_startup_and_warm_up(
    pod: tuple[str, Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, p = pod
    startup = p.container["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    s = p.settings(monkeypatch)
    assert budget > s.startup_timeout + s.warmup.warmup_timeout, f"{name}: warmgate gives up first"
    assert budget > default_startup_budget(), name


def test_the_table_of_numbers_is_what_the_recipes_set(
    pod: tuple[str, Pod], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, p = pod
    s = p.settings(monkeypatch)
    row = _table()[name]
    assert row[4] == f"{s.grace_period:g} / {s.stop_timeout:g}", f"{name}: {row}"
    assert row[5] == f"{s.drain_deadline:g} s", f"{name}: {row}"


def test_docker_run_drains_within_dockers_stop_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    run = docker_run()
    assert run.image.rsplit("/", 1)[-1].startswith(f"{IMAGE}:")
    env = dict(v.split("=", 1) for v in run.values("-e"))
    argv = [*exec_form(VLLM_IMAGE, "ENTRYPOINT"), *run.args]
    s = settings(argv, {**image_env(VLLM_IMAGE), **env}, monkeypatch)
    (stop_timeout,) = run.values("--stop-timeout")
    assert s.grace_period == float(stop_timeout), "docker stop's wait is warmgate's grace period"
    assert s.drain_deadline >= s.drain_min and s.drain_warnings() == []
    target = supervisor.warmup_target(s, env)
    assert target is not None
    published = {int(p.rsplit(":", 1)[-1]) for p in run.values("-p")}
    assert {s.port, int(target.url.rsplit(":", 1)[-1])} <= published, "probes and API published"
    mounts = [Path(v.split(":")[1]) for v in run.values("-v")]
    assert s.cache_dir is not None and any(s.cache_dir.is_relative_to(m) for m in mounts)
    row = _table()["docker run"]
    assert row[4] == f"{s.grace_period:g} / {s.stop_timeout:g}" and row[5] == (
        f"{s.drain_deadline:g} s"
    ), row
