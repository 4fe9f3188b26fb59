"""The drain after SIGTERM as a pure policy: when to stop waiting. No I/O, no clock.

The gate polls the upstream's in-flight gauges and hands each reading, with the time, to
`DrainPolicy.on_poll`, which answers `Continue(wait)` or `Done(outcome)`:

- never before `minimum` seconds: endpoint propagation takes that long, and requests
  that still arrive must be served in full;
- `emptied` once `IDLE_POLLS` polls in a row read nothing in flight (one zero can fall
  between two requests of a client);
- `no_metrics` when the upstream has no in-flight gauges: nothing could be checked, so
  the drain lasts `minimum` alone (and the first such poll asks for a warning);
- `timed_out` at the deadline, whatever still runs.

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
    warn_no_metrics: bool = False  # the first poll without in-flight gauges: say so once


@dataclass(frozen=True, slots=True)
class Done:
    outcome: Outcome
    warn_no_metrics: bool = False


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
    inflight: float | None = None  # at the last poll; None without gauges
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
        self._warned = False

    def on_poll(
        self, now: float, in_flight: float | None, names: Mapping[str, object] = _NO_NAMES
    ) -> Verdict:
        """One reading of the upstream's requests in flight (None: it has no gauges)."""
        if self.state.outcome is not None:
            return Done(self.state.outcome)
        elapsed = now - self.state.started
        self.state = dataclasses.replace(
            self.state,
            polls=self.state.polls + 1,
            seconds=elapsed,
            inflight=in_flight,
            names=MappingProxyType(dict(names)),
        )
        warn = in_flight is None and not self._warned
        self._warned = self._warned or warn
        self._zero_polls = self._zero_polls + 1 if in_flight == 0 else 0
        idle = in_flight is None or self._zero_polls >= IDLE_POLLS
        if idle and elapsed >= self.state.minimum_s:
            # Without gauges nothing was checked: say so rather than "emptied".
            outcome = Outcome.NO_METRICS if in_flight is None else Outcome.EMPTIED
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
