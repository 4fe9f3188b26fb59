"""Probe-server and gate timing benchmark (issue 4's performance goals), side by side in one run.

    .venv/bin/python scripts/bench_probe.py [--seconds 5] [--time-scale 0.25] [--features F,...]

Prints four figures:
1. idle throughput of warmgate's probe server vs a minimal uvloop + h11 server (the same
   client, keep-alive and `Connection: close`, each server measured twice in A B B A order
   so that load drifting on a shared machine weighs on both alike), as a ratio (goal: >= 0.8);
2. p99 latency of /ready at 200 req/s with `Connection: close` while a warm-up runs
   (goal: <= 5 ms), then the same load on the minimal server, in a process of its own,
   during the same warm-up: the floor this machine allows;
3. time from the last warm-up response to /ready turning 200 (goal: <= 20 ms);
4. time from the upstream turning healthy to warmgate noticing (goal: <= interval + 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import h11
import uvloop

from warmgate.bench.core import free_port

REQUEST = b"GET /ready HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST_CLOSE = b"GET /ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


# --- the reference: the smallest sensible uvloop + h11 server ---------------------------


async def _minimal_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    body = b'{"ok":true,"phase":"ready"}'
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data:
                break
            continue
        if isinstance(event, h11.Request):
            continue
        if isinstance(event, h11.EndOfMessage):
            headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
            writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            if conn.our_state is h11.MUST_CLOSE:
                break
            conn.start_next_cycle()
            continue
        break
    writer.close()


def minimal_server(port: int) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_minimal_conn, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


# --- load generation --------------------------------------------------------------------


async def _one_keepalive(port: int, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < deadline:
        writer.write(REQUEST)
        await _read_response(reader)
        counts[0] += 1
    writer.close()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return head


async def _one_close(port: int) -> float:
    began = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST_CLOSE)
    await _read_response(reader)
    writer.close()
    return (time.perf_counter() - began) * 1000


async def throughput(port: int, seconds: float, close: bool, connections: int = 16) -> float:
    deadline = time.perf_counter() + seconds
    if not close:
        counts = [0]
        await asyncio.gather(*(_one_keepalive(port, deadline, counts) for _ in range(connections)))
        return counts[0] / seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await _one_close(port)
            done += 1

    await asyncio.gather(*(worker() for _ in range(connections)))
    return done / seconds


async def paced_latencies(port: int, rate: float, seconds: float) -> list[float]:
    """Open-loop: one new connection every 1/rate s, as the kubelet's probes arrive."""
    latencies: list[float] = []
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_one_close(port)))
    latencies = list(await asyncio.gather(*tasks))
    return latencies


# --- warmgate under test ----------------------------------------------------------------


def start_warmgate(
    probe_port: int, sim_port: int, *extra: str, sim_extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "warmgate", "run", "--host", "127.0.0.1", "--port", str(probe_port),
        "--log-format", "json", *extra, "--",
        sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1", "--port", str(sim_port),
        "--max-model-len", "2048", *sim_extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def stop(proc: subprocess.Popen[bytes]) -> bytes:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    return err


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def log_events(stderr: bytes) -> list[dict[str, Any]]:
    found = []
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument(
        "--time-scale",
        default="0.25",
        help="the simulator's --time-scale during the warm-up: lower is a shorter warm-up "
        "with more requests per second",
    )
    parser.add_argument(
        "--features",
        help="the warm-up plan's --features (default: all): fewer is a shorter warm-up at the "
        "same request rate; the figures above need only its first seconds",
    )
    args = parser.parse_args()

    # 1. idle throughput, side by side
    ref_port = free_port()
    ref = subprocess.Popen([sys.executable, __file__, "--serve-minimal", str(ref_port)])
    probe_port, sim_port = free_port(), free_port()
    gate = start_warmgate(
        probe_port, sim_port, sim_extra=("--load-seconds", "600")
    )  # stays loading: idle
    try:
        wait_listening(ref_port)
        wait_listening(probe_port)
        rows = []
        for close in (False, True):
            runs: dict[int, list[float]] = {ref_port: [], probe_port: []}
            for port in (ref_port, probe_port, probe_port, ref_port):
                runs[port].append(uvloop.run(throughput(port, args.seconds / 2, close)))
            rows.append((close, statistics.mean(runs[ref_port]), statistics.mean(runs[probe_port])))
    finally:
        ref.kill()
        ref.wait()
        stop(gate)
    print("| probe server (idle) | minimal uvloop+h11 req/s | warmgate req/s | ratio |")
    print("|---|---:|---:|---:|")
    for close, reference, ours in rows:
        mode = "Connection: close" if close else "keep-alive, 16 connections"
        print(f"| {mode} | {reference:,.0f} | {ours:,.0f} | {ours / reference:.2f} |")

    # 2-4. a real warm-up over the simulator
    ref_port = free_port()
    ref = subprocess.Popen([sys.executable, __file__, "--serve-minimal", str(ref_port)])
    probe_port, sim_port = free_port(), free_port()
    gate = start_warmgate(
        probe_port,
        sim_port,
        "--health-interval",
        "0.25",
        *(("--features", args.features) if args.features else ()),
        sim_extra=("--load-seconds", "3", "--time-scale", args.time_scale),
    )
    try:
        wait_listening(probe_port)
        wait_listening(sim_port, timeout=60)
        wait_listening(ref_port)
        time.sleep(1.0)  # the warm-up is under way
        latencies = uvloop.run(paced_latencies(probe_port, 200, args.seconds))
        floor = uvloop.run(paced_latencies(ref_port, 200, args.seconds))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            reply = subprocess.run(
                [sys.executable, "-m", "warmgate", "probe", "ready", "--port", str(probe_port)],
                capture_output=True,
            )
            if reply.returncode == 0:
                break
            time.sleep(0.5)
    finally:
        ref.kill()
        ref.wait()
        err = stop(gate)
    events = log_events(err)
    q = statistics.quantiles(latencies, n=100)
    print()
    print(
        f"/ready at 200 req/s, Connection: close, during warm-up: n={len(latencies)} "
        f"p50={q[49]:.2f} ms p99={q[98]:.2f} ms max={max(latencies):.2f} ms (goal p99 <= 5 ms)"
    )
    q = statistics.quantiles(floor, n=100)
    print(
        f"  the same load on the minimal server, its own process, same warm-up: "
        f"p50={q[49]:.2f} ms p99={q[98]:.2f} ms max={max(floor):.2f} ms"
    )
    shapes = [e for e in events if e.get("event") == "shape"]
    ready = next(e for e in events if e.get("event") == "phase" and e.get("phase") == "ready")
    print(
        f"last warm-up response -> /ready 200: {(at(ready) - at(shapes[-1])) * 1000:.2f} ms (goal <= 20 ms)"
    )
    listening = next(e for e in events if e.get("event") == "listening" and e.get("loaded") is True)
    warming = next(e for e in events if e.get("event") == "phase" and e.get("phase") == "warming")
    print(
        f"upstream healthy -> noticed: {(at(warming) - at(listening)) * 1000:.1f} ms "
        "(goal <= --health-interval 250 ms + 50 ms)"
    )
    print(
        f"warm-up, warming -> ready: {at(ready) - at(warming):.1f} s "
        f"(about {2 * args.seconds:g} s of it under the probe loads above)"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-minimal":
        minimal_server(int(sys.argv[2]))
    else:
        main()
