"""A worker pod's rules in a multi-node group: a pure state machine, no I/O, no clock.

A worker pod runs `warmgate run --leader URL -- ray start --block ...`. Its shell
(warmgate.member) polls the leader's read-only `/status` and hands each reading, with the
time, to `Member`; it hands over SIGTERM too. `Member` answers the probe questions
(`live_until`, `ready_ok`, `startup_ok`) and says when the child may be stopped (`Stop`).

    joining --leader answers--> joined --leader out of reach / unhealthy--> broken
    broken --leader answers, same boot, healthy--> joined
    joined|broken --leader restarted (new boot id), failed or stopped--> broken for good
    any --SIGTERM--> holding --the leader let go, or the cap--> stopping

Choices worth knowing (docs/multinode.md has the reasons):
- The group is *over* once the leader we joined is gone for good: a new boot id, or its
  phase `failed` or `stopped`. The Ray cluster this worker joined cannot come back, so
  /live is 503 at once. The group is *in trouble* while the leader is out of reach
  (`lost_after` failed polls in a row), has never been reached, or reports `unhealthy`
  (its engine lost): /live turns 503 `grace` seconds after the trouble began, as the
  leader's own /live does after --live-grace.
- /ready is 200 while joined: the child runs (warmgate exits with it) and the leader
  answers, same boot, not unhealthy. /startup is 200 once the leader has been reached.
- After SIGTERM /live stays 200: the pod is stopping anyway, and a liveness kill would
  only cut the hold short.
- A SIGTERMed worker holds its child while the leader serves (ready, unhealthy, or
  draining with its drain not yet over), for at most `hold_cap` seconds. It lets go when
  the leader's drain is over, the leader stopped, failed, restarted, is out of reach, or
  is not serving (starting, loading, warming: nothing of clients' in flight). Only a
  reading asked for after SIGTERM decides: an older one may predate the leader's Ready.
  A second SIGTERM lets go at once.

Times are seconds on one clock of the caller's choosing; only differences matter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from warmgate.lifecycle import Phase as LeaderPhase

__all__ = [
    "LeaderLost",
    "LeaderReading",
    "LeaderSeen",
    "Member",
    "Phase",
    "Stop",
    "read_status",
]

# The leader's phases, as its /status names them. Any phase not named here (ready,
# sleeping, rewarming, ...) may hold clients' requests: a SIGTERMed worker holds then.
NOT_SERVING = frozenset({LeaderPhase.STARTING, LeaderPhase.LOADING, LeaderPhase.WARMING})
ENDED = frozenset({LeaderPhase.FAILED, LeaderPhase.STOPPED})
TROUBLED = LeaderPhase.UNHEALTHY.value
DRAINING = LeaderPhase.DRAINING.value


class Phase(StrEnum):
    JOINING = "joining"  # the leader not reached yet
    JOINED = "joined"  # the leader answers: same boot, serving or on its way
    BROKEN = "broken"  # the leader is out of reach, unhealthy, or gone for good
    HOLDING = "holding"  # SIGTERM heard: the child runs on until the leader lets go
    STOPPING = "stopping"  # SIGTERM forwarded to the child


@dataclass(frozen=True, slots=True)
class LeaderSeen:
    """One answer of the leader's /status."""

    boot_id: str
    phase: str
    drain_over: bool  # draining, and its drain has decided (or there is none: not ready)


@dataclass(frozen=True, slots=True)
class LeaderLost:
    """A poll that got no usable answer, and why (refused, timed out, HTTP 500, ...)."""

    why: str


LeaderReading = LeaderSeen | LeaderLost


@dataclass(frozen=True, slots=True)
class Stop:
    """Forward SIGTERM to the child now; `reason` says what let it go."""

    reason: str
    held_s: float  # seconds since the first SIGTERM


def read_status(http_status: int, body: bytes) -> LeaderReading:
    """A reading from the leader's GET /status answer (any status, any bytes)."""
    if http_status != 200:
        return LeaderLost(f"HTTP {http_status}")
    try:
        status: Any = json.loads(body)
    except ValueError:
        return LeaderLost("not JSON")
    if not isinstance(status, dict):
        return LeaderLost("not a JSON object")
    boot, phase = status.get("boot_id"), status.get("phase")
    if not isinstance(boot, str) or not isinstance(phase, str):
        return LeaderLost("no boot_id or phase (not warmgate in warm-up mode?)")
    drain = status.get("drain")
    outcome = drain.get("outcome") if isinstance(drain, dict) else None
    # A leader that was Ready drains: its /status shows the drain once its first poll is
    # in (`outcome`: "draining", then how it ended). One SIGTERMed before Ready has none:
    # it stopped its child at once.
    was_ready = status.get("started") is True
    drain_over = phase == DRAINING and (outcome not in (None, "draining") or not was_ready)
    return LeaderSeen(boot, phase, drain_over)


class Member:
    """A worker's view of its group: fed readings, SIGTERM and the time; answers probes
    and when to stop the child."""

    def __init__(self, now: float, *, lost_after: int, grace: float, hold_cap: float) -> None:
        if lost_after < 1:
            raise ValueError("lost_after must be >= 1")
        self._started = now
        self._lost_after = lost_after
        self._grace = grace
        self._hold_cap = hold_cap
        self.boot_id: str | None = None  # the leader's boot this worker joined
        self.last_seen: LeaderSeen | None = None
        self.lost_why: str | None = None  # the last failed poll's reason, while failing
        self.lost_polls = 0  # failed polls in a row
        self._lost_since: float | None = None
        self._unhealthy_since: float | None = None
        self.over: str | None = None  # why the group we joined is gone for good
        self._over_at = math.inf
        self.sigterm_at: float | None = None
        self.stop: Stop | None = None

    # --- what the probes answer ---------------------------------------------------------

    @property
    def phase(self) -> Phase:
        if self.stop is not None:
            return Phase.STOPPING
        if self.sigterm_at is not None:
            return Phase.HOLDING
        if self.boot_id is None:
            return Phase.JOINING
        if self.over is not None or self._unreachable or self._unhealthy_since is not None:
            return Phase.BROKEN
        return Phase.JOINED

    def live_until(self) -> float:
        """/live is 200 up to this time (inf: no limit now)."""
        if self.sigterm_at is not None:
            return math.inf
        if self.over is not None:
            return self._over_at
        if self.boot_id is None:
            return self._started + self._grace
        troubles = [self._unhealthy_since]
        if self._unreachable:
            troubles.append(self._lost_since)
        began = min((t for t in troubles if t is not None), default=None)
        return math.inf if began is None else began + self._grace

    def live_ok(self, now: float) -> bool:
        return now <= self.live_until()

    def ready_ok(self) -> bool:
        return self.phase is Phase.JOINED

    def startup_ok(self) -> bool:
        return self.boot_id is not None

    @property
    def hold_until(self) -> float | None:
        """When a hold ends whatever the leader says; None before SIGTERM."""
        return None if self.sigterm_at is None else self.sigterm_at + self._hold_cap

    # --- events -------------------------------------------------------------------------

    def on_reading(
        self, reading: LeaderReading, now: float, asked: float | None = None
    ) -> Stop | None:
        """One poll of the leader, `asked` at that time (default: now); a Stop when a held
        SIGTERM may now reach the child."""
        match reading:
            case LeaderLost(why=why):
                self.lost_polls += 1
                self.lost_why = why
                if self._lost_since is None:
                    self._lost_since = now
            case LeaderSeen():
                self._seen(reading, now)
        if self.phase is not Phase.HOLDING or self.sigterm_at is None:
            return None
        fresh = (now if asked is None else asked) >= self.sigterm_at
        return self._let_go(now) if fresh else None

    def on_sigterm(self, now: float) -> Stop | None:
        """SIGTERM reached warmgate: hold it until a reading asked for from now on says
        the leader lets go (poll at once), or a Stop now for a second SIGTERM."""
        if self.sigterm_at is not None:
            self.stop = Stop("second_sigterm", now - self.sigterm_at)
            return self.stop
        self.sigterm_at = now
        return None

    def on_deadline(self, now: float) -> Stop | None:
        """The hold's cap may have come: a Stop then."""
        cap = self.hold_until
        if self.phase is not Phase.HOLDING or cap is None or now < cap:
            return None
        return self._stopped("hold_timed_out", now)

    # --- rules --------------------------------------------------------------------------

    @property
    def _unreachable(self) -> bool:
        return self.lost_polls >= self._lost_after

    def _seen(self, seen: LeaderSeen, now: float) -> None:
        self.lost_polls, self.lost_why, self._lost_since = 0, None, None
        self.last_seen = seen
        if self.boot_id is None:
            self.boot_id = seen.boot_id
        if self.over is None and seen.boot_id != self.boot_id:
            self._end("leader_restarted", now)
        elif self.over is None and seen.phase in ENDED:
            self._end(f"leader_{seen.phase}", now)
        if seen.phase != TROUBLED:
            self._unhealthy_since = None
        elif self._unhealthy_since is None:
            self._unhealthy_since = now

    def _end(self, why: str, now: float) -> None:
        self.over, self._over_at = why, now

    def _let_go(self, now: float) -> Stop | None:
        """A Stop when nothing of the leader's still needs this worker's engine."""
        reason = self._why_let_go()
        return None if reason is None else self._stopped(reason, now)

    def _why_let_go(self) -> str | None:
        if self.over is not None:
            return self.over
        if self.boot_id is None or self._unreachable:
            return "leader_unreachable"
        seen = self.last_seen
        if seen is None or self.lost_polls:  # a failed poll below the threshold: wait
            return None
        if seen.phase in NOT_SERVING:
            return "leader_not_serving"
        if seen.phase == DRAINING and seen.drain_over:
            return "leader_drained"
        return None

    def _stopped(self, reason: str, now: float) -> Stop:
        assert self.sigterm_at is not None
        self.stop = Stop(reason, now - self.sigterm_at)
        return self.stop

    def as_status(self, now: float) -> dict[str, object]:
        """What a worker's /status shows of its group, as plain JSON-able values."""
        seen = self.last_seen
        return {
            "phase": self.phase.value,
            "live": self.live_ok(now),
            "ready": self.ready_ok(),
            "started": self.startup_ok(),
            "leader": {
                "boot_id": self.boot_id,
                "phase": seen.phase if seen is not None else None,
                "last_boot_id": seen.boot_id if seen is not None else None,
                "failed_polls": self.lost_polls,
                "failing": self.lost_why,
                "over": self.over,
            },
            "hold": None
            if self.sigterm_at is None
            else {
                "held_s": round(now - self.sigterm_at, 3),
                "cap_s": self._hold_cap,
                "released": self.stop.reason if self.stop is not None else None,
            },
        }
