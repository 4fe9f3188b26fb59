"""warmgate over the real vLLM CPU build: the gate, the drain and a failed start.

No timing thresholds here: first/warm ratios on the real engine are the benchmark's job.
The drain test stops the shared server, so it runs last (pytest keeps file order).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from typing import Any

import pytest
from conftest import Served, until_ready, vllm_command
from wgutil import Running, events, exit_event, free_port, http_get


def test_ready_only_after_warmup_and_status_lists_every_shape(served: Served) -> None:
    gate = served.gate
    phases = [e["phase"] for e in gate.events("phase")]
    assert phases[:3] == ["loading", "warming", "ready"], phases
    # Ready came only after the last warm-up shape had finished.
    log = gate.events()
    last_shape = max(i for i, e in enumerate(log) if e["event"] == "shape")
    became_ready = next(
        i for i, e in enumerate(log) if e["event"] == "phase" and e["phase"] == "ready"
    )
    assert last_shape < became_ready
    status, body = http_get(served.probe_port, "/status")
    assert status == 200 and body["phase"] == "ready"
    assert body["models"] == [served.model]
    assert len(body["shapes"]) >= 20
    for shape in body["shapes"]:
        assert shape["status"] in ("converged", "verified", "out_of_repeats"), shape
        assert shape["cold_ms"] > 0 and shape["warm_ms"] > 0
    # The plan knew the engine: its step budget and chunked prefill from vLLM's own line.
    engine = body["warmup"]["engine"]
    assert (engine["step_budget"], engine["chunked_prefill"]) == (2048, True), engine
    assert engine["sources"]["step_budget"] == "log", engine
    assert body["warmup"]["cold"] == []
    assert http_get(served.probe_port, "/startup")[0] == 200
    assert http_get(served.probe_port, "/live")[0] == 200


def _generate(base: str, model: str, prompt: str, max_tokens: int, out: list[Any]) -> None:
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    ).encode()
    request = urllib.request.Request(
        f"{base}/v1/completions", body, {"Content-Type": "application/json"}
    )
    try:
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        out.append((reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]))
    except Exception as exc:  # recorded, then asserted on
        out.append(("error", repr(exc)))


def test_sigterm_drains_four_long_requests_in_full(served: Served) -> None:
    results: list[Any] = []
    threads = [
        threading.Thread(
            target=_generate, args=(served.base, served.model, f"long {i} " * 40, 1500, results)
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)
    served.gate.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert http_get(served.probe_port, "/ready")[0] == 503
    late: list[Any] = []
    arrival = threading.Thread(
        target=_generate, args=(served.base, served.model, "late " * 20, 50, late)
    )
    arrival.start()  # sent during the drain, before endpoints would have dropped the pod
    for t in [*threads, arrival]:
        t.join(timeout=300)
    assert results == [("length", 1500)] * 4
    assert late == [("length", 50)]
    assert served.gate.wait(timeout=120) == 0
    end = exit_event(served.gate.stderr)
    assert end["drain"] == "emptied" and end["inflight"] == 0


# A chunked seeded prefill (16 x 1,000 prompt tokens) kills vLLM 0.32 CPU's engine
# ("CPU Generator does not use offset"), and its API server then exits 0.
CRASHING_PLAN = """
mode = "replace"
[[shape]]
endpoint = "completions"
prompt_tokens = 64
feature = "greedy"
[[shape]]
endpoint = "completions"
prompt_tokens = 1000
feature = "seed"
concurrency = 16
"""
SEEDED_SHAPE = "file/completions/nostream/seed/len1000/c16"


@pytest.mark.e2e
def test_engine_killed_by_a_seeded_prefill_is_named_then_quarantined(tmp_path: Any) -> None:
    """First start: the engine dies on the seeded shape, named; second start: Ready without it."""
    plan = tmp_path / "plan.toml"
    plan.write_text(CRASHING_PLAN)
    vllm_port = free_port()
    args = [
        "run", "--host", "127.0.0.1", "--port", "0", "--plan", str(plan),
        "--cache-dir", str(tmp_path / "cache"), "--max-repeats", "2",
        "--startup-timeout", "300", "--warmup-timeout", "300",
        "--", *vllm_command(), "--host", "127.0.0.1", "--port", str(vllm_port),
    ]  # fmt: skip
    first = Running(args)
    try:
        code = first.wait(timeout=420)
    finally:
        first.stop()
    end = exit_event(first.stderr)
    assert (end["reason"], end["shape"]) == ("engine_died_during_warmup", SEEDED_SHAPE), end
    assert code == end["code"] == (end.get("child_code") or 70)
    (died,) = [e for e in events(first.stderr) if e.get("event") == "engine_died_during_warmup"]
    (shape,) = died["shapes"]
    assert (shape["feature"], shape["prompt_tokens"], shape["concurrency"]) == ("seed", 1000, 16)
    assert shape["body"]["prompt"] == "<1000 prompt tokens>" and shape["body"]["seed"] == 1234
    assert died["quarantined"] == [SEEDED_SHAPE]

    second = Running(args)
    try:
        port = until_ready(second, timeout=420)
        assert http_get(port, "/ready")[0] == 200, second.stderr[-3000:]
        status = http_get(port, "/status")[1]
        assert [q["family"] for q in status["quarantined"]] == [SEEDED_SHAPE]
        assert [s["family"] for s in status["shapes"]] == [
            "file/completions/nostream/greedy/len64/c1"
        ]
        second.proc.send_signal(signal.SIGTERM)
        assert second.wait(timeout=120) == 0
    finally:
        second.stop()


def test_engine_that_fails_to_start_gives_its_status_and_error(tmp_path: Any) -> None:
    command = vllm_command()
    model_at = command.index("--model") + 1
    command[model_at] = str(tmp_path / "no-such-model")
    gate = Running(
        [
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--",
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
    )
    try:
        code = gate.wait(timeout=300)
    finally:
        gate.stop()
    assert code != 0
    end = exit_event(gate.stderr)
    assert end["code"] == code and end["reason"] in ("child_exited", "child_killed")
    assert "no-such-model" in gate.stderr + gate.stdout  # the engine's own error passed through
    assert [e["phase"] for e in events(gate.stderr) if e.get("event") == "phase"][-1] == "failed"
