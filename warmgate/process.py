"""The child process: spawn, forward signals, reap, stop with escalation.

This module is warmgate's tini. Each function does one thing; the supervisor
decides when to call which. Nothing here imports more than the standard
library, so `warmgate run` can exec the child before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

# Signals that are never forwarded. SIGKILL/SIGSTOP cannot be caught; SIGCHLD is
# ours (reaping); the synchronous fault signals only mean something inside the
# process that raised them; SIGTTIN/SIGTTOU are ignored so that writing logs
# from a background process group never stops warmgate; SIGPIPE stays ignored
# because warmgate's own sockets raise it (a peer that hung up), and forwarding
# it once made vLLM shut down in the middle of a warm-up.
NOT_FORWARDED = frozenset(
    {
        signal.SIGKILL,
        signal.SIGSTOP,
        signal.SIGCHLD,
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGFPE,
        signal.SIGILL,
        signal.SIGTRAP,
        signal.SIGABRT,
        signal.SIGSYS,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGPIPE,
    }
)
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in signal.Signals if s not in NOT_FORWARDED and s < signal.SIGRTMIN
)
# Signals after which the child is expected to exit, so stop escalation starts.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})

# What a terminal sends its foreground process group: ^C and ^\ (stty intr, quit).
TERMINAL_STOPS = (signal.SIGINT, signal.SIGQUIT)
_SI_KERNEL = 0x80  # si_code of a signal the kernel sent (the terminal's), not kill(2)
_SENTINEL_EXIT = signal.SIGRTMIN  # never forwarded, so it reaches the sentinel from warmgate only

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126


class SpawnError(Exception):
    """The command could not be executed; `code` is the shell's exit status for it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Child:
    """A spawned child: its pid is also its process-group id."""

    pid: int
    argv: tuple[str, ...]
    stdout: int | None = None  # read end of the child's stdout pipe, when captured
    stderr: int | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pgid(self) -> int:
        return self.pid


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def become_subreaper() -> None:
    """Orphaned grandchildren are reparented to us instead of to init (Linux >= 3.4)."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when `parent` goes, and close the race where it already went."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def block_signals() -> None:
    """Block every signal we handle, so none is lost between spawn and handler setup."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED_SIGNALS, signal.SIGCHLD})


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*FORWARDED_SIGNALS, signal.SIGCHLD})


def foreground_tty() -> int | None:
    """The terminal fd to hand to the child, if stdin is a terminal we own."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


def spawn(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    capture_output: bool,
    pdeathsig: bool,
    tty: int | None,
) -> Child:
    """Fork and exec `argv` directly (never through a shell) in its own process group.

    Raises SpawnError (127 not found, 126 not executable) when exec fails; the
    failed child is already reaped then.
    """
    out_r, out_w = os.pipe() if capture_output else (-1, -1)
    err_r, err_w = os.pipe() if capture_output else (-1, -1)
    status_r, status_w = os.pipe()  # close-on-exec: EOF means exec succeeded
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which execs or _exits
        _exec_child(argv, env, out_w, err_w, status_w, parent, pdeathsig, tty)
    os.close(status_w)
    for fd in (out_w, err_w):
        if fd >= 0:
            os.close(fd)
    failure = _read_all(status_r)
    os.close(status_r)
    if failure:
        os.waitpid(pid, 0)
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
        raise _spawn_error(argv[0], int(failure))
    return Child(
        pid=pid,
        argv=tuple(argv),
        stdout=out_r if capture_output else None,
        stderr=err_r if capture_output else None,
    )


def _exec_child(
    argv: Sequence[str],
    env: dict[str, str],
    out_w: int,
    err_w: int,
    status_w: int,
    parent: int,
    pdeathsig: bool,
    tty: int | None,
) -> None:  # pragma: no cover - child side of fork
    code = EXIT_NOT_FOUND
    try:
        os.setpgid(0, 0)
        if tty is not None:
            # From what is now a background group, tcsetpgrp stops us unless SIGTTOU is
            # blocked; the mask is cleared before exec below.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
            os.tcsetpgrp(tty, os.getpid())
        for sig in range(1, signal.NSIG):
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        if pdeathsig:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # parent died before prctl took effect
                os._exit(EXIT_NOT_FOUND)
        if out_w >= 0:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execvpe(argv[0], list(argv), env)
    except OSError as exc:
        os.write(status_w, str(exc.errno or errno.ENOENT).encode())
        code = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
    finally:
        os._exit(code)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    return b"".join(chunks)


def _spawn_error(cmd: str, err: int) -> SpawnError:
    if err in (errno.ENOENT, errno.ENOTDIR):
        return SpawnError(f"{cmd}: command not found", EXIT_NOT_FOUND)
    return SpawnError(f"{cmd}: cannot execute: {os.strerror(err)}", EXIT_NOT_EXECUTABLE)


@dataclass(frozen=True, slots=True)
class Sentinel:
    """A process in the child's process group that tells warmgate about ^C and ^\\.

    The terminal signals its foreground group alone, which the child holds, so warmgate
    would otherwise see only the child's exit. `reports` gets one byte per signal the
    terminal sent: its number. Signals sent by kill(2), warmgate's own forwarding with
    --signal-group included, are not reported.
    """

    pid: int
    reports: int  # read end of the pipe

    def ask_to_exit(self) -> bool:
        """Report what has arrived, then exit (EOF on `reports`); False if it is gone."""
        try:
            os.kill(self.pid, _SENTINEL_EXIT)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def start_sentinel(child: Child) -> Sentinel:
    """Fork the sentinel into `child`'s process group (call before any thread starts)."""
    reports, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the sentinel, which only _exits
        os.close(reports)
        _watch_terminal(child.pgid, write_end, parent)
    os.close(write_end)
    os.set_blocking(reports, False)
    with contextlib.suppress(OSError):  # joined from both sides, as shells do: no window
        os.setpgid(pid, child.pgid)
    return Sentinel(pid, reports)


def read_reports(fd: int) -> list[signal.Signals] | None:
    """The signals a sentinel reported since the last read; None once it has exited."""
    try:
        data = os.read(fd, 64)
    except BlockingIOError:
        return []
    except OSError:
        return None
    return [signal.Signals(signo) for signo in data] if data else None


def _become_helper(keep: int) -> None:  # pragma: no cover - runs in a forked helper
    """Block every signal, put stdio on /dev/null and close every fd but `keep`: the probe
    socket, the cache lock and the other helper's pipe must not outlive warmgate here."""
    signal.pthread_sigmask(signal.SIG_SETMASK, signal.valid_signals())
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd != keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _watch_terminal(pgid: int, reports: int, parent: int) -> None:  # pragma: no cover
    try:
        _become_helper(keep=reports)
        for sig in TERMINAL_STOPS:  # while ignored, a signal would not even be queued
            signal.signal(sig, signal.SIG_DFL)
        die_with_parent(parent)
        os.setpgid(0, pgid)
        while True:
            # One thread, lowest signal first: a ^C queued before warmgate's exit request
            # is always reported before the sentinel exits.
            info = signal.sigwaitinfo({*TERMINAL_STOPS, _SENTINEL_EXIT})
            if info.si_signo == _SENTINEL_EXIT:
                if info.si_pid == parent:
                    return
            elif info.si_code == _SI_KERNEL:
                os.write(reports, bytes([info.si_signo]))
    finally:
        os._exit(0)


class Guard:
    """A process that SIGKILLs the child's process group if warmgate dies without saying
    it is done, as SIGKILL leaves it no chance to (needed when warmgate is not PID 1).

    PR_SET_PDEATHSIG reaches the child alone; vLLM's EngineCore, which holds the GPU, is a
    grandchild in the child's group. The guard has a session of its own (a signal to
    warmgate's group or terminal misses it), blocks every signal and waits on a pipe whose
    only write end warmgate holds: EOF without `_GUARD_DONE` means warmgate died. Its cost:
    one fork before any thread or heavy import (under a millisecond), no CPU, and memory:
    it keeps warmgate's heap as it was at the fork (about 12 MB RSS, of which about 6 MB
    become its own as warmgate's pages change, copy-on-write).
    """

    __slots__ = ("_done", "pid")

    def __init__(self, pid: int, done: int) -> None:
        self.pid = pid
        self._done: int | None = done  # write end of the pipe

    def release(self) -> None:
        """warmgate's own sweep is over: the guard exits without killing. Idempotent."""
        if self._done is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._done, _GUARD_DONE)
        os.close(self._done)
        self._done = None


_GUARD_DONE = b"d"


def start_guard(child: Child) -> Guard:
    """Fork the guard of `child`'s process group (call before any thread starts).

    The group id is the child's pid, which stays reserved while any member of the group
    lives or the child is unreaped; warmgate says done only after its own sweep, so the
    guard kills a group that is still the child's.
    """
    watched, done = os.pipe()  # both close-on-exec: no exec'd process inherits the write end
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the guard, which only _exits
        _guard(child.pgid, watched)
    os.close(watched)
    return Guard(pid, done)


def _guard(pgid: int, watched: int) -> None:  # pragma: no cover - runs in the guard
    try:
        os.setsid()
        _become_helper(keep=watched)
        told = b""
        while data := os.read(watched, 16):  # every signal blocked: nothing interrupts it
            told += data
        if _GUARD_DONE not in told:  # EOF alone: warmgate died before its sweep
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
    finally:
        os._exit(0)


def shell_status(wait_status: int) -> int:
    """A wait status as a shell reports it (`$?`): the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def fatal_signal(wait_status: int) -> int | None:
    """The signal that killed the process, or None when it exited by itself."""
    return os.WTERMSIG(wait_status) if os.WIFSIGNALED(wait_status) else None


class Reaper:
    """Reaps every child, ours and reparented orphans alike, in a thread of its own.

    A blocking waitpid(-1) needs no SIGCHLD handler (uvloop keeps SIGCHLD for
    itself) and cannot miss an exit. The main child's status is handed to
    `on_main_exit` exactly once, so the reaper never loses it.
    """

    def __init__(self, main_pid: int, on_main_exit: Callable[[int], None]) -> None:
        self._main_pid, self._on_main_exit = main_pid, on_main_exit
        self.reaped = 0
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return  # no children left at all
            except InterruptedError:
                continue
            self.reaped += 1
            if pid == self._main_pid:
                self._on_main_exit(status)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def send(child: Child, sig: int, *, group: bool) -> bool:
    """Send `sig` to the child (or its whole process group); False if it is already gone."""
    try:
        if group:
            os.killpg(child.pgid, sig)
        else:
            os.kill(child.pid, sig)
    except ProcessLookupError:
        return False
    return True


def descendants(spare: Collection[int] = ()) -> list[int]:
    """Pids of every live process below us (our children are reparented orphans too),
    but warmgate's own helpers in `spare` (the terminal sentinel, the guard)."""
    import psutil  # imported late: only shutdown needs it

    pids = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.pid not in spare and proc.status() != psutil.STATUS_ZOMBIE:
                pids.append(proc.pid)
    return pids


def kill_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Pump:
    """Copies a child's output fd to ours as bytes arrive (no line buffering).

    A thread, not the event loop, does the blocking writes, so a slow log
    consumer never stalls the probe server. `on_data` sees a copy of each chunk.
    """

    def __init__(self, src: int, dst: int, on_data: Callable[[bytes], None] | None = None) -> None:
        self._src, self._dst, self._on_data = src, dst, on_data
        self._thread = threading.Thread(target=self._run, name=f"pump-{dst}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while data := os.read(self._src, 65536):
                _write_all(self._dst, data)
                if self._on_data is not None:
                    self._on_data(data)
        except OSError:
            pass
        finally:
            os.close(self._src)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            time.sleep(0.001)
        except OSError:
            return  # our own output is gone (EPIPE, EIO): keep draining, so the child never blocks


def is_pid1() -> bool:
    return os.getpid() == 1


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
