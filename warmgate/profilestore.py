"""Traffic profiles on the `--cache-dir` volume: one file per pod, merged at each start.

Layout:

    <cache_dir>/profiles/<profile key>/<pod>.json       what one pod learned (warmgate.profile)
    <cache_dir>/profiles/<profile key>/imported.json    what `warmgate profile import` merged in

The profile key is the served model and the served arguments (`profile_key`): the command
line less what cannot change what clients send or what the engine serves (where it
listens, its API key, its logging). It is *not* the compile-cache key, which holds the
image tag and the GPU: a profile should outlive a rollout, and traffic does not change
with the image.

Each pod writes only its own file, named after its host name (the pod's name on
Kubernetes), so pods sharing a volume never write the same file; a restarted container of
the same pod carries on from its file. Writes are atomic (a temp file beside it,
fsync-ed, then renamed), so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from warmgate.cache import served_args
from warmgate.errors import WarmgateError
from warmgate.profile import Profile, ProfileError, merge

PROFILES_DIR = "profiles"
IMPORTED = "imported"  # the pod name `warmgate profile import` writes as
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def profile_key(command: Sequence[str]) -> str:
    """`<model>-<12 hex of sha256 of the served arguments>`: readable, stable, safe as a name."""
    args = served_args(command)
    digest = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]
    return f"{_safe(_model_name(command), 'model')}-{digest}"


def _model_name(command: Sequence[str]) -> str:
    """--served-model-name, else --model, else the word after `serve`: the name a reader
    knows the deployment by (the hash tells two deployments of one model apart)."""
    found: dict[str, str] = {}
    for i, word in enumerate(command):
        name, eq, value = word.partition("=")
        if name in ("--served-model-name", "--model") and name not in found:
            value = value if eq else (command[i + 1] if i + 1 < len(command) else "")
            found[name] = value
        elif word == "serve" and i + 1 < len(command) and "serve" not in found:
            found["serve"] = command[i + 1]
    for name in ("--served-model-name", "--model", "serve"):
        if found.get(name) and not found[name].startswith("-"):
            return found[name].rstrip("/").rsplit("/", 1)[-1]
    return ""


def pod_name(environ: Mapping[str, str]) -> str:
    """The pod's name: $HOSTNAME (Kubernetes sets it to the pod's), else the host name."""
    return _safe(environ.get("HOSTNAME") or socket.gethostname(), "pod")


def _safe(text: str, default: str) -> str:
    return _SAFE.sub("_", text).strip("._")[:80] or default


@dataclass(frozen=True)
class ProfileStore:
    """The profile files of one key under one --cache-dir, and this pod's own."""

    cache_dir: Path
    key: str
    pod: str

    @property
    def folder(self) -> Path:
        return self.cache_dir / PROFILES_DIR / self.key

    @property
    def own(self) -> Path:
        return self.folder / f"{self.pod}.json"

    def read_own(self) -> tuple[Profile | None, str | None]:
        """This pod's earlier file (a restarted container carries on), and a warning."""
        try:
            return read_file(self.own), None
        except FileNotFoundError:
            return None, None
        except (OSError, ProfileError) as exc:
            return None, f"{_why(exc)}; this pod starts a new profile"

    def read_all(self) -> tuple[Profile | None, list[str]]:
        """Every pod's file of this key, merged (None when there is none), and a warning for
        each file left out."""
        profiles, warnings = read_folder(self.folder)
        return (merge(profiles, self.key) if profiles else None), warnings

    def write(self, profile: Profile) -> str | None:
        """Write this pod's file; a warning instead of raising (a full or read-only volume
        must not stop warmgate)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_file(self.own, profile)
        except OSError as exc:
            return f"{_why(exc)}; the profile was not written (next try at the next interval)"
        return None


def read_file(path: Path) -> Profile:
    """One profile file; OSError, or ProfileError naming the file."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except ValueError:
        raise ProfileError(f"{path}: not JSON; not a warmgate profile") from None
    return Profile.from_json(data, str(path))


def read_folder(folder: Path) -> tuple[list[Profile], list[str]]:
    """The profiles of one key's folder, and a warning per file that is not one."""
    profiles: list[Profile] = []
    warnings: list[str] = []
    try:
        paths = sorted(folder.glob("*.json"))
    except OSError as exc:
        return [], [_why(exc)]
    for path in paths:
        try:
            profiles.append(read_file(path))
        except (OSError, ProfileError) as exc:
            warnings.append(f"{_why(exc)}; left out of the merge")
    return profiles, warnings


def keys_in(cache_dir: Path) -> list[str]:
    """The profile keys under a --cache-dir (empty when it holds none)."""
    root = cache_dir / PROFILES_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.json")))


def write_file(path: Path, profile: Profile) -> None:
    """Atomic: a temp file beside it, fsync-ed, then renamed over it."""
    text = json.dumps(profile.to_json(), indent=1) + "\n"
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def _why(exc: OSError | ProfileError) -> str:
    if isinstance(exc, ProfileError):
        return str(exc)
    return f"profile {exc.filename}: {exc.strerror or exc}"


# --- `warmgate profile show|export|import` ---------------------------------------------------


def load_for_command(cache_dir: Path, key: str | None) -> Profile:
    """The merged profile of `key` (or of the only key) under `cache_dir`, for the CLI;
    WarmgateError (exit 2) naming the input and the fix."""
    if not cache_dir.is_dir():
        raise WarmgateError(f"--cache-dir {cache_dir}: no such directory")
    keys = keys_in(cache_dir)
    if key is None:
        if not keys:
            raise WarmgateError(
                f"--cache-dir {cache_dir}: holds no traffic profile yet (a pod writes one "
                "after Ready, every --profile-interval and at drain)"
            )
        if len(keys) > 1:
            raise WarmgateError(
                f"--cache-dir {cache_dir}: several profiles; pick one with --key: {', '.join(keys)}"
            )
        key = keys[0]
    elif key not in keys:
        raise WarmgateError(
            f"--key {key}: no profile under {cache_dir} (it has {', '.join(keys) or 'none'})"
        )
    profiles, warnings = read_folder(cache_dir / PROFILES_DIR / key)
    if not profiles:
        raise WarmgateError("; ".join(warnings) or f"--key {key}: no readable profile file")
    return merge(profiles, key)


def import_profile(cache_dir: Path, source: Path, key: str | None) -> Path:
    """Merge a profile file (a pod's, or `show --json`) into `cache_dir`'s `imported.json`
    of its key (or `key`): the next start of that deployment warms from it too."""
    try:
        incoming = read_file(source)
    except OSError as exc:
        raise WarmgateError(f"{source}: {exc.strerror or exc}") from None
    except ProfileError as exc:
        raise WarmgateError(str(exc)) from None
    store = ProfileStore(cache_dir, _safe(key or incoming.key, "profile"), IMPORTED)
    if not cache_dir.is_dir():
        raise WarmgateError(f"--cache-dir {cache_dir}: no such directory")
    earlier, warning = store.read_own()
    if warning is not None:
        raise WarmgateError(f"{warning.split(';')[0]}; move it away, then import again")
    merged = merge([p for p in (earlier, incoming) if p is not None], store.key)
    merged.pods = (IMPORTED,)
    failure = store.write(merged)
    if failure is not None:
        raise WarmgateError(failure.split(";")[0])
    return store.own
