"""warmgate.group, the worker's rules, driven with made-up leader readings: no processes,
no sockets, no sleeps. tests/test_multinode.py runs the same rules as real processes."""

from __future__ import annotations

import json
import math

import pytest

from warmgate.group import LeaderLost, LeaderSeen, Member, Phase, Stop, read_status

BOOT = "a" * 32
GRACE, CAP = 30.0, 18.0


def member(lost_after: int = 3) -> Member:
    return Member(0.0, lost_after=lost_after, grace=GRACE, hold_cap=CAP)


def seen(phase: str = "ready", boot: str = BOOT, drain_over: bool = False) -> LeaderSeen:
    return LeaderSeen(boot, phase, drain_over)


def status(**fields: object) -> bytes:
    return json.dumps({"mode": "warmup", "boot_id": BOOT, "started": True, **fields}).encode()


# --- reading the leader's /status -------------------------------------------------------


def test_a_status_reads_as_the_leaders_boot_phase_and_drain() -> None:
    assert read_status(200, status(phase="ready", drain=None)) == seen("ready")
    draining = {"outcome": "draining", "inflight": 2}
    assert read_status(200, status(phase="draining", drain=draining)) == seen("draining")
    emptied = {"outcome": "emptied", "inflight": 0}
    assert read_status(200, status(phase="draining", drain=emptied)).drain_over  # type: ignore[union-attr]


def test_a_drain_not_yet_polled_is_not_over_but_a_stop_before_ready_is() -> None:
    """Draining with no drain yet: the leader's first poll is still to come."""
    assert read_status(200, status(phase="draining", drain=None)) == seen("draining")
    before_ready = status(phase="draining", drain=None, started=False)
    assert read_status(200, before_ready) == seen("draining", drain_over=True)


@pytest.mark.parametrize(
    ("code", "body", "why"),
    [
        (503, b"{}", "HTTP 503"),
        (200, b"<html>", "not JSON"),
        (200, b"[1]", "not a JSON object"),
        (200, b'{"phase": "ready"}', "no boot_id or phase (not warmgate in warm-up mode?)"),
    ],
)
def test_an_unusable_answer_is_a_lost_poll(code: int, body: bytes, why: str) -> None:
    assert read_status(code, body) == LeaderLost(why)


# --- /live, /ready, /startup ------------------------------------------------------------


def test_a_worker_joins_the_first_boot_it_sees_and_is_ready_and_live() -> None:
    m = member()
    assert (m.phase, m.ready_ok(), m.startup_ok()) == (Phase.JOINING, False, False)
    assert m.live_until() == GRACE  # a leader never reached: live for the grace from start
    m.on_reading(seen("loading"), 1.0)
    assert (m.phase, m.ready_ok(), m.startup_ok(), m.boot_id) == (Phase.JOINED, True, True, BOOT)
    assert m.live_until() == math.inf


def test_a_leader_never_reached_fails_live_after_the_grace() -> None:
    m = member()
    for t in range(1, 40):
        m.on_reading(LeaderLost("ConnectError"), float(t))
    assert m.phase is Phase.JOINING
    assert m.live_ok(GRACE) and not m.live_ok(GRACE + 0.1)


def test_a_leader_out_of_reach_breaks_the_group_after_lost_after_polls() -> None:
    m = member(lost_after=3)
    m.on_reading(seen(), 0.0)
    m.on_reading(LeaderLost("ReadTimeout"), 10.0)
    m.on_reading(LeaderLost("ReadTimeout"), 11.0)
    assert (m.phase, m.ready_ok(), m.live_until()) == (Phase.JOINED, True, math.inf)
    m.on_reading(LeaderLost("ReadTimeout"), 12.0)
    assert (m.phase, m.ready_ok()) == (Phase.BROKEN, False)
    assert m.live_until() == 10.0 + GRACE  # the grace counts from the first failed poll
    m.on_reading(seen(), 13.0)  # back: a blip
    assert (m.phase, m.live_until(), m.lost_polls) == (Phase.JOINED, math.inf, 0)


def test_an_unhealthy_leader_breaks_the_group_with_the_grace() -> None:
    """The engine lost a worker: the leader's own /live fails after its grace; so does ours."""
    m = member()
    m.on_reading(seen(), 0.0)
    m.on_reading(seen("unhealthy"), 5.0)
    m.on_reading(seen("unhealthy"), 6.0)
    assert (m.phase, m.ready_ok(), m.live_until()) == (Phase.BROKEN, False, 5.0 + GRACE)
    m.on_reading(seen("ready"), 7.0)
    assert (m.phase, m.live_until()) == (Phase.JOINED, math.inf)


@pytest.mark.parametrize(
    ("reading", "over"),
    [
        (seen("ready", boot="b" * 32), "leader_restarted"),
        (seen("failed"), "leader_failed"),
        (seen("stopped"), "leader_stopped"),
    ],
)
def test_a_leader_gone_for_good_fails_live_at_once_and_for_good(
    reading: LeaderSeen, over: str
) -> None:
    m = member()
    m.on_reading(seen(), 0.0)
    m.on_reading(reading, 4.0)
    assert (m.phase, m.over, m.live_until(), m.ready_ok()) == (Phase.BROKEN, over, 4.0, False)
    m.on_reading(seen("ready", boot="c" * 32), 5.0)  # a third boot changes nothing
    m.on_reading(seen("ready"), 6.0)  # nor does the old boot answering again
    assert (m.over, m.live_until(), m.startup_ok()) == (over, 4.0, True)


# --- the coordinated drain --------------------------------------------------------------


def test_sigterm_while_the_leader_serves_holds_until_its_drain_is_over() -> None:
    m = member()
    m.on_reading(seen("ready"), 0.0)
    assert m.on_sigterm(1.0) is None
    assert (m.phase, m.ready_ok(), m.live_until(), m.hold_until) == (
        Phase.HOLDING,
        False,
        math.inf,  # stopping anyway: a liveness kill would only cut the hold short
        1.0 + CAP,
    )
    assert m.on_reading(seen("ready"), 2.0) is None
    assert m.on_reading(seen("draining"), 3.0) is None  # requests may be in flight
    assert m.on_deadline(4.0) is None  # a timer that fired early stops nothing
    stop = m.on_reading(seen("draining", drain_over=True), 6.0)
    assert stop == Stop("leader_drained", 5.0)
    assert m.phase is Phase.STOPPING
    assert m.on_reading(seen("stopped"), 7.0) is None  # one Stop only


def test_a_hold_ends_at_its_cap_whatever_the_leader_says() -> None:
    """A worker SIGTERMed alone (the leader serves on) holds until its cap."""
    m = member()
    m.on_reading(seen("ready"), 0.0)
    m.on_sigterm(10.0)
    m.on_reading(seen("ready"), 20.0)
    assert m.on_deadline(10.0 + CAP - 0.01) is None
    assert m.on_deadline(10.0 + CAP) == Stop("hold_timed_out", CAP)


@pytest.mark.parametrize(
    ("last", "reason"),
    [
        (seen("loading"), "leader_not_serving"),
        (seen("warming"), "leader_not_serving"),
        (seen("stopped"), "leader_stopped"),
        (seen("failed"), "leader_failed"),
        (seen("ready", boot="b" * 32), "leader_restarted"),
        (seen("draining", drain_over=True), "leader_drained"),
    ],
)
def test_the_first_reading_after_sigterm_lets_go_when_nothing_of_the_leaders_needs_us(
    last: LeaderSeen, reason: str
) -> None:
    m = member()
    m.on_reading(seen("loading"), 0.0)
    m.on_reading(last, 1.0)
    assert m.on_sigterm(2.0) is None  # decided on a reading asked for from now on
    assert m.on_reading(last, 2.5) == Stop(reason, 0.5)


def test_a_reading_asked_for_before_sigterm_decides_nothing() -> None:
    """A poll in flight at SIGTERM may have left before the leader turned Ready."""
    m = member()
    m.on_reading(seen("warming"), 0.0)
    m.on_sigterm(1.0)
    assert m.on_reading(seen("warming"), 1.2, asked=0.9) is None
    assert m.phase is Phase.HOLDING
    assert m.on_reading(seen("ready"), 1.4, asked=1.3) is None  # ready now: hold on


def test_sigterm_with_the_leader_out_of_reach_lets_go_at_the_next_poll() -> None:
    never = member()
    assert never.on_sigterm(1.0) is None
    assert never.on_reading(LeaderLost("ConnectError"), 1.5) == Stop("leader_unreachable", 0.5)
    lost = member(lost_after=2)
    lost.on_reading(seen("ready"), 0.0)
    lost.on_sigterm(1.0)
    assert lost.on_reading(LeaderLost("ConnectError"), 2.0) is None  # one blip: hold on
    assert lost.on_reading(LeaderLost("ConnectError"), 3.0) == Stop("leader_unreachable", 2.0)


def test_a_second_sigterm_lets_go_at_once() -> None:
    m = member()
    m.on_reading(seen("ready"), 0.0)
    assert m.on_sigterm(1.0) is None
    assert m.on_sigterm(3.0) == Stop("second_sigterm", 2.0)
    assert m.phase is Phase.STOPPING


def test_unknown_leader_phases_hold_as_serving() -> None:
    """Phases this worker does not know (sleeping, rewarming, ...) may hold requests."""
    m = member()
    m.on_reading(seen("sleeping"), 0.0)
    assert m.on_sigterm(1.0) is None


def test_status_shows_the_leader_and_the_hold() -> None:
    m = member()
    m.on_reading(seen("ready"), 0.0)
    m.on_sigterm(1.0)
    shown = m.as_status(3.0)
    assert shown["phase"] == "holding"
    assert shown["leader"] == {
        "boot_id": BOOT,
        "phase": "ready",
        "last_boot_id": BOOT,
        "failed_polls": 0,
        "failing": None,
        "over": None,
    }
    assert shown["hold"] == {"held_s": 2.0, "cap_s": CAP, "released": None}
    json.dumps(shown)
