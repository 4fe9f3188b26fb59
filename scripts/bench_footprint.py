"""Supervisor footprint benchmark (issue 8): warmgate next to tini and dumb-init, in one run.

    .venv/bin/python scripts/bench_footprint.py [--runs 20] [--idle 10] [--json FILE]

For each supervisor (warmgate, `tini`, `dumb-init`) it measures:
1. time from spawning the supervisor to the exec of its child: the child is `date +%s%N`,
   compared with a CLOCK_REALTIME stamp taken just before the supervisor is spawned (median
   and p90 of --runs runs, the supervisors interleaved so machine load hits them alike);
   warmgate also in warm-up mode (--upstream given: the probe port is bound before the spawn);
2. RSS of the supervisor process alone, idle over `sleep` (plain mode);
3. CPU seconds (user + system) of that idle supervisor over --idle seconds;
and for warmgate in warm-up mode over `warmgate sim`, after /ready turned 200: its own RSS
(probe server, upstream client and metrics loaded) and CPU over --idle seconds (health polls).

Goals (issue 8): the child exec'd within 300 ms of `warmgate run` starting; idle RSS <= 50 MB.
Missing tools are skipped with the command that installs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from warmgate.bench.core import free_port

BIN = Path(sys.executable).parent
WARMGATE = str(BIN / "warmgate")
EXEC_GOAL_MS = 300.0
RSS_GOAL_MB = 50.0
INSTALL = {
    "tini": "apt-get install -y tini   (Debian package)",
    "dumb-init": f"{BIN / 'pip'} install dumb-init   (PyPI; or: pip install '.[bench]')",
}


def supervisors() -> dict[str, list[str]]:
    """argv prefix of each supervisor that is installed, in table order."""
    found = {"warmgate": [WARMGATE, "run", "--"]}
    tini = shutil.which("tini")
    if tini is not None:
        found["tini"] = [tini, "-s", "--"]  # -s: subreaper, as warmgate is when not PID 1
    dumb_init = shutil.which("dumb-init") or shutil.which(str(BIN / "dumb-init"))
    if dumb_init is not None:
        found["dumb-init"] = [dumb_init, "--"]
    for name, how in INSTALL.items():
        if name not in found:
            print(
                f"# {name} is not installed; its column is skipped. Install: {how}", file=sys.stderr
            )
    return found


def _warmup_prefix() -> list[str]:
    """warmgate in warm-up mode whose upstream never answers: binds its probe port, spawns."""
    return [
        WARMGATE,
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--upstream",
        f"http://127.0.0.1:{free_port()}",
        "--",
    ]


# --- 1. time from spawning the supervisor to its child's exec ---------------------------


def time_to_exec_ms(prefix: Sequence[str]) -> float:
    date = shutil.which("date") or "date"
    began = time.time_ns()
    out = subprocess.run(
        [*prefix, date, "+%s%N"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30
    ).stdout.split()
    if not out:
        raise RuntimeError(f"`{' '.join(prefix)} date` printed nothing")
    return (int(out[-1]) - began) / 1e6


def exec_times(prefixes: dict[str, Any], runs: int) -> dict[str, list[float]]:
    """Interleaved runs: each round runs every supervisor once."""
    times: dict[str, list[float]] = {name: [] for name in prefixes}
    for prefix in prefixes.values():  # one unmeasured run each: page cache, .pyc files
        time_to_exec_ms(prefix() if callable(prefix) else prefix)
    for _ in range(runs):
        for name, prefix in prefixes.items():
            times[name].append(time_to_exec_ms(prefix() if callable(prefix) else prefix))
    return times


def p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


# --- 2 and 3. idle RSS and CPU ------------------------------------------------------------


@contextlib.contextmanager
def started(argv: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def idle_figures(pid: int, settle: float, idle: float) -> dict[str, float]:
    """RSS of this one process after `settle` seconds, and its CPU seconds over `idle` more."""
    process = psutil.Process(pid)
    time.sleep(settle)
    before = process.cpu_times()
    rss = process.memory_info().rss
    time.sleep(idle)
    after = process.cpu_times()
    return {
        "rss_mb": rss / 2**20,
        "rss_end_mb": process.memory_info().rss / 2**20,
        "cpu_s": (after.user - before.user) + (after.system - before.system),
    }


def idle_plain(prefix: Sequence[str], idle: float, log: Path) -> dict[str, float]:
    with started([*prefix, "sleep", "1000"], log) as proc:
        return idle_figures(proc.pid, settle=2.0, idle=idle)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def idle_after_ready(idle: float, timeout: float, log: Path) -> dict[str, float]:
    """warmgate in warm-up mode over the simulator (time scale 0), from /ready 200 on."""
    port, sim_port = free_port(), free_port()
    argv = [WARMGATE, "run", "--host", "127.0.0.1", "--port", str(port), "--"]
    argv += [WARMGATE, "sim", "--host", "127.0.0.1", "--port", str(sim_port)]
    argv += ["--max-model-len", "2048", "--time-scale", "0", "--load-seconds", "0"]
    with started(argv, log) as proc:
        began = time.monotonic()
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"warmgate exited with {proc.returncode}; see {log}")
            if time.monotonic() - began > timeout:
                raise RuntimeError(f"not Ready within {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        figures = idle_figures(proc.pid, settle=2.0, idle=idle)
        figures["spawn_to_ready_s"] = time.monotonic() - began
        return figures


# --- the report ---------------------------------------------------------------------------


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs <= 0:
        return "-"
    return f"{ours / theirs:,.0f}x" if ours / theirs >= 10 else f"{ours / theirs:.1f}x"


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(figures: dict[str, Any]) -> str:
    names = ["warmgate", "tini", "dumb-init"]
    sup = figures["supervisors"]

    def get(name: str, key: str) -> float | None:
        value = sup.get(name, {}).get(key)
        return None if value is None else float(value)

    idle = f"{figures['idle_s']:g} s"
    rows: list[tuple[str, str, int, float | None]] = [  # label, key, decimals, goal
        ("time to child exec, plain: median ms", "exec_median_ms", 1, EXEC_GOAL_MS),
        ("time to child exec, plain: p90 ms", "exec_p90_ms", 1, EXEC_GOAL_MS),
        ("time to child exec, warm-up mode: median ms", "warmup_exec_median_ms", 1, EXEC_GOAL_MS),
        ("time to child exec, warm-up mode: p90 ms", "warmup_exec_p90_ms", 1, EXEC_GOAL_MS),
        ("idle RSS, plain: MB", "idle_rss_mb", 1, RSS_GOAL_MB),
        ("idle RSS after Ready, warm-up mode over the sim: MB", "ready_rss_mb", 1, RSS_GOAL_MB),
        (f"idle CPU, plain: s over {idle}", "idle_cpu_s", 3, None),
        (f"idle CPU after Ready: s over {idle}", "ready_cpu_s", 3, None),
    ]
    lines = [
        "| figure | " + " | ".join(names) + " | warmgate / tini | warmgate / dumb-init | goal |",
        "|---|" + "---:|" * (len(names) + 2) + "---|",
    ]
    for label, key, digits, goal in rows:
        ours = get("warmgate", key)
        cells = [_cell(get(name, key), digits) for name in names]
        verdict = ""
        if goal is not None and ours is not None:
            verdict = f"<= {goal:g}: {'met' if ours <= goal else '**not met**'}"
        ratios = [_ratio(ours, get(other, key)) for other in ("tini", "dumb-init")]
        lines.append(f"| {label} | " + " | ".join([*cells, *ratios, verdict]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per time-to-exec figure")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to Ready")
    parser.add_argument("--no-warmup", action="store_true", help="skip the simulator run")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    found = supervisors()
    prefixes: dict[str, Any] = dict(found)
    prefixes["warmgate, warm-up mode"] = _warmup_prefix
    prefixes["no supervisor"] = []
    print(f"# time to child exec: {args.runs} interleaved runs each ...", file=sys.stderr)
    times = exec_times(prefixes, args.runs)
    sup: dict[str, dict[str, Any]] = {name: {} for name in found}
    for name in found:
        sup[name].update(
            exec_median_ms=statistics.median(times[name]),
            exec_p90_ms=p90(times[name]),
            exec_ms=times[name],
        )
    warm = times["warmgate, warm-up mode"]
    sup["warmgate"].update(
        warmup_exec_median_ms=statistics.median(warm),
        warmup_exec_p90_ms=p90(warm),
        warmup_exec_ms=warm,
    )
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        for name, prefix in found.items():
            print(f"# idle {name}: {args.idle:g} s ...", file=sys.stderr)
            idle = idle_plain(prefix, args.idle, Path(tmp) / f"{name}.log")
            sup[name].update(idle_rss_mb=idle["rss_mb"], idle_cpu_s=idle["cpu_s"])
        if not args.no_warmup:
            print("# warmgate over the simulator: waiting for Ready ...", file=sys.stderr)
            ready = idle_after_ready(args.idle, args.ready_timeout, Path(tmp) / "ready.log")
            sup["warmgate"].update(
                ready_rss_mb=ready["rss_mb"],
                ready_rss_end_mb=ready["rss_end_mb"],
                ready_cpu_s=ready["cpu_s"],
                spawn_to_ready_s=ready["spawn_to_ready_s"],
            )
    floor = times["no supervisor"]
    figures = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "python": platform.python_version(),
        "runs": args.runs,
        "idle_s": args.idle,
        "no_supervisor_exec_median_ms": statistics.median(floor),
        "supervisors": sup,
    }
    print(table(figures))
    print(
        f"\nSpawning `date` directly (no supervisor): {statistics.median(floor):.1f} ms median; "
        "every time to exec includes that floor. CPU time is counted in clock ticks (10 ms)."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
