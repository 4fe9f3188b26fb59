"""The warm-up in a process of its own, so that its HTTP client never holds our GIL.

With many warm-up requests in flight, httpx keeps a Python thread busy most of the time;
in warmgate's own process the probe server's thread would wait for the GIL behind it
(docs/benchmarks.md has the measurements). Here the warm-up's client costs the probe
server nothing but a pipe read per event.

`warmgate run` spawns `python -m warmgate.worker PARENT_PID` with posix_spawn, sends the
settings and the quarantined shapes on its stdin (pickled: both ends are this same
package) and reads one JSON event per line from its stdout (warmgate.warmup.Progress
reads them), the last one `done`. The
worker has its own process group, so a terminal's Ctrl-C does not reach it, and dies with
its parent (PR_SET_PDEATHSIG). Cancelling the read kills it through a pidfd, which cannot
hit a reused pid; the supervisor's reaper collects its status like any other child's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import signal
import sys
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from warmgate.config import WarmupSettings

if TYPE_CHECKING:
    from warmgate.plan import ShapeKey

_LINE_LIMIT = 1 << 24  # the plan event lists every shape: generous
# Reset in the worker: the supervisor ignores SIGTTIN/SIGTTOU, which exec would keep.
_DEFAULT_SIGNALS = (signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM)


class WorkerFailed(Exception):
    """The warm-up failed: the worker's verdict, or its end without one."""


class Worker:
    """The parent's handle on one warm-up worker."""

    def __init__(self, pid: int, stdin: int, events: int) -> None:
        self.pid, self._events = pid, events
        self._stdin: int | None = stdin
        self._pidfd = os.pidfd_open(pid)

    @classmethod
    def spawn(cls) -> Worker:
        stdin_r, stdin_w = os.pipe()  # both close-on-exec: only the dup2 copies cross
        events_r, events_w = os.pipe()
        env = dict(os.environ)
        # The package is importable in the worker even when warmgate runs from a checkout.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        argv = [sys.executable, "-m", "warmgate.worker", str(os.getpid())]
        try:
            pid = os.posix_spawn(
                sys.executable,
                argv,
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, events_w, 1),
                ],
                setpgroup=0,
                setsigdef=_DEFAULT_SIGNALS,
                setsigmask=(),
            )
        except OSError:
            for fd in (stdin_r, stdin_w, events_r, events_w):
                os.close(fd)
            raise
        os.close(stdin_r)
        os.close(events_w)
        return cls(pid, stdin_w, events_r)

    async def run(
        self, settings: WarmupSettings, quarantined: Sequence[ShapeKey] = ()
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Send the settings and the shapes to leave out, then yield each event up to
        `done` (which is not yielded: it returns normally when the warm-up succeeded and
        raises otherwise)."""
        try:
            # The sending thread owns the pipe from here on, so that kill() can never close
            # its fd under it; a killed worker ends the write with EPIPE.
            stdin, self._stdin = self._stdin, None
            if stdin is not None:
                job = pickle.dumps((settings, tuple(quarantined)))
                await asyncio.to_thread(_send, stdin, job)
            async with contextlib.aclosing(self._read()) as events:
                async for event in events:
                    if event.get("event") == "done":
                        if not event.get("ok"):
                            raise WorkerFailed(str(event.get("error") or "warm-up failed"))
                        return
                    yield event
            raise WorkerFailed(f"the warm-up worker (pid {self.pid}) ended without a verdict")
        finally:
            self.kill()

    async def _read(self) -> AsyncGenerator[dict[str, Any], None]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        # The transport owns the file and closes it.
        pipe = open(self._events, "rb", buffering=0, closefd=True)  # noqa: SIM115
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        finally:
            transport.close()

    def kill(self) -> None:
        """SIGKILL the worker (a no-op once it is gone); idempotent."""
        if self._pidfd < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        os.close(self._pidfd)
        self._pidfd = -1
        if self._stdin is not None:
            os.close(self._stdin)
            self._stdin = None


def _send(fd: int, data: bytes) -> None:
    """Write the settings and close the worker's stdin."""
    try:
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(data)
    except BrokenPipeError:
        pass  # it died at start: the read sees the end and says so


# --- the worker's side --------------------------------------------------------------------


def _events_out() -> IO[str]:
    """Our own copy of stdout for events; fd 1 then points at stderr, so that nothing a
    library prints can corrupt the event stream."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


async def _warm(settings: WarmupSettings, quarantined: Sequence[ShapeKey], out: IO[str]) -> None:
    from warmgate.upstream import Upstream
    from warmgate.warmup import warm

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event, separators=(",", ":")) + "\n")

    assert settings.upstream is not None
    upstream = Upstream(
        settings.upstream, api_key=settings.api_key, timeout=settings.request_timeout
    )
    try:
        await warm(upstream, settings, emit, quarantined)
    except Exception as exc:  # the parent decides what a failure means
        emit({"event": "done", "ok": False, "error": str(exc) or type(exc).__name__})
    else:
        emit({"event": "done", "ok": True})
    finally:
        await upstream.aclose()


def main() -> None:
    from warmgate.process import die_with_parent

    die_with_parent(int(sys.argv[1]))
    out = _events_out()
    settings, quarantined = pickle.load(sys.stdin.buffer)
    # As in the supervisor: httpx's __init__ would load its command-line client (click,
    # rich, pygments) when installed; None makes that import fail as if absent.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    import uvloop

    uvloop.run(_warm(settings, quarantined, out))


if __name__ == "__main__":
    main()
