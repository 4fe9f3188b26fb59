"""Wires the child process, signals and (later) the warm-up gate into one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterable

from warmgate import process
from warmgate.config import RunSettings, child_environment
from warmgate.errors import Exit


def run(settings: RunSettings, own_vars: Iterable[str]) -> int:
    """Spawn the child first (nothing heavy imported yet), then supervise it."""
    if not process.is_pid1():
        process.become_subreaper()
    process.block_signals()
    interactive = os.isatty(1) or os.isatty(2)
    try:
        child = process.spawn(
            settings.command,
            child_environment(os.environ, own_vars),
            capture_output=not interactive,
            pdeathsig=not process.is_pid1(),
            tty=process.foreground_tty(),
        )
    except process.SpawnError as exc:
        process.unblock_signals()
        reason = "command_not_found" if exc.code == Exit.NOT_FOUND else "not_executable"
        return log_exit(settings, reason, exc.code, error=str(exc))

    from warmgate import log

    log.configure(settings.log_level, settings.log_format)
    log.get().info("spawn", pid=child.pid, argv=list(child.argv), pid1=process.is_pid1())
    return _run_loop(_supervise(settings, child))


def _run_loop(main: asyncio.Future[int] | object) -> int:
    import uvloop

    return uvloop.run(main)  # type: ignore[arg-type]


async def _supervise(settings: RunSettings, child: process.Child) -> int:
    from warmgate import log

    logger = log.get()
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    pumps = _start_pumps(child)  # threads start with our signals still blocked

    def on_main_exit(status: int) -> None:
        loop.call_soon_threadsafe(exited.set_result, status)

    reaper = process.Reaper(child.pid, on_main_exit)
    stopper = _Stopper(settings, child, loop)

    def on_signal(sig: signal.Signals) -> None:
        delivered = process.send(child, sig, group=settings.signal_group)
        logger.info("signal", signal=sig.name, forwarded=delivered, group=settings.signal_group)
        if sig in process.STOP_SIGNALS:
            stopper.arm()

    for sig in process.FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    process.unblock_signals()

    status = await exited
    stopper.cancel()
    killed = await _sweep(child, settings.stop_timeout)
    reaper.join(timeout=1.0)
    for pump in pumps:
        pump.join(timeout=1.0)
    code = process.exit_code(status)
    reason = "child_killed" if os.WIFSIGNALED(status) else "child_exited"
    extra: dict[str, object] = {}
    if os.WIFSIGNALED(status):
        extra["signal"] = signal.Signals(os.WTERMSIG(status)).name
    if killed:
        extra["killed_leftovers"] = killed
    return log_exit(settings, reason, code, **extra)


class _Stopper:
    """Stop escalation: SIGKILL the child's group if it outlives --stop-timeout."""

    def __init__(
        self, settings: RunSettings, child: process.Child, loop: asyncio.AbstractEventLoop
    ):
        self._settings, self._child, self._loop = settings, child, loop
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._settings.stop_timeout, self._kill)

    def _kill(self) -> None:
        from warmgate import log

        log.get().warning("stop_timeout", pid=self._child.pid, after_s=self._settings.stop_timeout)
        process.send(self._child, signal.SIGKILL, group=True)
        process.kill_all(process.descendants(), signal.SIGKILL)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _start_pumps(child: process.Child) -> list[process.Pump]:
    pumps = []
    if child.stdout is not None:
        pumps.append(process.Pump(child.stdout, 1))
    if child.stderr is not None:
        pumps.append(process.Pump(child.stderr, 2))
    return pumps


async def _sweep(child: process.Child, grace: float) -> list[int]:
    """Once the main child is gone, stop whatever it left behind: SIGTERM, then SIGKILL.

    As PID 1 the kernel would do this when we exit; as a subreaper we must.
    Returns the pids that needed SIGKILL.
    """
    left = process.descendants()
    if not left:
        return []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pgid, signal.SIGTERM)
    process.kill_all(left, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while (left := process.descendants()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pgid, signal.SIGKILL)
        process.kill_all(left, signal.SIGKILL)
        deadline = loop.time() + 2.0
        while process.descendants() and loop.time() < deadline:
            await asyncio.sleep(0.01)
    return left


def log_exit(settings: RunSettings | None, reason: str, code: int, **fields: object) -> int:
    """The one `event=exit` line every run ends with; returns `code`."""
    from warmgate import log

    if settings is None:
        log.configure()
    else:
        log.configure(settings.log_level, settings.log_format)
    emit = (
        log.get().info
        if code == 0 or reason in ("child_exited", "child_killed")
        else log.get().error
    )
    emit("exit", reason=reason, code=code, **fields)
    process.flush_std()
    sys.stderr.flush()
    return code
