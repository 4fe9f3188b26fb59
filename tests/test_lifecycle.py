"""The readiness state machine, driven by events alone: no processes, no sleeps."""

from __future__ import annotations

import itertools

import pytest

from warmgate.lifecycle import (
    ALLOWED,
    Action,
    ChildExited,
    ChildSpawned,
    Decision,
    DrainDone,
    Event,
    HealthFailed,
    HealthOk,
    Lifecycle,
    LifecycleError,
    OnWarmupFailure,
    Phase,
    Sigterm,
    StartupTimedOut,
    WarmupFinished,
)

P = Phase
A = Action


def at(
    phase: Phase,
    *,
    unhealthy_threshold: int = 3,
    live_grace: float = 300.0,
    on_warmup_failure: OnWarmupFailure = "fail",
) -> Lifecycle:
    """A lifecycle driven to `phase` along the normal path, one event per 10 s."""
    lc = Lifecycle(
        0.0,
        unhealthy_threshold=unhealthy_threshold,
        live_grace=live_grace,
        on_warmup_failure=on_warmup_failure,
    )
    path: dict[Phase, list[Event]] = {
        P.LOADING: [ChildSpawned(42)],
        P.WARMING: [ChildSpawned(42), HealthOk()],
        P.READY: [ChildSpawned(42), HealthOk(), WarmupFinished(ok=True)],
    }
    for t, event in enumerate(path[phase], 1):
        lc.handle(event, t * 10.0)
    assert lc.phase is phase
    return lc


def test_happy_path_records_every_transition() -> None:
    lc = Lifecycle(0.0)
    assert lc.phase is P.STARTING
    assert lc.handle(ChildSpawned(42), 1.0) == Decision(P.LOADING, True, (), "child pid 42 spawned")
    assert lc.handle(HealthFailed("connection refused"), 2.0) == Decision(P.LOADING)
    d = lc.handle(HealthOk(), 3.0)
    assert (d.phase, d.changed, d.actions) == (P.WARMING, True, (A.START_WARMUP,))
    assert lc.handle(WarmupFinished(ok=True), 9.0).phase is P.READY
    assert [(t.phase, t.at) for t in lc.transitions] == [
        (P.STARTING, 0.0),
        (P.LOADING, 1.0),
        (P.WARMING, 3.0),
        (P.READY, 9.0),
    ]
    assert lc.time_in_phase(12.5) == 3.5


def test_probe_answers_per_phase() -> None:
    lc = Lifecycle(0.0)
    assert (lc.ready_ok(), lc.startup_ok(), lc.live_ok(0.0)) == (False, False, True)
    lc = at(P.WARMING)
    assert (lc.ready_ok(), lc.startup_ok()) == (False, False)
    lc = at(P.READY)
    assert (lc.ready_ok(), lc.startup_ok(), lc.live_ok(1e6)) == (True, True, True)


def test_unhealthy_after_threshold_and_back_on_one_ok() -> None:
    lc = at(P.READY, unhealthy_threshold=3)
    assert lc.handle(HealthFailed(), 50.0).phase is P.READY
    assert lc.handle(HealthFailed(), 51.0).phase is P.READY
    d = lc.handle(HealthFailed("503"), 52.0)
    assert (d.phase, d.changed) == (P.UNHEALTHY, True)
    assert "3 times" in d.note and "503" in d.note
    assert not lc.ready_ok()
    d = lc.handle(HealthOk(), 53.0)
    assert (d.phase, d.changed) == (P.READY, True)
    assert lc.ready_ok() and lc.health_failures == 0


def test_threshold_counts_consecutive_failures_only() -> None:
    lc = at(P.READY, unhealthy_threshold=2)
    events: list[Event] = [HealthFailed(), HealthOk(), HealthFailed(), HealthOk()]
    for t, event in enumerate(events):
        assert lc.handle(event, 50.0 + t).phase is P.READY


def test_failures_before_ready_do_not_count_after_it() -> None:
    lc = at(P.WARMING, unhealthy_threshold=3)
    lc.handle(HealthFailed(), 31.0)
    lc.handle(HealthFailed(), 32.0)
    lc.handle(WarmupFinished(ok=True), 33.0)
    assert lc.handle(HealthFailed(), 34.0).phase is P.READY  # one failure after Ready


def test_health_failing_while_loading_keeps_loading() -> None:
    lc = at(P.LOADING)
    for t in range(100):
        assert lc.handle(HealthFailed(), 20.0 + t) == Decision(P.LOADING)
    assert lc.health_failures == 100


def test_live_fails_only_after_grace_in_unhealthy() -> None:
    lc = at(P.READY, unhealthy_threshold=1, live_grace=300.0)
    lc.handle(HealthFailed(), 100.0)
    assert lc.phase is P.UNHEALTHY
    assert lc.live_ok(400.0)  # exactly the grace: still live
    assert not lc.live_ok(400.5)
    lc.handle(HealthOk(), 500.0)
    assert lc.live_ok(500.0)
    lc.handle(HealthFailed(), 600.0)  # the grace starts over
    assert lc.live_ok(850.0) and not lc.live_ok(901.0)


def test_startup_never_goes_back() -> None:
    lc = at(P.READY, unhealthy_threshold=1)
    lc.handle(HealthFailed(), 50.0)
    assert lc.phase is P.UNHEALTHY and lc.startup_ok()
    lc.handle(Sigterm(), 60.0)
    lc.handle(DrainDone(), 70.0)
    lc.handle(ChildExited(0), 80.0)
    assert lc.snapshot(80.0)["phase"] == "stopped"
    assert lc.startup_ok() and lc.ready_since == 30.0


def test_sigterm_after_ready_drains_then_forwards() -> None:
    lc = at(P.READY)
    d = lc.handle(Sigterm(), 50.0)
    assert (d.phase, d.actions) == (P.DRAINING, (A.START_DRAIN,))
    assert not lc.ready_ok() and lc.live_ok(50.0)
    assert lc.handle(HealthOk(), 51.0) == Decision(P.DRAINING)  # ignored while draining
    assert lc.handle(DrainDone(), 60.0).actions == (A.FORWARD_SIGTERM,)
    assert lc.handle(DrainDone(), 61.0) == Decision(P.DRAINING)  # a duplicate changes nothing
    d = lc.handle(ChildExited(0), 62.0)
    assert (d.phase, d.actions) == (P.STOPPED, (A.EXIT,))
    assert lc.exit_code == 0


def test_sigterm_while_unhealthy_also_drains() -> None:
    lc = at(P.READY, unhealthy_threshold=1)
    lc.handle(HealthFailed(), 50.0)
    assert lc.handle(Sigterm(), 51.0).actions == (A.START_DRAIN,)


@pytest.mark.parametrize(
    ("phase", "actions"),
    [(P.LOADING, (A.FORWARD_SIGTERM,)), (P.WARMING, (A.CANCEL_WARMUP, A.FORWARD_SIGTERM))],
)
def test_sigterm_before_ready_forwards_at_once(phase: Phase, actions: tuple[Action, ...]) -> None:
    lc = at(phase)
    d = lc.handle(Sigterm(), 50.0)
    assert (d.phase, d.actions) == (P.DRAINING, actions)
    assert lc.handle(WarmupFinished(ok=True), 51.0) == Decision(P.DRAINING)  # late report
    assert lc.handle(DrainDone(), 52.0) == Decision(P.DRAINING)  # no drain was started
    assert lc.handle(ChildExited(143), 53.0).phase is P.STOPPED
    assert not lc.startup_ok() and lc.exit_code == 143


def test_sigterm_racing_the_spawn_stops_the_child_once_it_exists() -> None:
    lc = Lifecycle(0.0)
    d = lc.handle(Sigterm(), 1.0)
    assert (d.phase, d.actions) == (P.DRAINING, ())  # no child to signal yet
    assert lc.handle(ChildSpawned(7), 2.0).actions == (A.FORWARD_SIGTERM,)
    assert lc.handle(ChildExited(143), 3.0).phase is P.STOPPED


def test_second_sigterm_skips_the_drain() -> None:
    lc = at(P.READY)
    lc.handle(Sigterm(), 50.0)
    d = lc.handle(Sigterm(), 51.0)
    assert (d.phase, d.changed) == (P.DRAINING, False)
    assert d.actions == (A.CANCEL_DRAIN, A.FORWARD_SIGTERM)
    assert lc.handle(DrainDone(), 52.0) == Decision(P.DRAINING)  # the cancelled drain reporting
    assert lc.handle(Sigterm(), 53.0).actions == (A.FORWARD_SIGTERM,)  # like tini: pass it on


def test_child_exit_during_drain_cancels_it() -> None:
    lc = at(P.READY)
    lc.handle(Sigterm(), 50.0)
    d = lc.handle(ChildExited(0), 51.0)
    assert (d.phase, d.actions) == (P.STOPPED, (A.CANCEL_DRAIN, A.EXIT))
    assert lc.handle(Sigterm(), 52.0) == Decision(P.STOPPED)
    assert lc.handle(DrainDone(), 53.0) == Decision(P.STOPPED)


def test_warmup_failure_fails_by_default() -> None:
    lc = at(P.WARMING)
    d = lc.handle(WarmupFinished(ok=False, detail="3 shapes errored"), 40.0)
    assert (d.phase, d.actions) == (P.FAILED, (A.FORWARD_SIGTERM,))
    assert "3 shapes errored" in (lc.failure or "")
    assert not lc.startup_ok() and not lc.ready_ok()
    d = lc.handle(ChildExited(0), 41.0)
    assert (d.phase, d.changed, d.actions) == (P.FAILED, False, (A.EXIT,))
    assert lc.exit_code == 1  # a failed startup never looks like a clean stop


def test_warmup_failure_with_ready_policy_serves_anyway() -> None:
    lc = at(P.WARMING, on_warmup_failure="ready")
    d = lc.handle(WarmupFinished(ok=False, detail="timeout"), 40.0)
    assert (d.phase, d.actions) == (P.READY, ())
    assert "serving anyway" in d.note and lc.ready_ok() and lc.startup_ok()


@pytest.mark.parametrize("phase", [P.LOADING, P.WARMING])
def test_startup_timeout_fails_before_ready(phase: Phase) -> None:
    lc = at(phase)
    d = lc.handle(StartupTimedOut(), 99.0)
    assert d.phase is P.FAILED and d.actions[-1] is A.FORWARD_SIGTERM
    assert (A.CANCEL_WARMUP in d.actions) == (phase is P.WARMING)
    assert lc.handle(Sigterm(), 100.0).actions == (A.FORWARD_SIGTERM,)
    lc.handle(ChildExited(143), 101.0)
    assert lc.exit_code == 143


def test_startup_timeout_after_ready_is_ignored() -> None:
    lc = at(P.READY)
    assert lc.handle(StartupTimedOut(), 99.0) == Decision(P.READY)


@pytest.mark.parametrize("phase", [P.LOADING, P.WARMING, P.READY])
def test_unexpected_child_exit_is_a_failure(phase: Phase) -> None:
    lc = at(phase)
    d = lc.handle(ChildExited(139), 50.0)
    assert d.phase is P.FAILED and d.actions[-1] is A.EXIT
    assert (A.CANCEL_WARMUP in d.actions) == (phase is P.WARMING)
    assert lc.exit_code == 139 and "139" in (lc.failure or "")
    assert lc.handle(HealthOk(), 51.0) == Decision(P.FAILED)


def test_spawn_failure_reported_as_exit() -> None:
    lc = Lifecycle(0.0)
    assert lc.handle(ChildExited(127), 1.0).actions == (A.EXIT,)
    assert lc.phase is P.FAILED and lc.exit_code == 127


def test_events_that_only_a_bug_can_send_raise() -> None:
    lc = at(P.READY)
    with pytest.raises(LifecycleError):
        lc.handle(ChildSpawned(43), 50.0)
    with pytest.raises(LifecycleError):
        lc.handle(WarmupFinished(ok=True), 50.0)
    with pytest.raises(LifecycleError):
        at(P.LOADING).handle(WarmupFinished(ok=True), 50.0)
    lc.handle(ChildExited(0), 51.0)
    with pytest.raises(LifecycleError):
        lc.handle(ChildExited(0), 52.0)


def test_ignored_events_change_nothing() -> None:
    lc = at(P.READY)
    before = lc.transitions
    ignored: list[Event] = [HealthOk(), DrainDone(), StartupTimedOut()]
    for event in ignored:
        assert lc.handle(event, 60.0) == Decision(P.READY)
    assert lc.transitions == before
    starting = Lifecycle(0.0)
    assert starting.handle(HealthOk(), 1.0) == Decision(P.STARTING)
    assert starting.handle(HealthFailed(), 1.0) == Decision(P.STARTING)


def test_every_recorded_transition_is_allowed() -> None:
    lc = at(P.READY, unhealthy_threshold=1)
    events: list[Event] = [
        HealthFailed(),
        HealthOk(),
        HealthFailed(),
        Sigterm(),
        Sigterm(),
        ChildExited(0),
    ]
    for t, event in enumerate(events):
        lc.handle(event, 100.0 + t)
    phases = [t.phase for t in lc.transitions]
    assert phases == [
        P.STARTING,
        P.LOADING,
        P.WARMING,
        P.READY,
        P.UNHEALTHY,
        P.READY,
        P.UNHEALTHY,
        P.DRAINING,
        P.STOPPED,
    ]
    assert all(b in ALLOWED[a] for a, b in itertools.pairwise(phases))
    assert not ALLOWED[P.STOPPED] and not ALLOWED[P.FAILED]  # terminal


def test_snapshot_is_plain_data() -> None:
    lc = at(P.READY)
    snap = lc.snapshot(35.0)
    assert snap["phase"] == "ready" and snap["ready"] is True and snap["started"] is True
    assert snap["time_in_phase_s"] == 5.0 and snap["child_pid"] == 42
    transitions = snap["transitions"]
    assert isinstance(transitions, list)
    assert transitions[-1] == {"phase": "ready", "at": 30.0, "reason": "warm-up finished"}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unhealthy_threshold"):
        Lifecycle(0.0, unhealthy_threshold=0)
    with pytest.raises(ValueError, match="live_grace"):
        Lifecycle(0.0, live_grace=-1)
    with pytest.raises(ValueError, match="on_warmup_failure"):
        Lifecycle(0.0, on_warmup_failure="retry")  # type: ignore[arg-type]
