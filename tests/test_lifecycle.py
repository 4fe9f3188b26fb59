"""The readiness state machine, driven by events alone: no processes, no sleeps."""

from __future__ import annotations

import itertools
import math
import signal

import pytest

from warmgate.errors import Ending
from warmgate.lifecycle import (
    ALLOWED,
    Action,
    AdapterPending,
    AdapterWarmed,
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
    Sleep,
    StopAsked,
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
    startup_timeout: float = math.inf,
) -> Lifecycle:
    """A lifecycle driven to `phase` along the normal path, one event per 10 s."""
    life = Lifecycle(
        0.0,
        unhealthy_threshold=unhealthy_threshold,
        live_grace=live_grace,
        on_warmup_failure=on_warmup_failure,
        startup_timeout=startup_timeout,
    )
    path: dict[Phase, list[Event]] = {
        P.LOADING: [ChildSpawned(42)],
        P.WARMING: [ChildSpawned(42), HealthOk()],
        P.READY: [ChildSpawned(42), HealthOk(), WarmupFinished(ok=True)],
    }
    for t, event in enumerate(path[phase], 1):
        life.handle(event, t * 10.0)
    assert life.phase is phase
    return life


def test_happy_path_records_every_transition() -> None:
    life = Lifecycle(0.0)
    assert life.phase is P.STARTING
    assert life.handle(ChildSpawned(42), 1.0) == Decision(
        P.LOADING, True, (), "child pid 42 spawned"
    )
    assert life.handle(HealthFailed("connection refused"), 2.0) == Decision(P.LOADING)
    d = life.handle(HealthOk(), 3.0)
    assert (d.phase, d.changed, d.actions) == (P.WARMING, True, (A.START_WARMUP,))
    assert life.handle(WarmupFinished(ok=True), 9.0).phase is P.READY
    assert [(t.phase, t.at) for t in life.transitions] == [
        (P.STARTING, 0.0),
        (P.LOADING, 1.0),
        (P.WARMING, 3.0),
        (P.READY, 9.0),
    ]
    assert life.time_in_phase(12.5) == 3.5


def test_probe_answers_per_phase() -> None:
    life = Lifecycle(0.0)
    assert (life.ready_ok(), life.startup_ok(), life.live_ok(0.0)) == (False, False, True)
    life = at(P.WARMING)
    assert (life.ready_ok(), life.startup_ok()) == (False, False)
    life = at(P.READY)
    assert (life.ready_ok(), life.startup_ok(), life.live_ok(1e6)) == (True, True, True)


def test_unhealthy_after_threshold_and_back_on_one_ok() -> None:
    life = at(P.READY, unhealthy_threshold=3)
    assert life.handle(HealthFailed(), 50.0).phase is P.READY
    assert life.handle(HealthFailed(), 51.0).phase is P.READY
    d = life.handle(HealthFailed("503"), 52.0)
    assert (d.phase, d.changed) == (P.UNHEALTHY, True)
    assert "3 times" in d.note and "503" in d.note
    assert not life.ready_ok()
    d = life.handle(HealthOk(), 53.0)
    assert (d.phase, d.changed) == (P.READY, True)
    assert life.ready_ok() and life.health_failures == 0


def test_threshold_counts_consecutive_failures_only() -> None:
    life = at(P.READY, unhealthy_threshold=2)
    events: list[Event] = [HealthFailed(), HealthOk(), HealthFailed(), HealthOk()]
    for t, event in enumerate(events):
        assert life.handle(event, 50.0 + t).phase is P.READY


def test_failures_before_ready_do_not_count_after_it() -> None:
    life = at(P.WARMING, unhealthy_threshold=3)
    life.handle(HealthFailed(), 31.0)
    life.handle(HealthFailed(), 32.0)
    life.handle(WarmupFinished(ok=True), 33.0)
    assert life.handle(HealthFailed(), 34.0).phase is P.READY  # one failure after Ready


def test_health_failing_while_loading_keeps_loading() -> None:
    life = at(P.LOADING)
    for t in range(100):
        assert life.handle(HealthFailed(), 20.0 + t) == Decision(P.LOADING)
    assert life.health_failures == 100


def test_live_fails_only_after_grace_in_unhealthy() -> None:
    life = at(P.READY, unhealthy_threshold=1, live_grace=300.0)
    life.handle(HealthFailed(), 100.0)
    assert life.phase is P.UNHEALTHY
    assert life.live_ok(400.0)  # exactly the grace: still live
    assert not life.live_ok(400.5)
    life.handle(HealthOk(), 500.0)
    assert life.live_ok(500.0)
    life.handle(HealthFailed(), 600.0)  # the grace starts over
    assert life.live_ok(850.0) and not life.live_ok(901.0)


def test_startup_never_goes_back() -> None:
    life = at(P.READY, unhealthy_threshold=1)
    life.handle(HealthFailed(), 50.0)
    assert life.phase is P.UNHEALTHY and life.startup_ok()
    life.handle(Sigterm(), 60.0)
    life.handle(DrainDone(), 70.0)
    life.handle(ChildExited(0), 80.0)
    assert life.as_status(80.0)["phase"] == "stopped"
    assert life.startup_ok() and life.ready_since == 30.0


def test_sigterm_after_ready_drains_then_forwards() -> None:
    life = at(P.READY)
    d = life.handle(Sigterm(), 50.0)
    assert (d.phase, d.actions) == (P.DRAINING, (A.START_DRAIN,))
    assert not life.ready_ok() and life.live_ok(50.0)
    assert life.handle(HealthOk(), 51.0) == Decision(P.DRAINING)  # ignored while draining
    assert life.handle(DrainDone(), 60.0).actions == (A.FORWARD_SIGTERM,)
    assert life.handle(DrainDone(), 61.0) == Decision(P.DRAINING)  # a duplicate changes nothing
    d = life.handle(ChildExited(0), 62.0)
    assert (d.phase, d.actions) == (P.STOPPED, (A.EXIT,))
    assert life.ending == Ending("stopped", 0) and life.stop_signal == "SIGTERM"


def test_sigterm_while_unhealthy_also_drains() -> None:
    life = at(P.READY, unhealthy_threshold=1)
    life.handle(HealthFailed(), 50.0)
    assert life.handle(Sigterm(), 51.0).actions == (A.START_DRAIN,)


@pytest.mark.parametrize(
    ("phase", "actions"),
    [(P.LOADING, (A.FORWARD_SIGTERM,)), (P.WARMING, (A.CANCEL_WARMUP, A.FORWARD_SIGTERM))],
)
def test_sigterm_before_ready_forwards_at_once(phase: Phase, actions: tuple[Action, ...]) -> None:
    life = at(phase)
    d = life.handle(Sigterm(), 50.0)
    assert (d.phase, d.actions) == (P.DRAINING, actions)
    assert life.handle(WarmupFinished(ok=True), 51.0) == Decision(P.DRAINING)  # late report
    assert life.handle(DrainDone(), 52.0) == Decision(P.DRAINING)  # no drain was started
    assert life.handle(ChildExited(143, signal.SIGTERM), 53.0).phase is P.STOPPED
    assert not life.startup_ok() and life.ending == Ending("stopped", 143)


def test_sigterm_racing_the_spawn_stops_the_child_once_it_exists() -> None:
    life = Lifecycle(0.0)
    d = life.handle(Sigterm(), 1.0)
    assert (d.phase, d.actions) == (P.DRAINING, ())  # no child to signal yet
    assert life.handle(ChildSpawned(7), 2.0).actions == (A.FORWARD_SIGTERM,)
    assert life.handle(ChildExited(143), 3.0).phase is P.STOPPED


def test_second_sigterm_skips_the_drain() -> None:
    life = at(P.READY)
    life.handle(Sigterm(), 50.0)
    d = life.handle(Sigterm(), 51.0)
    assert (d.phase, d.changed) == (P.DRAINING, False)
    assert d.actions == (A.SKIP_DRAIN, A.FORWARD_SIGTERM)
    assert life.handle(DrainDone(), 52.0) == Decision(P.DRAINING)  # the cancelled drain reporting
    assert life.handle(Sigterm(), 53.0).actions == (A.FORWARD_SIGTERM,)  # like tini: pass it on


def test_child_exit_during_drain_cancels_it() -> None:
    life = at(P.READY)
    life.handle(Sigterm(), 50.0)
    d = life.handle(ChildExited(0), 51.0)
    assert (d.phase, d.actions) == (P.STOPPED, (A.CANCEL_DRAIN, A.EXIT))
    assert life.handle(Sigterm(), 52.0) == Decision(P.STOPPED)
    assert life.handle(DrainDone(), 53.0) == Decision(P.STOPPED)


def test_warmup_failure_fails_by_default() -> None:
    life = at(P.WARMING)
    d = life.handle(WarmupFinished(ok=False, detail="3 shapes errored"), 40.0)
    assert (d.phase, d.actions) == (P.FAILED, (A.FORWARD_SIGTERM,))
    assert "3 shapes errored" in (life.failure or "")
    assert not life.startup_ok() and not life.ready_ok()
    d = life.handle(ChildExited(0), 41.0)
    assert (d.phase, d.changed, d.actions) == (P.FAILED, False, (A.EXIT,))
    assert life.ending == Ending("warmup_failed", 70)  # the README's code, not the child's 0


def test_warmup_failure_with_ready_policy_serves_anyway() -> None:
    life = at(P.WARMING, on_warmup_failure="ready")
    d = life.handle(WarmupFinished(ok=False, detail="timeout"), 40.0)
    assert (d.phase, d.actions) == (P.READY, ())
    assert "serving anyway" in d.note and life.ready_ok() and life.startup_ok()


def test_startup_deadline_is_decided_at_a_health_report_while_loading() -> None:
    life = at(P.LOADING, startup_timeout=60.0)  # created at 0, loading since 10
    assert life.handle(HealthFailed("connection refused"), 60.0) == Decision(P.LOADING)
    d = life.handle(HealthFailed("connection refused"), 60.5)
    assert (d.phase, d.changed, d.actions) == (P.FAILED, True, (A.FORWARD_SIGTERM,))
    assert "60 s" in d.note and life.startup_failure == "upstream_never_healthy"
    assert life.handle(Sigterm(), 61.0).actions == (A.FORWARD_SIGTERM,)
    assert life.handle(ChildExited(143, signal.SIGTERM), 62.0).actions == (A.EXIT,)
    assert life.ending == Ending("upstream_never_healthy", 69)


@pytest.mark.parametrize("status", [0, 1, 137])
def test_a_failed_startup_ends_with_its_own_code_whatever_the_child_left(status: int) -> None:
    life = at(P.LOADING, startup_timeout=5.0)
    life.handle(HealthFailed(), 20.0)
    life.handle(ChildExited(status), 21.0)
    assert life.ending == Ending("upstream_never_healthy", 69)


def test_startup_deadline_spares_a_healthy_upstream_and_later_phases() -> None:
    life = at(P.LOADING, startup_timeout=15.0)
    d = life.handle(HealthOk(), 500.0)  # late, but healthy: the warm-up has its own timeout
    assert (d.phase, d.actions) == (P.WARMING, (A.START_WARMUP,))
    assert life.handle(HealthFailed(), 501.0) == Decision(P.WARMING)
    ready = at(P.READY, startup_timeout=15.0, unhealthy_threshold=5)
    assert ready.handle(HealthFailed(), 900.0) == Decision(P.READY)
    assert ready.startup_failure is None


@pytest.mark.parametrize("phase", [P.LOADING, P.WARMING, P.READY])
def test_unexpected_child_exit_is_a_failure(phase: Phase) -> None:
    life = at(phase)
    d = life.handle(ChildExited(139), 50.0)
    assert d.phase is P.FAILED and d.actions[-1] is A.EXIT
    assert (A.CANCEL_WARMUP in d.actions) == (phase is P.WARMING)
    reason = "engine_died_during_warmup" if phase is P.WARMING else "child_exited"
    assert life.ending == Ending(reason, 139) and "139" in (life.failure or "")
    assert life.handle(HealthOk(), 51.0) == Decision(P.FAILED)


def test_spawn_failure_reported_as_exit() -> None:
    life = Lifecycle(0.0)
    assert life.handle(ChildExited(127), 1.0).actions == (A.EXIT,)
    assert life.phase is P.FAILED and life.ending == Ending("child_exited", 127)


def test_events_that_only_a_bug_can_send_raise() -> None:
    life = at(P.READY)
    with pytest.raises(LifecycleError):
        life.handle(ChildSpawned(43), 50.0)
    with pytest.raises(LifecycleError):
        life.handle(WarmupFinished(ok=True), 50.0)
    with pytest.raises(LifecycleError):
        at(P.LOADING).handle(WarmupFinished(ok=True), 50.0)
    life.handle(ChildExited(0), 51.0)
    with pytest.raises(LifecycleError):
        life.handle(ChildExited(0), 52.0)


def test_ignored_events_change_nothing() -> None:
    life = at(P.READY)
    before = life.transitions
    ignored: list[Event] = [HealthOk(), DrainDone()]
    for event in ignored:
        assert life.handle(event, 60.0) == Decision(P.READY)
    assert life.transitions == before
    starting = Lifecycle(0.0)
    assert starting.handle(HealthOk(), 1.0) == Decision(P.STARTING)
    assert starting.handle(HealthFailed(), 1.0) == Decision(P.STARTING)


def test_every_recorded_transition_is_allowed() -> None:
    life = at(P.READY, unhealthy_threshold=1)
    events: list[Event] = [
        HealthFailed(),
        HealthOk(),
        HealthFailed(),
        Sigterm(),
        Sigterm(),
        ChildExited(0),
    ]
    for t, event in enumerate(events):
        life.handle(event, 100.0 + t)
    phases = [t.phase for t in life.transitions]
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


def test_status_is_plain_data() -> None:
    life = at(P.READY)
    snap = life.as_status(35.0)
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
    with pytest.raises(ValueError, match="startup_timeout"):
        Lifecycle(0.0, startup_timeout=0)
    with pytest.raises(ValueError, match="on_warmup_failure"):
        Lifecycle(0.0, on_warmup_failure="retry")  # type: ignore[arg-type]


def test_live_until_is_what_the_probe_thread_compares_its_clock_to() -> None:
    life = at(P.READY, unhealthy_threshold=1, live_grace=300.0)
    assert life.live_until() == math.inf
    life.handle(HealthFailed(), 100.0)
    assert life.live_until() == 400.0
    life.handle(ChildExited(139), 101.0)
    assert life.live_until() == -math.inf and not life.live_ok(101.0)  # the child is gone


def test_seconds_per_phase_sums_repeated_phases() -> None:
    life = at(P.READY, unhealthy_threshold=1)  # starting 0-10, loading 10-20, warming 20-30
    life.handle(HealthFailed(), 40.0)
    life.handle(HealthOk(), 45.0)
    assert life.seconds_per_phase(50.0) == {
        "starting": 10.0,
        "loading": 10.0,
        "warming": 10.0,
        "ready": 15.0,
        "unhealthy": 5.0,
    }


def test_no_ending_while_the_child_runs() -> None:
    life = at(P.READY)
    life.handle(Sigterm(), 50.0)
    assert life.ending is None
    life.handle(ChildExited(137, signal.SIGKILL), 51.0)
    assert life.ending == Ending("stopped", 137)


@pytest.mark.parametrize("phase", [P.LOADING, P.WARMING, P.READY])
def test_a_stop_the_child_already_heard_stops_without_forwarding(phase: Phase) -> None:
    life = at(phase)
    d = life.handle(StopAsked("SIGINT"), 50.0)
    expected = (A.CANCEL_WARMUP,) if phase is P.WARMING else ()
    assert (d.phase, d.actions) == (P.DRAINING, expected)  # no FORWARD_SIGTERM: it has it
    assert not life.ready_ok()
    assert life.handle(ChildExited(0), 51.0).phase is P.STOPPED
    assert life.ending == Ending("stopped", 0) and life.stop_signal == "SIGINT"


def test_a_stop_during_the_drain_skips_the_rest_and_the_first_stop_is_named() -> None:
    life = at(P.READY)
    life.handle(Sigterm(), 50.0)
    assert life.handle(StopAsked("SIGINT"), 51.0).actions == (A.SKIP_DRAIN,)
    assert life.handle(DrainDone(), 52.0).actions == ()  # the drain is over already
    assert life.handle(StopAsked("SIGQUIT"), 53.0).actions == ()
    life.handle(ChildExited(130), 54.0)
    assert life.ending == Ending("stopped", 130) and life.stop_signal == "SIGTERM"


def test_a_stop_after_failing_changes_nothing() -> None:
    life = at(P.WARMING)
    life.handle(WarmupFinished(ok=False, detail="boom"), 50.0)
    assert life.handle(StopAsked("SIGINT"), 51.0) == Decision(P.FAILED)
    life.handle(ChildExited(0), 52.0)
    assert life.ending == Ending("warmup_failed", 70) and life.stop_signal is None


@pytest.mark.parametrize(("status", "code"), [(0, 70), (1, 1), (139, 139)])
def test_an_engine_that_dies_during_the_warm_up_is_never_a_success(status: int, code: int) -> None:
    life = at(P.WARMING)
    d = life.handle(ChildExited(status), 50.0)
    assert (d.phase, d.actions) == (P.FAILED, (A.CANCEL_WARMUP, A.EXIT))
    assert life.ending == Ending("engine_died_during_warmup", code)
    assert "engine died during warm-up" in (life.failure or "")


def test_an_engine_that_dies_while_loading_or_serving_ends_with_its_status() -> None:
    for phase in (P.LOADING, P.READY):
        life = at(phase)
        life.handle(ChildExited(0), 50.0)
        assert life.phase is P.FAILED and life.ending == Ending("child_exited", 0)


# --- sleep and wake, runtime LoRA adapters -------------------------------------------------


def asleep(unhealthy_threshold: int = 3) -> Lifecycle:
    life = at(P.READY, unhealthy_threshold=unhealthy_threshold)
    d = life.handle(Sleep(True), 50.0)
    assert (d.phase, d.changed, d.actions) == (P.SLEEPING, True, ())
    return life


def test_sleep_is_503_on_ready_only_and_wake_rewarms_then_ready() -> None:
    life = asleep()
    assert (life.ready_ok(), life.live_ok(1e6), life.startup_ok()) == (False, True, True)
    assert life.handle(Sleep(True), 51.0) == Decision(P.SLEEPING)  # the next poll: same
    d = life.handle(Sleep(False), 52.0)
    assert (d.phase, d.changed, d.actions) == (P.REWARMING, True, (A.START_REWARM,))
    assert (life.ready_ok(), life.live_ok(1e6), life.startup_ok()) == (False, True, True)
    assert life.handle(Sleep(False), 53.0) == Decision(P.REWARMING)
    d = life.handle(WarmupFinished(ok=True), 54.0)
    assert (d.phase, d.changed, d.actions) == (P.READY, True, ())
    assert life.ready_ok() and life.ready_since == 30.0 and life.wakes == 1
    assert [t.phase for t in life.transitions][-3:] == [P.SLEEPING, P.REWARMING, P.READY]
    assert life.seconds_per_phase(55.0)["sleeping"] == 2.0


def test_a_failed_rewarm_still_ends_ready() -> None:
    life = asleep()
    life.handle(Sleep(False), 52.0)
    d = life.handle(WarmupFinished(ok=False, detail="HTTP 500"), 53.0)
    assert (d.phase, d.actions) == (P.READY, ())
    assert "HTTP 500" in d.note and life.ending is None and life.failure is None


def test_sleep_before_ready_means_nothing() -> None:
    for phase in (P.LOADING, P.WARMING):
        life = at(phase)
        assert not life.after_ready()
        assert life.handle(Sleep(True), 50.0) == Decision(phase)
    assert at(P.READY).after_ready()


def test_sleeping_again_mid_rewarm_cancels_it_and_a_late_report_is_ignored() -> None:
    life = asleep()
    life.handle(Sleep(False), 52.0)
    d = life.handle(Sleep(True), 53.0)
    assert (d.phase, d.actions) == (P.SLEEPING, (A.CANCEL_WARMUP,))
    assert life.handle(WarmupFinished(ok=True), 54.0) == Decision(P.SLEEPING)


def test_sleep_from_unhealthy_and_health_failing_while_asleep_changes_nothing() -> None:
    life = at(P.READY, unhealthy_threshold=1)
    life.handle(HealthFailed(), 40.0)
    assert life.phase is P.UNHEALTHY
    assert life.handle(Sleep(True), 41.0).phase is P.SLEEPING
    for t in range(5):
        assert life.handle(HealthFailed(), 42.0 + t) == Decision(P.SLEEPING)
    assert life.live_ok(1e9)  # no unhealthy grace runs while asleep


def test_health_failing_mid_rewarm_cancels_it_and_recovery_rewarms_again() -> None:
    life = asleep(unhealthy_threshold=2)
    life.handle(Sleep(False), 52.0)
    assert life.handle(HealthFailed(), 53.0) == Decision(P.REWARMING)
    d = life.handle(HealthFailed("503"), 54.0)
    assert (d.phase, d.actions) == (P.UNHEALTHY, (A.CANCEL_WARMUP,))
    assert life.handle(WarmupFinished(ok=False), 54.5) == Decision(P.UNHEALTHY)  # late report
    d = life.handle(HealthOk(), 55.0)
    assert (d.phase, d.actions) == (P.REWARMING, (A.START_REWARM,))
    assert life.handle(WarmupFinished(ok=True), 56.0).phase is P.READY
    assert life.handle(HealthFailed(), 57.0).phase is P.READY  # the count starts again


@pytest.mark.parametrize(
    ("wake", "actions"),
    [(False, (A.START_DRAIN,)), (True, (A.CANCEL_WARMUP, A.START_DRAIN))],
)
def test_sigterm_while_asleep_or_rewarming_drains_as_from_ready(
    wake: bool, actions: tuple[Action, ...]
) -> None:
    life = asleep()
    if wake:
        life.handle(Sleep(False), 52.0)
    d = life.handle(Sigterm(), 60.0)
    assert (d.phase, d.actions) == (P.DRAINING, actions)
    assert life.handle(Sleep(False), 61.0) == Decision(P.DRAINING)
    assert life.handle(DrainDone(), 62.0).actions == (A.FORWARD_SIGTERM,)
    assert life.handle(ChildExited(0), 63.0).phase is P.STOPPED
    assert life.ending == Ending("stopped", 0)


def test_stop_signal_or_crash_while_rewarming_cancels_it() -> None:
    life = asleep()
    life.handle(Sleep(False), 52.0)
    assert life.handle(StopAsked("SIGINT"), 53.0).actions == (A.CANCEL_WARMUP,)
    life = asleep()
    life.handle(Sleep(False), 52.0)
    d = life.handle(ChildExited(137, signal.SIGKILL), 53.0)
    assert (d.phase, d.actions) == (P.FAILED, (A.CANCEL_WARMUP, A.EXIT))
    assert life.startup_failure is None and life.ending == Ending("child_killed", 137)


def test_a_crash_while_asleep_is_the_childs_status() -> None:
    life = asleep()
    d = life.handle(ChildExited(3), 53.0)
    assert (d.phase, d.actions) == (P.FAILED, (A.EXIT,))
    assert life.ending is not None and life.ending.code == 3


def test_adapters_warm_one_at_a_time_and_only_while_ready() -> None:
    life = at(P.WARMING)
    assert life.handle(AdapterPending(), 25.0) == Decision(P.WARMING)
    life.handle(WarmupFinished(ok=True), 30.0)
    d = life.handle(AdapterPending(), 40.0)
    assert (d.phase, d.changed, d.actions) == (P.READY, False, (A.START_ADAPTER_WARMUP,))
    assert life.handle(AdapterPending(), 41.0) == Decision(P.READY)  # one runs already
    assert life.handle(AdapterWarmed(), 42.0) == Decision(P.READY)
    assert life.handle(AdapterPending(), 43.0).actions == (A.START_ADAPTER_WARMUP,)


@pytest.mark.parametrize(
    ("event", "phase", "actions"),
    [
        (Sleep(True), P.SLEEPING, (A.STOP_ADAPTER_WARMUP,)),
        (HealthFailed(), P.UNHEALTHY, (A.STOP_ADAPTER_WARMUP,)),
        (Sigterm(), P.DRAINING, (A.STOP_ADAPTER_WARMUP, A.START_DRAIN)),
        (ChildExited(1), P.FAILED, (A.STOP_ADAPTER_WARMUP, A.EXIT)),
    ],
)
def test_leaving_ready_stops_the_adapter_warmup(
    event: Event, phase: Phase, actions: tuple[Action, ...]
) -> None:
    life = at(P.READY, unhealthy_threshold=1)
    life.handle(AdapterPending(), 40.0)
    d = life.handle(event, 41.0)
    assert (d.phase, d.actions) == (phase, actions)
    assert not life.adapter_warming
    assert life.handle(AdapterWarmed(), 42.0) == Decision(phase)  # the stopped one reporting


def test_every_new_move_is_in_the_table() -> None:
    assert P.SLEEPING in ALLOWED[P.READY] and P.SLEEPING in ALLOWED[P.UNHEALTHY]
    assert ALLOWED[P.SLEEPING] == {P.REWARMING, P.DRAINING, P.FAILED}
    assert P.READY in ALLOWED[P.REWARMING] and P.WARMING not in ALLOWED[P.SLEEPING]
    assert P.REWARMING in ALLOWED[P.UNHEALTHY]
