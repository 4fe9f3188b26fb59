"""Wires the child process, its signals and (in warm-up mode) the readiness gate together.

Order matters for start-up speed: the probe port is bound and the child spawned
before anything heavy (asyncio, structlog, httpx, prometheus) is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmgate import options, process, servers
from warmgate.config import RunSettings, child_environment
from warmgate.errors import Exit, child_ending, ending

if TYPE_CHECKING:
    import asyncio


@dataclass(frozen=True, slots=True)
class Target:
    """Where warm-up mode sends its requests."""

    url: str
    api_key: str | None


def warmup_target(settings: RunSettings, environ: dict[str, str]) -> Target | None:
    """The upstream to warm up, or None for plain-init and worker mode."""
    if settings.no_warmup or settings.leader is not None:
        return None
    url = settings.warmup.upstream or servers.upstream_url(settings.command, environ)
    if url is None:
        return None
    key = (
        settings.warmup.api_key or environ.get("VLLM_API_KEY") or servers.api_key(settings.command)
    )
    return Target(url, key)


def supervise(settings: RunSettings, own_vars: Iterable[str]) -> int:
    """Spawn the child first (nothing heavy imported yet), then supervise it."""
    target = warmup_target(settings, dict(os.environ))
    sock = None
    if target is not None or settings.leader is not None:  # worker mode serves probes too
        try:
            sock = _bind(settings.host, settings.port)
        except OSError as exc:
            why = (
                "is in use (another warmgate?)"
                if exc.errno == 98
                else f"cannot be bound: {exc.strerror}"
            )
            return log_exit(
                settings,
                "probe_port_unavailable",
                error=f"--port {settings.port} on {settings.host} {why}",
            )
    env = child_environment(os.environ, own_vars)
    cache_report, cache_warnings = _prepare_cache(settings, env)
    if cache_report is not None:
        env = cache_report.env
    if not process.is_pid1():
        process.become_subreaper()
    process.block_signals()
    interactive = os.isatty(1) or os.isatty(2)
    tty = process.foreground_tty()
    try:
        child = process.spawn(
            settings.command,
            env,
            capture_output=not interactive,
            pdeathsig=not process.is_pid1(),
            tty=tty,
        )
    except process.SpawnError as exc:
        process.unblock_signals()
        reason = "command_not_found" if exc.code == Exit.NOT_FOUND else "not_executable"
        return log_exit(settings, reason, error=str(exc))
    # PR_SET_PDEATHSIG reaches the child alone; a guard kills its group if we are SIGKILLed.
    # As PID 1 none is needed: the kernel kills the whole PID namespace with us.
    guard = process.start_guard(child) if not process.is_pid1() else None
    # The terminal's ^C reaches the child's group alone; a sentinel there tells us of it.
    sentinel = process.start_sentinel(child) if tty is not None else None

    from warmgate import log

    log.configure(settings.log_level, settings.log_format)
    log.get().info(
        "spawn",
        pid=child.pid,
        argv=servers.redacted(child.argv),
        pid1=process.is_pid1(),
        mode="warmup" if target else "worker" if settings.leader else "plain",
        **({"guard": guard.pid} if guard is not None else {}),
        **({"terminal_sentinel": sentinel.pid} if sentinel is not None else {}),
    )
    for warning in cache_warnings:
        log.get().warning("cache", note=warning)
    if cache_report is not None:
        log.get().info(
            "cache",
            phase="start",
            dir=str(cache_report.report.dirs.root),
            bytes=cache_report.report.sizes().get("start"),
        )
    import uvloop

    try:
        return uvloop.run(
            _run_until_child_exits(
                settings,
                child,
                target,
                sock,
                cache_report.report if cache_report else None,
                sentinel,
                guard,
            )
        )
    except Exception as exc:  # a bug of ours must still stop the child and say why, once
        process.send(child, signal.SIGKILL, group=True)
        if guard is not None:
            guard.release()
        log.get().exception("internal_error")
        return log_exit(settings, "internal_error", error=f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class _Cache:
    report: Any  # warmgate.cache.CacheReport
    env: dict[str, str]


def _prepare_cache(settings: RunSettings, env: dict[str, str]) -> tuple[_Cache | None, list[str]]:
    """Lock a compile-cache slot and point the child's cache variables at it (--cache-dir)."""
    if settings.cache_dir is None:
        return None, []
    from warmgate import cache

    dirs, warnings = cache.prepare(
        settings.cache_dir, settings.cache_key, settings.command, env, cache.gpu_name()
    )
    if dirs is None:
        return None, warnings
    report = cache.CacheReport(dirs)
    report.record("start", cache.snapshot(dirs))
    return _Cache(report, cache.child_env(env, dirs)), warnings


def _bind(host: str, port: int) -> socket.socket:
    """Reserve the probe port before the child starts, so a clash fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


async def _run_until_child_exits(
    settings: RunSettings,
    child: process.Child,
    target: Target | None,
    sock: socket.socket | None,
    cache_report: Any = None,
    sentinel: process.Sentinel | None = None,
    guard: process.Guard | None = None,
) -> int:
    """The supervisor's event loop: signals, reaping, the gate (warm-up mode), then the
    leftovers' stop and the exit line; returns the exit code."""
    import asyncio

    from warmgate import log

    logger = log.get()
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    # warmgate's own helpers: never signalled as the child's, never reported as leftovers
    helpers = frozenset(h.pid for h in (sentinel, guard) if h is not None)
    signals = _ChildSignals(settings, child, loop, helpers)
    gate = None
    if target is not None:
        # httpx's __init__ also loads its command-line client when click and rich are
        # installed (with pygments: ~5 MB of RSS); None makes that import fail as if absent.
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
        from warmgate.gate import Gate

        gate = Gate(settings, child, target.url, target.api_key, signals.forward, cache_report)
        for warning in settings.drain_warnings():
            logger.warning("config", note=warning)
    member = None
    if settings.leader is not None:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]  # as above
        from warmgate.member import Membership

        member = Membership(settings, child, signals.forward)
    pumps = _start_pumps(
        child, gate.scan_output if gate is not None else None
    )  # threads start with signals blocked

    terminal = None
    if sentinel is not None:
        from warmgate.lifecycle import StopAsked

        def stop_heard(sig: signal.Signals) -> None:
            if gate is not None:
                gate.apply(StopAsked(sig.name))
            else:
                signals.heard(sig)

        terminal = _TerminalStops(sentinel, loop, stop_heard)

    def child_exited(status: int) -> None:
        if terminal is None:
            exited.set_result(status)
        else:  # every ^C typed before the child's exit is heard before that exit
            terminal.close(then=lambda: exited.set_result(status))

    def on_main_exit(status: int) -> None:
        loop.call_soon_threadsafe(child_exited, status)

    reaper = process.Reaper(child.pid, on_main_exit)
    handler: Callable[[signal.Signals], None] = (
        gate.on_signal
        if gate is not None
        else member.on_signal
        if member is not None
        else signals.forward
    )
    for sig in process.FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, handler, sig)
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    process.unblock_signals()

    if gate is not None:
        assert sock is not None
        end = await gate.drive_lifecycle(exited, sock)
        wait_status = exited.result()
    else:
        if member is not None:
            assert sock is not None
            wait_status = await member.serve_until(exited, sock)
        else:
            wait_status = await exited
        end = child_ending(process.shell_status(wait_status), process.fatal_signal(wait_status))
        if signals.stop_signal is not None or (member is not None and member.stop_asked):
            end = ending("stopped", end.code)
    signals.cancel()
    killed = await _sweep(child, settings.stop_timeout, helpers)
    if guard is not None:
        guard.release()  # before the reaper's join: it returns once the guard is reaped
    reaper.join(timeout=1.0)
    for pump in pumps:
        pump.join(timeout=1.0)
    extra: dict[str, Any] = gate.exit_fields() if gate is not None else {}
    stop_signal = gate.life.stop_signal if gate is not None else signals.stop_signal
    if member is not None:
        extra.update(member.exit_fields())
        if member.stop_asked:  # a held SIGTERM is the stop asked for, forwarded or not
            stop_signal = stop_signal or signal.SIGTERM.name
    fatal = process.fatal_signal(wait_status)
    if end.reason == "stopped":
        extra["signal"] = stop_signal  # the stop asked for; the child's own death apart
        if fatal is not None:
            extra["child_signal"] = signal.Signals(fatal).name
    elif fatal is not None:
        extra["signal"] = signal.Signals(fatal).name
    if end.code != process.shell_status(wait_status):
        extra["child_code"] = process.shell_status(wait_status)
    if killed:
        extra["killed_leftovers"] = killed
    return log_exit(settings, end.reason, end.code, **extra)


class _ChildSignals:
    """Signals to the child: forward one and log it, and SIGKILL the child's group if it
    outlives --stop-timeout after a stop signal."""

    def __init__(
        self,
        settings: RunSettings,
        child: process.Child,
        loop: asyncio.AbstractEventLoop,
        helpers: frozenset[int] = frozenset(),
    ):
        self._settings, self._child, self._loop = settings, child, loop
        self._helpers = helpers
        self._timer: asyncio.TimerHandle | None = None
        self.stop_signal: str | None = None  # the first stop signal forwarded (plain-init mode)

    def forward(self, sig: signal.Signals) -> None:
        """Send `sig` to the child (or its group), log it, and arm the stop timer if it stops."""
        group = self._settings.signal_group
        delivered = process.send(self._child, sig, group=group)
        from warmgate import log

        log.get().info("signal", signal=sig.name, forwarded=delivered, group=group)
        if sig in process.STOP_SIGNALS:
            self.stop_signal = self.stop_signal or sig.name
            if self._timer is None:
                self._timer = self._loop.call_later(self._settings.stop_timeout, self._kill)

    def heard(self, sig: signal.Signals) -> None:
        """The child heard a stop from the terminal: record it, forward nothing, arm no
        timer (an interactive child may go on after ^C; tini's terminal semantics)."""
        self.stop_signal = self.stop_signal or sig.name

    def _kill(self) -> None:
        from warmgate import log

        log.get().warning("stop_timeout", pid=self._child.pid, after_s=self._settings.stop_timeout)
        process.send(self._child, signal.SIGKILL, group=True)
        process.kill_all(process.descendants(self._helpers), signal.SIGKILL)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _TerminalStops:
    """^C and ^\\ typed into the terminal the child holds, as the sentinel reports them.

    The child has the signal already, so nothing is forwarded: `on_stop` records the stop.
    """

    EXIT_WAIT_S = 1.0  # the sentinel's exit takes microseconds; SIGKILL after this

    def __init__(
        self,
        sentinel: process.Sentinel,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[signal.Signals], None],
    ):
        self._sentinel, self._loop, self._on_stop = sentinel, loop, on_stop
        self._open = True
        self._then: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        loop.add_reader(sentinel.reports, self._read)

    def _read(self) -> None:
        from warmgate import log

        reports = process.read_reports(self._sentinel.reports)
        for sig in reports or ():
            log.get().info("signal", signal=sig.name, source="terminal", forwarded=False)
            self._on_stop(sig)
        if reports is None:
            self._closed()

    def close(self, then: Callable[[], None]) -> None:
        """Hear what the sentinel still has to report, see it exit, then call `then`."""
        self._then.append(then)
        if not self._open:
            self._closed()
        elif self._sentinel.ask_to_exit():
            self._timer = self._loop.call_later(self.EXIT_WAIT_S, self._kill)
        else:
            self._read()

    def _kill(self) -> None:
        self._sentinel.kill()
        self._closed()

    def _closed(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._sentinel.reports)
            os.close(self._sentinel.reports)
        if self._timer is not None:
            self._timer.cancel()
        while self._then:
            self._then.pop(0)()


def _start_pumps(
    child: process.Child, scan: Callable[[int, bytes], None] | None
) -> list[process.Pump]:
    pumps = []
    for src, dst in ((child.stdout, 1), (child.stderr, 2)):
        if src is not None:
            on_data = (lambda data, dst=dst: scan(dst, data)) if scan is not None else None
            pumps.append(process.Pump(src, dst, on_data))
    return pumps


async def _sweep(
    child: process.Child, grace: float, spare: frozenset[int] = frozenset()
) -> list[int]:
    """Once the main child is gone, stop whatever it left behind: SIGTERM, then SIGKILL.

    As PID 1 the kernel would do this when we exit; as a subreaper we must. `spare`:
    warmgate's own helpers (the sentinel, which may take a moment to die; the guard,
    which must outlive the sweep). Returns the pids that needed SIGKILL.
    """
    import asyncio

    def leftovers() -> list[int]:
        return process.descendants(spare)

    left = leftovers()
    if not left:
        return []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pgid, signal.SIGTERM)
    process.kill_all(left, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while (left := leftovers()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pgid, signal.SIGKILL)
        process.kill_all(left, signal.SIGKILL)
        deadline = loop.time() + 2.0
        while leftovers() and loop.time() < deadline:
            await asyncio.sleep(0.01)
    return left


def log_exit(
    settings: RunSettings | None, reason: str, code: int | None = None, **fields: object
) -> int:
    """The one `event=exit` line every run ends with; returns the exit code.

    `reason` is a row of warmgate.errors.EXIT_REASONS, which gives the code; `code` is
    needed only where the table leaves it open (the child's status, an error's own code).
    """
    from warmgate import log

    end = ending(reason, code)
    if settings is None:
        log.configure(*_log_choice_from_env(os.environ))
    else:
        log.configure(settings.log_level, settings.log_format)
    ok = end.code == 0 or reason in ("child_exited", "child_killed", "stopped")
    (log.get().info if ok else log.get().error)("exit", reason=reason, code=end.code, **fields)
    process.flush_std()
    sys.stderr.flush()
    return end.code


def _log_choice_from_env(environ: Mapping[str, str]) -> tuple[str, str]:
    """Log level and format for an error before the settings exist: the WARMGATE_*
    variables when they hold a valid choice (a pod's JSON logs stay JSON), else the defaults."""
    chosen = []
    for name in ("log_level", "log_format"):
        row = options.option("run", name)
        value = environ.get(row.envvar or "", "")
        chosen.append(value if value in row.choices else str(row.default))
    return chosen[0], chosen[1]
