"""The drain after SIGTERM as a pure policy: when to stop waiting. No I/O, no clock.

The gate polls the upstream's in-flight gauges, each poll bounded by `poll_timeout`, and
hands each reading (a number, or why there is none: `Unread`), with the time, to
`DrainPolicy.on_poll`, which answers `Continue(wait)` or `Done(outcome)`:

- never before `minimum` seconds: endpoint propagation takes that long, and requests
  that still arrive must be served in full;
- `emptied` once `IDLE_POLLS` polls in a row read nothing in flight (one zero can fall
  between two requests of a client);
- `no_metrics` when the upstream answers without in-flight gauges: nothing could be
  checked, so the drain lasts `minimum` alone (and the first such poll asks for a warning);
- `timed_out` at the deadline, whatever still runs. An upstream that does not answer in
  time may be busy, not idle: the drain waits on for a later answer or the deadline (and
  the first such poll asks for a warning of its own).

A second SIGTERM (`skipped`) or the child exiting (`child_exited`) ends it early:
`cut_short`. Times are seconds on the caller's clock; only differences matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

POLL_INTERVAL_S = 0.5
IDLE_POLLS = 2
POLL_TIMEOUT_S = 5.0  # the longest a poll waits for /metrics
POLL_FLOOR_S = 0.25  # ... and the least, even at the deadline: the most a drain overruns


class Unread(StrEnum):
    """Why a poll read no number of requests in flight."""

    NO_GAUGES = "no_gauges"  # the upstream answered, without the gauges (or /metrics)
    NO_ANSWER = "no_answer"  # the upstream did not answer within the poll's timeout


Reading = float | Unread


class Outcome(StrEnum):
    EMPTIED = "emptied"
    NO_METRICS = "no_metrics"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CHILD_EXITED = "child_exited"

    @property
    def may_leave_requests(self) -> bool:
        """Requests may still run after this outcome, so the log names them."""
        return self in (Outcome.TIMED_OUT, Outcome.SKIPPED, Outcome.NO_METRICS)


@dataclass(frozen=True, slots=True)
class Continue:
    wait: float  # seconds until the next poll
    warn: Unread | None = None  # the first poll that read nothing for this reason: say so once


@dataclass(frozen=True, slots=True)
class Done:
    outcome: Outcome
    warn: Unread | None = None


Verdict = Continue | Done
_NO_NAMES: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class DrainState:
    """What /status, /metrics and the log show of a drain; replaced, never changed."""

    started: float
    deadline_s: float
    minimum_s: float
    polls: int = 0
    seconds: float = 0.0  # from the start to the last poll, or to the end
    inflight: float | None = None  # at the last poll; None when it read nothing
    unread: Unread | None = None  # why the last poll read nothing
    outcome: Outcome | None = None  # None while draining
    # What may still run, as read at the last poll (connections, request ids); kept only
    # while it can matter, i.e. not after an outcome that leaves nothing running.
    names: Mapping[str, object] = field(default_factory=lambda: _NO_NAMES)


class DrainPolicy:
    """One drain; `state` is its latest `DrainState`."""

    def __init__(self, started: float, *, minimum: float, deadline: float) -> None:
        if minimum < 0 or deadline < 0:
            raise ValueError(f"drain minimum {minimum} and deadline {deadline} must be >= 0")
        self.state = DrainState(started, deadline, minimum)
        self._zero_polls = 0
        self._warned: set[Unread] = set()

    def poll_timeout(self, now: float) -> float:
        """How long the poll starting at `now` may wait for an answer: what is left of the
        deadline, at least POLL_FLOOR_S, at most POLL_TIMEOUT_S."""
        left = self.state.started + self.state.deadline_s - now
        return min(POLL_TIMEOUT_S, max(POLL_FLOOR_S, left))

    def on_poll(
        self, now: float, reading: Reading, names: Mapping[str, object] = _NO_NAMES
    ) -> Verdict:
        """One reading of the upstream's requests in flight, or why there is none."""
        if self.state.outcome is not None:
            return Done(self.state.outcome)
        elapsed = now - self.state.started
        unread = reading if isinstance(reading, Unread) else None
        in_flight = None if isinstance(reading, Unread) else reading
        self.state = dataclasses.replace(
            self.state,
            polls=self.state.polls + 1,
            seconds=elapsed,
            inflight=in_flight,
            unread=unread,
            names=MappingProxyType(dict(names)),
        )
        warn = unread if unread is not None and unread not in self._warned else None
        if warn is not None:
            self._warned.add(warn)
        self._zero_polls = self._zero_polls + 1 if in_flight == 0 else 0
        idle = unread is Unread.NO_GAUGES or self._zero_polls >= IDLE_POLLS
        if idle and elapsed >= self.state.minimum_s:
            # Without gauges nothing was checked: say so rather than "emptied".
            outcome = Outcome.EMPTIED if unread is None else Outcome.NO_METRICS
            return Done(self._end(outcome), warn)
        if elapsed >= self.state.deadline_s:
            return Done(self._end(Outcome.TIMED_OUT), warn)
        return Continue(min(POLL_INTERVAL_S, self.state.deadline_s - elapsed), warn)

    def cut_short(self, now: float, outcome: Outcome) -> Done | None:
        """End the drain early (`skipped`, `child_exited`); None when it had already ended."""
        if self.state.outcome is not None:
            return None
        self.state = dataclasses.replace(self.state, seconds=now - self.state.started)
        return Done(self._end(outcome))

    def _end(self, outcome: Outcome) -> Outcome:
        names = self.state.names if outcome.may_leave_requests else _NO_NAMES
        self.state = dataclasses.replace(self.state, outcome=outcome, names=names)
        return outcome
