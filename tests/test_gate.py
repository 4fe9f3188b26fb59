"""Warm-up mode over `warmgate sim`: the readiness gate, failures and probes, end to end."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from wgutil import Running, alive, events, exit_event, free_port, http_get, run, wait_for

# A small, fast plan: two concurrency buckets and a 1024-token context (40 shapes).
FAST = [
    "--concurrency",
    "1,4",
    "--max-repeats",
    "3",
    "--health-interval",
    "0.1",
    "--drain-min",
    "0",
]


def sim(port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "warmgate",
        "sim",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--time-scale",
        "0.02",
        "--load-seconds",
        "1",
        *extra,
    ]


def gate(*wg_args: str, sim_args: tuple[str, ...] = (), fast: bool = True) -> tuple[Running, int]:
    """warmgate run over the simulator; returns it and the bound probe port (read from the log)."""
    args = [
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *(FAST if fast else []),
        *wg_args,
        "--",
        *sim(free_port(), *sim_args),
    ]
    running = Running(args)
    port = int(running.wait_event("listening", timeout=15)["port"])
    return running, port


def test_ready_is_503_until_warm_then_200_and_sigterm_drains() -> None:
    running, port = gate(sim_args=("--time-scale", "0.05"))
    seen: list[tuple[int, str]] = []
    try:
        assert http_get(port, "/startup")[0] == 503
        assert http_get(port, "/live")[0] == 200

        def ready() -> bool:
            status, body = http_get(port, "/ready")
            seen.append((status, body["phase"]))
            return status == 200

        wait_for(ready, timeout=120, interval=0.02)
        assert {phase for status, phase in seen if status == 503} >= {"loading", "warming"}
        assert all(phase == "ready" for status, phase in seen if status == 200)
        assert http_get(port, "/startup")[0] == 200

        status, body = http_get(port, "/status")
        assert status == 200 and body["phase"] == "ready" and body["mode"] == "warmup"
        assert body["shapes"], body
        assert all(
            s["status"] in ("converged", "verified", "out_of_repeats") for s in body["shapes"]
        )
        assert all(s["cold_ms"] is not None and s["warm_ms"] is not None for s in body["shapes"])
        phases = [t["phase"] for t in body["transitions"]]
        assert phases == ["starting", "loading", "warming", "ready"]

        metrics = http_get(port, "/metrics")[1]
        assert 'warmgate_phase{phase="ready"} 1.0' in metrics
        assert "warmgate_ready 1.0" in metrics
        # Labelled by the bounded feature and endpoint, never by shape.
        assert 'warmgate_warmup_request_seconds_bucket{endpoint="/v1/chat/completions"' in metrics
        assert "family=" not in metrics

        running.proc.send_signal(signal.SIGTERM)
        assert running.wait(timeout=30) == 0
    finally:
        running.stop()
    assert exit_event(running.stderr)["drain"] == "emptied"


@pytest.mark.parametrize(
    ("phase", "sim_args"),
    [
        ("loading", ("--crash-during-load", "--crash-code", "3")),
        ("warming", ("--crash-after", "2", "--crash-code", "3", "--slow", "0.3")),
        ("ready", ("--crash-after", "6", "--crash-code", "3")),
    ],
)
def test_child_crash_in_each_phase_exits_with_its_status(
    phase: str, sim_args: tuple[str, ...]
) -> None:
    running, _ = gate(sim_args=sim_args)
    try:
        assert running.wait(timeout=60) == 3
    finally:
        running.stop()
    reached = [e["phase"] for e in running.events("phase")]
    assert phase in reached and reached[-1] == "failed", reached
    assert exit_event(running.stderr)["code"] == 3


@pytest.mark.parametrize(
    ("name", "sim_args", "wg_args"),
    [
        ("http_500", ("--fail-first", "100000"), ()),
        ("garbage", ("--malformed",), ()),
        ("hang", ("--slow", "60"), ("--request-timeout", "0.3")),
    ],
)
def test_broken_upstream_fails_the_pod_under_fail(
    name: str, sim_args: tuple[str, ...], wg_args: tuple[str, ...]
) -> None:
    running, _ = gate(*wg_args, sim_args=sim_args)
    try:
        assert running.wait(timeout=60) == 70
    finally:
        running.stop()
    end = exit_event(running.stderr)
    assert end["reason"] == "warmup_failed", end
    assert running.events("warmup_failed")


def test_upstream_never_healthy_is_69() -> None:
    running, _ = gate("--startup-timeout", "1", sim_args=("--load-seconds", "60"))
    try:
        assert running.wait(timeout=30) == 69
    finally:
        running.stop()
    end = exit_event(running.stderr)
    assert end["reason"] == "upstream_never_healthy" and end["phase"] == "failed", end
    names = [e["event"] for e in running.events()]
    assert names.index("startup_timeout") < names.index("exit"), names
    assert running.events("startup_timeout")[0]["after_s"] == 1
    assert not running.events("warmup_worker")  # it never got as far as warming


def test_status_and_metrics_never_fail_while_state_changes(tmp_path: Path) -> None:
    """The probe thread reads one published snapshot, never the main loop's changing state.

    /status and /metrics are fetched without pause through a warm-up that measures a
    compile cache, the Ready transition and a drain, until warmgate exits.
    """
    args = [*FAST[:-2], "--drain-min", "1", "--cache-dir", str(tmp_path / "cache")]
    running, port = gate(*args, fast=False, sim_args=("--compile-seconds", "0.2"))
    answers: dict[str, list[int]] = {"/status": [], "/metrics": []}
    stop = threading.Event()

    def hammer(path: str) -> None:
        while not stop.is_set() and len(answers[path]) < 10_000:
            try:
                answers[path].append(http_get(port, path)[0])
            except OSError:  # warmgate has exited (connection refused or reset)
                if running.proc.poll() is not None:
                    return
            time.sleep(0.005)  # leave the 2-core machine some CPU for the warm-up

    threads = [threading.Thread(target=hammer, args=(path,), daemon=True) for path in answers]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=120)
        running.proc.send_signal(signal.SIGTERM)
        assert running.wait(timeout=30) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        running.stop()
    for path, codes in answers.items():
        assert codes and set(codes) == {200}, (path, sorted(set(codes)))
    phases = [e["phase"] for e in running.events("phase")]
    assert phases == ["loading", "warming", "ready", "draining", "stopped"], phases
    assert [e.get("phase") for e in running.events("cache")][-2:] == ["healthy", "warm"]
    assert exit_event(running.stderr)["drain"] == "emptied"


def _worker(running: Running) -> int:
    """The warm-up worker's pid, once warmgate has started it."""
    pid = int(running.wait_event("warmup_worker", timeout=60)["pid"])
    # posix_spawn's parent resumes while the child's exec is still setting up its new
    # memory: /proc/PID/cmdline can read empty for a moment on a loaded machine.
    wait_for(lambda: "warmgate.worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode())
    return pid


def test_warmup_runs_in_a_worker_process_that_sigterm_stops() -> None:
    running, port = gate(sim_args=("--slow", "0.5"))
    try:
        pid = _worker(running)
        assert os.getpgid(pid) == pid  # a group of its own: a terminal's Ctrl-C misses it
        assert psutil.Process(pid).ppid() == running.proc.pid
        wait_for(lambda: http_get(port, "/status")[1]["shapes"], timeout=30)  # events arrive
        assert http_get(port, "/ready")[0] == 503
        running.proc.send_signal(signal.SIGTERM)
        assert running.wait(timeout=30) == 0
    finally:
        running.stop()
    assert not alive(pid)
    phases = [e["phase"] for e in running.events("phase")]
    assert phases[-2:] == ["draining", "stopped"], phases


def test_a_killed_worker_fails_the_warmup() -> None:
    running, _ = gate(sim_args=("--slow", "0.5"))
    try:
        os.kill(_worker(running), signal.SIGKILL)
        assert running.wait(timeout=60) == 70
    finally:
        running.stop()
    failed = running.events("warmup_failed")
    assert failed and "ended without a verdict" in failed[0]["error"], failed
    assert exit_event(running.stderr)["reason"] == "warmup_failed"


def test_the_worker_dies_with_a_killed_supervisor() -> None:
    running, _ = gate(sim_args=("--slow", "0.5"))
    try:
        pid = _worker(running)
        running.proc.kill()  # SIGKILL: no chance to clean up
        running.wait(timeout=10)
        wait_for(lambda: not alive(pid), timeout=10)
    finally:
        running.stop()


def test_broken_upstream_is_served_anyway_under_ready() -> None:
    running, port = gate("--on-warmup-failure", "ready", sim_args=("--malformed",))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        assert running.events("warmup_failed")
        running.proc.send_signal(signal.SIGTERM)
        assert running.wait(timeout=30) == 0
    finally:
        running.stop()


def test_health_flapping_after_ready_flips_ready() -> None:
    running, port = gate("--unhealthy-threshold", "2", sim_args=("--health-flap", "2,1.5"))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        wait_for(lambda: http_get(port, "/ready")[1]["phase"] == "unhealthy", timeout=10)
        assert http_get(port, "/ready")[0] == 503
        assert http_get(port, "/live")[0] == 200  # within --live-grace
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=10)
    finally:
        running.stop()


def test_jit_lines_after_ready_are_counted() -> None:
    sim_port = free_port()
    running = Running(
        [
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *FAST,
            "--features",
            "greedy",
            "--",
            *sim(sim_port),
        ]
    )
    try:
        port = int(running.wait_event("listening")["port"])
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        assert http_get(port, "/status")[1]["jit_misses_after_ready"] == 0
        # logprobs: a feature this warm-up (--features greedy) never touched.
        body = b'{"model": "warmgate/sim", "prompt": "hello there", "max_tokens": 4, "logprobs": 2}'
        request = urllib.request.Request(
            f"http://127.0.0.1:{sim_port}/v1/completions",
            body,
            {"Content-Type": "application/json"},
        )
        assert urllib.request.urlopen(request, timeout=30).status == 200
        wait_for(lambda: http_get(port, "/status")[1]["jit_misses_after_ready"] >= 1, timeout=10)
        assert "warmgate_jit_misses_total 0.0" not in http_get(port, "/metrics")[1]
    finally:
        running.stop()


def _raw(port: int, payload: bytes, *, pause: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        if pause:
            conn.sendall(payload[:5])
            time.sleep(pause)
            payload = payload[5:]
        try:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_probe_server_survives_bad_clients() -> None:
    running, port = gate(sim_args=("--load-seconds", "30"))
    try:
        assert _raw(port, b"\x00\xffgarbage\r\n\r\n").startswith(b"HTTP/1.1 400")
        big = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert _raw(port, big).split(b" ")[1] in (b"400", b"431")
        slow = threading.Thread(
            target=_raw,
            args=(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n"),
            kwargs={"pause": 3.0},
        )
        slow.start()
        assert http_get(port, "/ready")[0] == 503
        assert slow.is_alive()  # answered while the slow sender still dawdles (3 s)
        slow.join()
        assert http_get(port, "/nope")[0] == 404
        head = _raw(port, b"HEAD /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        post = _raw(
            port,
            b"POST /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        assert post.startswith(b"HTTP/1.1 405")
    finally:
        running.stop()


def test_probe_port_in_use_is_71() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = run(
            ["run", "--host", "127.0.0.1", "--port", str(port), "--", *sim(free_port())]
        )
    assert rc == 71
    end = exit_event(err)
    assert end["reason"] == "probe_port_unavailable" and "in use" in end["error"]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--plan", "/nonexistent/plan.toml"],
        ["--upstream", "localhost:8000"],
        ["--concurrency", "1,x"],
        ["--features", "greedy,telepathy"],
    ],
)
def test_bad_warmup_options_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    rc, _, err = run(["run", "--port", "0", *args, "--", *sim(free_port())])
    assert rc == 2, err
    assert exit_event(err)["reason"] == "usage"
    assert "Traceback" not in err


def test_no_warmup_keeps_plain_init_mode() -> None:
    rc, _, err = run(
        ["run", "--no-warmup", "--", *sim(free_port(), "--crash-after", "1.5", "--crash-code", "5")]
    )
    assert rc == 5
    assert "phase" not in exit_event(err)
    assert next(e for e in events(err) if e["event"] == "spawn")["mode"] == "plain"


def test_probe_command_and_oneshot_warmup() -> None:
    sim_port = free_port()
    running = Running(["run", "--host", "127.0.0.1", "--port", "0", *FAST, "--", *sim(sim_port)])
    try:
        port = int(running.wait_event("listening")["port"])
        assert run(["probe", "ready", "--port", str(port)])[0] == 1
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        assert run(["probe", "ready", "--port", str(port)])[0] == 0
        assert run(["probe", "startup", "--port", str(port)])[0] == 0
        rc, _, err = run(
            [
                "warmup",
                "--upstream",
                f"http://127.0.0.1:{sim_port}",
                "--concurrency",
                "1",
                "--max-repeats",
                "2",
                "--log-format",
                "json",
            ],
            timeout=120,
        )
        assert rc == 0, err
    finally:
        running.stop()
    assert run(["probe", "live", "--port", str(free_port())])[0] == 1
    rc, _, err = run(["warmup", "--upstream", f"http://127.0.0.1:{free_port()}"])
    assert rc == 1 and "Traceback" not in err


def _status(port: int) -> dict[str, Any]:
    return http_get(port, "/status")[1]  # type: ignore[no-any-return]


def test_readme_metrics_table_lists_what_metrics_serves() -> None:
    """Every metric served, with its label names, is a row of the README's table (and no more)."""
    from types import MappingProxyType

    from prometheus_client.parser import text_string_to_metric_families

    from warmgate.telemetry import Counters, Metrics

    class Full:  # every metric present: a drain in progress, a cache, a quarantine, a budget
        phase = "draining"
        counters = Counters(
            drain_inflight=2.0,
            cache_bytes=MappingProxyType({"start": 1}),
            quarantined=MappingProxyType({"seed": 3}),
            cold=MappingProxyType({"greedy": 1}),
            adapters=MappingProxyType({"warm": 1}),
        )

    meter = Metrics(lambda: Full())
    meter.closed = lambda: {"evicted": 2, "refused": 0, "silent": 1}
    meter.observe("seed", "/v1/completions", 0.5)
    served: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(meter.render().decode()):
        if family.name.endswith("_created"):
            continue  # the histogram's creation time, named in its row
        name = family.name + ("_total" if family.type == "counter" else "")
        served[name] = {
            label for sample in family.samples for label in sample.labels if label != "le"
        }
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, set[str]] = {}
    for row in table.splitlines():
        if row.startswith("| `warmgate_"):
            cells = [c.strip() for c in row.strip("|").split("|")]
            names = re.sub(r"\([^)]*\)", "", cells[2])  # the label names, not their values
            documented[cells[0].strip("`")] = set(re.findall(r"`(\w+)`", names))
    assert documented == served


def test_a_spent_budget_is_ready_with_the_cold_shapes_named() -> None:
    """--warmup-budget cuts the plan: Ready all the same, the shapes left cold named in
    /status, the log and /metrics; the shapes that ran keep their verdicts."""
    running, port = gate("--warmup-budget", "0.2", sim_args=("--time-scale", "0.2"))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        status = _status(port)
        cold = [s for s in status["shapes"] if s["status"] == "cold"]
        ran = [s for s in status["shapes"] if s["status"] != "cold"]
        assert cold and ran, status["shapes"]
        assert all(s["repeats"] == 0 for s in cold)
        assert status["warmup"]["budget_s"] == 0.2
        assert status["warmup"]["cold"] == [s["family"] for s in cold]
        spent = running.wait_event("warmup_budget_spent")
        assert spent["cold"] == status["warmup"]["cold"]
        metrics = http_get(port, "/metrics")[1]
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("warmgate_cold_shapes{")
        )
        assert counted == len(cold)
    finally:
        running.stop()


def test_shapes_run_once_when_their_first_run_is_warm() -> None:
    """Verify once: the first shapes repeat (cold, and the latency model has no data
    yet); later shapes whose first run matches the model run once ("verified")."""
    running, port = gate(sim_args=("--time-scale", "0.05"))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=90)
        shapes = _status(port)["shapes"]
    finally:
        running.stop()
    assert shapes[0]["status"] in ("converged", "out_of_repeats") and shapes[0]["repeats"] >= 2
    verified = [s for s in shapes if s["status"] == "verified"]
    assert verified and all(s["repeats"] == 1 and s["predicted_ms"] > 0 for s in verified)
    assert all(s["status"] in ("converged", "verified", "out_of_repeats") for s in shapes)
    assert sum(s["repeats"] for s in shapes) < 2 * len(shapes)


def test_the_plan_follows_the_engines_step_budget_from_its_log() -> None:
    running, port = gate(sim_args=("--max-num-batched-tokens", "256"))
    try:
        wait_for(lambda: http_get(port, "/ready")[0] == 200, timeout=60)
        status = _status(port)
    finally:
        running.stop()
    engine = status["warmup"]["engine"]
    assert engine["step_budget"] == 256 and engine["sources"]["step_budget"] == "log"
    config = running.wait_event("engine_config")
    assert config["step_budget"] == 256
    loads = sorted(s["prompt_tokens"] * s["concurrency"] for s in status["shapes"])
    assert loads[-2] <= 256 < loads[-1]  # all within one step but the chunked prompt
