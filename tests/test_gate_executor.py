"""The gate's executor, driven by events: no child process, no sockets, no sleeps.

The gate turns the lifecycle's actions into signals and drain polls, and publishes the
snapshot the probe thread reads. Here events are handed to it directly, signals go to a
list instead of a process, and no task group runs (the loops are not started).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from warmgate import probe, process
from warmgate.config import RunSettings
from warmgate.drain import Continue, Done, Outcome
from warmgate.errors import Ending
from warmgate.gate import Gate
from warmgate.httpserver import Request
from warmgate.lifecycle import ChildExited, ChildSpawned, HealthOk, WarmupFinished


class Recorded:
    def __init__(self) -> None:
        self.sent: list[signal.Signals] = []

    def __call__(self, sig: signal.Signals) -> None:
        self.sent.append(sig)


@pytest.fixture
def forwarded() -> Recorded:
    return Recorded()


@pytest.fixture
def gate(forwarded: Recorded) -> Iterator[Gate]:
    settings = RunSettings(
        command=("warmgate", "sim"), drain_min=0.0, drain_timeout=30.0, on_warmup_failure="fail"
    )
    child = process.Child(pid=os.getpid(), argv=settings.command)
    made = Gate(settings, child, "http://127.0.0.1:9", None, forwarded)
    yield made
    asyncio.run(made.upstream.aclose())


def ready(gate: Gate) -> None:
    gate.apply(ChildSpawned(gate.child.pid))
    gate.apply(HealthOk())
    gate.apply(WarmupFinished(ok=True))
    assert gate.life.phase == "ready"


def status(gate: Gate) -> dict[str, Any]:
    return json.loads(gate.published.status)  # type: ignore[no-any-return]


def probe_answer(gate: Gate, path: str) -> tuple[int, bytes]:
    answer = probe.make_handler(gate)(Request("GET", path, "", {}, b""))
    assert isinstance(answer.body, bytes)
    return answer.status, answer.body


def test_sigterm_after_ready_drains_until_idle_then_forwards(
    gate: Gate, forwarded: Recorded
) -> None:
    ready(gate)
    assert gate.published.ready and probe_answer(gate, "/ready")[0] == 200
    gate.on_signal(signal.SIGTERM)
    assert forwarded.sent == []  # draining: the child keeps serving
    assert probe_answer(gate, "/ready")[0] == 503 and gate.published.phase == "draining"

    assert gate.drain_polled(2, {"connections": ["127.0.0.1:4000"]}) == Continue(0.5)
    drain = status(gate)["drain"]
    assert (drain["outcome"], drain["inflight"], drain["connections"]) == (
        "draining",
        2,
        ["127.0.0.1:4000"],
    )
    assert gate.drain_polled(0, {}) == Continue(0.5)
    assert forwarded.sent == []
    assert gate.drain_polled(0, {}) == Done(Outcome.EMPTIED)
    assert forwarded.sent == [signal.SIGTERM]

    gate.apply(ChildExited(0))
    assert gate.life.ending == Ending("stopped", 0)
    assert gate.exit_fields() | {"drain": "emptied", "inflight": 0} == gate.exit_fields()
    assert probe_answer(gate, "/live")[0] == 503  # the child is gone


def test_second_sigterm_skips_the_drain_and_other_signals_pass_at_once(
    gate: Gate, forwarded: Recorded
) -> None:
    ready(gate)
    gate.on_signal(signal.SIGHUP)
    assert forwarded.sent == [signal.SIGHUP] and gate.life.phase == "ready"
    gate.on_signal(signal.SIGTERM)
    gate.drain_polled(3, {"connections": ["127.0.0.1:4001"]})
    gate.on_signal(signal.SIGTERM)
    assert forwarded.sent == [signal.SIGHUP, signal.SIGTERM]
    fields = gate.exit_fields()
    assert (fields["drain"], fields["inflight"], fields["connections"]) == (
        "skipped",
        3,
        ["127.0.0.1:4001"],
    )
    assert status(gate)["drain"]["outcome"] == "skipped"


def test_a_child_exit_mid_drain_ends_it_as_child_exited(gate: Gate, forwarded: Recorded) -> None:
    ready(gate)
    gate.on_signal(signal.SIGTERM)
    gate.drain_polled(1, {"connections": ["127.0.0.1:4002"]})
    gate.apply(ChildExited(137, signal.SIGKILL))
    assert forwarded.sent == []
    assert gate.life.ending == Ending("stopped", 137)
    assert gate.exit_fields()["drain"] == "child_exited"
    assert "connections" not in gate.exit_fields()  # nothing can still run


def test_warmup_failure_forwards_sigterm_and_ends_70(gate: Gate, forwarded: Recorded) -> None:
    gate.apply(ChildSpawned(gate.child.pid))
    gate.apply(HealthOk())
    gate.apply(WarmupFinished(ok=False, detail="3 shapes errored"))
    assert forwarded.sent == [signal.SIGTERM]
    assert status(gate)["phase"] == "failed" and "3 shapes" in status(gate)["failure"]
    gate.apply(ChildExited(0))
    assert gate.life.ending == Ending("warmup_failed", 70)


def test_the_probe_thread_reads_only_the_published_snapshot(gate: Gate) -> None:
    ready(gate)
    before = gate.published
    gate.on_signal(signal.SIGTERM)
    assert gate.published is not before and before.phase == "ready"  # replaced, not changed
    metrics = gate.metrics().decode()
    assert 'warmgate_phase{phase="draining"} 1.0' in metrics
    assert "warmgate_ready 0.0" in metrics
    code, body = probe_answer(gate, "/status")
    assert code == 200 and json.loads(body)["phase"] == "draining"
