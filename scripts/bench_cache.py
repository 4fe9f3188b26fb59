"""Compile-cache benchmark: time to Ready of a first and a second start with --cache-dir.

    .venv/bin/python scripts/bench_cache.py            # the real vLLM CPU build (scripts/real_vllm.sh)
    .venv/bin/python scripts/bench_cache.py --sim      # warmgate sim, 20 s of compilation at start
    .venv/bin/python scripts/bench_cache.py --command "CMD"   # any server (host/port appended)

Both starts run `warmgate run --cache-dir DIR -- <server>` with the same fresh DIR, the
same command line (the cache key includes it) and no other compile cache: the first fills
it, the second should find it. Prints a markdown table per start: spawn->healthy,
spawn->Ready, cache size, and /status's verdict (hit, outcome, what the engine's own log
said it loaded or failed to load).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from warmgate.bench.core import Stop, free_port, stop_session

ROOT = Path(__file__).resolve().parent.parent
# A short warm-up: both starts run the same one, so the difference is the engine's own start.
WARMUP = ("--features", "greedy,logprobs", "--concurrency", "1,4", "--max-repeats", "2")


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")
    except (OSError, ValueError):
        return 0, None


def one_start(
    command: list[str], cache: Path, env: dict[str, str], log: Path, upstream: int
) -> dict[str, Any]:
    probe = free_port()
    argv = [sys.executable, "-m", "warmgate", "run", "--host", "127.0.0.1", "--port", str(probe),
            "--log-format", "json", "--cache-dir", str(cache), *WARMUP, "--",
            *command, "--host", "127.0.0.1", "--port", str(upstream)]  # fmt: skip
    began = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)
        healthy = None
        try:
            while time.monotonic() - began < 1800:
                if proc.poll() is not None:
                    raise SystemExit(f"warmgate exited with {proc.returncode}; see {log}")
                status, body = get(probe, "/ready")
                if healthy is None and body and body.get("phase") in ("warming", "ready"):
                    healthy = time.monotonic() - began
                if status == 200:
                    break
                time.sleep(0.25)
            ready = time.monotonic() - began
            _, status_body = get(probe, "/status")
        finally:
            stop_session(proc, Stop(timeout_s=60.0))
    return {"healthy_s": healthy, "ready_s": ready, "cache": status_body["cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--command", help="server command line (host/port appended)")
    parser.add_argument(
        "--sim", action="store_true", help="warmgate sim with --compile-seconds 20 instead"
    )
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the third start (empty cache, warm page cache) that separates the two",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(tempfile.mkdtemp(prefix="warmgate-cache-bench-"))
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sim = f"{sys.executable} -m warmgate sim --max-model-len 2048 --compile-seconds 20"
    command_line = (
        args.command
        or (sim if args.sim else None)
        or subprocess.run(
            ["bash", str(ROOT / "scripts" / "real_vllm.sh")],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    command = shlex.split(command_line)
    env = dict(os.environ)
    for name in (
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "CUDA_CACHE_PATH",
    ):
        env.pop(name, None)  # --cache-dir must be the only cache either start can use
    port = free_port()  # one command line for every start, as in a Deployment
    with tempfile.TemporaryDirectory(prefix="warmgate-cache-") as cache:
        rows = [
            ("1: empty cache", one_start(command, Path(cache), env, args.out / "start1.log", port)),
            ("2: same cache", one_start(command, Path(cache), env, args.out / "start2.log", port)),
        ]
    if args.control:  # the OS page cache is warm now too: what is left is the compile cache
        with tempfile.TemporaryDirectory(prefix="warmgate-cache-") as cache:
            control = one_start(command, Path(cache), env, args.out / "start3.log", port)
            rows.append(("3: empty cache again (control)", control))
    print(
        "| start | spawn→healthy s | spawn→Ready s | cache after warm-up | new files | hit "
        "| outcome | engine loaded | engine load failures |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|---|")
    for name, row in rows:
        c = row["cache"]
        last = c["sizes"].get("warm") or c["sizes"].get("healthy") or {}
        engine = c.get("engine") or {}
        failures = "; ".join(engine.get("load_failures") or []) or "-"
        print(
            f"| {name} | {row['healthy_s']:.1f} | {row['ready_s']:.1f} | "
            f"{last.get('bytes', 0) / 1e6:.1f} MB, {last.get('files', 0)} files | "
            f"{c['new_files']} | {c['hit']} | {c['outcome']} | {engine.get('loaded')} | "
            f"{failures} |"
        )
    first, second = rows[0][1], rows[1][1]
    print(
        f"\nsecond/first time to Ready: {second['ready_s'] / first['ready_s']:.2f}; "
        f"engine start (spawn→healthy): {second['healthy_s'] / first['healthy_s']:.2f}"
    )
    if args.control:
        third = rows[2][1]
        print(
            f"second/control time to Ready: {second['ready_s'] / third['ready_s']:.2f}; "
            f"engine start: {second['healthy_s'] / third['healthy_s']:.2f}"
        )
    print(f"logs in {args.out}")


if __name__ == "__main__":
    main()
