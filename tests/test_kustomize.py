"""docker/kubernetes/: every overlay renders with `kubectl kustomize`, and what it renders is
valid: the built-in kinds against Kubernetes' own schemas (kubernetes-validate, offline), the
LeaderWorkerSet field by field against its v1 API, which kubernetes-validate does not know.

Where warmgate's flags, probes and timeouts in these pods agree with its CLI is
tests/test_deploy.py's part. kubectl must be on PATH (it embeds kustomize); without it these
tests skip and say so.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import manifests  # scripts/manifests.py: the one renderer of the overlays

pytestmark = pytest.mark.skipif(
    manifests.kubectl() is None and not os.environ.get("CI"),  # CI's image has it: fail there
    reason="kubectl not on PATH: it renders docker/kubernetes/overlays (`kubectl kustomize`)",
)

# The oldest Kubernetes we support, and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
LWS_API = "leaderworkerset.x-k8s.io/v1"
EXPECTED_KINDS = {
    "gpu": ["Deployment", "PersistentVolumeClaim", "Service"],
    "sim": ["Deployment", "Service"],
    "multinode": ["LeaderWorkerSet", "PersistentVolumeClaim", "Service"],
}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "kubernetes.md"


def _kind(overlay: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in manifests.render(overlay) if d["kind"] == kind]


def _lws() -> dict[str, Any]:
    (lws,) = _kind("multinode", "LeaderWorkerSet")
    return lws


def _validate(obj: dict[str, Any], version: str) -> None:
    """kubernetes-validate, strict (unknown fields fail), with the object named in the error."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        pytest.fail(
            f"{name} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}"
        )


# --- rendering and the built-in kinds ---------------------------------------------------------


def test_every_overlay_is_tested() -> None:
    found = sorted(p.name for p in (manifests.KUBERNETES / "overlays").iterdir() if p.is_dir())
    assert found == sorted(manifests.OVERLAYS) == sorted(EXPECTED_KINDS)


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_overlay_renders(overlay: str) -> None:
    objects = manifests.render(overlay)
    assert sorted(d["kind"] for d in objects) == EXPECTED_KINDS[overlay]
    assert all(
        d["metadata"]["labels"]["app.kubernetes.io/name"] == "warmgate-vllm" for d in objects
    )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_rendered_objects_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    checked = 0
    for obj in manifests.render(overlay):
        if obj["apiVersion"] == LWS_API:
            continue  # a CRD: test_lws_* below
        _validate(obj, version)
        checked += 1
    assert checked >= 2, f"{overlay}: nothing validated"


def test_render_errors_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(manifests.RenderError, match=r"^kubectl kustomize .*missing\.yaml") as info:
        manifests.documents(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(manifests.RenderError, match="no overlay 'cpu'"):
        manifests.render("cpu")


# --- the LeaderWorkerSet, field by field --------------------------------------------------------
#
# leaderworkerset.x-k8s.io/v1 as api/leaderworkerset/v1/leaderworkerset_types.go in
# kubernetes-sigs/lws declares it (its JSON names, kubebuilder enums and required fields). A
# name ending in "!" is required; every object is closed (an unknown or misspelt field fails,
# as the API server's structural schema would prune it silently); a pod template is checked by
# kubernetes-validate as the template of a core v1 PodTemplate.


class Enum(tuple[str, ...]):
    """A string field's allowed values (+kubebuilder:validation:Enum)."""


POD_TEMPLATE = "PodTemplateSpec"
INT_OR_STRING = (int, str)
LWS_SPEC: dict[str, Any] = {
    "replicas": int,
    "leaderWorkerTemplate!": {
        "leaderTemplate": POD_TEMPLATE,
        "workerTemplate!": POD_TEMPLATE,
        "size": int,
        "restartPolicy": Enum(
            ("Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None")
        ),
        "subGroupPolicy": {
            "subGroupPolicyType": Enum(("LeaderWorker", "LeaderExcluded")),
            "subGroupSize": int,
        },
        "volumeClaimTemplates": list,
        "persistentVolumeClaimRetentionPolicy": {
            "whenDeleted": Enum(("Retain", "Delete")),
            "whenScaled": Enum(("Retain", "Delete")),
        },
    },
    "rolloutStrategy": {
        "type!": Enum(("RollingUpdate",)),
        "rollingUpdateConfiguration": {
            "partition": int,
            "maxUnavailable": INT_OR_STRING,
            "maxSurge": INT_OR_STRING,
        },
    },
    "startupPolicy": Enum(("LeaderCreated", "LeaderReady")),
    "networkConfig": {"subdomainPolicy!": Enum(("Shared", "UniquePerReplica"))},
}


def _check(value: Any, schema: Any, where: str, version: str) -> list[str]:
    """What is wrong with `value` against `schema`, one line per problem."""
    if isinstance(schema, Enum):
        return [] if value in schema else [f"{where}: {value!r} is not one of {list(schema)}"]
    if schema == POD_TEMPLATE:
        name = where.rsplit(".", 1)[-1].lower()
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}}
        try:
            kubernetes_validate.validate({**pod_template, "template": value}, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return [f"{where}: {exc.message} at {list(exc.path)[1:]}"]
        return []
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        fields = {k.rstrip("!"): v for k, v in schema.items()}
        problems = [
            f"{where}.{k[:-1]}: required" for k in schema if k.endswith("!") and k[:-1] not in value
        ]
        for key, item in value.items():
            if key not in fields:
                problems.append(f"{where}.{key}: no such field in {LWS_API}")
            else:
                problems += _check(item, fields[key], f"{where}.{key}", version)
        return problems
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) or not isinstance(value, types):  # bool is an int in Python
        return [f"{where}: {value!r} is not {' or '.join(t.__name__ for t in types)}"]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_lws_matches_the_v1_api_field_by_field(version: str) -> None:
    lws = _lws()
    assert lws["apiVersion"] == LWS_API
    assert set(lws) == {"apiVersion", "kind", "metadata", "spec"}
    # The name becomes a headless Service's and the pods' DNS labels (name-group-index).
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", lws["metadata"]["name"])
    assert _check(lws["spec"], LWS_SPEC, "spec", version) == []


def test_lws_checker_catches_what_the_api_would_reject() -> None:
    spec = _lws()["spec"]
    broken = {
        **spec,
        "startupPolicy": "WorkersFirst",
        "leaderWorkerTemplate": {
            **{k: v for k, v in spec["leaderWorkerTemplate"].items() if k != "workerTemplate"},
            "sizee": 2,
        },
    }
    problems = _check(broken, LWS_SPEC, "spec", K8S_VERSIONS[0])
    assert "spec.leaderWorkerTemplate.workerTemplate: required" in problems
    assert "spec.leaderWorkerTemplate.sizee: no such field in " + LWS_API in problems
    assert any(p.startswith("spec.startupPolicy: 'WorkersFirst'") for p in problems)
    bad_pod = {"spec": {"containers": [{"name": "x", "image": "y", "imagePullPolicy": 3}]}}
    assert _check(bad_pod, POD_TEMPLATE, "spec.workerTemplate", K8S_VERSIONS[0])


def _words(container: dict[str, Any]) -> list[str]:
    """command + args, with a `sh -c SCRIPT` split into the script's words."""
    words = [*container.get("command", []), *container.get("args", [])]
    if "sh" not in words or words[words.index("sh") + 1] != "-c":
        return words
    at = words.index("sh")
    return words[:at] + shlex.split(words[at + 2])


def _flag(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def _gpus(template: dict[str, Any]) -> int:
    (container,) = template["spec"]["containers"]
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_lws_group_is_one_ray_cluster_serving_one_model() -> None:
    group = _lws()["spec"]["leaderWorkerTemplate"]
    size = group["size"]
    assert size >= 2, "a multi-node group has workers"
    (leader,) = group["leaderTemplate"]["spec"]["containers"]
    words = _words(leader)
    # vLLM's LWS guide: the Ray head waits for the whole group, then vLLM spreads over it.
    script = words.index("bash") + 1
    assert words[script].endswith("/multi-node-serving.sh") and words[script + 1] == "leader"
    assert "--ray_cluster_size=$(LWS_GROUP_SIZE)" in words
    serve = words.index("vllm")
    assert words[serve - 2 : serve + 2] == ["&&", "exec", "vllm", "serve"]
    assert _flag(words, "--distributed-executor-backend") == "ray"
    assert _flag(words, "--pipeline-parallel-size") == "$(LWS_GROUP_SIZE)"  # one stage a node
    tensor_parallel = int(_flag(words, "--tensor-parallel-size"))
    for role in ("leaderTemplate", "workerTemplate"):
        assert _gpus(group[role]) == tensor_parallel, f"{role}: one GPU per tensor-parallel rank"
    # The workers join the head the leader started, once it answers.
    (worker,) = group["workerTemplate"]["spec"]["containers"]
    gcs = [p["containerPort"] for p in leader["ports"] if p["name"] == "ray-gcs"]
    assert f"--address=$(LWS_LEADER_ADDRESS):{gcs[0]}" in worker["args"]
    (wait,) = group["workerTemplate"]["spec"]["initContainers"]
    assert f"ray health-check --address=$(LWS_LEADER_ADDRESS):{gcs[0]}" in " ".join(wait["command"])


def test_lws_restarts_and_starts_groups_whole() -> None:
    spec = _lws()["spec"]
    group = spec["leaderWorkerTemplate"]
    # A lost pod breaks the Ray cluster: recreate the whole group, not the one pod.
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"
    # LeaderReady would deadlock: the leader is Ready only once its workers have joined.
    assert spec["startupPolicy"] == "LeaderCreated"
    assert "subGroupPolicy" not in group, "one Ray cluster per group: no subgroups"
    rolling = spec["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1, "keep serving capacity"
    for role in ("leader", "worker"):
        labels = group[f"{role}Template"]["metadata"]["labels"]
        assert labels["role"] == role


def test_lws_api_service_is_not_its_headless_service() -> None:
    # The LWS controller creates a headless Service named after the set (the pods' DNS
    # names); a Service of the same name would collide with it.
    (service,) = _kind("multinode", "Service")
    assert service["metadata"]["name"] != _lws()["metadata"]["name"]
    assert service["spec"]["selector"]["role"] == "leader"


# --- docs/kubernetes.md shows what the overlays render -----------------------------------------


def _doc_blocks() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S)
    return [b for b in map(yaml.safe_load, blocks) if isinstance(b, dict)]


def test_docs_probe_snippet_is_the_gpu_overlays() -> None:
    (deployment,) = _kind("gpu", "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    snippets = [b for b in _doc_blocks() if "startupProbe" in b]
    assert snippets, "docs/kubernetes.md: no probe snippet"
    for snippet in snippets:
        assert snippet["ports"] == container["ports"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            rendered = container[kind]
            for key, value in snippet[kind].items():
                assert rendered[key] == value, f"docs {kind}.{key}: {value} != {rendered[key]}"


def test_docs_say_how_to_render_and_apply_each_overlay() -> None:
    text = DOCS.read_text()
    for overlay in manifests.OVERLAYS:
        path = f"docker/kubernetes/overlays/{overlay}"
        assert f"kubectl apply -k {path}" in text, overlay
    assert "kubectl kustomize docker/kubernetes/overlays/" in text
