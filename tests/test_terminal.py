"""Ctrl-C typed into a real terminal that the child holds: a stop, in both modes.

warmgate runs as the session leader of a new pty, as under `docker run -it`; the child
takes the terminal's foreground, so ^C reaches the child's process group alone.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from wgutil import (
    WARMGATE,
    Running,
    alive,
    events,
    exit_event,
    free_port,
    http_get,
    wait_for,
)

# Runs as the pty's new session leader, takes it as controlling terminal, becomes warmgate.
_SESSION_LEADER = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)
SLEEPER = [sys.executable, "-c", "print('child-running', flush=True); import time; time.sleep(60)"]


class InTerminal:
    """`warmgate ARGS` on a fresh pty; its output is read as it comes, every wait bounded."""

    def __init__(self, args: list[str]) -> None:
        master, slave = os.openpty()
        self._master = master
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SESSION_LEADER, *WARMGATE[1:], *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "WARMGATE_LOG_FORMAT": "json"},
        )
        os.close(slave)
        self._output = b""
        self._done = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 4096)
            except OSError:  # EIO: every holder of the terminal has closed it
                data = b""
            with self._changed:
                self._output += data
                self._done = not data
                self._changed.notify_all()
            if not data:
                return

    @property
    def output(self) -> str:
        return self._output.decode(errors="replace")

    def wait_for(self, predicate: Callable[[str], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (found := predicate(self.output)):
                left = deadline - time.monotonic()
                if left <= 0 or self._done:
                    raise AssertionError(f"not seen within {timeout} s:\n{self.output}")
                self._changed.wait(min(left, 0.1))
            return found

    def event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        def found(text: str) -> dict[str, Any] | None:
            return next((e for e in events(text) if e["event"] == name), None)

        return self.wait_for(found, timeout)  # type: ignore[no-any-return]

    def press(self, keys: bytes) -> None:
        _, ready, _ = select.select([], [self._master], [], 5)
        assert ready, "the terminal takes no input"
        os.write(self._master, keys)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        os.close(self._master)


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def _members_of_the_childs_group(term: InTerminal) -> tuple[int, int]:
    """(child pid, sentinel pid) once both are in the child's group, which holds the terminal."""
    spawn = term.event("spawn")
    child, sentinel = spawn["pid"], spawn["terminal_sentinel"]
    wait_for(lambda: sorted(_group(child)) == sorted([child, sentinel]))
    assert psutil.Process(sentinel).ppid() == term.proc.pid
    return child, sentinel


def _signal_lines(term: InTerminal) -> list[dict[str, Any]]:
    """warmgate's `signal` log lines (the simulator logs lines of that name too)."""
    return [e for e in events(term.output) if e["event"] == "signal" and "forwarded" in e]


def _stopped_by_ctrl_c(term: InTerminal, child: int, sentinel: int) -> dict[str, Any]:
    term.press(b"\x03")
    term.wait(timeout=30)
    end = exit_event(term.output)
    assert (end["reason"], end["signal"]) == ("stopped", "SIGINT"), end
    assert "killed_leftovers" not in end, end
    wait_for(lambda: not _group(child), timeout=5)  # no sentinel, no orphan
    assert not psutil.pid_exists(sentinel) or psutil.Process(sentinel).status() == "zombie"
    heard = _signal_lines(term)
    assert heard == [heard[0]] and heard[0]["source"] == "terminal", heard
    assert heard[0]["forwarded"] is False  # the child has it already
    return end


def test_ctrl_c_in_plain_mode_is_a_stop() -> None:
    term = InTerminal(["run", "--", *SLEEPER])
    try:
        child, sentinel = _members_of_the_childs_group(term)
        term.wait_for(lambda text: "child-running" in text)
        end = _stopped_by_ctrl_c(term, child, sentinel)
    finally:
        term.close()
    # Python dies of an unhandled KeyboardInterrupt by SIGINT: 130.
    assert (end["code"], end["child_signal"]) == (130, "SIGINT"), end
    assert term.proc.returncode == 130


def test_ctrl_c_in_warmup_mode_once_ready_is_a_stop() -> None:
    upstream = free_port()
    term = InTerminal(
        [
            "run", "--host", "127.0.0.1", "--port", "0", "--health-interval", "0.1",
            "--features", "greedy", "--concurrency", "1", "--max-repeats", "2",
            "--", *WARMGATE, "sim", "--host", "127.0.0.1", "--port", str(upstream),
            "--load-seconds", "0", "--time-scale", "0", "--max-model-len", "512",
        ]
    )  # fmt: skip
    try:
        child, sentinel = _members_of_the_childs_group(term)
        port = int(term.event("listening")["port"])
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60, interval=0.1)
        end = _stopped_by_ctrl_c(term, child, sentinel)
    finally:
        term.close()
    assert end["phase"] == "stopped", end
    phases = [e["phase"] for e in events(term.output) if e["event"] == "phase"]
    assert phases[-3:] == ["ready", "draining", "stopped"], phases


def test_a_ctrl_c_is_heard_before_the_exit_it_caused() -> None:
    # The sentinel, held stopped, hears ^C only after the child has died of it; warmgate
    # waits for the sentinel's report before it takes the child's exit as the end.
    term = InTerminal(["run", "--", *SLEEPER])
    try:
        child, sentinel = _members_of_the_childs_group(term)
        term.wait_for(lambda text: "child-running" in text)
        os.kill(sentinel, signal.SIGSTOP)
        term.press(b"\x03")
        wait_for(lambda: not alive(child), interval=0.005)
        os.kill(sentinel, signal.SIGCONT)
        term.wait(timeout=30)
    finally:
        term.close()
    end = exit_event(term.output)
    assert (end["reason"], end["signal"], end["code"]) == ("stopped", "SIGINT", 130), end


def test_a_child_that_signals_its_own_group_is_not_a_stop() -> None:
    # Only the terminal's ^C is a stop; the same SIGINT from kill(2) is the child's own doing.
    script = "import os, signal, time; input(); os.killpg(0, signal.SIGINT); time.sleep(30)"
    term = InTerminal(["run", "--", sys.executable, "-c", script])
    try:
        _members_of_the_childs_group(term)
        term.press(b"go\r")
        term.wait(timeout=30)
    finally:
        term.close()
    end = exit_event(term.output)
    assert (end["reason"], end["signal"]) == ("child_killed", "SIGINT"), end
    assert not _signal_lines(term)


def test_without_a_terminal_there_is_no_sentinel() -> None:
    warmgate = Running(["run", "--", *SLEEPER])
    try:
        spawn = warmgate.wait_event("spawn", timeout=10)
        assert "terminal_sentinel" not in spawn
        kids = psutil.Process(warmgate.proc.pid).children()
        # the child, and the guard (warmgate is not PID 1 here), which is no sentinel
        assert sorted(k.pid for k in kids) == sorted([spawn["pid"], spawn["guard"]])
        assert os.getpgid(spawn["guard"]) != spawn["pid"]
        warmgate.proc.send_signal(signal.SIGTERM)
        assert warmgate.wait(timeout=15) == 143
    finally:
        warmgate.stop()


def test_the_terminal_reaches_an_interactive_child(tmp_path: Path) -> None:
    # The child holds the terminal: it reads what is typed, and ^C it handles is no exit.
    script = (
        "import signal; signal.signal(signal.SIGINT, lambda *a: print('caught', flush=True)); "
        "print('prompt', flush=True); line = input(); raise SystemExit(len(line))"
    )
    term = InTerminal(["run", "--stop-timeout", "1", "--", sys.executable, "-c", script])
    try:
        term.wait_for(lambda text: "prompt" in text)
        term.press(b"\x03")
        term.wait_for(lambda text: "caught" in text)
        time.sleep(1.5)  # past --stop-timeout: a terminal stop arms no SIGKILL
        term.press(b"abc\r")
        assert term.wait(timeout=30) == 3
    finally:
        term.close()
    end = exit_event(term.output)
    assert (end["reason"], end["code"], end["signal"]) == ("stopped", 3, "SIGINT"), end


def test_a_usage_error_in_a_terminal_keeps_the_log_format_of_the_environment() -> None:
    # Settings that fail to parse cannot say the format: WARMGATE_LOG_FORMAT still does.
    term = InTerminal(["run", "--max-repeats", "1", "--", "true"])
    try:
        assert term.wait() == 2
        end = term.event("exit")
    finally:
        term.close()
    assert (end["reason"], end["code"]) == ("usage", 2)
    assert "--max-repeats 1 must be >= 2" in end["error"]
