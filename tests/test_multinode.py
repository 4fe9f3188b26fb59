"""Issue 19 over `warmgate sim`: a multi-node group as real processes on loopback.

The leader pod is `warmgate run -- warmgate sim --group-size 3 --group-port P`; each worker
pod is `warmgate run --leader http://LEADER_PROBES -- warmgate sim --group-leader 127.0.0.1:P`
(the sim worker stands for `ray start --block`). The leader's simulator keeps its HTTP port
closed until both workers joined, and a lost worker kills its engine, as a Ray group's.
Clients talk to the leader's simulator directly, as a Service would send them.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from simutil import Sim, complete, sse_events
from wgutil import Running, free_port, http_get, run, wait_for

TIME_SCALE = "1.5"
LONG = 400  # max_tokens of a long generation: ~4 s at TIME_SCALE
# The leader's warm-up: 12 one-token shapes, Ready ~3 s after the group formed.
LEADER_FAST = [
    *("--concurrency", "1", "--features", "greedy", "--max-repeats", "2", "--max-tokens", "1"),
    *("--health-interval", "0.1", "--stop-timeout", "5"),
]
WORKER_FAST = ("--health-interval", "0.1", "--stop-timeout", "5")
SIM = [sys.executable, "-m", "warmgate", "sim"]


def probe(port: int, path: str) -> int:
    """The HTTP status of GET path on 127.0.0.1:port; 0 when nothing answers."""
    try:
        return http_get(port, path, timeout=2.0)[0]
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class Pod:
    wg: Running
    port: int = 0  # warmgate's probe port
    child_pid: int = 0
    procs: list[psutil.Process] = field(default_factory=list)

    def status(self) -> dict[str, Any]:
        code, body = http_get(self.port, "/status")
        assert code == 200, body
        assert isinstance(body, dict)
        return body

    def exit_event(self) -> dict[str, Any]:
        (end,) = [e for e in self.wg.events("exit") if "reason" in e]
        return end

    def own_events(self, name: str, key: str) -> list[dict[str, Any]]:
        """warmgate's own records of `name` (the child's share its stderr): those with `key`."""
        return [e for e in self.wg.events(name) if key in e]


class Group:
    """A leader pod and its worker pods; whatever is left is killed at teardown."""

    def __init__(self) -> None:
        self.group_port = free_port()
        self.sim_port = free_port()
        self.pods: list[Pod] = []

    def _pod(self, args: list[str], listening: dict[str, Any]) -> Pod:
        pod = Pod(Running(args))
        self.pods.append(pod)
        pod.port = int(pod.wg.wait_event("listening", timeout=30, **listening)["port"])
        pod.child_pid = int(pod.wg.wait_event("spawn", timeout=5)["pid"])
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pod.child_pid)
            pod.procs = [root, *root.children(recursive=True)]
        return pod

    def leader(self, *wg_args: str, size: int = 3) -> Pod:
        sim = [*SIM, "--host", "127.0.0.1", "--port", str(self.sim_port)]
        sim += ["--max-model-len", "1024", "--time-scale", TIME_SCALE, "--load-seconds", "0.2"]
        sim += ["--group-size", str(size), "--group-port", str(self.group_port)]
        args = ["run", "--host", "127.0.0.1", "--port", "0", *LEADER_FAST, *wg_args, "--", *sim]
        return self._pod(args, {"upstream": f"http://127.0.0.1:{self.sim_port}"})

    def worker(self, leader: Pod, *wg_args: str) -> Pod:
        url = f"http://127.0.0.1:{leader.port}"
        sim = [*SIM, "--group-leader", f"127.0.0.1:{self.group_port}"]
        args = ["run", "--leader", url, "--host", "127.0.0.1", "--port", "0"]
        return self._pod([*args, *WORKER_FAST, *wg_args, "--", *sim], {"leader": url})

    def close(self) -> None:
        for pod in self.pods:
            pod.wg.stop()
            print(f"--- warmgate stderr, pid {pod.wg.proc.pid} ---\n{pod.wg.stderr[-6000:]}")
            for proc in pod.procs:
                with contextlib.suppress(psutil.Error):
                    proc.kill()  # psutil checks it is still the same process


@pytest.fixture
def group() -> Iterator[Group]:
    started = Group()
    try:
        yield started
    finally:
        started.close()


def running(sim_port: int) -> bool:
    """The leader's engine has a request running (vllm:num_requests_running > 0)."""
    text = http_get(sim_port, "/metrics")[1]
    return any(
        line.startswith("vllm:num_requests_running{") and float(line.rsplit(" ", 1)[1]) > 0
        for line in text.splitlines()
    )


def start_long(
    pool: ThreadPoolExecutor, group: Group, max_tokens: int = LONG
) -> Future[tuple[int, Any]]:
    future = pool.submit(complete, group.sim_port, max_tokens, 60)  # straight to the leader
    wait_for(lambda: running(group.sim_port), timeout=10, interval=0.05)
    return future


def ready_group(group: Group, *worker_args: str, leader_args: tuple[str, ...] = ()) -> list[Pod]:
    leader = group.leader(*leader_args)
    workers = [group.worker(leader, *worker_args) for _ in range(2)]
    wait_for(lambda: probe(leader.port, "/ready") == 200, timeout=60, interval=0.05)
    return [leader, *workers]


# --- 1. the group turns Ready only when the leader is warm and every worker is live ------


def test_the_group_is_ready_only_once_every_worker_joined_and_the_leader_warmed(
    group: Group,
) -> None:
    leader = group.leader()
    first = group.worker(leader)
    wait_for(lambda: probe(first.port, "/ready") == 200, timeout=30, interval=0.05)
    # One worker of two: the engine waits for its placement group, /health never answers.
    time.sleep(2.0)
    assert leader.status()["phase"] == "loading"
    assert probe(leader.port, "/ready") == 503
    assert probe(first.port, "/live") == 200
    assert first.status()["leader"]["boot_id"] == leader.status()["boot_id"]

    second = group.worker(leader)
    wait_for(lambda: probe(leader.port, "/ready") == 200, timeout=60, interval=0.05)
    assert leader.status()["phase"] == "ready"
    for worker in (first, second):
        assert probe(worker.port, "/live") == probe(worker.port, "/ready") == 200
        assert probe(worker.port, "/startup") == 200
        shown = worker.status()
        assert shown["mode"] == "worker" and shown["phase"] == "joined", shown
    # Ready came after the group formed, and after a whole warm-up.
    log = leader.wg.events()
    formed = next(i for i, e in enumerate(log) if e.get("event") == "group_formed")
    warming = next(i for i, e in enumerate(log) if e.get("phase") == "warming")
    ready = next(i for i, e in enumerate(log) if e.get("phase") == "ready")
    assert formed < warming < ready
    assert leader.status()["shapes"], "no warm-up ran"


# --- 2. a dead worker: the leader turns unready, /live fails, requests in flight fail ----


def test_a_killed_worker_makes_the_leader_unready_and_the_workers_live_fail(
    group: Group,
) -> None:
    leader, dying, survivor = ready_group(
        group, "--live-grace", "4", leader_args=("--live-grace", "2")
    )
    with ThreadPoolExecutor(1) as pool:
        request = start_long(pool, group)
        # SIGKILL the worker's `ray start --block` stand-in.
        psutil.Process(dying.child_pid).kill()
        status, body = request.result(timeout=30)
    assert status == 500 and "EngineDeadError" in str(body), body

    # The dying worker's warmgate exits with its child, as tini does: the pod restarts.
    assert dying.wg.wait(timeout=10) == 137
    assert dying.exit_event()["reason"] == "child_killed"
    assert probe(dying.port, "/live") == 0

    wait_for(lambda: probe(leader.port, "/ready") == 503, timeout=10, interval=0.05)
    assert leader.status()["phase"] == "unhealthy"
    # The group is broken: the survivor is unready at its next poll of the leader, and
    # still live for its --live-grace.
    wait_for(lambda: probe(survivor.port, "/ready") == 503, timeout=10, interval=0.05)
    assert probe(survivor.port, "/live") == 200
    wait_for(lambda: probe(survivor.port, "/live") == 503, timeout=15, interval=0.05)
    wait_for(lambda: probe(leader.port, "/live") == 503, timeout=10, interval=0.05)
    shown = survivor.status()
    assert shown["phase"] == "broken" and shown["leader"]["phase"] == "unhealthy", shown
    assert survivor.own_events("group", "leader_phase")[-1]["phase"] == "broken"


def test_a_restarted_leader_fails_the_workers_live_at_once(group: Group) -> None:
    """A new boot id: the Ray head this worker joined is gone, whatever the grace."""
    leader = group.leader(size=2)
    worker = group.worker(leader)
    wait_for(lambda: probe(leader.port, "/ready") == 200, timeout=60, interval=0.05)
    first_boot = leader.status()["boot_id"]
    leader.wg.stop()  # SIGKILL: the guard takes its simulator with it
    wait_for(lambda: worker.status()["leader"]["failed_polls"] > 0, timeout=10, interval=0.05)
    assert probe(worker.port, "/live") == 200  # out of reach only: the grace (300 s) runs

    # The leader pod comes back on the same address (a restarted container).
    port = leader.port
    sim = [*SIM, "--host", "127.0.0.1", "--port", str(group.sim_port)]
    sim += ["--group-size", "2", "--group-port", str(group.group_port), "--load-seconds", "0"]
    again = group._pod(
        ["run", "--host", "127.0.0.1", "--port", str(port), *LEADER_FAST, "--", *sim],
        {"upstream": f"http://127.0.0.1:{group.sim_port}"},
    )
    wait_for(lambda: probe(worker.port, "/live") == 503, timeout=10, interval=0.05)
    shown = worker.status()
    assert shown["leader"]["over"] == "leader_restarted", shown
    assert shown["leader"]["last_boot_id"] == again.status()["boot_id"] != first_boot


# --- 3. SIGTERM on a worker mid-generation loses no request ------------------------------


def test_group_deletion_mid_generation_loses_no_request(group: Group) -> None:
    """LWS deletes the group: every pod gets SIGTERM. The workers hold their engines until
    the leader has drained, so the generation in flight completes."""
    leader, *workers = ready_group(group, leader_args=("--drain-min", "0"))
    with ThreadPoolExecutor(1) as pool:
        request = start_long(pool, group)
        began = time.monotonic()
        for worker in workers:
            worker.wg.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wg.wait_event("hold", timeout=10)
            assert worker.status()["phase"] == "holding"
            assert probe(worker.port, "/ready") == 503 and probe(worker.port, "/live") == 200
        leader.wg.proc.send_signal(signal.SIGTERM)
        status, body = request.result(timeout=60)
        finished = time.monotonic() - began
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length", body
    assert body["usage"]["completion_tokens"] == LONG, body

    assert leader.wg.wait(timeout=30) == 0
    assert leader.exit_event()["drain"] == "emptied"
    for worker in workers:
        assert worker.wg.wait(timeout=30) == 0
        end = worker.exit_event()
        assert end["reason"] == "stopped" and end["signal"] == "SIGTERM", end
        assert end["hold"] in ("leader_drained", "leader_stopped", "leader_unreachable"), end
        assert end["held_s"] >= finished - 1.0, (end, finished)  # held through the generation
    # The leader's engine never lost a worker while it served.
    assert not leader.wg.events("engine_dead")


def test_a_worker_sigtermed_alone_holds_until_its_cap(group: Group) -> None:
    """The leader serves on: the worker holds for its drain deadline, then stops. The
    leader's engine then loses that worker, and the generation in flight with it."""
    leader, worker, _ = ready_group(group, "--drain-timeout", "2")
    with ThreadPoolExecutor(1) as pool:
        request = start_long(pool, group, 2 * LONG)  # ~8 s: it outlasts the 2 s cap
        worker.wg.proc.send_signal(signal.SIGTERM)
        worker.wg.wait_event("hold", timeout=10)
        time.sleep(0.5)
        assert worker.status()["phase"] == "holding"
        assert probe(leader.port, "/ready") == 200  # the leader serves on meanwhile
        assert not request.done()
        status, body = request.result(timeout=30)
    assert status == 500 and "EngineDeadError" in str(body), body
    assert worker.wg.wait(timeout=15) == 0
    end = worker.exit_event()
    assert end["reason"] == "stopped" and end["hold"] == "hold_timed_out", end
    assert 2.0 <= end["held_s"] < 3.5, end


# --- the simulator's group model, and bad input -----------------------------------------


def test_the_sim_leader_opens_once_formed_refuses_extras_and_dies_with_a_worker() -> None:
    with Sim("--group-size", "2", "--group-port", "0", wait_listening=False) as leader:
        group_port = int(leader.wait_event("group_listening")["port"])
        time.sleep(0.5)
        assert not leader.events("listening")  # no worker yet: the HTTP port stays closed
        join = ("--group-leader", f"127.0.0.1:{group_port}")
        with Sim(*join, wait_listening=False) as worker:
            worker.wait_event("joined")
            leader.port = int(leader.wait_event("listening")["port"])
            assert leader.get("/health").status_code == 200
            with Sim(*join, wait_listening=False) as extra:  # the group is whole already
                assert extra.wait_exit(10) == 1
                assert extra.events("join_refused")
            with (
                leader.client(timeout=30) as client,
                client.stream("POST", "/v1/completions", json=_stream_body()) as stream,
            ):
                chunks = stream.iter_lines()
                assert next(chunks).startswith("data: ")  # the generation runs
                worker.proc.kill()
                rest = "\n".join(chunks)
            events = sse_events(rest)
            assert any("error" in e and e["error"]["type"] == "EngineDeadError" for e in events)
            assert "[DONE]" not in events
        assert leader.get("/health").status_code == 503
        assert leader.post("/v1/completions", _stream_body(stream=False)).status_code == 500
        assert leader.events("engine_dead")


def _stream_body(stream: bool = True) -> dict[str, Any]:
    return {
        "model": "warmgate/sim",
        "prompt": "hello",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": stream,
    }


def test_a_sim_worker_outlives_its_leader_and_stops_on_sigterm() -> None:
    """As a raylet in its reconnect window: the worker's warmgate /live must catch it."""
    with Sim("--group-size", "2", "--group-port", "0", wait_listening=False) as leader:
        group_port = int(leader.wait_event("group_listening")["port"])
        with Sim("--group-leader", f"127.0.0.1:{group_port}", wait_listening=False) as worker:
            worker.wait_event("joined")
            leader.proc.kill()
            worker.wait_event("leader_lost")
            time.sleep(0.5)
            assert worker.proc.poll() is None
            worker.signal(signal.SIGTERM)
            assert worker.wait_exit(5) == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["sim", "--group-leader", "nowhere"], "--group-leader 'nowhere': use HOST:PORT"),
        (["sim", "--group-size", "0"], "--group-size 0 must be at least 1"),
        (
            ["sim", "--group-size", "2", "--group-leader", "h:1"],
            "--group-leader (a worker) and --group-size (a leader) exclude each other",
        ),
        (
            ["run", "--leader", "leader:8080", "--", "true"],
            "--leader 'leader:8080' must be a URL such as http://127.0.0.1:8000",
        ),
    ],
)
def test_bad_group_input_is_one_clear_line_and_exit_2(args: list[str], error: str) -> None:
    code, _, err = run(args, timeout=30)
    assert code == 2, err
    assert error in err, err
    assert "Traceback" not in err
