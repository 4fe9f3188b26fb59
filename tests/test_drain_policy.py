"""The drain policy, driven by polls alone: no processes, no sleeps."""

from __future__ import annotations

import pytest

from warmgate.drain import (
    IDLE_POLLS,
    POLL_FLOOR_S,
    POLL_INTERVAL_S,
    POLL_TIMEOUT_S,
    Continue,
    Done,
    DrainPolicy,
    Outcome,
    Unread,
)

NAMES = {"connections": ["127.0.0.1:5000"]}


def policy(minimum: float = 5.0, deadline: float = 30.0) -> DrainPolicy:
    return DrainPolicy(100.0, minimum=minimum, deadline=deadline)


def test_empties_after_two_zero_polls_once_the_minimum_has_passed() -> None:
    drain = policy(minimum=0.0)
    assert drain.on_poll(100.0, 3) == Continue(POLL_INTERVAL_S)
    assert drain.on_poll(100.5, 0) == Continue(POLL_INTERVAL_S)  # one zero can fall between two
    assert drain.on_poll(101.0, 0) == Done(Outcome.EMPTIED)
    assert IDLE_POLLS == 2
    state = drain.state
    assert (state.outcome, state.inflight, state.seconds, state.polls) == (
        Outcome.EMPTIED,
        0,
        1.0,
        3,
    )


def test_a_request_between_zero_polls_starts_the_count_over() -> None:
    drain = policy(minimum=0.0)
    for now, in_flight in ((100.0, 0), (100.5, 1), (101.0, 0)):
        assert isinstance(drain.on_poll(now, in_flight), Continue)
    assert drain.on_poll(101.5, 0) == Done(Outcome.EMPTIED)


def test_never_ends_before_the_minimum_even_when_idle() -> None:
    drain = policy(minimum=5.0)
    for now in (100.0, 100.5, 101.0, 104.5):
        assert isinstance(drain.on_poll(now, 0), Continue)
    assert drain.on_poll(105.0, 0) == Done(Outcome.EMPTIED)


def test_times_out_at_the_deadline_with_requests_still_running() -> None:
    drain = policy(minimum=0.0, deadline=1.0)
    assert drain.on_poll(100.0, 4, NAMES) == Continue(POLL_INTERVAL_S)
    assert drain.on_poll(100.8, 4, NAMES) == Continue(pytest.approx(0.2))  # up to the deadline
    assert drain.on_poll(101.0, 4, NAMES) == Done(Outcome.TIMED_OUT)
    assert drain.state.inflight == 4 and dict(drain.state.names) == NAMES  # still running


def test_without_gauges_the_minimum_alone_and_one_warning() -> None:
    drain = policy(minimum=1.0)
    no_gauges = Unread.NO_GAUGES
    assert drain.on_poll(100.0, no_gauges) == Continue(POLL_INTERVAL_S, warn=no_gauges)
    assert drain.on_poll(100.5, no_gauges) == Continue(POLL_INTERVAL_S)
    assert drain.on_poll(101.0, no_gauges, NAMES) == Done(Outcome.NO_METRICS)
    assert drain.state.inflight is None and dict(drain.state.names) == NAMES
    assert drain.state.unread is no_gauges


def test_without_gauges_and_no_minimum_the_first_poll_warns_and_ends() -> None:
    done = policy(minimum=0.0).on_poll(100.0, Unread.NO_GAUGES)
    assert done == Done(Outcome.NO_METRICS, Unread.NO_GAUGES)


def test_no_answer_is_not_idle_the_drain_waits_for_an_answer_or_the_deadline() -> None:
    # Past the minimum, yet a silent upstream may be busy: neither emptied nor no_metrics.
    drain = policy(minimum=0.0, deadline=2.0)
    no_answer = Unread.NO_ANSWER
    assert drain.on_poll(100.0, 0) == Continue(POLL_INTERVAL_S)
    assert drain.on_poll(100.5, no_answer) == Continue(POLL_INTERVAL_S, warn=no_answer)
    assert drain.state.inflight is None and drain.state.unread is no_answer
    assert drain.on_poll(101.0, 0) == Continue(POLL_INTERVAL_S)  # the zero count started over
    assert drain.state.unread is None
    assert drain.on_poll(101.5, no_answer) == Continue(pytest.approx(0.5))  # warned once
    assert drain.on_poll(102.0, no_answer, NAMES) == Done(Outcome.TIMED_OUT)
    assert drain.state.unread is no_answer and dict(drain.state.names) == NAMES


def test_a_wedged_upstream_times_out_at_the_first_poll_that_reaches_the_deadline() -> None:
    drain = policy(minimum=0.0, deadline=1.0)
    timeout = drain.poll_timeout(100.0)
    assert timeout == 1.0  # the whole drain, not POLL_TIMEOUT_S
    done = drain.on_poll(100.0 + timeout, Unread.NO_ANSWER)
    assert done == Done(Outcome.TIMED_OUT, Unread.NO_ANSWER)


def test_no_gauges_and_no_answer_each_warn_once() -> None:
    drain = policy(minimum=10.0)
    verdicts = [drain.on_poll(100.0 + i, r) for i, r in enumerate([*Unread, *Unread])]
    assert [v.warn for v in verdicts] == [*Unread, None, None]


@pytest.mark.parametrize(
    ("now", "timeout"),
    [
        (100.0, POLL_TIMEOUT_S),  # plenty left: the usual bound
        (127.0, 3.0),  # what is left of the 30 s deadline
        (129.9, POLL_FLOOR_S),  # never less than the floor...
        (135.0, POLL_FLOOR_S),  # ...even past the deadline
    ],
)
def test_a_poll_waits_no_longer_than_the_drain_has_left(now: float, timeout: float) -> None:
    assert policy(deadline=30.0).poll_timeout(now) == pytest.approx(timeout)


@pytest.mark.parametrize("outcome", [Outcome.SKIPPED, Outcome.CHILD_EXITED])
def test_cut_short_ends_it_once(outcome: Outcome) -> None:
    drain = policy()
    drain.on_poll(100.0, 2, NAMES)
    assert drain.cut_short(102.5, outcome) == Done(outcome)
    assert drain.state.seconds == 2.5 and drain.state.outcome is outcome
    assert drain.cut_short(103.0, Outcome.SKIPPED) is None  # already over
    assert drain.on_poll(103.0, 0) == Done(outcome)  # a late poll changes nothing
    assert drain.state.seconds == 2.5


def test_names_are_dropped_once_nothing_can_still_run() -> None:
    for outcome, kept in ((Outcome.CHILD_EXITED, False), (Outcome.SKIPPED, True)):
        drain = policy()
        drain.on_poll(100.0, 1, NAMES)
        drain.cut_short(101.0, outcome)
        assert bool(drain.state.names) is kept, outcome
    drain = policy(minimum=0.0)
    drain.on_poll(100.0, 0, NAMES)
    drain.on_poll(100.5, 0, NAMES)
    assert drain.state.outcome is Outcome.EMPTIED and not drain.state.names


def test_outcomes_that_may_leave_requests_running() -> None:
    assert {o for o in Outcome if o.may_leave_requests} == {
        Outcome.TIMED_OUT,
        Outcome.SKIPPED,
        Outcome.NO_METRICS,
    }


def test_state_is_replaced_not_changed() -> None:
    drain = policy()
    before = drain.state
    drain.on_poll(100.5, 3)
    assert before.polls == 0 and before.inflight is None and drain.state is not before


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        DrainPolicy(0.0, minimum=-1.0, deadline=10.0)
