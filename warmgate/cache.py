"""`--cache-dir`: a compile cache on a volume, keyed, locked, and measured.

Layout on the volume:

    <cache_dir>/<key>/slot<N>/.lock          who holds the slot (flock, and a line of text)
    <cache_dir>/<key>/slot<N>/vllm/          VLLM_CACHE_ROOT (vLLM's torch_compile_cache)
    <cache_dir>/<key>/slot<N>/triton/        TRITON_CACHE_DIR
    <cache_dir>/<key>/slot<N>/cuda/          CUDA_CACHE_PATH (the driver's JIT cache)
    <cache_dir>/<key>/slot<N>/flashinfer/    FLASHINFER_WORKSPACE_BASE
    <cache_dir>/<key>/slot<N>/inductor/      TORCHINDUCTOR_CACHE_DIR (vLLM overrides it)
    <cache_dir>/<key>/quarantine.json        shapes that killed the engine, shared by the slots

The key (`key_for`) names what invalidates a cache: `--cache-key` (the image tag, say),
the child's command line and the GPU model.

Shared-volume rule: one writer per slot. warmgate takes an exclusive, non-blocking
`flock` on `slot<N>/.lock`, trying slot0, slot1, ... in turn, and holds it for its whole
life; the kernel drops it when warmgate exits, SIGKILL included, so a dead pod never
leaves a stale lock. The fd is close-on-exec, so the engine never inherits it. A pod
that finds every slot (`max_slots`) taken runs without the cache. Why slots rather than
"one directory per key, latecomers get a throwaway": a pod holds its lock for as long
as it serves, so with 2 replicas, or a rolling update that starts the new pod before the
old one stops, a single directory would leave every second pod cold forever; with
slots each of them warms its own once and reuses it afterwards. The price is up to
`max_slots` copies of the cache per key on the volume.

The quarantine is one JSON file per key, `{"key": ..., "shapes": [record, ...]}`, each
record a `plan.ShapeKey` with `reason` (in_flight | not_known_safe), `exit_code` and `at`.
It is replaced whole (a temp file, then rename), so a reader never sees half of it; two
pods that write at once keep the last one's merge. A new key starts without one.

On NFS, Linux emulates flock with POSIX byte-range locks, which the server enforces
across clients with NFSv4 (or NFSv3 with lockd); a volume mounted `nolock` or
`local_lock=all` only locks within one node. An NFSv4 client cut off for longer than
the lease (90 s by default) can lose its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmgate.childlog import LineScanner

# (variable, subdirectory of the slot) for each cache the child is pointed at.
CACHE_VARS: tuple[tuple[str, str], ...] = (
    ("VLLM_CACHE_ROOT", "vllm"),
    ("TRITON_CACHE_DIR", "triton"),
    ("CUDA_CACHE_PATH", "cuda"),
    ("FLASHINFER_WORKSPACE_BASE", "flashinfer"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
)
# The CUDA JIT cache's maximum (4 GiB); NVIDIA's default is far smaller and evicts.
CUDA_CACHE_MAXSIZE = 4 * 1024**3
MAX_SLOTS = 8
# Less free space than this and the engine could die of ENOSPC mid-compile.
MIN_FREE_BYTES = 1024**3
LOCK_FILE = ".lock"
QUARANTINE_FILE = "quarantine.json"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class SlotLock:
    """The open, flock-ed `.lock` of a slot; closing it gives the slot up."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def release(self) -> None:
        """Close the fd once; later calls do nothing (its number may be another file's by then)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class CacheDirs:
    """The slot this warmgate holds, and what the child needs to use it.

    The slot stays locked until `release()` or until this process exits: keep the
    object for warmgate's whole life (dropping it does not unlock).
    """

    root: Path  # <cache_dir>/<key>/slot<N>
    key: str
    slot: int
    env: dict[str, str]  # variables warmgate sets for the child (the user set none of them)
    dirs: tuple[Path, ...]  # the compile directories those variables point at: what to measure
    lock: SlotLock = field(repr=False, compare=False)

    def release(self) -> None:
        """Give the slot up; a second call does nothing."""
        self.lock.release()


def key_for(cache_key: str | None, command: Sequence[str], gpu: str | None) -> str:
    """`<cache-key or nokey>-<gpu or cpu>-<12 hex of sha256>`: stable, readable, safe as a name.

    The hash covers the raw `--cache-key`, the GPU name and every argument of the command
    but those that cannot change what the engine compiles (where it listens, its API key,
    its logging), so any change to the rest gives a new key.
    """
    args = _compile_relevant(command)
    digest = hashlib.sha256(json.dumps([cache_key, args, gpu]).encode()).hexdigest()
    return f"{_readable(cache_key, 'nokey')}-{_readable(gpu, 'cpu')}-{digest[:12]}"


# Options of vLLM (and the simulator) that leave compiled artifacts alone: (takes a value?)
_NOT_IN_KEY = {
    "--host": True,
    "--port": True,
    "--api-key": True,
    "--uvicorn-log-level": True,
    "--enable-log-requests": False,
    "--enable-log-outputs": False,
    "--disable-log-requests": False,
    "--disable-log-stats": False,
}


def _compile_relevant(command: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip_value = False
    for arg in command:
        if skip_value:
            skip_value = False
            continue
        name = arg.split("=", 1)[0]
        if name in _NOT_IN_KEY:
            skip_value = _NOT_IN_KEY[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def served_args(command: Sequence[str]) -> list[str]:
    """The command's arguments less where it listens, its API key and its logging: what
    the traffic profile is keyed by (warmgate.profilestore), without the cache key or GPU."""
    return _compile_relevant(command)


def prepare(
    cache_dir: Path,
    cache_key: str | None,
    command: Sequence[str],
    environ: Mapping[str, str],
    gpu: str | None,
    *,
    max_slots: int = MAX_SLOTS,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> tuple[CacheDirs | None, list[str]]:
    """Create and lock a slot for this run, before the child starts.

    Returns (None, [warning]) when the volume cannot hold a cache (read-only, full,
    not a directory, every slot taken) or when the user set every cache variable:
    warmgate then goes on without a cache and the child keeps its defaults.
    """
    wanted = [(var, sub) for var, sub in CACHE_VARS if not environ.get(var)]
    if not wanted:
        names = ", ".join(var for var, _ in CACHE_VARS)
        return None, [f"--cache-dir {cache_dir}: ignored, the environment already sets {names}"]
    key = key_for(cache_key, command, gpu)
    cache_dir = cache_dir.absolute()  # the child may run elsewhere
    fd = -1
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = _free_bytes(cache_dir)
        if free < min_free_bytes:
            return None, [
                f"--cache-dir {cache_dir}: only {free / 1024**2:.0f} MiB free, less than the "
                f"{min_free_bytes / 1024**2:.0f} MiB a compile may need; "
                "warmgate goes on without the compile cache (free space or grow the volume)"
            ]
        for slot in range(max_slots):
            root = cache_dir / key / f"slot{slot}"
            fd = _try_lock(root)
            if fd >= 0:
                break
        else:
            return None, [
                f"--cache-dir {cache_dir}: all {max_slots} slots of key {key} are in use by "
                "other warmgates; this one goes on without the compile cache"
            ]
        _write_holder(fd)
        dirs = tuple(root / sub for _, sub in wanted)
        for path in dirs:
            path.mkdir(exist_ok=True)
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        return None, [
            f"--cache-dir {cache_dir}: {_explain(exc)}; warmgate goes on without the compile cache"
        ]
    env = {var: str(root / sub) for var, sub in wanted}
    if not environ.get("CUDA_CACHE_MAXSIZE"):
        env["CUDA_CACHE_MAXSIZE"] = str(CUDA_CACHE_MAXSIZE)
    return CacheDirs(root=root, key=key, slot=slot, env=env, dirs=dirs, lock=SlotLock(fd)), []


def quarantine_path(dirs: CacheDirs) -> Path:
    """`<cache_dir>/<key>/quarantine.json`: one per key, whichever slot a pod holds."""
    return dirs.root.parent / QUARANTINE_FILE


def read_quarantine(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The quarantine's records ([] when there is none yet), and a warning when the file
    cannot be read or is not one (the warm-up then runs the whole plan)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"quarantine {path}: {_explain(exc)}; ignored, the whole plan runs"
    except ValueError:
        return [], f"quarantine {path}: not JSON; ignored, the whole plan runs (delete it)"
    shapes = data.get("shapes") if isinstance(data, dict) else None
    if not isinstance(shapes, list):
        return [], f"quarantine {path}: no shapes list; ignored, the whole plan runs (delete it)"
    return [r for r in shapes if isinstance(r, dict)], None


def write_quarantine(path: Path, key: str, records: Sequence[Mapping[str, Any]]) -> str | None:
    """Add `records` to the quarantine (one per model and family, the first kept).

    Atomic: the merge goes to a temp file beside it, fsync-ed, then renamed over it.
    Returns a warning instead of raising: a read-only or full volume must not stop warmgate.
    """
    known, _ = read_quarantine(path)
    merged: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in [*known, *records]:
        merged.setdefault((record.get("model"), record.get("family")), dict(record))
    text = json.dumps({"key": key, "shapes": list(merged.values())}, indent=1)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, text.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        return f"quarantine {path}: {_explain(exc)}; not recorded, the next start runs it again"
    return None


def child_env(environ: Mapping[str, str], dirs: CacheDirs | None) -> dict[str, str]:
    """`environ` plus the cache variables, each only where the user has not set it.

    A variable set to the empty string counts as unset: an empty path is never meant.
    """
    env = dict(environ)
    if dirs is not None:
        env.update({var: value for var, value in dirs.env.items() if not environ.get(var)})
    return env


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """What the compile directories held at one moment."""

    size_bytes: int  # apparent size (st_size) of every regular file
    file_count: int
    paths: frozenset[str]  # every file, as a path under the slot

    def new_files(self, earlier: CacheSnapshot) -> int:
        """How many files exist now that did not at `earlier`."""
        return len(self.paths - earlier.paths)


def snapshot(dirs: CacheDirs) -> CacheSnapshot:
    """Walk the compile directories (os.scandir, no symlinks followed).

    Blocking: a few-GB cache of tens of thousands of files takes tens of milliseconds
    on a local disk, more on NFS, so call it off the event loop. Files that vanish or
    cannot be read mid-walk are skipped.
    """
    size = 0
    paths: set[str] = set()
    under_root = len(str(dirs.root)) + 1  # cheaper than os.path.relpath per file
    stack = [str(top) for top in dirs.dirs]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            size += entry.stat(follow_symlinks=False).st_size
                            paths.add(entry.path[under_root:])
                    except OSError:
                        continue
        except OSError:
            continue
    return CacheSnapshot(size_bytes=size, file_count=len(paths), paths=frozenset(paths))


class EngineCacheLog(LineScanner):
    """The engine's own word on its compile cache, from a copy of its output (pump threads
    call feed): vLLM logs each artifact it loads, and the reason when it cannot load one
    and compiles again (a version mismatch, a corrupt file).
    """

    LOADED = (b"Directly load AOT compilation from path", b"Directly load the compiled graph")
    FAILED = b"due to a load failure from "
    MAX_REASONS = 8

    def __init__(self) -> None:
        super().__init__()
        self.loaded = 0
        self.failures: list[str] = []

    def scan(self, lines: list[bytes]) -> None:
        for line in lines:
            if any(marker in line for marker in self.LOADED):
                self.loaded += 1
            elif self.FAILED in line and len(self.failures) < self.MAX_REASONS:
                _, _, reason = line.partition(b"reason: ")
                self.failures.append(reason.decode(errors="replace").strip() or "unknown")

    def as_status(self) -> dict[str, Any]:
        with self._lock:
            return {"loaded": self.loaded, "load_failures": list(self.failures)}


@dataclass(slots=True)
class CacheReport:
    """Snapshots at named moments ("start", "healthy", "warm") for /status, /metrics and the log."""

    dirs: CacheDirs
    snapshots: dict[str, CacheSnapshot] = field(default_factory=dict)
    engine: EngineCacheLog = field(default_factory=lambda: EngineCacheLog())

    def record(self, when: str, snap: CacheSnapshot) -> None:
        self.snapshots[when] = snap

    @property
    def new_files(self) -> int | None:
        """Files that appeared between the first snapshot and the latest; None before two."""
        if len(self.snapshots) < 2:
            return None
        first, *_, last = self.snapshots.values()
        return last.new_files(first)

    @property
    def hit(self) -> bool | None:
        """True when no new file appeared in the compile directories since the first
        snapshot and the engine did not report failing to load what it found.

        None before two snapshots, and when the directories stayed empty (the engine
        compiled nothing there, so there was nothing to hit).
        """
        outcome = self.outcome
        return None if outcome is None else outcome == "hit"

    @property
    def outcome(self) -> str | None:
        """hit: a filled cache, nothing new and no load failure; partial: a filled cache
        the engine compiled something again beside (new files, or a load failure in its
        log); miss: an empty cache it filled. None while unknown."""
        new = self.new_files
        if new is None:
            return None
        first, *_, last = self.snapshots.values()
        if first.file_count == 0:
            return "miss" if last.file_count else None
        return "partial" if new or self.engine.failures else "hit"

    def sizes(self) -> dict[str, int]:
        """Bytes by moment, in the shape `telemetry.Counters.cache_bytes` takes."""
        return {when: snap.size_bytes for when, snap in self.snapshots.items()}

    def as_status(self) -> dict[str, Any]:
        """The `cache` section of /status (JSON-ready)."""
        return {
            "dir": str(self.dirs.root),
            "key": self.dirs.key,
            "slot": self.dirs.slot,
            "hit": self.hit,
            "outcome": self.outcome,
            "new_files": self.new_files,
            "engine": self.engine.as_status(),
            "sizes": {
                when: {"bytes": snap.size_bytes, "files": snap.file_count}
                for when, snap in self.snapshots.items()
            },
        }


def gpu_name() -> str | None:
    """The GPU model as NVML names it ("NVIDIA H100 80GB HBM3"); None without an NVIDIA GPU.

    Distinct models in one pod are joined with "+". Never raises.
    """
    try:
        from warmgate.telemetry import gpus

        found = gpus()
        if not found:
            return None
        return "+".join(sorted({str(g["name"]) for g in found}))
    except Exception:  # an odd NVML must not stop warmgate: the key just says "cpu"
        return None


def _readable(text: str | None, default: str) -> str:
    cleaned = _UNSAFE.sub("_", text or "").strip("._-")[:48]
    return cleaned or default


def _free_bytes(path: Path) -> float:
    stats = os.statvfs(path)
    if stats.f_blocks == 0:  # some FUSE volumes report no capacity at all: don't judge them
        return float("inf")
    return stats.f_bavail * stats.f_frsize


def _try_lock(root: Path) -> int:
    """The locked fd of `root/.lock`, or -1 when another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    # O_RDWR: NFS emulates flock with POSIX write locks, which need a writable fd.
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_holder(fd: int) -> None:
    """Note who holds the slot; doubles as the probe that the volume takes writes."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {since}\n".encode(), 0)
    os.fsync(fd)


def _explain(exc: OSError) -> str:
    reasons = {
        errno.EROFS: "the volume is read-only (mount it read-write)",
        errno.ENOSPC: "the volume is full (free space or grow it)",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EACCES: "permission denied (check the volume's owner and mode)",
        errno.EPERM: "permission denied (check the volume's owner and mode)",
        errno.ENOTDIR: "a path on the way is a file, not a directory",
        errno.EEXIST: "a path on the way is a file, not a directory",
    }
    where = f" at {exc.filename}" if exc.filename else ""
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{reason}{where}"
