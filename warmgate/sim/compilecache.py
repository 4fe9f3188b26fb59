"""The engine's compile cache, as vLLM keeps it: compile once at start, save the artifact
under `$VLLM_CACHE_ROOT/torch_compile_cache/`, and load it on the next start instead.

With `--compile-seconds N` the simulator's start pays N seconds of compilation unless the
cache holds the artifact for this model and context. It logs vLLM's own lines, so
`warmgate --cache-dir` can be shown a hit, a miss and (with a corrupt file) a load failure.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from warmgate.sim.settings import VERSION

ARTIFACT = b"warmgate-sim compiled graph v1\n"


def artifact_path(model: str, max_model_len: int, environ: dict[str, str] | None = None) -> Path:
    """Where the artifact of this model and context lives (vLLM hashes its config too)."""
    env = os.environ if environ is None else environ
    root = Path(env.get("VLLM_CACHE_ROOT") or Path.home() / ".cache" / "vllm")
    key = hashlib.sha256(f"{VERSION}|{model}|{max_model_len}".encode()).hexdigest()[:16]
    return root / "torch_compile_cache" / "torch_aot_compile" / key / "rank_0_0" / "model"


def load(path: Path) -> str | None:
    """None when the artifact was loaded, else why it was not ("" when there is none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if data == ARTIFACT else "Compile cache file corrupted."


def save(path: Path) -> None:
    """Write aside and rename, so a reader never sees half an artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    aside.write_bytes(ARTIFACT)
    os.replace(aside, path)


def log_line(message: str) -> str:
    """vLLM's worker-log prefix around `message`."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    return f"(Worker pid={os.getpid()}) INFO {stamp} [decorators.py:333] [backbone] {message}"
