"""Issue 5 over `warmgate sim`: SIGTERM after Ready drains the upstream, then stops the child.

Real processes on loopback. Clients talk to the simulator directly, as a Service would
send them to the pod: warmgate does not proxy traffic, it only reads the simulator's
in-flight gauges on /metrics. To name what a timed-out drain left running it lists the
upstream's client connections, and, when the engine logs both ends of each request
(vLLM's and the simulator's --enable-log-requests --enable-log-outputs), their ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import pytest
from simutil import complete
from wgutil import Running, events, free_port, http_get, wait_for

from warmgate.drain import Reading, Unread
from warmgate.upstream import Upstream

LONG = 200  # max_tokens of a long request: ~2 s at TIME_SCALE, alone or four in a batch
TIME_SCALE = "1.5"
# A warm-up of 12 one-token shapes: Ready ~3 s after start.
FAST = [
    *("--concurrency", "1", "--features", "greedy", "--max-repeats", "2", "--max-tokens", "1"),
    *("--health-interval", "0.1"),
]


@dataclass
class Pod:
    wg: Running
    port: int  # warmgate's probe port
    sim_port: int
    sim_pid: int
    sim_group: list[psutil.Process]  # the simulator and its children, as started

    def send(self, sig: signal.Signals) -> None:
        self.wg.proc.send_signal(sig)

    def log(self) -> list[dict[str, Any]]:
        return events(self.wg.stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        # The simulator's JSON log lines pass through warmgate's stderr; warmgate's own
        # lines of these names carry fields the simulator's never do.
        own = {"listening": "upstream", "signal": "forwarded", "drain": "deadline_s"}
        found = [e for e in self.log() if e.get("event") == name]
        return [e for e in found if name not in own or own[name] in e]

    def exit_event(self) -> dict[str, Any]:
        (end,) = self.events("exit")
        return end


class Pods:
    """Starts warmgate-over-sim pods and kills whatever is left of them at teardown."""

    def __init__(self) -> None:
        self.started: list[Pod] = []

    def start(
        self,
        *wg_args: str,
        sim_args: tuple[str, ...] = (),
        load_seconds: float = 0.5,
        stop_timeout: float = 5.0,  # generous: this 2-core machine is often busy
        ready: bool = True,
    ) -> Pod:
        sim_port = free_port()
        sim = [sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1"]
        sim += ["--port", str(sim_port), "--max-model-len", "256", "--time-scale", TIME_SCALE]
        sim += ["--load-seconds", str(load_seconds), *sim_args]
        wg_args = ("--stop-timeout", f"{stop_timeout:g}", *FAST, *wg_args)
        wg = Running(["run", "--host", "127.0.0.1", "--port", "0", *wg_args, "--", *sim])
        pod = Pod(wg, 0, sim_port, 0, [])
        self.started.append(pod)
        # The simulator logs a `listening` line of its own; warmgate's names the upstream.
        upstream = f"http://127.0.0.1:{sim_port}"
        pod.port = int(wg.wait_event("listening", timeout=15, upstream=upstream)["port"])
        pod.sim_pid = int(wg.wait_event("spawn")["pid"])
        pod.sim_group = group_of(pod.sim_pid)
        if ready:
            wait_for(lambda: http_get(pod.port, "/ready")[0] == 200, timeout=60, interval=0.05)
        return pod

    def close(self) -> None:
        for pod in self.started:
            pod.wg.stop()
            # pytest shows this only for a failed test: the log that explains it
            print(f"--- warmgate stderr, pid {pod.wg.proc.pid} ---\n{pod.wg.stderr[-8000:]}")
            for proc in pod.sim_group:
                with contextlib.suppress(psutil.Error):
                    proc.kill()  # psutil checks it is still the same process


@pytest.fixture
def pods() -> Iterator[Pods]:
    started = Pods()
    try:
        yield started
    finally:
        started.close()


def open_chat(sim_port: int, request_id: str) -> tuple[int, Callable[[], tuple[int, Any]]]:
    """Connect to the simulator: (the client's local port, a call that runs a long chat)."""
    conn = http.client.HTTPConnection("127.0.0.1", sim_port, timeout=30)
    conn.connect()
    assert conn.sock is not None
    local_port = int(conn.sock.getsockname()[1])
    body = {
        "model": "warmgate/sim",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": LONG,
        "ignore_eos": True,
    }
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}

    def send() -> tuple[int, Any]:
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read())
        finally:
            conn.close()

    return local_port, send


def assert_full(reply: tuple[int, Any], max_tokens: int = LONG) -> None:
    status, body = reply
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length", body
    assert body["usage"]["completion_tokens"] == max_tokens, body


def sim_inflight(sim_port: int) -> float:
    """vllm:num_requests_running + vllm:num_requests_waiting on the simulator's /metrics."""
    text = http_get(sim_port, "/metrics")[1]
    gauges = re.findall(r"^vllm:num_requests_(?:running|waiting)\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(value) for value in gauges)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} missing from /metrics:\n{text}"
    return float(found.group(1))


def group_of(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def left_of(group: list[psutil.Process], pgid: int) -> list[int]:
    """Pids still running (zombies count as gone) from `group` or in process group `pgid`."""
    left = set()
    for proc in [*group, *psutil.process_iter()]:
        try:
            in_group = proc in group or os.getpgid(proc.pid) == pgid
            if in_group and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.add(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return sorted(left)


def start_long(pool: ThreadPoolExecutor, pod: Pod, count: int) -> list[Future[tuple[int, Any]]]:
    futures = [pool.submit(complete, pod.sim_port, LONG) for _ in range(count)]
    wait_for(lambda: sim_inflight(pod.sim_port) >= count, timeout=10, interval=0.05)
    return futures


def sim_exit_code(pod: Pod) -> int:
    """The exit code the simulator itself reported when it stopped."""
    stopped = pod.events("stopped")
    assert len(stopped) == 1, pod.wg.stderr
    return int(stopped[0]["exit_code"])


# --- 1. requests in flight at SIGTERM finish in full --------------------------------------


@pytest.mark.parametrize("mode", ["abort", "hang"])
def test_requests_in_flight_at_sigterm_finish_in_full(pods: Pods, mode: str) -> None:
    pod = pods.start("--drain-min", "0", sim_args=("--on-sigterm", mode))
    with ThreadPoolExecutor(4) as pool:
        futures = start_long(pool, pod, 4)
        pod.sim_group = group_of(pod.sim_pid)
        pod.send(signal.SIGTERM)
        replies = [f.result(timeout=30) for f in futures]
    code = pod.wg.wait(timeout=30)

    for reply in replies:
        assert_full(reply)
    end = pod.exit_event()
    assert end["drain"] == "emptied" and end["inflight"] == 0, end
    assert code == end["code"] == sim_exit_code(pod) == 0
    assert not pod.events("config")  # the defaults fit the grace period: no warning
    assert wait_for(lambda: not left_of(pod.sim_group, pod.sim_pid), timeout=5)


# --- 2. arrivals during the drain, /ready, /status and /metrics while draining ------------


def test_requests_arriving_during_the_drain_are_served_in_full(pods: Pods) -> None:
    pod = pods.start("--drain-min", "0")
    with ThreadPoolExecutor(2) as pool:
        (first,) = start_long(pool, pod, 1)
        pod.send(signal.SIGTERM)
        pod.wg.wait_event("drain", timeout=5, phase="draining")
        status, body = http_get(pod.port, "/ready")
        assert status == 503 and body["phase"] == "draining", body
        time.sleep(0.3)
        late = pool.submit(complete, pod.sim_port, LONG)  # arrives mid-drain, outlasts the first

        def two_in_flight() -> dict[str, Any] | None:
            drain: dict[str, Any] | None = http_get(pod.port, "/status")[1]["drain"]
            return drain if drain and (drain.get("inflight") or 0) >= 2 else None

        drain = wait_for(two_in_flight, timeout=5, interval=0.1)
        assert drain["outcome"] == "draining", drain
        metrics = http_get(pod.port, "/metrics")[1]
        assert metric(metrics, "warmgate_drain_inflight") >= 1
        metric(metrics, "warmgate_drain_seconds")  # present while draining
        assert metric(metrics, 'warmgate_phase{phase="draining"}') == 1
        assert metric(metrics, "warmgate_ready") == 0
        # Served in full: the drain waited for it (a SIGTERM reaching the simulator
        # earlier would have aborted it).
        assert_full(first.result(timeout=30))
        assert_full(late.result(timeout=30))
    assert pod.wg.wait(timeout=30) == 0

    done = pod.events("drain_done")
    assert [d["outcome"] for d in done] == ["emptied"]
    assert pod.exit_event()["drain"] == "emptied"
    assert sim_exit_code(pod) == 0 and not re.findall(r"aborted\.", pod.wg.stdout)


# --- 3. the drain deadline --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["abort", "hang"])
def test_drain_timeout_stops_the_child_and_counts_what_was_left(pods: Pods, mode: str) -> None:
    # One sequence at a time: four long requests need ~6 s, the drain may take 1.
    pod = pods.start(
        "--drain-min", "0", "--drain-timeout", "1",
        sim_args=("--on-sigterm", mode, "--max-num-seqs", "1"), stop_timeout=2,
    )  # fmt: skip
    with ThreadPoolExecutor(4) as pool:
        futures = start_long(pool, pod, 4)
        pod.sim_group = group_of(pod.sim_pid)
        pod.send(signal.SIGTERM)
        code = pod.wg.wait(timeout=30)
        outcomes = [f.exception(timeout=30) or f.result() for f in futures]

    end = pod.exit_event()
    assert end["drain"] == "timed_out" and end["inflight"] == 4, end
    lines = pod.log()
    (done,) = [e for e in lines if e.get("event") == "drain_done"]
    assert done["level"] == "warning" and done["outcome"] == "timed_out", done
    assert done["inflight"] == 4, done
    # Named by their connections; the simulator was not asked to log request ids.
    assert len(done["connections"]) == len(end["connections"]) == 4, done
    assert "requests" not in done and "--enable-log-outputs" in done["requests_hint"], done
    assert lines.index(done) < lines.index(end)
    if mode == "abort":  # vLLM's default: the cut-off requests end with "abort"
        assert code == end["code"] == sim_exit_code(pod) == 0
        finished = [o[1]["choices"][0]["finish_reason"] for o in outcomes if isinstance(o, tuple)]
        assert "abort" in finished, outcomes
    else:  # a child that never finishes is SIGKILLed --stop-timeout (2 s) later
        assert code == end["code"] == 128 + signal.SIGKILL, end
        assert (end["reason"], end["signal"], end["child_signal"]) == (
            "stopped",
            "SIGTERM",
            "SIGKILL",
        ), end
        assert pod.events("stop_timeout")
        assert all(isinstance(o, Exception) for o in outcomes), outcomes
    (drain,), (forwarded,) = pod.events("drain"), pod.events("signal")
    assert lines.index(drain) < lines.index(done) < lines.index(forwarded)  # SIGTERM came last
    assert wait_for(lambda: not left_of(pod.sim_group, pod.sim_pid), timeout=5)


def test_drain_timeout_names_the_requests_and_connections_left(pods: Pods) -> None:
    # One sequence at a time: three long chats need ~6 s, the drain may take 1.
    log_flags = ("--enable-log-requests", "--enable-log-outputs")
    pod = pods.start(
        "--drain-min", "0", "--drain-timeout", "1",
        sim_args=("--max-num-seqs", "1", *log_flags), stop_timeout=2,
    )  # fmt: skip
    request_ids = [f"drain-test-{i}-{uuid.uuid4().hex[:8]}" for i in range(3)]
    chats = [open_chat(pod.sim_port, request_id) for request_id in request_ids]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(send) for _, send in chats]
        wait_for(lambda: sim_inflight(pod.sim_port) >= 3, timeout=10, interval=0.05)
        pod.sim_group = group_of(pod.sim_pid)
        pod.send(signal.SIGTERM)

        def named() -> dict[str, Any] | None:
            drain: dict[str, Any] | None = http_get(pod.port, "/status")[1]["drain"]
            return drain if drain and "connections" in drain else None

        seen = wait_for(named, timeout=5, interval=0.05)  # /status while draining
        code = pod.wg.wait(timeout=30)
        replies = [f.result(timeout=30) for f in futures]

    # The requests the drain left running are those the stopped child cut off; on this
    # busy machine the first may finish in full before the drain's 1 s runs out.
    cut = [
        i for i, (_, body) in enumerate(replies) if body["choices"][0]["finish_reason"] == "abort"
    ]
    assert len(cut) >= 2, replies
    requests = sorted(f"chatcmpl-{request_ids[i]}" for i in cut)
    connections = sorted(f"127.0.0.1:{chats[i][0]}" for i in cut)
    end = pod.exit_event()
    (done,) = pod.events("drain_done")
    for line in (done, end):
        assert sorted(line["requests"]) == requests, line
        assert sorted(line["connections"]) == connections, line
        assert not {"requests_more", "connections_more", "requests_dropped"} & line.keys()
    assert done["outcome"] == end["drain"] == "timed_out", done
    assert done["inflight"] == end["inflight"] == len(cut), done
    assert set(requests) <= set(seen["requests"]) <= {f"chatcmpl-{r}" for r in request_ids}
    assert set(connections) <= set(seen["connections"]), seen
    # The child was stopped: it aborted exactly the requests named, and nothing is left.
    assert code == end["code"] == 0, end
    aborted = re.findall(r"Request (\S+) aborted\.", pod.wg.stdout)
    assert sorted(aborted) == requests, pod.wg.stdout[-4000:]
    assert wait_for(lambda: not left_of(pod.sim_group, pod.sim_pid), timeout=5)


# --- 4. signals that skip the drain -----------------------------------------------------


def test_sigterm_before_ready_is_forwarded_at_once(pods: Pods) -> None:
    # While warming the rule is the same (tests/test_lifecycle.py); loading is the quick case.
    pod = pods.start("--drain-min", "30", "--grace-period", "60", load_seconds=20, ready=False)
    pod.wg.wait_event("phase", phase="loading", timeout=30)
    pod.wg.wait_event("starting")  # the simulator's handlers are in place: it exits 0
    pod.send(signal.SIGTERM)
    code = pod.wg.wait(timeout=15)  # well before --drain-min 30

    assert code == 0
    assert not pod.events("drain")
    (forwarded,) = pod.events("signal")
    assert forwarded["signal"] == "SIGTERM" and forwarded["forwarded"] is True
    assert pod.events("phase")[-2]["reason"] == "SIGTERM before ready: stopping"
    end = pod.exit_event()
    assert "drain" not in end
    assert (end["reason"], end["signal"], end["phase"]) == ("stopped", "SIGTERM", "stopped"), end


def test_sigint_after_ready_is_forwarded_at_once(pods: Pods) -> None:
    pod = pods.start("--drain-min", "30", "--grace-period", "60")
    pod.send(signal.SIGINT)
    code = pod.wg.wait(timeout=15)  # well before --drain-min 30

    assert code == sim_exit_code(pod) == 0
    assert not pod.events("drain")
    (forwarded,) = pod.events("signal")
    assert forwarded["signal"] == "SIGINT" and forwarded["forwarded"] is True
    # A stop that was asked for: not "child exited unexpectedly", not a failure.
    assert pod.events("phase")[-1]["phase"] == "stopped"
    end = pod.exit_event()
    assert (end["reason"], end["signal"], end["phase"]) == ("stopped", "SIGINT", "stopped"), end


def test_second_sigterm_skips_the_rest_of_the_drain(pods: Pods) -> None:
    pod = pods.start("--drain-min", "30", "--grace-period", "60")
    pod.send(signal.SIGTERM)
    pod.wg.wait_event("drain", timeout=5, phase="draining")
    time.sleep(0.5)
    assert http_get(pod.port, "/ready")[0] == 503
    pod.send(signal.SIGTERM)
    code = pod.wg.wait(timeout=15)  # well before --drain-min 30

    assert code == sim_exit_code(pod) == 0
    notes = [e["note"] for e in pod.events("lifecycle")]
    assert "second SIGTERM: drain skipped, stopping now" in notes
    assert [d["outcome"] for d in pod.events("drain_done")] == ["skipped"]
    assert pod.exit_event()["drain"] == "skipped"


# --- 5. an upstream without in-flight gauges ------------------------------------------------


def test_without_inflight_gauges_the_drain_lasts_drain_min(pods: Pods) -> None:
    pod = pods.start("--drain-min", "1", "--inflight-metric", "no_such_gauge")
    with ThreadPoolExecutor(1) as pool:
        (request,) = start_long(pool, pod, 1)  # ~2 s: still running after --drain-min
        pod.send(signal.SIGTERM)
        code = pod.wg.wait(timeout=15)
        status, body = request.result(timeout=30)

    assert code == 0
    # Nothing told warmgate the request was running: the forwarded SIGTERM cut it off.
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort", body
    (warning,) = pod.events("drain_no_metrics")
    assert warning["level"] == "warning"
    (done,) = pod.events("drain_done")
    assert done["outcome"] == "no_metrics" and done["inflight"] is None, done
    end = pod.exit_event()
    assert end["drain"] == "no_metrics" and end["inflight"] is None


def _metrics_server(status: int, text: str) -> ThreadingHTTPServer:
    """A loopback server that answers every GET with `status` and `text`."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _inflight_at(url: str, timeout: float = 5.0) -> Reading:
    async def read() -> Reading:
        upstream = Upstream(url)
        try:
            return await upstream.inflight(
                ("vllm:num_requests_running", "vllm:num_requests_waiting"), timeout
            )
        finally:
            await upstream.aclose()

    return asyncio.run(read())


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        (404, '{"detail":"Not Found"}', Unread.NO_GAUGES),  # an upstream with no /metrics
        (200, "# TYPE other gauge\nother 3.0\n", Unread.NO_GAUGES),  # without the gauges
        (200, "garbage{{{ 1\n", Unread.NO_GAUGES),
        (
            200,
            'vllm:num_requests_running{engine="0"} 2.0\nvllm:num_requests_running{engine="1"} 1.0\n'
            'vllm:num_requests_waiting{engine="0"} 4.0\nother 9.0\n',
            7.0,
        ),
    ],
)
def test_upstream_inflight_sums_the_gauges_or_says_why_not(
    status: int, text: str, expected: Reading
) -> None:
    server = _metrics_server(status, text)
    try:
        assert _inflight_at(f"http://127.0.0.1:{server.server_address[1]}") == expected
    finally:
        server.shutdown()
        server.server_close()


def test_upstream_inflight_is_no_answer_when_nothing_listens() -> None:
    assert _inflight_at(f"http://127.0.0.1:{free_port()}") is Unread.NO_ANSWER


def test_upstream_inflight_gives_up_on_a_wedged_upstream_within_its_timeout() -> None:
    # The kernel accepts the connection into the backlog; nothing ever reads or answers.
    with socket.create_server(("127.0.0.1", 0)) as wedged:
        url = f"http://127.0.0.1:{wedged.getsockname()[1]}"
        assert _inflight_at(url, timeout=0.3) is Unread.NO_ANSWER


def test_a_wedged_upstream_times_out_the_drain_and_says_it_did_not_answer(pods: Pods) -> None:
    pod = pods.start("--drain-min", "0", "--drain-timeout", "1", stop_timeout=1)
    pod.sim_group = group_of(pod.sim_pid)
    os.kill(pod.sim_pid, signal.SIGSTOP)  # wedged: /metrics accepts and never answers
    pod.send(signal.SIGTERM)
    assert pod.wg.wait(timeout=30) == 128 + signal.SIGKILL  # it never acts on SIGTERM

    lines = pod.log()
    (drain,), (silent,), (done,) = (
        pod.events(n) for n in ("drain", "drain_no_answer", "drain_done")
    )
    (forwarded,), (stop_timeout,) = pod.events("signal"), pod.events("stop_timeout")
    assert silent["level"] == "warning" and "did not answer" in silent["note"], silent
    # The poll waited no longer than the 1 s drain had left, not /metrics' usual 5 s.
    assert 0 < silent["timeout_s"] <= 1, silent
    assert (done["outcome"], done["inflight"]) == ("timed_out", None), done
    assert not pod.events("drain_no_metrics")  # silence is not "no gauges"
    order = [lines.index(e) for e in (drain, silent, done, forwarded, stop_timeout)]
    assert order == sorted(order), order
    end = pod.exit_event()
    assert (end["reason"], end["drain"], end["child_signal"]) == ("stopped", "timed_out", "SIGKILL")
    assert wait_for(lambda: not left_of(pod.sim_group, pod.sim_pid), timeout=5)


# --- 6. values that cannot fit the grace period -------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--drain-timeout", "60", "--grace-period", "30"), ("--drain-timeout 60", "30")),
        (("--drain-min", "10", "--grace-period", "8"), ("--grace-period 8", "--drain-min 10")),
    ],
)
def test_values_that_cannot_fit_warn_at_startup(
    pods: Pods, args: tuple[str, ...], named: tuple[str, ...]
) -> None:
    pod = pods.start(*args, ready=False)
    (warning,) = pod.events("config")
    assert warning["level"] == "warning"
    assert all(part in warning["note"] for part in named), warning
