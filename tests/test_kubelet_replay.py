"""scripts/kubelet_replay.py: the kubelet's probe rules (pure), the manifest it reads, and
one replay over `warmgate sim` whose decisions and simulated costs are asserted, not wall
times."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load() -> ModuleType:
    sys.path.insert(0, str(ROOT / "scripts"))  # its `import manifests`, as when run as a script
    spec = importlib.util.spec_from_file_location(
        "kubelet_replay", ROOT / "scripts" / "kubelet_replay.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["kubelet_replay"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kr = _load()


def spec(**kw: Any) -> Any:
    return kr.ProbeSpec(kr.HttpGet("/x", 8080), **kw)


# --- the kubelet's rules ---------------------------------------------------------------------


def test_no_probe_is_ready_at_start() -> None:
    kubelet = kr.Kubelet({})
    events = kubelet.start(0.0)
    assert [e.what for e in events] == ["started", "ready"]
    assert kubelet.ready


def test_startup_probe_gates_readiness_and_liveness() -> None:
    kubelet = kr.Kubelet(
        {"startup": spec(failure_threshold=5), "readiness": spec(), "liveness": spec()}
    )
    assert kubelet.start(0.0) == []
    assert kubelet.should_probe("startup", 0.0)
    assert not kubelet.should_probe("liveness", 0.0)
    assert not kubelet.should_probe("readiness", 0.0)
    assert kubelet.observe("startup", False, 1.0) == []
    events = kubelet.observe("startup", True, 2.0, "HTTP 200")
    assert [e.what for e in events] == ["started"]  # readiness starts out failed
    assert not kubelet.ready
    assert not kubelet.should_probe("startup", 3.0)
    assert kubelet.should_probe("liveness", 3.0)
    assert [e.what for e in kubelet.observe("readiness", True, 3.0)] == ["ready"]
    assert kubelet.failures == {"startup": 1, "readiness": 0, "liveness": 0}


def test_failure_threshold_counts_failures_in_a_row_and_restarts() -> None:
    kubelet = kr.Kubelet({"liveness": spec(failure_threshold=3)})
    kubelet.start(0.0)
    for t, ok in enumerate([False, False, True, False, False]):
        assert kubelet.observe("liveness", ok, float(t)) == []
    restart = kubelet.observe("liveness", False, 5.0, "connection refused")
    assert [(e.probe, e.what, e.t) for e in restart] == [("liveness", "restart", 5.0)]
    assert "connection refused" in restart[0].detail
    # The replay goes on with the same container: the count starts again.
    assert kubelet.observe("liveness", False, 6.0) == []
    assert kubelet.observe("liveness", False, 7.0) == []
    assert len(kubelet.observe("liveness", False, 8.0)) == 1
    assert len(kubelet.restarts) == 2


def test_startup_failure_threshold_restarts() -> None:
    kubelet = kr.Kubelet({"startup": spec(failure_threshold=2)})
    kubelet.start(0.0)
    kubelet.observe("startup", False, 0.0)
    assert kubelet.observe("startup", False, 1.0)[0].what == "restart"
    assert not kubelet.started


def test_readiness_success_and_failure_thresholds() -> None:
    kubelet = kr.Kubelet({"readiness": spec(success_threshold=2, failure_threshold=2)})
    kubelet.start(0.0)
    assert kubelet.observe("readiness", True, 1.0) == []
    assert kubelet.observe("readiness", False, 2.0) == []
    assert kubelet.observe("readiness", True, 3.0) == []
    assert [e.what for e in kubelet.observe("readiness", True, 4.0)] == ["ready"]
    assert kubelet.observe("readiness", True, 5.0) == []
    assert kubelet.observe("readiness", False, 6.0) == []
    assert [e.what for e in kubelet.observe("readiness", False, 7.0)] == ["not-ready"]
    assert not kubelet.restarts  # readiness never restarts


def test_initial_delay() -> None:
    kubelet = kr.Kubelet({"liveness": spec(initial_delay_s=30.0)})
    kubelet.start(0.0)
    assert not kubelet.should_probe("liveness", 29.9)
    assert kubelet.should_probe("liveness", 30.0)


# --- the manifest --------------------------------------------------------------------------------

needs_kubectl = pytest.mark.skipif(
    kr.manifests.kubectl() is None,
    reason="kubectl not on PATH: it renders docker/kubernetes/overlays (`kubectl kustomize`)",
)


@needs_kubectl
def test_reads_the_deployment_probes() -> None:
    assert kr.MANIFEST == ROOT / "docker" / "kubernetes" / "overlays" / "gpu"
    m = kr.load_manifest()
    assert (m.warmgate_port, m.api_port) == (8080, 8000)
    startup, readiness, liveness = (m.probes[k] for k in ("startup", "readiness", "liveness"))
    assert startup.action == kr.HttpGet("/startup", "warmgate")
    assert (startup.period_s, startup.timeout_s, startup.failure_threshold) == (10, 2, 216)
    assert readiness.action.path == "/ready"
    assert (readiness.period_s, readiness.failure_threshold, readiness.success_threshold) == (
        5,
        1,
        1,
    )
    assert liveness.action.path == "/live"
    assert (liveness.period_s, liveness.failure_threshold) == (10, 3)
    assert m.container_port("warmgate") == 8080


def test_scaling_floors_timeouts() -> None:
    scaled = spec(initial_delay_s=600, period_s=10, timeout_s=1).scaled(0.01, 0.05)
    assert (scaled.initial_delay_s, scaled.period_s, scaled.timeout_s) == (6.0, 0.1, 0.05)


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        ("exec: {command: [true]}", "only httpGet and tcpSocket"),
        ("httpGet: {path: /live, port: 8080}\n        successThreshold: 2", "must be 1"),
    ],
)
def test_rejects_probes_it_cannot_replay(tmp_path: Path, probe: str, message: str) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text(
        f"kind: Pod\nspec:\n  containers:\n    - name: c\n      livenessProbe:\n        {probe}\n"
    )
    with pytest.raises(ValueError, match=message):
        kr.load_manifest(path)


@needs_kubectl
def test_reads_the_rendered_sim_overlay_and_lws_templates() -> None:
    overlays = ROOT / "docker" / "kubernetes" / "overlays"
    assert kr.load_manifest(overlays / "sim").probes == kr.load_manifest().probes
    leader = kr.load_manifest(overlays / "multinode")  # the first container with probes
    assert leader.probes["startup"].failure_threshold == 360
    worker = kr.load_manifest(overlays / "multinode", "ray-worker")
    assert set(worker.probes) == {"readiness", "liveness"}
    assert worker.warmgate_port == 8080


def test_unrenderable_manifest_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [nowhere.yaml]\n")
    with pytest.raises(ValueError, match=r"^--manifest ") as info:
        kr.load_manifest(tmp_path)
    assert "\n" not in str(info.value)


@needs_kubectl
def test_rows_probe_ports_the_pod_has() -> None:
    m = kr.load_manifest()
    table = kr.rows(m)
    for row in table.values():
        kr.check_ports(row, m)
    bad = kr.Row("health", "x", {"readiness": m.probes["readiness"]})  # warmgate's port
    with pytest.raises(ValueError, match="only the server's 8000"):
        kr.check_ports(bad, m)


# --- one replay over the simulator ---------------------------------------------------------------


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    if kr.manifests.kubectl() is None:  # the replay reads the rendered gpu overlay
        pytest.skip("kubectl not on PATH: it renders docker/kubernetes/overlays")
    out = tmp_path_factory.mktemp("replay") / "replay.json"
    code = kr.main(
        [
            "--time-scale", "0.05",
            "--load-seconds", "60",  # 3 s: longer than the naive liveness probe allows (20 s)
            "--sim-args", "--max-model-len 1024",
            "--warmgate-args", "--concurrency 1,4 --max-repeats 2",
            "--after-ready", "10",
            "--deadline", "600",  # 30 s a row at most
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    return {r["key"]: r for r in json.loads(out.read_text())}


def test_warmgate_row_is_never_killed_and_its_first_request_is_warm(
    replay: dict[str, dict[str, Any]],
) -> None:
    r = replay["warmgate"]
    assert r["error"] is None
    assert r["ready_at_s"] is not None
    assert r["restarts"] == []
    # Whether a liveness tick fits in the short after-Ready window depends on machine load;
    # what must hold is that none failed.
    assert r["failures"]["liveness"] == 0
    assert r["failures"]["startup"] >= 1  # loading and warming: the startup probe waited
    first = r["first"]
    assert r["first_ok"], first["error"]
    assert all(k.startswith("json_grammar:") for k in first["compiled_after_ready"])
    assert first["cost_ratio"] < 1.1


def test_container_start_row_races_the_load(replay: dict[str, dict[str, Any]]) -> None:
    r = replay["container-start"]
    assert r["ready_at_s"] == 0.0
    assert not r["first_ok"] or r["first"]["compiled_after_ready"]


def test_health_row_first_request_compiles(replay: dict[str, dict[str, Any]]) -> None:
    r = replay["health"]
    assert r["ready_at_s"] is not None and r["restarts"] == []
    assert r["first_ok"]
    assert r["first"]["compiled_after_ready"]
    assert r["first"]["cost_ratio"] > 1.2


def test_warmup_sh_row_misses_what_its_three_chats_do_not_warm(
    replay: dict[str, dict[str, Any]],
) -> None:
    r = replay["warmup.sh"]
    assert r["ready_at_s"] is not None and r["first_ok"]
    assert any(k.startswith("logprobs") for k in r["first"]["compiled_after_ready"])


def test_naive_liveness_restarts_a_slow_loading_pod(replay: dict[str, dict[str, Any]]) -> None:
    r = replay["naive-liveness"]
    assert r["restarts"], "a /health liveness probe without a startupProbe must kill a slow load"
    assert r["restarts"][0]["probe"] == "liveness"
    assert r["restarted_before_ready"]
