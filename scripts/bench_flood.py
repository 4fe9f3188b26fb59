"""Probe server under a connection flood (issue 16's acceptance benchmark).

    .venv/bin/python scripts/bench_flood.py [--seconds 30] [--idle 1000] [--slowloris 200]
        [--probes 300] [--workers 4] [--nofile 1024] [--json FILE] [--out FILE]

Starts `warmgate run` over `warmgate sim` (a small, fast plan) with `ulimit -n` at --nofile
(the default 1024: an EMFILE would show), waits for /ready 200, then for --seconds holds
--idle connections that send nothing and --slowloris connections that send one header byte
every 0.5 s on the probe port, each reopened as soon as warmgate closes it, from --workers
processes of their own (the flood shares no GIL with the prober). Meanwhile it sends at least
--probes `/ready` probes as the kubelet does (a fresh connection each: connect, GET, read,
close; 1 s timeout, the kubelet's default) and reports: probes sent, whether all answered
200, p50/p99 ms, warmgate's RSS before and after the flood (psutil) and its open descriptors,
and the evictions the flood saw (a connection reset by warmgate before it sent a whole head).

Goals (issue 16): every probe 200; p99 <= 50 ms; RSS growth <= 20 MB. Loopback only; it stops
by itself after --seconds (and the warm-up it waits for, at most --ready-timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from warmgate.bench.core import free_port
from warmgate.probe import HEAD_TIMEOUT_S

P99_GOAL_MS = 50.0
RSS_GOAL_MB = 20.0
PROBE_TIMEOUT_S = 1.0  # the kubelet's default timeoutSeconds
DRIBBLE_S = 0.5
PROBE = b"GET /ready HTTP/1.1\r\nHost: bench\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n"
# A head that never ends: one byte of it every DRIBBLE_S.
SLOW_HEAD = b"GET /ready HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 100_000


# --- the flood, in worker processes ------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.opened = 0
        self.evicted = 0  # reset or closed by warmgate well before the head deadline
        self.closed = 0  # closed (or reset) at the head deadline
        self.connect_errors = 0


async def _hold(port: int, slow: bool, until: float, tally: Tally) -> None:
    """One connection slot: open, send nothing (or dribble), reopen when warmgate closes it."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.connect_errors += 1
            await asyncio.sleep(0.05)
            continue
        tally.opened += 1
        opened_at = time.monotonic()
        ended = asyncio.ensure_future(reader.read(65536))
        sent = 0
        try:
            while time.monotonic() < until:
                done, _ = await asyncio.wait([ended], timeout=DRIBBLE_S if slow else 1.0)
                if done:
                    with contextlib.suppress(ConnectionError):
                        ended.result()
                    if time.monotonic() - opened_at < 0.9 * HEAD_TIMEOUT_S:
                        tally.evicted += 1
                    else:
                        tally.closed += 1
                    break
                if slow:
                    if writer.transport.is_closing():
                        raise ConnectionResetError  # reset, and the read not woken yet
                    writer.write(SLOW_HEAD[sent : sent + 1])
                    sent += 1
        except ConnectionError:  # a write after warmgate reset the connection
            tally.evicted += 1
        finally:
            ended.cancel()
            writer.transport.abort()


async def _flood(port: int, idle: int, slow: int, seconds: float) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    async with asyncio.TaskGroup() as group:
        for i in range(idle + slow):
            group.create_task(_hold(port, i >= idle, until, tally))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the first ones connect while the rest start
    return tally


def flood_worker(port: int, idle: int, slow: int, seconds: float) -> None:
    import uvloop

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = idle + slow + 64
    if hard != resource.RLIM_INFINITY and hard < want:
        raise SystemExit(f"flood worker: ulimit -Hn {hard} < {want}; use more --workers")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    tally = uvloop.run(_flood(port, idle, slow, seconds))
    print(json.dumps(vars(tally)), flush=True)


# --- warmgate and the prober -------------------------------------------------------------


def start_warmgate(probe_port: int, sim_port: int, nofile: int) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "warmgate", "run", "--host", "127.0.0.1",
        "--port", str(probe_port), "--log-format", "json", "--health-interval", "0.1",
        "--features", "greedy", "--concurrency", "1,4", "--max-repeats", "3", "--",
        sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1", "--port", str(sim_port),
        "--max-model-len", "1024", "--time-scale", "0.02", "--load-seconds", "0.5",
    ]  # fmt: skip

    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=limit,
    )


def probe(port: int) -> tuple[int, float]:
    """(status, ms) of one kubelet-style probe; status 0 when it failed or timed out."""
    began = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as conn:
            conn.settimeout(max(0.001, began + PROBE_TIMEOUT_S - time.perf_counter()))
            conn.sendall(PROBE)
            received = b""
            while chunk := conn.recv(4096):
                received += chunk
    except OSError:
        return 0, (time.perf_counter() - began) * 1000
    ms = (time.perf_counter() - began) * 1000
    status = received.split(b" ", 2)[1:2]
    if ms > PROBE_TIMEOUT_S * 1000 or not status or not status[0].isdigit():
        return 0, ms  # the kubelet would have given up
    return int(status[0]), ms


def wait_ready(port: int, gate: subprocess.Popen[bytes], timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if gate.poll() is not None:
            raise SystemExit(f"warmgate exited {gate.returncode} before /ready turned 200")
        if probe(port)[0] == 200:
            return time.monotonic() - began
        time.sleep(0.2)
    raise SystemExit(f"/ready did not turn 200 within {timeout} s")


def stop(gate: subprocess.Popen[bytes]) -> str:
    if gate.poll() is None:
        gate.send_signal(signal.SIGTERM)
        try:
            gate.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(gate.pid, signal.SIGKILL)
    _, err = gate.communicate()
    return err.decode(errors="replace")


def mb(value: float) -> float:
    return value / 1e6


def run(args: argparse.Namespace) -> dict[str, Any]:
    probe_port, sim_port = free_port(), free_port()
    gate = start_warmgate(probe_port, sim_port, args.nofile)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        ready_s = wait_ready(probe_port, gate, args.ready_timeout)
        me = psutil.Process(gate.pid)
        time.sleep(1.0)  # the warm-up worker's exit settles
        rss_before = me.memory_info().rss
        fds_before = me.num_fds()
        shares = [(args.idle + i) // args.workers for i in range(args.workers)]
        slow_shares = [(args.slowloris + i) // args.workers for i in range(args.workers)]
        workers = [
            subprocess.Popen(
                [sys.executable, __file__, "--flood-worker", *map(str, (probe_port, idle, slow)),
                 str(args.seconds)],
                stdout=subprocess.PIPE,
            )
            for idle, slow in zip(shares, slow_shares, strict=True)
        ]  # fmt: skip
        began = time.monotonic()
        time.sleep(min(2.0, args.seconds / 10))  # the flood's connections are up
        window = args.seconds - (time.monotonic() - began) - 0.5
        interval = window / args.probes
        results: list[tuple[int, float]] = []
        fds_max, rss_max = fds_before, rss_before
        next_at = time.monotonic()
        while len(results) < args.probes or time.monotonic() - began < args.seconds - 0.5:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
            results.append(probe(probe_port))
            if len(results) % 10 == 0:
                fds_max = max(fds_max, me.num_fds())
                rss_max = max(rss_max, me.memory_info().rss)
            if len(results) >= args.probes and time.monotonic() - began >= args.seconds:
                break
        outputs = [w.communicate(timeout=args.seconds + 60)[0] for w in workers]
        if any(w.returncode for w in workers):
            raise SystemExit("a flood worker failed (its error is above)")
        tallies = [json.loads(out) for out in outputs]
        time.sleep(0.5)
        rss_after = me.memory_info().rss
        fds_after = me.num_fds()
        gate_alive = gate.poll() is None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        log = stop(gate)
    latencies = [ms for _, ms in results]
    q = statistics.quantiles(latencies, n=100)
    total = {key: sum(t[key] for t in tallies) for key in tallies[0]}
    return {
        "seconds": args.seconds,
        "idle": args.idle,
        "slowloris": args.slowloris,
        "workers": args.workers,
        "nofile": args.nofile,
        "ready_s": round(ready_s, 2),
        "probes": len(results),
        "probes_200": sum(status == 200 for status, _ in results),
        "p50_ms": round(q[49], 2),
        "p99_ms": round(q[98], 2),
        "max_ms": round(max(latencies), 2),
        "rss_before_mb": round(mb(rss_before), 1),
        "rss_after_mb": round(mb(rss_after), 1),
        "rss_max_mb": round(mb(rss_max), 1),
        "rss_growth_mb": round(mb(rss_after - rss_before), 1),
        "fds_before": fds_before,
        "fds_max": fds_max,
        "fds_after": fds_after,
        "flood_opened": total["opened"],
        "evictions_seen": total["evicted"],
        "closed_at_deadline": total["closed"],
        "flood_connect_errors": total["connect_errors"],
        "warmgate_alive": gate_alive,
        "accept_failures_logged": log.count("accept failed"),
    }


def report(f: dict[str, Any]) -> str:
    rate = f["flood_opened"] / f["seconds"]
    all_200 = f["probes_200"] == f["probes"]
    goals = [
        ("every probe 200", all_200, f"{f['probes_200']}/{f['probes']}"),
        (f"p99 <= {P99_GOAL_MS:g} ms", f["p99_ms"] <= P99_GOAL_MS, f"{f['p99_ms']} ms"),
        (
            f"RSS growth <= {RSS_GOAL_MB:g} MB",
            f["rss_growth_mb"] <= RSS_GOAL_MB,
            f"{f['rss_growth_mb']} MB",
        ),
    ]
    rows = [
        ("flood", f"{f['idle']} idle + {f['slowloris']} slowloris for {f['seconds']:g} s, "
                  f"{f['workers']} processes"),
        ("warmgate's ulimit -n", f"{f['nofile']}"),
        ("/ready probes sent (fresh connection each)", f"{f['probes']}"),
        ("answered 200", f"{f['probes_200']} ({'all' if all_200 else 'NOT all'})"),
        ("latency p50 / p99 / max", f"{f['p50_ms']} / {f['p99_ms']} / {f['max_ms']} ms"),
        ("p99 / goal", f"{f['p99_ms'] / P99_GOAL_MS:.2f}"),
        ("warmgate RSS before / after / max", f"{f['rss_before_mb']} / {f['rss_after_mb']} / "
                                              f"{f['rss_max_mb']} MB"),
        ("RSS growth / goal", f"{f['rss_growth_mb']} MB / {RSS_GOAL_MB:g} MB = "
                              f"{f['rss_growth_mb'] / RSS_GOAL_MB:.2f}"),
        ("warmgate open descriptors before / max / after",
         f"{f['fds_before']} / {f['fds_max']} / {f['fds_after']}"),
        ("flood connections opened", f"{f['flood_opened']:,} ({rate:,.0f}/s)"),
        ("evictions seen (closed before the head deadline)", f"{f['evictions_seen']:,}"),
        ("closed at the head deadline (a 408, or a reset once the kernel hands over "
         "a connection silent since it opened)", f"{f['closed_at_deadline']:,}"),
        ("flood connects that failed", f"{f['flood_connect_errors']:,}"),
        ("accept failures logged (EMFILE)", f"{f['accept_failures_logged']}"),
        ("warmgate still running after the flood", "yes" if f["warmgate_alive"] else "NO"),
    ]  # fmt: skip
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines.append("")
    lines += [f"- {goal}: {value}: {'pass' if ok else 'FAIL'}" for goal, ok, value in goals]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the flood")
    parser.add_argument("--idle", type=int, default=1000, help="connections that send nothing")
    parser.add_argument(
        "--slowloris", type=int, default=200, help="connections sending a header byte each 0.5 s"
    )
    parser.add_argument("--probes", type=int, default=300, help="/ready probes, at the least")
    parser.add_argument("--workers", type=int, default=4, help="flood processes")
    parser.add_argument("--nofile", type=int, default=1024, help="warmgate's ulimit -n")
    parser.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to Ready")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--out", type=Path, help="write the table to this file too")
    args = parser.parse_args()
    figures = run(args)
    text = report(figures)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--flood-worker":
        port, idle, slow = (int(a) for a in sys.argv[2:5])
        flood_worker(port, idle, slow, float(sys.argv[5]))
    else:
        main()
