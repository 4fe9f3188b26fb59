"""warmgate's plain-init mode, checked on real processes, signals and PID namespaces."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from wgutil import (
    WARMGATE,
    Running,
    alive,
    child,
    events,
    exit_event,
    run,
    start,
    wait_for,
)

from warmgate.process import FORWARDED_SIGNALS


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_code_passes_through(code: int) -> None:
    rc, _, err = run(["run", "--", sys.executable, "-c", f"raise SystemExit({code})"])
    assert rc == code
    assert exit_event(err) | {"reason": "child_exited", "code": code} == exit_event(err)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_killed_child_gives_128_plus_signal(sig: int, code: int) -> None:
    rc, _, err = run(["run", "--", sys.executable, "-c", f"import os; os.kill(os.getpid(), {sig})"])
    assert rc == code
    assert exit_event(err)["reason"] == "child_killed"
    assert exit_event(err)["signal"] == signal.Signals(sig).name


def test_missing_command_is_127() -> None:
    rc, _, err = run(["run", "--", "/nonexistent/warmgate-test-cmd"])
    assert rc == 127
    assert exit_event(err)["reason"] == "command_not_found"
    assert "Traceback" not in err


def test_not_executable_is_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    rc, _, err = run(["run", "--", str(script)])
    assert rc == 126
    assert exit_event(err)["reason"] == "not_executable"


@pytest.mark.parametrize(
    "args", [[], ["--"], ["--no-such-flag", "true"], ["--stop-timeout", "x", "true"]]
)
def test_usage_errors_are_2_with_one_line(args: list[str]) -> None:
    rc, _out, err = run(["run", *args])
    assert rc == 2
    assert err.strip().count("\n") == 0, err
    assert exit_event(err)["reason"] == "usage"
    assert "Traceback" not in err


def test_command_is_found_on_path_and_options_end_at_first_argument() -> None:
    # `--stop-timeout` after the command belongs to the command, not to warmgate.
    rc, out, _ = run(["run", "sh", "-c", 'echo "$0 $1"', "--stop-timeout", "x"])
    assert rc == 0
    assert out == "--stop-timeout x\n"


def test_every_forwarded_signal_reaches_the_child(tmp_path: Path) -> None:
    record = tmp_path / "signals"
    proc = start(["run", "--stop-timeout", "60", "--", *child("recorder.py", str(record))])
    try:
        wait_for(lambda: "ready" in _lines(record))
        expected = [s for s in FORWARDED_SIGNALS if s != signal.SIGTERM]
        for sig in expected:
            proc.send_signal(sig)
            wait_for(lambda sig=sig: sig.name in _lines(record), timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    got = _lines(record)
    assert got == ["ready", *[s.name for s in expected], "SIGTERM"]


def test_a_stop_signal_forwarded_in_plain_mode_ends_as_stopped() -> None:
    warmgate = Running(["run", "--", sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        warmgate.wait_event("spawn", timeout=10)
        warmgate.proc.send_signal(signal.SIGINT)
        code = warmgate.wait(timeout=15)
    finally:
        warmgate.stop()
    end = exit_event(warmgate.stderr)
    # Python re-raises an unhandled KeyboardInterrupt as death by SIGINT: 130.
    assert (end["reason"], end["code"], end["signal"]) == ("stopped", 130, "SIGINT"), end
    assert end["child_signal"] == "SIGINT" and code == 130


def test_signal_group_reaches_grandchild(tmp_path: Path) -> None:
    mine, grand = tmp_path / "child", tmp_path / "grandchild"
    proc = start(
        [
            "run",
            "--signal-group",
            "--",
            *child("recorder.py", str(mine), "--spawn-grandchild", str(grand)),
        ]
    )
    try:
        wait_for(lambda: "ready" in _lines(mine) and "ready" in _lines(grand))
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "SIGUSR1" in _lines(mine) and "SIGUSR1" in _lines(grand))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    assert "SIGTERM" in _lines(grand)


def test_without_signal_group_only_the_child_is_signalled(tmp_path: Path) -> None:
    mine, grand = tmp_path / "child", tmp_path / "grandchild"
    proc = start(["run", "--", *child("recorder.py", str(mine), "--spawn-grandchild", str(grand))])
    try:
        wait_for(lambda: "ready" in _lines(mine) and "ready" in _lines(grand))
        proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "SIGUSR2" in _lines(mine))
        time.sleep(0.2)
        assert "SIGUSR2" not in _lines(grand)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


def test_as_pid1_reaps_orphaned_zombies(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        # CI machines are root with unshare(1): there this test must run, never skip.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "needs root and unshare(1) for a PID namespace"
        )
    report = tmp_path / "report"
    cmd = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        *WARMGATE,
        "run",
        "--",
        *child("orphaner.py", "100", str(report), "7"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, timeout=60, env={**os.environ, "WARMGATE_LOG_FORMAT": "json"}
    )
    err = proc.stderr.decode()
    assert proc.returncode == 7, err
    zombies, _pid = report.read_text().split()
    assert zombies == "0"
    spawn = next(e for e in events(err) if e["event"] == "spawn")
    assert spawn["pid1"] is True
    assert exit_event(err)["code"] == 7


def test_subreaper_adopts_and_reaps_orphans(tmp_path: Path) -> None:
    ppid_file = tmp_path / "ppid"
    proc = start(["run", "--", *child("reparent.py", str(ppid_file), "2")])
    try:
        wait_for(ppid_file.exists)
        assert int(ppid_file.read_text()) == proc.pid
        time.sleep(0.6)  # the orphan has exited by now
        kids = psutil.Process(proc.pid).children()
        assert [k for k in kids if k.status() == psutil.STATUS_ZOMBIE] == []
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_sigkill_of_warmgate_takes_the_child_down(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = start(["run", "--", *child("family.py", str(pids), "wait")])
    wait_for(pids.exists)
    child_pid = int(pids.read_text().split()[0])
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(child_pid), timeout=5)


class SessionLeader(Running):
    """warmgate as the leader of a session and process group of its own, as a shell starts
    a job: killpg(warmgate's pid) reaches everything in that group at once."""

    def __init__(self, args: list[str]) -> None:
        self._watch(start(args, start_new_session=True))


def test_sigkill_of_warmgate_and_its_group_leaves_no_grandchild(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG reaches the child alone; the guard, in a session of its own, outlives
    even a SIGKILL of warmgate's whole process group and takes the child's group down."""
    pids = tmp_path / "pids"
    wg = SessionLeader(["run", "--", *child("family.py", str(pids), "wait")])
    try:
        guard = wg.wait_event("spawn")["guard"]
        wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        child_pid, grand_pid = map(int, pids.read_text().split())
        assert os.getsid(guard) == os.getpgid(guard) == guard  # neither ours nor the child's
        os.killpg(wg.proc.pid, signal.SIGKILL)
        assert wg.wait(timeout=10) == -signal.SIGKILL
    finally:
        wg.stop()
    wait_for(lambda: not alive(child_pid) and not alive(grand_pid) and not alive(guard), 5)


GUARDED = """
import os, sys
from warmgate import process
# captured: the sleeper must not hold the test's stdout pipe open
child = process.spawn(["sleep", "60"], dict(os.environ), capture_output=True, pdeathsig=False,
                      tty=None)
guard = process.start_guard(child)
print(child.pid, flush=True)
if sys.argv[1] == "release":
    guard.release()
    guard.release()  # a second release does nothing
    _, status = os.waitpid(guard.pid, 0)  # it has read its pipe to the end and exited
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.parametrize("end", ["release", "exit"])
def test_the_guard_kills_the_childs_group_only_when_warmgate_ends_unreleased(end: str) -> None:
    # A child without PR_SET_PDEATHSIG: only the guard can stop it once its parent is gone.
    out = subprocess.run(
        [sys.executable, "-c", GUARDED, end], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    child_pid, *guard_code = map(int, out.stdout.split())
    sleeper = psutil.Process(child_pid)
    try:
        if end == "release":
            assert guard_code == [0] and alive(child_pid)  # the guard left it alone
        else:
            wait_for(lambda: not alive(child_pid), timeout=5)
    finally:
        with contextlib.suppress(psutil.Error):
            sleeper.kill()


def test_stubborn_child_is_killed_after_stop_timeout(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = start(["run", "--stop-timeout", "1", "--", *child("family.py", str(pids), "stubborn")])
    try:
        wait_for(pids.exists)
        child_pid, grand_pid = map(int, pids.read_text().split())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 137
    finally:
        proc.kill()
    wait_for(lambda: not alive(child_pid) and not alive(grand_pid), timeout=5)
    _, err = proc.communicate()
    names = [e["event"] for e in events(err.decode())]
    assert names.index("signal") < names.index("stop_timeout") < names.index("exit"), names
    (stopped,) = [e for e in events(err.decode()) if e["event"] == "stop_timeout"]
    assert stopped["after_s"] == 1


def test_leftover_processes_are_stopped_when_the_child_exits(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    rc, _, _err = run(["run", "--", *child("family.py", str(pids), "orphan")])
    assert rc == 0
    _, grand_pid = map(int, pids.read_text().split())
    wait_for(lambda: not alive(grand_pid), timeout=5)


def test_output_passes_through_unbuffered_and_byte_exact() -> None:
    script = (
        "import sys,time; sys.stdout.write('10%\\r20%\\rdone'); sys.stdout.flush(); time.sleep(3)"
    )
    proc = start(["run", "--", sys.executable, "-c", script])
    try:
        assert proc.stdout is not None
        got = b""
        while len(got) < len(b"10%\r20%\rdone"):
            got += os.read(proc.stdout.fileno(), 100)
        assert got == b"10%\r20%\rdone"
        assert proc.poll() is None  # it arrived while the child still ran (it sleeps 3 s)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_own_variables_are_removed_from_the_child_environment() -> None:
    names = ["WARMGATE_STOP_TIMEOUT", "WARMGATE_SIGNAL_GROUP", "WARMGATE_SIM_PORT"]
    script = f"import os; print(sorted(k for k in os.environ if k in {names!r}))"
    env = {"WARMGATE_STOP_TIMEOUT": "5", "WARMGATE_SIGNAL_GROUP": "1", "WARMGATE_SIM_PORT": "9"}
    rc, out, _ = run(["run", "--", sys.executable, "-c", script], env=env)
    assert rc == 0
    assert out.strip() == "['WARMGATE_SIM_PORT']"


def test_environment_variables_configure_run(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = start(
        ["run", "--", *child("family.py", str(pids), "stubborn")],
        env={"WARMGATE_STOP_TIMEOUT": "0.5"},
    )
    try:
        wait_for(pids.exists)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 137
    finally:
        proc.kill()


def test_child_gets_default_signal_dispositions_and_mask() -> None:
    script = (
        "import signal; "
        "print(signal.pthread_sigmask(signal.SIG_BLOCK, []) == set(), "
        "signal.getsignal(signal.SIGTTOU) == signal.SIG_DFL, signal.getsignal(signal.SIGPIPE))"
    )
    rc, out, _ = run(["run", "--", sys.executable, "-c", script])
    assert rc == 0
    # Python itself ignores SIGPIPE at start-up, so its value says nothing; the mask and SIGTTOU do.
    assert out.startswith("True True")


def test_version() -> None:
    rc, out, _ = run(["--version"])
    assert rc == 0 and out.startswith("warmgate ")
