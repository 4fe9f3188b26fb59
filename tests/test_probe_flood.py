"""The probe server of a real `warmgate run ... -- warmgate sim` under more connections than
its cap: a fresh /ready probe still answers 200. The figures live in scripts/bench_flood.py."""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import sys
from collections.abc import Iterator

from wgutil import Running, free_port, http_get, start, wait_for

from warmgate.probe import FDS_FOR_THE_REST

# `ulimit -n` of warmgate here: its probe server's cap is then this less FDS_FOR_THE_REST.
NOFILE = 512
CAP = NOFILE - FDS_FOR_THE_REST


class LimitedWarmgate(Running):
    """warmgate with a low `ulimit -n`, so that a few hundred connections pass its cap."""

    def __init__(self, args: list[str]) -> None:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

        self._watch(start(args, preexec_fn=limit))


@contextlib.contextmanager
def connections(port: int, count: int, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    held = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if first_bytes:
                sock.sendall(first_bytes)
            held.append(sock)
        yield held
    finally:
        for sock in held:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_ready_answers_200_with_more_connections_held_than_the_cap() -> None:
    sim_port = free_port()
    running = LimitedWarmgate(
        [
            "run", "--host", "127.0.0.1", "--port", "0", "--health-interval", "0.1",
            "--features", "greedy", "--concurrency", "1", "--max-repeats", "2", "--",
            sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1",
            "--port", str(sim_port), "--max-model-len", "1024", "--time-scale", "0.02",
            "--load-seconds", "0.2",
        ]
    )  # fmt: skip
    try:
        port = int(running.wait_event("listening", timeout=15)["port"])
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60, interval=0.1)
        # Connections that have sent nothing wait in the kernel (TCP_DEFER_ACCEPT); ones that
        # have begun a head are the server's, more of them than its cap: the oldest go.
        with (
            connections(port, CAP, b""),
            connections(port, CAP + 50, b"GET /ready HTTP/1.1\r\n") as begun,
        ):
            for _ in range(5):
                assert http_get(port, "/ready")[0] == 200
            wait_for(lambda: closed_by_server(begun[0]), timeout=5)
        assert http_get(port, "/ready")[0] == 200
        metrics = http_get(port, "/metrics")[1]
        evicted = re.search(
            r'warmgate_probe_connections_closed_total\{why="evicted"\} (\S+)', metrics
        )
        assert evicted and float(evicted[1]) >= 50, metrics
    finally:
        running.stop()
