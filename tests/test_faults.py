"""Faults warmgate must survive: the rows of docs/reliability.md that no other test file shows.

Real processes, signals and loopback sockets: `warmgate run` over `warmgate sim`, the
simulator's fault switches, SIGSTOP for an engine that stops answering, SIGKILL for the
OOM killer, tmpfs mounts in a private mount namespace for cache volumes, and a small
loopback proxy in front of the simulator where a test must see what warmgate sends.
Every test checks what a user sees (probe answers, log events, the exit line) and that
nothing is left running; every process it starts is killed at teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from wgutil import WARMGATE, Running, alive, events, exit_event, free_port, http_get, wait_for

# Ready in a second or two: 12 one-token shapes, one request at a time, a 256-token context.
FAST = (
    *("--features", "greedy", "--concurrency", "1", "--max-repeats", "2", "--max-tokens", "1"),
    *("--health-interval", "0.1", "--drain-min", "0", "--stop-timeout", "2"),
)
# vLLM's API server runs its engine in a subprocess of its own (EngineCore), in the same
# process group; `sleep` plays that part here: `sh` starts it, notes its pid in the file
# named by $0, and execs the simulator in its own place.
ENGINE_CORE = 'sleep 600 & echo $! > "$0"; exec "$@"'


class Wrapped(Running):
    """warmgate started through another command (unshare, say) that execs it or forks it."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "WARMGATE_LOG_FORMAT": "json", **(env or {})}
        self._watch(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        )


@dataclass
class Pod:
    """One `warmgate run` over the simulator, and the processes it is responsible for."""

    wg: Running
    port: int  # warmgate's probe port
    sim_port: int
    child_pid: int  # the simulator (or the shell that became it)
    engine_core: int | None = None  # the child's own subprocess, when one was asked for
    watched: list[psutil.Process] = field(default_factory=list)  # to kill at teardown

    def get(self, path: str) -> tuple[int, Any]:
        return http_get(self.port, path)

    def send(self, sig: signal.Signals) -> None:
        self.wg.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.wg.wait(timeout=timeout)

    def watch(self, pid: int) -> int:
        with contextlib.suppress(psutil.Error):
            self.watched.append(psutil.Process(pid))
        return pid

    def own(self, name: str) -> list[dict[str, Any]]:
        """warmgate's own log events of one name (the simulator's pass through its stderr
        too; for these names warmgate's carry a field the simulator's never do)."""
        mine = {"listening": "upstream", "signal": "forwarded"}
        found = self.wg.events(name)
        return [e for e in found if name not in mine or mine[name] in e]

    def sim_stopped(self) -> list[dict[str, Any]]:
        """The simulator's own `stopped` lines: it heard a stop signal and exited cleanly."""
        return [e for e in self.wg.events("stopped") if "exit_code" in e]

    def phases(self) -> list[str]:
        return [e["phase"] for e in self.own("phase")]

    def end(self) -> dict[str, Any]:
        return exit_event(self.wg.stderr)

    def left(self, *more: int) -> list[int]:
        """Pids still running (zombies count as gone): the child, its engine subprocess,
        `more`, and anything else in the child's process group."""
        pids = {self.child_pid, *more, *([self.engine_core] if self.engine_core else [])}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(proc.pid) == self.child_pid:
                    pids.add(proc.pid)
        return sorted(pid for pid in pids if alive(pid))


class Pods:
    """Starts pods; at teardown kills warmgate and whatever it was responsible for."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Pod] = []

    def start(
        self,
        *wg_args: str,
        sim_args: Sequence[str] = (),
        engine_core: bool = False,
        upstream: str | None = None,
        wrap: Sequence[str] = (),
        env: dict[str, str] | None = None,
        child_args: Sequence[str] = (),
        sim_port: int | None = None,
        ready: bool = True,
    ) -> Pod:
        sim_port = sim_port or free_port()
        child = [sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1"]
        child += ["--port", str(sim_port), "--max-model-len", "256", "--time-scale", "0"]
        child += ["--load-seconds", "0", *sim_args]
        pid_file = self.tmp_path / f"engine_core.{len(self.started)}"
        if engine_core:
            child = ["sh", "-c", ENGINE_CORE, str(pid_file), *child]
        if child_args:  # a command line with words of its own before the engine's argv
            drop = f'shift {len(child_args) - 1}; exec "$@"'
            child = ["sh", "-c", drop, *child_args, *child]
        # warmgate recognises the simulator, not a shell in front of it
        wrapped = engine_core or bool(child_args)
        own_upstream = upstream or (f"http://127.0.0.1:{sim_port}" if wrapped else None)
        args = ["run", "--host", "127.0.0.1", "--port", "0", *FAST]
        args += [*(("--upstream", own_upstream) if own_upstream else ()), *wg_args, "--", *child]
        wg = Wrapped([*wrap, *WARMGATE, *args], env) if wrap else Running(args, env)
        pod = Pod(wg, 0, sim_port, 0)
        self.started.append(pod)
        pod.watch(wg.proc.pid)
        url = own_upstream or f"http://127.0.0.1:{sim_port}"
        pod.port = int(wg.wait_event("listening", timeout=30, upstream=url)["port"])
        pod.child_pid = pod.watch(int(wg.wait_event("spawn", timeout=10)["pid"]))
        wg.wait_event("starting", timeout=30)  # the simulator's signal handlers are in place
        if engine_core:
            text = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
            pod.engine_core = pod.watch(int(text))
        if ready:
            wait_for(lambda: pod.get("/ready")[0] == 200, timeout=60, interval=0.05)
        return pod

    def close(self) -> None:
        for pod in self.started:
            pod.wg.stop()
            for proc in pod.watched:
                with contextlib.suppress(psutil.Error):
                    proc.kill()  # psutil checks that it is still the same process
            # pytest shows this only for a failed test: the log that explains it
            print(f"--- warmgate stderr, pid {pod.wg.proc.pid} ---\n{pod.wg.stderr[-6000:]}")


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Pods]:
    started = Pods(tmp_path)
    try:
        yield started
    finally:
        started.close()


def exchange(port: int, payload: bytes) -> bytes:
    """Send raw bytes to the probe port and read until the server closes the connection.

    A reset after the answer counts as a close (the server closes with unread bytes of an
    oversized head still queued); a server that never closes fails with a timeout.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            conn.sendall(payload)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def stop_and_check(pod: Pod, code: int = 0) -> dict[str, Any]:
    """SIGTERM as the kubelet sends it: the run ends `stopped` with `code`, nothing left."""
    pod.send(signal.SIGTERM)
    assert pod.wait() == code
    end = pod.end()
    assert (end["reason"], end["code"], end["signal"]) == ("stopped", code, "SIGTERM"), end
    assert wait_for(lambda: not pod.left(), timeout=10)
    return end


# --- the probe port ---------------------------------------------------------------------

GARBAGE = {
    "tls_client_hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    "binary": b"\x00\xff\xfe\x01garbage\r\n\r\n",
    "empty_lines": b"\r\n\r\n",
    "no_path": b"GET\r\n\r\n",
    "header_without_colon": b"GET /ready HTTP/1.1\r\nHost x\r\n\r\n",
    "bad_content_length": b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
    "http_0_9": b"GET /ready\r\n\r\n",
}


def test_garbage_bytes_get_400_and_probes_keep_answering(pods: Pods) -> None:
    pod = pods.start(sim_args=("--load-seconds", "60"), ready=False)
    for name, payload in GARBAGE.items():
        # exchange() returns only once warmgate has closed the connection itself
        reply = exchange(pod.port, payload)
        assert reply.startswith(b"HTTP/1.1 400 "), (name, reply[:200])
    assert pod.get("/ready") == (503, {"ok": False, "phase": "loading"})
    assert pod.get("/live")[0] == 200 and pod.get("/startup")[0] == 503
    assert pod.wg.proc.poll() is None and not pod.own("internal_error")
    stop_and_check(pod)


def test_oversized_heads_get_431_and_probes_keep_answering(pods: Pods) -> None:
    pod = pods.start(sim_args=("--load-seconds", "60"), ready=False)
    request = b"GET /ready HTTP/1.1\r\nHost: x\r\n"
    oversized = {
        "one_64k_header": request + b"X-Big: " + b"a" * 65536 + b"\r\n\r\n",
        "one_1m_header": request + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
        "3000_small_headers": request + b"X-A: b\r\n" * 3000 + b"\r\n",
        "20k_path": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "unterminated_1m_head": request + b"X-Big: " + b"a" * (1 << 20),
    }
    for name, payload in oversized.items():
        reply = exchange(pod.port, payload)
        assert reply.startswith(b"HTTP/1.1 431 "), (name, reply[:200])
    assert pod.get("/ready") == (503, {"ok": False, "phase": "loading"})
    assert pod.get("/live")[0] == 200
    assert pod.wg.proc.poll() is None and not pod.own("internal_error")
    stop_and_check(pod)


# --- the upstream during the warm-up ------------------------------------------------------


class Proxy:
    """A loopback front for the simulator that records (path, status) of every request
    and, given a key, refuses /v1/* without `Authorization: Bearer KEY` as vLLM's
    --api-key does."""

    def __init__(self, upstream_port: int, key: str | None = None) -> None:
        self.upstream_port, self.key = upstream_port, key
        self.seen: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.forward(self)

            def do_POST(self) -> None:
                proxy.forward(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        given = handler.headers.get("Authorization")
        headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        if self.key and handler.path.startswith("/v1/") and given != f"Bearer {self.key}":
            status, data = 401, b'{"error": "Unauthorized"}'
        else:
            skip = {"host", "connection", "content-length"}
            sent = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
            conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
            try:
                conn.request(handler.command, handler.path, body, sent)
                reply = conn.getresponse()
                status, data = reply.status, reply.read()
                hop = {"transfer-encoding", "connection", "content-length"}
                headers = [(k, v) for k, v in reply.getheaders() if k.lower() not in hop]
            except OSError:
                status, data = 502, b'{"error": "upstream down"}'
            finally:
                conn.close()
        with self._lock:
            self.seen.append((handler.path, status))
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(data)

    def statuses(self, prefix: str) -> list[int]:
        with self._lock:
            return [status for path, status in self.seen if path.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    started: list[Proxy] = []
    try:
        yield started
    finally:
        for proxy in started:
            proxy.close()


def test_upstream_5xx_during_warmup_is_retried_and_the_pod_gets_ready(
    pods: Pods, proxies: list[Proxy]
) -> None:
    # The simulator answers its first 3 generation requests 500: the warm-up's probe of
    # the model kind, then two attempts at the first shape, whose third attempt succeeds.
    sim_port = free_port()
    proxy = Proxy(sim_port)
    proxies.append(proxy)
    pod = pods.start(
        upstream=proxy.url, sim_port=sim_port, sim_args=("--fail-first", "3"), ready=False
    )
    wait_for(lambda: pod.get("/ready")[0] == 200, timeout=60, interval=0.05)
    assert pod.get("/startup")[0] == 200 and pod.get("/live")[0] == 200
    generated = proxy.statuses("/v1/")
    assert generated.count(500) == 3 and generated[-1] == 200, generated
    assert not pod.own("warmup_failed")
    shapes = pod.get("/status")[1]["shapes"]
    assert shapes and {s["status"] for s in shapes} <= {
        "converged",
        "verified",
        "out_of_repeats",
    }, shapes
    assert pod.phases() == ["loading", "warming", "ready"]
    stop_and_check(pod)


@pytest.mark.parametrize(
    ("fault", "sim_args", "named"),
    [
        ("http_500", ("--fail-first", "100000"), "HTTP 500"),
        ("garbage", ("--malformed",), "not JSON"),
    ],
)
def test_broken_upstream_during_warmup_stops_the_child_and_exits_70(
    pods: Pods, fault: str, sim_args: tuple[str, ...], named: str
) -> None:
    pod = pods.start(sim_args=sim_args, engine_core=True, ready=False)
    worker = pod.watch(int(pod.wg.wait_event("warmup_worker", timeout=30)["pid"]))
    # Each failing request is tried 3 times with backoff: it is still warming now.
    assert pod.get("/ready") == (503, {"ok": False, "phase": "warming"})
    assert pod.get("/startup")[0] == 503 and pod.get("/live")[0] == 200
    assert pod.wait() == 70

    end = pod.end()
    assert (end["reason"], end["code"], end["phase"]) == ("warmup_failed", 70, "failed"), end
    (failed,) = pod.own("warmup_failed")
    assert named in failed["error"] and failed["policy"] == "fail", failed
    assert [e["signal"] for e in pod.own("signal")] == ["SIGTERM"]
    assert [e["exit_code"] for e in pod.sim_stopped()] == [0]  # it heard SIGTERM and left
    assert pod.phases() == ["loading", "warming", "failed"]
    assert wait_for(lambda: not pod.left(worker), timeout=10)


def test_upstream_that_stops_answering_during_warmup_fails_it_and_stops_the_child(
    pods: Pods,
) -> None:
    # Generation requests are held for 60 s (/health still answers): each warm-up
    # request times out after --request-timeout, and is tried 3 times.
    pod = pods.start(
        "--request-timeout", "1", sim_args=("--slow", "60"), engine_core=True, ready=False
    )
    worker = pod.watch(int(pod.wg.wait_event("warmup_worker", timeout=30)["pid"]))
    assert pod.get("/ready") == (503, {"ok": False, "phase": "warming"})
    assert pod.get("/live")[0] == 200  # the child lives; only the warm-up can tell
    assert pod.wait() == 70

    end = pod.end()
    assert (end["reason"], end["code"], end["phase"]) == ("warmup_failed", 70, "failed"), end
    (failed,) = pod.own("warmup_failed")
    assert "ReadTimeout" in failed["error"], failed
    assert [e["exit_code"] for e in pod.sim_stopped()] == [0]  # SIGTERM ended it in time
    assert not pod.own("stop_timeout")
    assert wait_for(lambda: not pod.left(worker), timeout=10)


# --- the engine dies ----------------------------------------------------------------------


def test_engine_dying_while_loading_ends_with_its_exit_code(pods: Pods) -> None:
    pod = pods.start(
        sim_args=("--load-seconds", "4", "--crash-during-load", "--crash-code", "3"),
        engine_core=True,
        ready=False,
    )
    assert pod.get("/ready") == (503, {"ok": False, "phase": "loading"})
    assert pod.get("/startup")[0] == 503 and pod.get("/live")[0] == 200
    assert pod.wait() == 3  # the simulator dies half-way through its 4 s load

    end = pod.end()
    assert (end["reason"], end["code"], end["phase"]) == ("child_exited", 3, "failed"), end
    assert pod.own("phase")[-1]["reason"] == "child exited unexpectedly with 3"
    assert not pod.own("warmup_worker") and not pod.own("signal")
    assert wait_for(lambda: not pod.left(), timeout=10)  # its engine subprocess too


def test_engine_killed_after_ready_ends_as_killed_and_leaves_nothing(pods: Pods) -> None:
    pod = pods.start(engine_core=True)
    assert pod.get("/live")[0] == 200
    os.kill(pod.child_pid, signal.SIGKILL)  # as the OOM killer does
    assert pod.wait() == 137

    end = pod.end()
    assert (end["reason"], end["code"], end["signal"]) == ("child_killed", 137, "SIGKILL"), end
    assert end["phase"] == "failed"
    assert pod.phases()[-2:] == ["ready", "failed"]
    assert pod.own("phase")[-1]["reason"] == "child exited unexpectedly with 137"
    # The engine's own subprocess outlived it: warmgate adopted it (subreaper) and stopped it.
    assert wait_for(lambda: not pod.left(), timeout=10)


def test_killed_warmup_worker_fails_the_warmup_and_stops_the_child(pods: Pods) -> None:
    pod = pods.start(sim_args=("--slow", "0.1"), engine_core=True, ready=False)
    worker = pod.watch(int(pod.wg.wait_event("warmup_worker", timeout=30)["pid"]))
    assert pod.get("/ready") == (503, {"ok": False, "phase": "warming"})
    os.kill(worker, signal.SIGKILL)
    assert pod.wait() == 70

    end = pod.end()
    assert (end["reason"], end["code"], end["phase"]) == ("warmup_failed", 70, "failed"), end
    (failed,) = pod.own("warmup_failed")
    assert "ended without a verdict" in failed["error"], failed
    assert [e["signal"] for e in pod.own("signal")] == ["SIGTERM"]
    assert [e["exit_code"] for e in pod.sim_stopped()] == [0]
    assert wait_for(lambda: not pod.left(worker), timeout=10)


# --- after Ready --------------------------------------------------------------------------


def test_upstream_wedged_after_ready_turns_live_503_after_live_grace(pods: Pods) -> None:
    pod = pods.start(
        "--unhealthy-threshold", "2", "--live-grace", "2", "--stop-timeout", "1",
        "--drain-timeout", "1", engine_core=True,
    )  # fmt: skip
    os.kill(pod.child_pid, signal.SIGSTOP)  # wedged: /health accepts and never answers
    unhealthy = pod.wg.wait_event("phase", timeout=30, phase="unhealthy")
    assert "health failed 2 times in a row" in unhealthy["reason"], unhealthy
    assert pod.get("/ready") == (503, {"ok": False, "phase": "unhealthy"})
    assert pod.get("/live")[0] == 200  # within --live-grace
    wait_for(lambda: pod.get("/live")[0] == 503, timeout=30, interval=0.1)
    assert pod.get("/startup")[0] == 200  # never goes back
    assert pod.get("/ready")[0] == 503

    # The kubelet restarts the container: SIGTERM; the stopped engine never exits by itself.
    pod.send(signal.SIGTERM)
    assert pod.wait() == 137
    end = pod.end()
    assert (end["reason"], end["signal"], end["child_signal"]) == ("stopped", "SIGTERM", "SIGKILL")
    # A wedged engine may still be busy: the drain waits for it to its deadline.
    assert end["drain"] == "timed_out" and pod.own("stop_timeout"), end
    (done,) = pod.own("drain_done")
    assert done["unread"] == "no_answer", done
    assert pod.phases()[-3:] == ["unhealthy", "draining", "stopped"]
    assert wait_for(lambda: not pod.left(), timeout=10)


def test_second_sigterm_skips_the_drain_and_leaves_nothing(pods: Pods) -> None:
    pod = pods.start("--drain-min", "30", "--grace-period", "60", engine_core=True)
    pod.send(signal.SIGTERM)
    pod.wg.wait_event("drain", timeout=10, phase="draining")
    assert pod.get("/ready") == (503, {"ok": False, "phase": "draining"})
    assert pod.get("/live")[0] == 200
    pod.send(signal.SIGTERM)
    assert pod.wait(timeout=20) == 0  # well before --drain-min 30

    end = pod.end()
    assert (end["reason"], end["signal"], end["drain"]) == ("stopped", "SIGTERM", "skipped"), end
    notes = [e["note"] for e in pod.own("lifecycle")]
    assert "second SIGTERM: drain skipped, stopping now" in notes
    assert [e["exit_code"] for e in pod.sim_stopped()] == [0]
    assert wait_for(lambda: not pod.left(), timeout=10)


# --- the cache volume ---------------------------------------------------------------------


def private_mount(vol: Path, options: str, then: str = "true") -> list[str]:
    """argv prefix: mount a tmpfs on `vol` in a mount namespace of warmgate's own, run
    `then` (shell), then exec the rest. Root ignores file modes; a read-only or full
    mount it cannot ignore."""
    vol.mkdir()
    script = f'mount -t tmpfs -o {options} tmpfs "$0" && {{ {then}; }} && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(vol)]


@pytest.mark.parametrize(
    ("volume", "options", "then", "named"),
    [
        # 4g (a limit, not memory used): past the free-space check, to the first write
        ("read_only", "ro,size=4g", "true", "the volume is read-only"),
        # dd stops at ENOSPC: nothing is left for a compile cache
        (
            "full",
            "size=64k",
            'dd if=/dev/zero of="$0/fill" bs=4k 2>/dev/null; true',
            "only 0 MiB free",
        ),
    ],
)
def test_unusable_cache_volume_warns_and_the_pod_gets_ready_without_it(
    pods: Pods, tmp_path: Path, volume: str, options: str, then: str, named: str
) -> None:
    vol = tmp_path / "cache"
    pod = pods.start("--cache-dir", str(vol), wrap=private_mount(vol, options, then))
    (warning,) = pod.own("cache")
    assert warning["level"] == "warning", warning
    assert named in warning["note"] and "without the compile cache" in warning["note"], warning
    assert pod.get("/status")[1]["cache"] is None
    assert "warmgate_cache_bytes{" not in pod.get("/metrics")[1]
    environ = Path(f"/proc/{pod.child_pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith((b"VLLM_CACHE_ROOT=", b"TRITON_CACHE_DIR="))]
    stop_and_check(pod)


# --- warmgate itself is killed ------------------------------------------------------------


def test_sigkill_of_warmgate_takes_the_engine_and_the_worker_down(pods: Pods) -> None:
    pod = pods.start(sim_args=("--slow", "0.1"), ready=False)
    worker = pod.watch(int(pod.wg.wait_event("warmup_worker", timeout=30)["pid"]))
    pod.wg.proc.kill()  # no handler runs: only PR_SET_PDEATHSIG can stop them now
    assert pod.wait() == -signal.SIGKILL
    assert wait_for(lambda: not alive(pod.child_pid) and not alive(worker), timeout=10)


def test_sigkill_of_warmgate_leaves_no_engine_subprocess_behind(pods: Pods) -> None:
    """vLLM's EngineCore, which holds the GPU, is the API server's child, not warmgate's;
    it does not die with its parent (vllm-project/vllm#55510)."""
    pid_file = pods.tmp_path / "engine_core"
    wg = Running(["run", "--", "sh", "-c", ENGINE_CORE, str(pid_file), "sleep", "600"])
    pod = Pod(wg, 0, 0, 0)
    pods.started.append(pod)
    pod.watch(wg.proc.pid)
    pod.child_pid = pod.watch(int(wg.wait_event("spawn", timeout=10)["pid"]))
    engine_core = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())
    pod.engine_core = pod.watch(int(engine_core))
    wg.proc.kill()  # warmgate is not PID 1 here: PR_SET_PDEATHSIG reaches its child only
    assert pod.wait() == -signal.SIGKILL
    assert wait_for(lambda: not alive(pod.child_pid), timeout=10)
    assert wait_for(lambda: not alive(pod.engine_core or 0), timeout=5)


def test_sigkill_of_warmgate_as_pid1_ends_every_process_it_started(pods: Pods) -> None:
    argv = ["unshare", "--pid", "--fork", "--mount-proc", *WARMGATE, "run", "--"]
    argv += ["sh", "-c", "sleep 600 & exec sleep 600"]
    wg = Wrapped(argv)
    pod = Pod(wg, 0, 0, 0)
    pods.started.append(pod)
    pod.watch(wg.proc.pid)
    assert wg.wait_event("spawn", timeout=10)["pid1"] is True
    (warmgate,) = wait_for(lambda: psutil.Process(wg.proc.pid).children())
    family = wait_for(lambda: len(found := warmgate.children(recursive=True)) == 2 and found)
    for proc in [warmgate, *family]:
        pod.watch(proc.pid)
    warmgate.kill()  # from outside its PID namespace, where SIGKILL reaches PID 1
    wg.wait(timeout=10)
    assert wait_for(lambda: not any(alive(p.pid) for p in family), timeout=10)


# --- the API key --------------------------------------------------------------------------

KEY = "sk-warmgate-test-2f9c71d0e4"


@pytest.mark.parametrize("source", ["flag", "env", "child_argv"])
def test_api_key_is_used_and_never_echoed(pods: Pods, proxies: list[Proxy], source: str) -> None:
    sim_port = free_port()
    proxy = Proxy(sim_port, key=KEY)  # vLLM's --api-key: /v1/* needs the key
    proxies.append(proxy)
    wg_args: tuple[str, ...] = ("--api-key", KEY) if source == "flag" else ()
    env = {"VLLM_API_KEY": KEY} if source == "env" else None
    # child_argv: the key on the engine's own command line, as `vllm serve M --api-key KEY`
    pod = pods.start(
        *wg_args,
        upstream=proxy.url,
        sim_port=sim_port,
        env=env,
        child_args=("--api-key", KEY) if source == "child_argv" else (),
        ready=False,
    )
    worker = int(pod.wg.wait_event("warmup_worker", timeout=30)["pid"])
    seen = {"worker argv": Path(f"/proc/{worker}/cmdline").read_bytes().decode(errors="replace")}
    wait_for(lambda: pod.get("/ready")[0] == 200, timeout=60, interval=0.05)
    # Ready through a server that refuses requests without the key: it was sent.
    assert proxy.statuses("/v1/") and 401 not in proxy.statuses("/v1/"), proxy.seen
    seen["/status"] = str(pod.get("/status")[1])
    seen["/metrics"] = pod.get("/metrics")[1]
    for path in ("/ready", "/live", "/startup", "/nope"):
        seen[path] = str(pod.get(path)[1])
    stop_and_check(pod)
    seen["stdout"] = pod.wg.stdout
    seen.update({f"log: {line[:120]}": line for line in pod.wg.lines if KEY in line})
    seen["exit line"] = str(pod.end())
    echoed = {where: text for where, text in seen.items() if KEY in text}
    assert not echoed, f"the API key was echoed in: {sorted(echoed)}"


def test_a_log_reader_that_goes_away_stops_nothing() -> None:
    # The pipe warmgate logs to closes (a log shipper dies, `warmgate run ... | head`):
    # every later write fails, and SIGTERM must still drain, stop the child and exit 0.
    port, sim_port = free_port(), free_port()
    child = [sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1", "--port"]
    child += [str(sim_port), "--max-model-len", "256", "--time-scale", "0", "--load-seconds", "0"]
    proc = subprocess.Popen(
        [*WARMGATE, "run", "--host", "127.0.0.1", "--port", str(port), *FAST, "--", *child],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "WARMGATE_LOG_FORMAT": "json"},
    )
    try:
        assert proc.stderr is not None
        spawn = wait_for(lambda: _event_line(proc.stderr, "spawn"), timeout=30)
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        proc.stderr.close()  # the reader goes away; warmgate's next log line meets EPIPE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0  # the child's own code: a stop, not 120 or a hang
        assert wait_for(lambda: not alive(spawn["pid"]), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _event_line(stream: Any, name: str) -> dict[str, Any] | None:
    """The next log record on `stream` if it is event `name` (one line per call)."""
    line = stream.readline().decode(errors="replace")
    found = [e for e in events(line) if e.get("event") == name]
    return found[0] if found else None
