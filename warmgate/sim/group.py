"""The simulator as a multi-node group: a leader that needs N-1 workers, and the workers.

Shaped like vLLM over a Ray cluster (docs/multinode.md):
- The leader (`warmgate sim --group-size N`) listens for workers on --group-port, as the
  Ray head's GCS does. vLLM waits for its placement group before it loads anything, so the
  leader's HTTP port stays closed (its /health fails) until N-1 workers have joined.
- A worker (`warmgate sim --group-leader HOST:PORT`) stands for `ray start --block`: it
  serves no HTTP, joins the leader (retrying while the head is not up yet), sends a
  heartbeat every HEARTBEAT_S, and runs until SIGTERM or SIGINT. A leader that goes away
  does not end it: a raylet outlives its head for a reconnect window.
- Once formed, a worker lost (its connection closed, or silent for LOST_AFTER_S) kills the
  leader's engine for good, as a Ray actor's death does vLLM's: requests in flight fail,
  later ones get 500, /health answers 503.

The wire protocol is lines over TCP: `join PID`, then `beat`; the leader answers
`welcome` (or `full` when the group has all its workers already).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from warmgate import log as wglog

HEARTBEAT_S = 0.2
LOST_AFTER_S = 1.0  # five heartbeats missed
JOIN_RETRY_S = 0.2
JOIN_TIMEOUT_S = 120.0  # a worker whose head never comes up exits 1, as `ray start` does


class LeaderGroup:
    """The leader's side: who has joined, whether the group formed, whether it broke."""

    def __init__(self, size: int, host: str, port: int, on_broken: Callable[[str], None]) -> None:
        self.expected = size - 1
        self._host, self._port = host, port
        self._on_broken = on_broken
        self._log = wglog.get("warmgate.sim")
        self.joined: dict[int, str] = {}  # connection number -> the worker's pid
        self.formed = asyncio.Event()
        self.broken: str | None = None
        self._server: asyncio.Server | None = None
        self._connections = 0

    @property
    def healthy(self) -> bool:
        return self.formed.is_set() and self.broken is None

    async def listen(self) -> bool:
        """Open the group port; False (logged) when it cannot be bound."""
        try:
            self._server = await asyncio.start_server(self._member, self._host, self._port)
        except OSError as exc:
            self._log.error(
                "group_listen_failed",
                error=f"--group-port {self._port}: {exc.strerror} (another leader?)",
            )
            return False
        port = self._server.sockets[0].getsockname()[1]
        self._log.info("group_listening", port=port, expected_workers=self.expected)
        return True

    async def wait_formed(self, signalled: asyncio.Event) -> bool:
        """Until every worker has joined (True) or a signal came first (False)."""
        if self.formed.is_set():
            return True
        self._log.info("group_waiting", expected_workers=self.expected)
        formed = asyncio.ensure_future(self.formed.wait())
        stop = asyncio.ensure_future(signalled.wait())
        await asyncio.wait({formed, stop}, return_when=asyncio.FIRST_COMPLETED)
        for task in (formed, stop):
            task.cancel()
        return self.formed.is_set()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _member(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        number = self._connections
        try:
            async with asyncio.timeout(LOST_AFTER_S):
                hello = (await reader.readline()).decode(errors="replace").split()
            if hello[:1] != ["join"] or len(hello) != 2:
                return
            if len(self.joined) >= self.expected:
                writer.write(b"full\n")
                return
            self._join(number, hello[1])
            writer.write(b"welcome\n")
            await self._heartbeats(reader)
            self._lost(number, "closed")
        except TimeoutError:
            self._lost(number, f"silent for {LOST_AFTER_S:g} s")
        except OSError:
            self._lost(number, "connection reset")
        finally:
            writer.close()

    def _join(self, number: int, pid: str) -> None:
        self.joined[number] = pid
        self._log.info("worker_joined", worker_pid=pid, joined=len(self.joined))
        if len(self.joined) == self.expected and not self.formed.is_set():
            self._log.info("group_formed", workers=self.expected)
            self.formed.set()

    async def _heartbeats(self, reader: asyncio.StreamReader) -> None:
        """Until the worker closes its end (returns) or goes silent (TimeoutError)."""
        while True:
            async with asyncio.timeout(LOST_AFTER_S):
                if not await reader.readline():
                    return

    def _lost(self, number: int, why: str) -> None:
        pid = self.joined.pop(number, None)
        if pid is None:
            return
        self._log.warning("worker_lost", worker_pid=pid, why=why, joined=len(self.joined))
        if self.formed.is_set() and self.broken is None:
            self.broken = f"worker {pid} lost ({why})"
            self._on_broken(self.broken)


def parse_address(text: str) -> tuple[str, int]:
    """`--group-leader HOST:PORT` -> (host, port); ValueError names the fix."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--group-leader {text!r}: use HOST:PORT, e.g. 127.0.0.1:6379")
    return host.strip("[]"), int(port)


async def run_worker(leader: str) -> int:
    """A group worker's process: join, heartbeat, run until SIGTERM/SIGINT; exit code."""
    logger = wglog.get("warmgate.sim")
    host, port = parse_address(leader)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("starting", role="worker", leader=leader)
    joined = await _join(host, port, stop)
    if joined is None:
        if stop.is_set():
            logger.info("stopped", reason="signal before joining", exit_code=0)
            return 0
        logger.error("join_failed", leader=leader, after_s=JOIN_TIMEOUT_S, exit_code=1)
        return 1
    reader, writer = joined
    if (await reader.readline()).strip() != b"welcome":
        logger.error("join_refused", leader=leader, why="the group is full", exit_code=1)
        writer.close()
        return 1
    logger.info("joined", leader=leader)
    async with asyncio.TaskGroup() as tg:
        beats = tg.create_task(_beat(writer))
        watch = tg.create_task(_watch_leader(reader, logger))
        await stop.wait()
        beats.cancel()
        watch.cancel()
    writer.close()
    logger.info("stopped", role="worker", exit_code=0)
    return 0


async def _join(
    host: str, port: int, stop: asyncio.Event
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(JOIN_RETRY_S):
                    await stop.wait()
            continue
        writer.write(f"join {os.getpid()}\n".encode())
        return reader, writer
    return None


async def _beat(writer: asyncio.StreamWriter) -> None:
    """Heartbeats until the leader goes away (_watch_leader says so)."""
    with contextlib.suppress(OSError):
        while not writer.is_closing():  # uvloop raises on a write to a closed transport
            writer.write(b"beat\n")
            await writer.drain()
            await asyncio.sleep(HEARTBEAT_S)


async def _watch_leader(reader: asyncio.StreamReader, logger: Any) -> None:
    with contextlib.suppress(OSError):
        while await reader.readline():
            pass
    logger.warning("leader_lost", note="running on, as a raylet does in its reconnect window")
