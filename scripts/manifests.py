"""The Kubernetes manifests as the cluster gets them: docker/kubernetes/overlays/<name>
rendered by `kubectl kustomize`, once per process.

scripts/kubelet_replay.py, tests/test_deploy.py and tests/test_kustomize.py read the manifests
through this module only, so that what they check is what `kubectl apply -k` applies, not the
base or a patch on its own. kubectl (1.14 or later; it embeds kustomize) must be on PATH.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "docker" / "kubernetes"
OVERLAYS = ("gpu", "sim", "multinode")
# A render takes well under a second; a hung kubectl must not hang a test.
RENDER_TIMEOUT_S = 60.0


class RenderError(ValueError):
    """The manifests could not be rendered (no kubectl, or kustomize refused them)."""


def overlay(name: str) -> Path:
    """The directory of one overlay."""
    if name not in OVERLAYS:
        raise RenderError(f"no overlay {name!r} (have: {', '.join(OVERLAYS)})")
    return KUBERNETES / "overlays" / name


def kubectl() -> str | None:
    """kubectl's path, or None where it is not installed."""
    return shutil.which("kubectl")


def is_kustomization(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file()
        for name in ("kustomization.yaml", "kustomization.yml", "Kustomization")
    )


@functools.cache
def rendered_text(directory: Path) -> str:
    """`kubectl kustomize DIRECTORY`'s output, run once per directory and process."""
    tool = kubectl()
    if tool is None:
        raise RenderError(
            f"{directory}: kubectl not found on PATH (it renders the Kustomize overlays; "
            "install kubectl, or pass a rendered YAML file)"
        )
    try:
        result = subprocess.run(
            [tool, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise RenderError(
            f"kubectl kustomize {directory}: no answer in {RENDER_TIMEOUT_S:g} s"
        ) from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RenderError(f"kubectl kustomize {directory}: {last}")
    return result.stdout


def documents(path: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization directory (rendered) or of a plain YAML file, each a
    fresh copy that the caller may change."""
    path = path.resolve()
    try:
        text = rendered_text(path) if is_kustomization(path) else path.read_text()
        loaded = list(yaml.safe_load_all(text))
    except (OSError, yaml.YAMLError) as exc:
        raise RenderError(f"{path}: {exc}") from None
    return [d for d in loaded if isinstance(d, dict)]


def render(name: str) -> list[dict[str, Any]]:
    """The objects of overlay `name`, as `kubectl apply -k` would create them."""
    return documents(overlay(name))
