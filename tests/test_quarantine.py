"""An engine that dies during the warm-up: the shape is named, quarantined under the cache
key, and the next start of that key leaves it out and becomes Ready."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from test_gate import FAST, sim
from wgutil import Running, exit_event, free_port, http_get, wait_for

from warmgate import plan, process
from warmgate.cache import read_quarantine, write_quarantine
from warmgate.config import RunSettings
from warmgate.gate import Gate
from warmgate.lifecycle import ChildSpawned, HealthOk, WarmupFinished
from warmgate.plan import ModelInfo, PlanError, PlanSettings, ShapeKey, UpstreamInfo


def key(feature: str, tokens: int, concurrency: int, endpoint: str = "completions") -> ShapeKey:
    family = f"{endpoint}/nostream/{feature}/len{tokens}/c{concurrency}"
    return ShapeKey("m", family, f"/v1/{endpoint}", False, feature, tokens, concurrency)


# --- which shapes: the pure rule ---------------------------------------------------------


def test_quarantine_holds_the_shape_in_flight_and_the_larger_ones_of_its_feature() -> None:
    done_small, done_mid = key("seed", 64, 1), key("seed", 32, 4)  # loads 64 and 128
    crashed = key("seed", 100, 4)  # load 400
    not_run_small = key("seed", 16, 4)  # load 64: no bigger than what completed
    not_run_between = key("seed", 200, 1)  # load 200 > 128: not known to be safe
    not_run_big = key("seed", 1000, 16)
    other = key("sampling", 1000, 16)
    planned = [done_small, done_mid, crashed, not_run_small, not_run_between, not_run_big, other]
    held = plan.to_quarantine(planned, [done_small, done_mid], [crashed])
    assert held == (crashed, not_run_between, not_run_big)


def test_with_nothing_of_the_feature_completed_every_shape_of_it_is_held() -> None:
    planned = [key("greedy", 8, 1), key("seed", 1000, 16), key("seed", 8, 1), key("json", 8, 4)]
    held = plan.to_quarantine(planned, [key("greedy", 8, 1)], [key("seed", 1000, 16)])
    assert held == (key("seed", 1000, 16), key("seed", 8, 1))


def test_a_completed_shape_is_never_held_even_when_larger() -> None:
    big_done = key("seed", 1000, 1)
    held = plan.to_quarantine([big_done, key("seed", 10, 1)], [big_done], [key("seed", 10, 1)])
    assert held == (key("seed", 10, 1),)


def _plan() -> plan.Plan:
    info = UpstreamInfo((ModelInfo("m", 1024),), has_tokenize=True, tokens_per_word=1.3)
    return plan.build_plan(PlanSettings(concurrency=(1, 4), coverage="pairwise"), info)


def test_the_plan_filter_leaves_out_exactly_the_quarantined_shapes_in_order() -> None:
    full = _plan()
    seeded = [s for s in full.shapes if s.feature == "seed"]
    held = [s.key for s in seeded[1:]] + [dataclasses.replace(seeded[0].key, model="other")]
    kept, dropped = plan.without_quarantined(full, held)
    assert dropped == tuple(seeded[1:])
    assert kept.shapes == tuple(s for s in full.shapes if s not in seeded[1:])
    assert seeded[0] in kept.shapes  # another model's record does not match it
    assert (kept.converge, kept.tokens_per_word) == (full.converge, full.tokens_per_word)


def test_a_plan_with_every_shape_quarantined_is_refused_with_the_fix() -> None:
    full = _plan()
    with pytest.raises(PlanError, match="new --cache-key or delete"):
        plan.without_quarantined(full, [s.key for s in full.shapes])
    assert plan.without_quarantined(full, []) == (full, ())


def test_a_shape_key_survives_json_and_odd_records_are_refused() -> None:
    k = key("seed", 1000, 16)
    assert ShapeKey.from_dict(json.loads(json.dumps(k.as_dict()))) == k
    assert ShapeKey.from_dict({**k.as_dict(), "reason": "in_flight"}) == k
    assert ShapeKey.from_dict({**k.as_dict(), "concurrency": True}) is None
    assert ShapeKey.from_dict({**k.as_dict(), "prompt_tokens": "1000"}) is None
    assert ShapeKey.from_dict({"family": "x"}) is None
    assert ShapeKey.from_dict(["not", "a", "record"]) is None


def test_the_redacted_body_carries_every_field_but_the_prompt() -> None:
    full = _plan()
    for shape in full.shapes:
        prompt: list[int] | str = [7] * 3 if shape.prompt_kind == "tokens" else "secret words"
        sent = plan.body_for(shape, prompt)
        shown = plan.redacted_body(shape)
        assert "secret" not in json.dumps(shown) and "[7, 7, 7]" not in json.dumps(shown)
        assert f"<{shape.prompt_tokens} prompt tokens>" in json.dumps(shown)
        assert set(shown) == set(sent)
        assert {k: v for k, v in shown.items() if k not in ("prompt", "messages")} == {
            k: v for k, v in sent.items() if k not in ("prompt", "messages")
        }
    replayed = plan.Shape(
        "replay/r.jsonl:1", "/v1/chat/completions", "m", "recorded", 0,
        recorded={"messages": [{"role": "user", "content": "private"}], "seed": 3},
    )  # fmt: skip
    shown = plan.redacted_body(replayed)
    assert shown["messages"] == [{"role": "user", "content": "<prompt removed>"}]
    assert shown["seed"] == 3


# --- where it is kept: the cache volume ---------------------------------------------------


def test_quarantine_file_is_merged_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "key" / "quarantine.json"
    path.parent.mkdir()
    assert read_quarantine(path) == ([], None)
    first = {**key("seed", 100, 4).as_dict(), "reason": "in_flight"}
    again = {**key("seed", 100, 4).as_dict(), "reason": "not_known_safe"}
    second = {**key("seed", 200, 4).as_dict(), "reason": "not_known_safe"}
    assert write_quarantine(path, "key", [first]) is None
    assert write_quarantine(path, "key", [again, second]) is None
    records, warning = read_quarantine(path)
    assert warning is None and records == [first, second]  # the first record of a shape stays
    assert json.loads(path.read_text())["key"] == "key"
    assert sorted(p.name for p in path.parent.iterdir()) == ["quarantine.json"]  # no temp left


def test_an_unusable_quarantine_warns_and_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    warning = write_quarantine(blocker / "quarantine.json", "k", [key("seed", 1, 1).as_dict()])
    assert warning is not None and "not recorded" in warning
    bad = tmp_path / "quarantine.json"
    bad.write_text("{half")
    records, warning = read_quarantine(bad)
    assert records == [] and warning is not None and "not JSON" in warning
    bad.write_text('{"shapes": 3}')
    assert read_quarantine(bad)[0] == []


# --- the gate names the shapes in flight (no processes) ------------------------------------


def _dying_gate() -> Gate:
    settings = RunSettings(command=("warmgate", "sim"))
    child = process.Child(pid=os.getpid(), argv=settings.command)
    gate = Gate(settings, child, "http://127.0.0.1:9", None, lambda sig: None)
    crashed = key("seed", 1000, 16)
    gate.progress.handle(
        {
            "event": "plan",
            "models": ["m"],
            "shapes": [key("seed", 8, 1).as_dict(), crashed.as_dict(), key("json", 8, 1).as_dict()],
            "warnings": [],
        }
    )
    gate.progress.handle({"event": "start", "index": 0, "body": {}})
    gate.progress.handle({"event": "shape", "index": 0, "status": "converged", "error": None})
    body = {"model": "m", "prompt": "<1000 prompt tokens>", "seed": 1234}
    gate.progress.handle({"event": "start", "index": 1, "body": body})
    gate.apply(ChildSpawned(gate.child.pid))
    gate.apply(HealthOk())
    return gate


def _child_exits(gate: Gate, status: int) -> None:
    """The reaper's report, as the gate's child watcher takes it."""

    async def exits() -> None:
        exited = asyncio.get_running_loop().create_future()
        exited.set_result(status << 8)  # a wait status: exited with `status`
        await gate._watch_child(exited)

    asyncio.run(exits())


def test_status_and_exit_line_name_the_shape_in_flight_when_the_engine_dies() -> None:
    gate = _dying_gate()
    try:
        _child_exits(gate, 0)
        died = json.loads(gate.published.status)["engine_died"]
        assert [s["family"] for s in died["shapes"]] == ["completions/nostream/seed/len1000/c16"]
        shape = died["shapes"][0]
        assert (shape["feature"], shape["prompt_tokens"], shape["concurrency"]) == (
            "seed",
            1000,
            16,
        )
        assert shape["body"]["prompt"] == "<1000 prompt tokens>"
        assert "crash the engine too" in died["note"]
        assert gate.exit_fields()["shape"] == "completions/nostream/seed/len1000/c16"
        assert gate.life.ending is not None and gate.life.ending.code == 70
    finally:
        asyncio.run(gate.upstream.aclose())


def test_a_child_exit_after_ready_names_no_shape() -> None:
    gate = _dying_gate()
    try:
        gate.apply(WarmupFinished(ok=True))
        _child_exits(gate, 3)
        assert gate.life.ending is not None and gate.life.ending.reason == "child_exited"
        assert "shape" not in gate.exit_fields()
        assert json.loads(gate.published.status)["engine_died"] is None
    finally:
        asyncio.run(gate.upstream.aclose())


def test_a_failed_warm_up_with_failing_health_waits_for_the_engine_to_exit() -> None:
    """The requests fail before the dying engine's server exits: the exit, not the failed
    warm-up, must decide (engine_died_during_warmup, naming the shape)."""
    gate = _dying_gate()  # its upstream (port 9) refuses: health fails

    async def fail_while_dying() -> bool:
        exited = asyncio.get_running_loop().create_future()
        gate._exited = exited
        asyncio.get_running_loop().call_later(0.2, exited.set_result, 0)
        await gate._await_dying_engine()
        return exited.done()

    try:
        assert asyncio.run(fail_while_dying())
    finally:
        asyncio.run(gate.upstream.aclose())


# --- over the simulator: crash, heal, a new key starts clean -------------------------------

CRASH_ON_SEED = ("--crash-on-feature", "seed", "--crash-above-tokens", "512", "--crash-code", "0")


def _run(*wg_args: str, sim_port: int) -> Running:
    # The sweep plans seeded prompts of up to 1,000 tokens x 4; the engine plan's seeded
    # requests stay short (32 tokens x 4 here), under the crash's 512.
    probes = ("--host", "127.0.0.1", "--port", "0", "--coverage", "pairwise")
    return Running(["run", *probes, *FAST, *wg_args, "--", *sim(sim_port, *CRASH_ON_SEED)])


def _crashes(gate: Running) -> dict[str, Any]:
    """The run ends 70, naming a seed shape in flight; its engine_died_during_warmup line."""
    try:
        assert gate.wait(timeout=120) == 70
    finally:
        gate.stop()
    died = gate.events("engine_died_during_warmup")
    assert len(died) == 1, gate.stderr[-3000:]
    end = exit_event(gate.stderr)
    assert (end["reason"], end["code"], end["child_code"]) == ("engine_died_during_warmup", 70, 0)
    assert "/seed/" in end["shape"] and end["shape"] == died[0]["shape"]
    logged = [json.dumps(e) for e in gate.events()]
    assert logged.index(json.dumps(died[0])) < logged.index(json.dumps(end))
    (shape,) = died[0]["shapes"]
    assert shape["feature"] == "seed" and shape["family"] == died[0]["shape"]
    assert shape["body"]["seed"] == 1234
    assert "prompt tokens>" in json.dumps(
        shape["body"].get("messages", shape["body"].get("prompt"))
    )
    return died[0]


def test_a_crash_loop_heals_in_one_restart_and_a_new_key_starts_clean(tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "cache")
    sim_port = free_port()
    died = _crashes(_run("--cache-dir", cache_dir, sim_port=sim_port))
    held = died["quarantined"]
    assert died["shape"] in held and all("/seed/" in f for f in held)
    assert "not the whole feature" in died["quarantine_note"]
    where = Path(died["quarantine"])  # <cache dir>/<key>/quarantine.json, beside the slots
    assert where.parent.parent == tmp_path / "cache" and (where.parent / "slot0").is_dir()
    records, _ = read_quarantine(where)
    assert [r["family"] for r in records] == held

    healed = _run("--cache-dir", cache_dir, sim_port=sim_port)  # the very same command again
    try:
        port = int(healed.wait_event("listening", timeout=15)["port"])
        wait_for(lambda: http_get(port, "/ready")[0] == 200 or healed.proc.poll() is not None, 120)
        assert http_get(port, "/ready")[0] == 200, healed.stderr[-3000:]
        status = http_get(port, "/status")[1]
        assert [q["family"] for q in status["quarantined"]] == held
        assert not {s["family"] for s in status["shapes"]} & set(held)
        assert any(s["feature"] == "seed" for s in status["shapes"])  # the feature still warms
        metrics = http_get(port, "/metrics")[1]
        assert f'warmgate_quarantined_shapes{{feature="seed"}} {float(len(held))}' in metrics
        (warning,) = healed.events("quarantine")
        assert warning["shapes"] == held and warning["level"] == "warning"
        healed.proc.send_signal(signal.SIGTERM)
        assert healed.wait(timeout=30) == 0
    finally:
        healed.stop()

    _crashes(_run("--cache-dir", cache_dir, "--cache-key", "v2", sim_port=sim_port))


def test_without_a_cache_dir_the_log_says_how_to_get_quarantine() -> None:
    died = _crashes(_run(sim_port=free_port()))
    assert died["quarantine"] is None and died["shape"] in died["would_quarantine"]
    assert "--cache-dir" in died["quarantine_hint"]
