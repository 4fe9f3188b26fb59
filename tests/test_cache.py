"""--cache-dir: keys, directories, the slot lock, unusable volumes, and hit/miss."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from warmgate import cache
from warmgate.cache import CacheDirs, CacheReport, child_env, key_for, prepare, snapshot

COMMAND = ("vllm", "serve", "Qwen/Qwen2.5-0.5B", "--max-model-len", "4096")
GPU = "NVIDIA H100 80GB HBM3"
DIR_VARS = [var for var, _ in cache.CACHE_VARS]


@pytest.fixture
def held() -> Iterator[list[CacheDirs]]:
    """Slots a test took; released after it so no lock outlives the test."""
    taken: list[CacheDirs] = []
    yield taken
    for dirs in taken:
        dirs.release()


def take(
    held: list[CacheDirs], cache_dir: Path, environ: dict[str, str] | None = None, **kw: Any
) -> CacheDirs:
    dirs, warnings = prepare(cache_dir, "img:v1", COMMAND, environ or {}, GPU, **kw)
    assert dirs is not None, warnings
    assert warnings == []
    held.append(dirs)
    return dirs


# --- the key ---------------------------------------------------------------------------


def test_key_is_readable_and_stable() -> None:
    key = key_for("vllm/vllm-openai:v0.6.3", COMMAND, GPU)
    assert key == key_for("vllm/vllm-openai:v0.6.3", list(COMMAND), GPU)
    prefix, digest = key.rsplit("-", 1)
    assert prefix == "vllm_vllm-openai_v0.6.3-NVIDIA_H100_80GB_HBM3"
    assert len(digest) == 12 and int(digest, 16) >= 0


def test_key_defaults_and_unsafe_text() -> None:
    assert key_for(None, COMMAND, None).startswith("nokey-cpu-")
    odd = key_for("../../etc", COMMAND, "")
    assert "/" not in odd and not odd.startswith(".")
    assert len(key_for("x" * 500, COMMAND, GPU)) < 120


def test_key_changes_with_what_invalidates_the_cache() -> None:
    keys = {
        key_for("img:v1", COMMAND, GPU),
        key_for("img:v2", COMMAND, GPU),
        key_for(None, COMMAND, GPU),
        key_for("img:v1", (*COMMAND, "--enforce-eager"), GPU),
        key_for("img:v1", ("vllm serve", *COMMAND[2:]), GPU),  # argv boundaries count
        key_for("img:v1", COMMAND, "NVIDIA A100-SXM4-80GB"),
        key_for("img:v1", COMMAND, None),
    }
    assert len(keys) == 7


def test_key_ignores_where_the_server_listens_its_api_key_and_logging() -> None:
    base = key_for("img:v1", COMMAND, GPU)
    same = [
        (*COMMAND, "--port", "8001", "--host", "0.0.0.0"),
        (*COMMAND, "--port=9000", "--api-key", "s3cret", "--enable-log-requests"),
        ("--host", "::", *COMMAND, "--uvicorn-log-level", "debug", "--disable-log-stats"),
    ]
    assert {key_for("img:v1", c, GPU) for c in same} == {base}
    # A value that only looks like a skipped option's is still part of the key.
    assert key_for("img:v1", (*COMMAND, "--served-model-name", "--port"), GPU) != base


# --- directories and the child's environment ---------------------------------------------


def test_prepare_creates_a_locked_slot_and_points_every_cache_at_it(
    tmp_path: Path, held: list[CacheDirs]
) -> None:
    dirs = take(held, tmp_path / "vol")  # the volume directory itself is created too
    assert dirs.root == tmp_path / "vol" / key_for("img:v1", COMMAND, GPU) / "slot0"
    assert dirs.slot == 0
    assert set(dirs.env) == {*DIR_VARS, "CUDA_CACHE_MAXSIZE"}
    assert dirs.env["CUDA_CACHE_MAXSIZE"] == str(4 * 1024**3)
    assert dirs.env["VLLM_CACHE_ROOT"] == str(dirs.root / "vllm")
    assert len(dirs.dirs) == len(DIR_VARS)
    for path in dirs.dirs:
        assert path.is_dir() and path.parent == dirs.root
    holder = (dirs.root / ".lock").read_text()
    assert f"pid {os.getpid()}" in holder
    fd = dirs.lock.fd
    assert fd is not None and not os.get_inheritable(fd)


def test_user_variables_win(tmp_path: Path, held: list[CacheDirs]) -> None:
    environ = {
        "TRITON_CACHE_DIR": "/mine/triton",
        "CUDA_CACHE_MAXSIZE": "1",
        "VLLM_CACHE_ROOT": "",
        "PATH": "/bin",
    }
    dirs = take(held, tmp_path, environ)
    assert "TRITON_CACHE_DIR" not in dirs.env and "CUDA_CACHE_MAXSIZE" not in dirs.env
    assert not (dirs.root / "triton").exists()  # not ours to measure
    env = child_env(environ, dirs)
    assert env["TRITON_CACHE_DIR"] == "/mine/triton"
    assert env["CUDA_CACHE_MAXSIZE"] == "1"
    assert env["VLLM_CACHE_ROOT"] == str(dirs.root / "vllm")  # empty reads as unset
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(dirs.root / "inductor")
    assert env["PATH"] == "/bin"
    assert child_env(environ, None) == environ


def test_every_variable_set_means_no_cache(tmp_path: Path) -> None:
    environ = {var: f"/mine/{var}" for var in DIR_VARS}
    dirs, warnings = prepare(tmp_path, None, COMMAND, environ, None)
    assert dirs is None
    assert "already sets" in warnings[0]
    assert list(tmp_path.iterdir()) == []


# --- one writer per slot ------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from warmgate.cache import prepare
dirs, warnings = prepare(Path(sys.argv[1]), "img:v1", {command!r}, {{}}, {gpu!r})
(dirs.dirs[0] / "mine").write_text("x")
print(dirs.root, flush=True)
sys.stdin.read()  # hold the slot until the test closes stdin
"""


def test_a_second_process_never_writes_into_a_held_slot(
    tmp_path: Path, held: list[CacheDirs]
) -> None:
    code = HOLDER.format(command=COMMAND, gpu=GPU)
    other = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        other_root = Path(other.stdout.readline().strip())
        assert other_root.name == "slot0"
        mine = take(held, tmp_path)
        assert mine.slot == 1 and mine.root != other_root
        assert all(str(other_root) not in value for value in mine.env.values())
        assert f"pid {other.pid}" in (other_root / ".lock").read_text()
    finally:
        other.communicate("", timeout=10)
    assert other.returncode == 0
    again = take(held, tmp_path)  # the holder exited: its slot (and its files) are free
    assert again.slot == 0 and (again.dirs[0] / "mine").exists()


def test_lock_is_not_inherited_by_the_child(tmp_path: Path) -> None:
    dirs, _ = prepare(tmp_path, "img:v1", COMMAND, {}, GPU)
    assert dirs is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
        close_fds=False,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"  # exec is done
        dirs.release()  # warmgate is gone; the engine it spawned lives on
        with open(tmp_path / "reuses-the-fd-number", "w") as other:
            dirs.release()  # a second release must not close someone else's fd
            other.write("still open")
        after, _ = prepare(tmp_path, "img:v1", COMMAND, {}, GPU)
        assert after is not None and after.slot == 0
        after.release()
    finally:
        child.kill()
        child.wait()


def test_all_slots_taken_means_no_cache(tmp_path: Path, held: list[CacheDirs]) -> None:
    take(held, tmp_path, max_slots=1)
    dirs, warnings = prepare(tmp_path, "img:v1", COMMAND, {}, GPU, max_slots=1)
    assert dirs is None
    assert "all 1 slots" in warnings[0] and "without the compile cache" in warnings[0]


# --- volumes that cannot hold a cache -------------------------------------------------------

PROBE = """
import json, sys
from pathlib import Path
from warmgate.cache import prepare
out = {}
for name, min_free in (("default", None), ("no_minimum", 0)):
    kw = {} if min_free is None else {"min_free_bytes": min_free}
    dirs, warnings = prepare(Path(sys.argv[1]), "img:v1", ["vllm", "serve"], {}, None, **kw)
    out[name] = {"dirs": None if dirs is None else str(dirs.root), "warnings": warnings}
print(json.dumps(out))
"""


def in_mount_namespace(tmp_path: Path, setup: str) -> dict[str, Any]:
    """Run PROBE on tmp_path/vol after `setup` (shell, with $VOL) in a private mount namespace."""
    vol = tmp_path / "vol"
    vol.mkdir()
    script = f'VOL="$1"; {{ {setup}; }} || exit 97; exec "$2" -c "$3" "$VOL"'
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(vol),
            sys.executable,
            PROBE,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode == 97 or result.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount in a private namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


@pytest.fixture(scope="module")
def mounts_allowed() -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private mount namespace")


@pytest.mark.usefixtures("mounts_allowed")
def test_read_only_volume_warns_and_goes_on(tmp_path: Path) -> None:
    out = in_mount_namespace(tmp_path, 'mount -t tmpfs -o ro,size=4g tmpfs "$VOL"')
    for attempt in out.values():
        assert attempt["dirs"] is None
        assert "read-only" in attempt["warnings"][0]


@pytest.mark.usefixtures("mounts_allowed")
def test_full_volume_warns_and_goes_on(tmp_path: Path) -> None:
    fill = 'dd if=/dev/zero of="$VOL/f" bs=4k 2>/dev/null; true'  # stops at ENOSPC
    out = in_mount_namespace(tmp_path, f'mount -t tmpfs -o size=64k tmpfs "$VOL" && {{ {fill}; }}')
    assert out["default"]["dirs"] is None
    assert "0 MiB free" in out["default"]["warnings"][0]
    # Past the free-space check, the first write (the holder line) meets ENOSPC.
    assert out["no_minimum"]["dirs"] is None
    assert "full" in out["no_minimum"]["warnings"][0]


def test_file_where_the_volume_should_be(tmp_path: Path) -> None:
    (tmp_path / "vol").write_text("oops")
    dirs, warnings = prepare(tmp_path / "vol" / "cache", None, COMMAND, {}, None)
    assert dirs is None
    assert "not a directory" in warnings[0] and "without the compile cache" in warnings[0]


# --- size and hit ---------------------------------------------------------------------------


def test_snapshot_counts_files_and_bytes(tmp_path: Path, held: list[CacheDirs]) -> None:
    dirs = take(held, tmp_path)
    nested = dirs.root / "triton" / "abc"
    nested.mkdir()
    (nested / "k.cubin").write_bytes(b"x" * 1000)
    (dirs.root / "vllm" / "graph.py").write_bytes(b"y" * 24)
    (dirs.root / "cuda" / "link").symlink_to("/etc")  # not followed, not counted
    (dirs.root / "stray").write_bytes(b"z" * 5000)  # outside the compile directories
    snap = snapshot(dirs)
    assert (snap.size_bytes, snap.file_count) == (1024, 2)
    assert snap.paths == {"triton/abc/k.cubin", "vllm/graph.py"}


def test_hit_means_no_new_file(tmp_path: Path, held: list[CacheDirs]) -> None:
    dirs = take(held, tmp_path)
    kernel = dirs.root / "triton" / "k.cubin"

    cold = CacheReport(dirs)
    cold.record("start", snapshot(dirs))
    assert cold.hit is None  # one snapshot says nothing yet
    kernel.write_bytes(b"x" * 10)
    cold.record("healthy", snapshot(dirs))
    cold.record("warm", snapshot(dirs))
    assert cold.hit is False and cold.new_files == 1

    warm = CacheReport(dirs)
    warm.record("start", snapshot(dirs))
    kernel.write_bytes(b"x" * 20)  # rewritten in place: bigger, but not new
    warm.record("warm", snapshot(dirs))
    assert warm.hit is True and warm.new_files == 0
    assert warm.sizes() == {"start": 10, "warm": 20}
    status = warm.as_status()
    assert json.loads(json.dumps(status)) == status
    assert status["hit"] is True and status["slot"] == 0
    assert status["sizes"]["warm"] == {"bytes": 20, "files": 1}


def test_hit_is_unknown_when_nothing_was_ever_compiled(
    tmp_path: Path, held: list[CacheDirs]
) -> None:
    dirs = take(held, tmp_path)
    report = CacheReport(dirs)
    report.record("start", snapshot(dirs))
    report.record("warm", snapshot(dirs))
    assert report.hit is None and report.new_files == 0


# vLLM 0.32's own lines (decorators.py), as the CPU build printed them on a second start.
VLLM_LOAD_FAILURE = (
    b"(Worker pid=19065) WARNING 11-23 15:51:11 [decorators.py:333] [backbone] Compiling model "
    b"again due to a load failure from /c/torch_compile_cache/torch_aot_compile/f3f6/rank_0_0/"
    b"model, reason: 'function' object has no attribute 'finalize_loading'\n"
)
VLLM_LOADED = (
    b"(Worker pid=7) INFO 11-23 15:51:11 [decorators.py:320] [backbone] Directly load AOT "
    b"compilation from path /c/torch_compile_cache/torch_aot_compile/f3f6/rank_0_0/model\n"
)


def test_engine_log_counts_loads_and_keeps_failure_reasons_across_odd_splits() -> None:
    log = cache.EngineCacheLog()
    data = b"noise\n" + VLLM_LOADED + VLLM_LOAD_FAILURE + b"more noise"
    for i in range(0, len(data), 7):  # the pump hands over whatever read() returned
        log.feed(1, data[i : i + 7])
    log.feed(2, VLLM_LOADED)  # another stream keeps its own unfinished line
    assert log.as_status() == {
        "loaded": 2,
        "load_failures": ["'function' object has no attribute 'finalize_loading'"],
    }


def test_outcome_reads_files_and_the_engine(tmp_path: Path, held: list[CacheDirs]) -> None:
    dirs = take(held, tmp_path)
    (dirs.root / "vllm" / "graph").write_bytes(b"g")
    filled = CacheReport(dirs)
    filled.record("start", snapshot(dirs))
    filled.record("warm", snapshot(dirs))
    assert (filled.outcome, filled.hit) == ("hit", True)
    # The files stayed the same, but the engine says it could not load them: not a hit.
    filled.engine.feed(1, VLLM_LOAD_FAILURE)
    assert (filled.outcome, filled.hit) == ("partial", False)
    status = filled.as_status()
    assert status["outcome"] == "partial" and status["engine"]["load_failures"]

    grown = CacheReport(dirs)
    grown.record("start", snapshot(dirs))
    (dirs.root / "vllm" / "graph2").write_bytes(b"g")
    grown.record("warm", snapshot(dirs))
    assert (grown.outcome, grown.hit, grown.new_files) == ("partial", False, 1)


def test_second_start_over_the_sim_hits_its_compile_cache(tmp_path: Path) -> None:
    """Three real starts of warmgate over the simulator, which compiles at start and keeps
    the artifact where vLLM does: cold fills the cache, warm loads it, corrupt recompiles.
    The same command line each time (the cache key includes it), as in a Deployment."""
    from wgutil import free_port

    ports = (free_port(), free_port())
    first = _start_with_cache(tmp_path, *ports)
    assert first["outcome"] == "miss" and first["hit"] is False
    assert first["engine"] == {"loaded": 0, "load_failures": []}

    second = _start_with_cache(tmp_path, *ports)
    assert second["outcome"] == "hit" and second["hit"] is True and second["new_files"] == 0
    assert second["engine"] == {"loaded": 1, "load_failures": []}
    assert second["sizes"]["start"]["files"] >= 1

    for artifact in tmp_path.rglob("torch_aot_compile/*/rank_0_0/model"):
        artifact.write_bytes(b"truncated")
    third = _start_with_cache(tmp_path, *ports)
    assert third["outcome"] == "partial" and third["hit"] is False
    assert third["engine"] == {"loaded": 0, "load_failures": ["Compile cache file corrupted."]}


def _start_with_cache(cache_dir: Path, port: int, sim_port: int) -> dict[str, Any]:
    """One `warmgate run --cache-dir` over the sim, to Ready: /status's cache section."""
    from wgutil import Running, http_get

    sim = [sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1", "--port",
           str(sim_port), "--load-seconds", "0", "--compile-seconds", "0.5",
           "--time-scale", "0", "--max-model-len", "512"]  # fmt: skip
    args = ["run", "--host", "127.0.0.1", "--port", str(port), "--cache-dir", str(cache_dir),
            "--features", "greedy", "--concurrency", "1", "--max-repeats", "2", "--", *sim]  # fmt: skip
    running = Running(args)
    try:
        running.wait_event("cache", timeout=60, phase="warm")
        status, body = http_get(port, "/status")
        assert status == 200, body
        running.proc.terminate()
        assert running.wait(timeout=30) == 0
    finally:
        running.stop()
    assert isinstance(body["cache"], dict)
    return body["cache"]


# --- the GPU name ---------------------------------------------------------------------------


def test_gpu_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from warmgate import telemetry

    assert cache.gpu_name() is None or isinstance(cache.gpu_name(), str)  # the real NVML
    monkeypatch.setattr(telemetry, "gpus", lambda: [{"name": GPU}, {"name": GPU}])
    assert cache.gpu_name() == GPU
    monkeypatch.setattr(telemetry, "gpus", lambda: [{"name": "B"}, {"name": "A"}])
    assert cache.gpu_name() == "A+B"
    monkeypatch.setattr(telemetry, "gpus", lambda: None)
    assert cache.gpu_name() is None

    def broken() -> None:
        raise RuntimeError("NVML went away")

    monkeypatch.setattr(telemetry, "gpus", broken)
    assert cache.gpu_name() is None
