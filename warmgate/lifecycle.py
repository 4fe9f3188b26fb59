"""The readiness lifecycle: a pure state machine, no I/O.

The gate feeds it events (child spawned, health ok/failed, warm-up finished, SIGTERM,
...) with the current time, and carries out the returned `Decision`. It also answers the
probe questions (`ready_ok`, `startup_ok`, `live_until`) and, once the child is gone,
how warmgate ends (`ending`: the exit line's reason and code, from warmgate.errors'
table).

    starting --ChildSpawned--> loading --HealthOk--> warming --WarmupFinished--> ready
    ready --HealthFailed x threshold--> unhealthy --HealthOk--> ready
    ready|unhealthy --Sigterm--> draining --DrainDone/ChildExited--> stopped
    starting|loading|warming --Sigterm--> draining (SIGTERM forwarded at once, no drain)
    any phase but stopped|failed --StopAsked--> draining (the child heard SIGINT or SIGQUIT)
    loading --HealthFailed past startup_timeout--> failed (upstream_never_healthy, 69)
    warming --WarmupFinished(ok=False), policy "fail"--> failed (warmup_failed, 70)
    warming --ChildExited--> failed (engine_died_during_warmup: the child's code, or 70)
    loading|ready|unhealthy --ChildExited--> failed (the child's status)
    ready|unhealthy --Sleep(True)--> sleeping --Sleep(False)--> rewarming (START_REWARM)
    unhealthy --HealthOk--> rewarming when a re-warm was cut short (START_REWARM)
    rewarming --WarmupFinished--> ready (ok or not: the engine is awake and was serving)
    rewarming --Sleep(True)--> sleeping (CANCEL_WARMUP)
    rewarming --HealthFailed x threshold--> unhealthy (CANCEL_WARMUP)
    sleeping|rewarming --Sigterm--> draining, as from ready (START_DRAIN)
    sleeping|rewarming --ChildExited--> failed (the child's status)

Every phase change is checked against `ALLOWED` below, the one table of legal moves.

Choices worth knowing:
- `draining` means "shutting down": /ready answers 503 and later health or warm-up
  reports are ignored. A pod that was Ready drains first (START_DRAIN, then
  FORWARD_SIGTERM on DrainDone); one that never was forwards SIGTERM at once.
- The startup deadline counts from the lifecycle's creation and is checked at each
  health report while loading; the warm-up has its own timeout.
- ChildExited after a stop was asked for (draining) -> `stopped`, and the run ends as
  `stopped`, naming the signal (`stop_signal`): SIGTERM, or a SIGINT/SIGQUIT the shell
  forwarded or the terminal sent the child (StopAsked). Any other exit, before or after
  Ready, is a crash -> `failed`. The child's status is the exit code, unless warmgate
  itself failed the startup (69 or 70, as the README's exit-code table says, whatever
  status the stopped child left), or the engine died during the warm-up: a crash is
  never a success there, so a child that exited 0 ends with 70.
- `failed` is terminal: the child is told to stop (FORWARD_SIGTERM) and EXIT follows
  once it has exited.
- A stop decided before ChildSpawned (a SIGTERM racing the spawn) is carried out
  when ChildSpawned arrives: that Decision says FORWARD_SIGTERM.
- `sleeping` is the upstream's own sleep mode (vLLM's /sleep, reported by /is_sleeping):
  /ready 503, /live 200, /startup stays true. After wake-up the first step of each batch
  size pays a reallocation, so `rewarming` runs a short plan before Ready; a separate
  phase because its failure or a crash in it is not a failed startup (no exit 70), and a
  SIGTERM in it drains as from Ready. Health failing in `sleeping` changes nothing: a
  sleeping engine that still answers is what sleep looks like, and one that died exits.
- Runtime LoRA adapters are warmed one at a time, in the background, only while Ready:
  AdapterPending answers START_ADAPTER_WARMUP when none runs, AdapterWarmed says it
  ended. Leaving `ready` for any phase stops one that runs (STOP_ADAPTER_WARMUP): its
  requests would hold up a drain or a sleep, and a re-warm or an unhealthy engine comes
  first; the gate asks again once Ready.
- Plain-init mode (no upstream, warmgate only as tini) has no Lifecycle: the supervisor
  simply does not create one.

Times are seconds on one clock of the caller's choosing (monotonic is best); they are
only subtracted from each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from warmgate.errors import Ending, Exit, child_ending, ending
from warmgate.options import DEFAULTS, ON_WARMUP_FAILURE, OnWarmupFailure

__all__ = [
    "ALLOWED",
    "Action",
    "AdapterPending",
    "AdapterWarmed",
    "ChildExited",
    "ChildSpawned",
    "Decision",
    "DrainDone",
    "Event",
    "HealthFailed",
    "HealthOk",
    "Lifecycle",
    "LifecycleError",
    "OnWarmupFailure",
    "Phase",
    "Sigterm",
    "Sleep",
    "StopAsked",
    "Transition",
    "WarmupFinished",
]


class Phase(StrEnum):
    STARTING = "starting"  # Lifecycle created; the child is being spawned
    LOADING = "loading"  # child runs; upstream /health not ok yet
    WARMING = "warming"  # upstream healthy; warm-up plan running
    READY = "ready"  # warm; /ready answers 200
    UNHEALTHY = "unhealthy"  # was ready; health failing (/ready 503)
    SLEEPING = "sleeping"  # the upstream reports is_sleeping: true (/ready 503, /live 200)
    REWARMING = "rewarming"  # woken up; the short re-warm plan runs (/ready 503)
    DRAINING = "draining"  # shutting down after SIGTERM
    STOPPED = "stopped"  # child exited after we asked it to stop
    FAILED = "failed"  # startup failed or the child crashed


P = Phase
# The only legal phase changes. `_move` checks every change against it, so a wrong
# target in a handler raises at once instead of producing a strange /status.
ALLOWED: dict[Phase, frozenset[Phase]] = {
    P.STARTING: frozenset({P.LOADING, P.DRAINING, P.FAILED}),
    P.LOADING: frozenset({P.WARMING, P.DRAINING, P.FAILED}),
    P.WARMING: frozenset({P.READY, P.DRAINING, P.FAILED}),
    P.READY: frozenset({P.UNHEALTHY, P.SLEEPING, P.DRAINING, P.FAILED}),
    P.UNHEALTHY: frozenset({P.READY, P.REWARMING, P.SLEEPING, P.DRAINING, P.FAILED}),
    P.SLEEPING: frozenset({P.REWARMING, P.DRAINING, P.FAILED}),
    P.REWARMING: frozenset({P.READY, P.UNHEALTHY, P.SLEEPING, P.DRAINING, P.FAILED}),
    P.DRAINING: frozenset({P.STOPPED}),
    P.STOPPED: frozenset(),
    P.FAILED: frozenset(),
}
_BEFORE_READY = frozenset({P.STARTING, P.LOADING, P.WARMING})
_SERVING = frozenset({P.READY, P.UNHEALTHY})
_AFTER_READY = frozenset({P.READY, P.UNHEALTHY, P.SLEEPING, P.REWARMING})  # SIGTERM drains
ENGINE_DIED = "engine_died_during_warmup"


class Action(StrEnum):
    """What the supervisor must do next, in the order given."""

    START_WARMUP = "start_warmup"  # run the warm-up plan; report WarmupFinished
    CANCEL_WARMUP = "cancel_warmup"  # abandon the warm-up (or re-warm) in progress
    START_REWARM = "start_rewarm"  # run the short after-wake plan; report WarmupFinished
    START_ADAPTER_WARMUP = "start_adapter_warmup"  # warm the next adapter; AdapterWarmed after
    STOP_ADAPTER_WARMUP = "stop_adapter_warmup"  # Ready was left: stop warming an adapter
    START_DRAIN = "start_drain"  # /ready is 503 now; run the drain policy, report DrainDone
    SKIP_DRAIN = "skip_drain"  # second SIGTERM: end the drain now (outcome `skipped`)
    CANCEL_DRAIN = "cancel_drain"  # the child exited mid-drain (outcome `child_exited`)
    FORWARD_SIGTERM = "forward_sigterm"  # send SIGTERM to the child (process layer escalates)
    EXIT = "exit"  # the child is gone: stop every task, end as `Lifecycle.ending` says


# --- events -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpawned:
    pid: int


@dataclass(frozen=True)
class HealthOk:
    pass


@dataclass(frozen=True)
class HealthFailed:
    reason: str = ""


@dataclass(frozen=True)
class WarmupFinished:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Sigterm:
    pass


@dataclass(frozen=True)
class Sleep:
    """The upstream's /is_sleeping answer, read after Ready."""

    sleeping: bool


@dataclass(frozen=True)
class AdapterPending:
    """A runtime LoRA adapter waits to be warmed."""


@dataclass(frozen=True)
class AdapterWarmed:
    """The adapter warm-up that START_ADAPTER_WARMUP began has ended, whatever its outcome."""


@dataclass(frozen=True)
class StopAsked:
    """A stop signal other than SIGTERM reached the child already: forwarded by the shell,
    or sent by the terminal to the child's process group (Ctrl-C)."""

    signal: str  # its name, e.g. "SIGINT"


@dataclass(frozen=True)
class DrainDone:
    pass


@dataclass(frozen=True)
class ChildExited:
    status: int  # as a shell reports it: the exit code, or 128+N if killed by signal N
    signal: int | None = None  # N when a signal killed it


Event: TypeAlias = (
    ChildSpawned
    | HealthOk
    | HealthFailed
    | WarmupFinished
    | Sigterm
    | Sleep
    | AdapterPending
    | AdapterWarmed
    | StopAsked
    | DrainDone
    | ChildExited
)


@dataclass(frozen=True)
class Transition:
    phase: Phase
    at: float
    reason: str


@dataclass(frozen=True)
class Decision:
    """The answer to one event. `changed` is True when the phase moved."""

    phase: Phase
    changed: bool = False
    actions: tuple[Action, ...] = ()
    note: str = ""  # why, for the log; a warning when something was accepted anyway


class LifecycleError(RuntimeError):
    """An event that can only come from a bug in the caller (e.g. two children)."""


class Lifecycle:
    """Readiness state machine; see the module docstring for the rules."""

    def __init__(
        self,
        now: float,
        *,
        unhealthy_threshold: int = DEFAULTS["unhealthy_threshold"],
        live_grace: float = DEFAULTS["live_grace"],
        on_warmup_failure: OnWarmupFailure = DEFAULTS["on_warmup_failure"],
        startup_timeout: float = math.inf,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0 seconds, got {startup_timeout}")
        if unhealthy_threshold < 1:
            raise ValueError(f"unhealthy_threshold must be >= 1, got {unhealthy_threshold}")
        if live_grace < 0:
            raise ValueError(f"live_grace must be >= 0 seconds, got {live_grace}")
        if on_warmup_failure not in ON_WARMUP_FAILURE:
            raise ValueError(
                f"on_warmup_failure must be one of {ON_WARMUP_FAILURE}, not {on_warmup_failure!r}"
            )
        self.unhealthy_threshold = unhealthy_threshold
        self.live_grace = live_grace
        self.on_warmup_failure: OnWarmupFailure = on_warmup_failure
        self.startup_timeout = startup_timeout
        self._transitions: list[Transition] = [Transition(P.STARTING, now, "created")]
        self.child_pid: int | None = None
        self.child_status: int | None = None
        self.child_signal: int | None = None
        self.health_failures = 0  # consecutive
        self.ready_since: float | None = None  # first time Ready; startup_ok from then on
        self.unhealthy_since: float | None = None
        self.failure: str | None = None  # why `failed`, for /status
        self.startup_failure: str | None = None  # the exit reason when warmgate failed the startup
        self.stop_signal: str | None = None  # the first stop asked for, named on the exit line
        self._drain_pending = False  # START_DRAIN issued, DrainDone not yet seen
        self.wakes = 0  # times the upstream woke from sleep (each started a re-warm)
        self.rewarm_owed = False  # woke, and the re-warm has not finished yet
        self.adapter_warming = False  # START_ADAPTER_WARMUP issued, AdapterWarmed not yet seen

    # --- queries ------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._transitions[-1].phase

    @property
    def transitions(self) -> tuple[Transition, ...]:
        return tuple(self._transitions)

    def time_in_phase(self, now: float) -> float:
        return max(0.0, now - self._transitions[-1].at)

    def ready_ok(self) -> bool:
        """/ready: 200 only while Ready."""
        return self.phase is P.READY

    def startup_ok(self) -> bool:
        """/startup: true once the first warm-up was accepted (Ready reached); never goes back."""
        return self.ready_since is not None

    def after_ready(self) -> bool:
        """From the first Ready until the drain: the upstream's sleep state and its adapters
        matter (before Ready the engine is loading, not sleeping)."""
        return self.phase in _AFTER_READY

    def live_until(self) -> float:
        """/live answers 200 up to this time: never once the child is gone, and only
        `live_grace` seconds into `unhealthy`; otherwise without end (inf)."""
        if self.child_status is not None:
            return -math.inf
        if self.phase is P.UNHEALTHY and self.unhealthy_since is not None:
            return self.unhealthy_since + self.live_grace
        return math.inf

    def live_ok(self, now: float) -> bool:
        """/live: false once the child is gone or the upstream stayed unhealthy past the grace."""
        return now <= self.live_until()

    def seconds_per_phase(self, now: float) -> dict[str, float]:
        """Seconds spent in each phase so far, phases entered more than once summed."""
        spent: dict[str, float] = {}
        ends = [t.at for t in self._transitions[1:]] + [now]
        for here, end in zip(self._transitions, ends, strict=True):
            spent[here.phase.value] = spent.get(here.phase.value, 0.0) + end - here.at
        return spent

    @property
    def ending(self) -> Ending | None:
        """How warmgate ends once the child is gone (None before): reason and exit code.

        The child's status, unless warmgate itself failed the startup: then the code of
        that reason (69 upstream_never_healthy, 70 warmup_failed), whatever the stopped
        child's status.
        """
        if self.child_status is None:
            return None
        if self.startup_failure == ENGINE_DIED:
            return ending(ENGINE_DIED, self.child_status or Exit.WARMUP_FAILED)
        if self.startup_failure is not None:
            return ending(self.startup_failure)
        if self.phase is P.STOPPED and self.stop_signal is not None:
            return ending("stopped", self.child_status)
        return child_ending(self.child_status, self.child_signal)

    def as_status(self, now: float) -> dict[str, object]:
        """Everything /status shows, as plain JSON-able values."""
        return {
            "phase": self.phase.value,
            "time_in_phase_s": round(self.time_in_phase(now), 3),
            "ready": self.ready_ok(),
            "started": self.startup_ok(),
            "live": self.live_ok(now),
            "health_failures": self.health_failures,
            "child_pid": self.child_pid,
            "child_status": self.child_status,
            "failure": self.failure,
            "transitions": [
                {"phase": t.phase.value, "at": t.at, "reason": t.reason} for t in self._transitions
            ],
        }

    # --- events -------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> Decision:
        """Apply one event at time `now` and say what must happen next.

        Events that do not apply in the current phase (a late health report while
        draining, say) return an unchanged Decision with no actions. Events that can
        only come from a caller bug raise LifecycleError.
        """
        match event:
            case ChildSpawned(pid=pid):
                return self._child_spawned(pid, now)
            case HealthOk():
                return self._health_ok(now)
            case HealthFailed(reason=reason):
                return self._health_failed(reason, now)
            case WarmupFinished(ok=ok, detail=detail):
                return self._warmup_finished(ok, detail, now)
            case Sigterm():
                return self._sigterm(now)
            case Sleep(sleeping=sleeping):
                return self._sleep(sleeping, now)
            case AdapterPending():
                return self._adapter_pending()
            case AdapterWarmed():
                self.adapter_warming = False
                return self._same()
            case StopAsked(signal=name):
                return self._stop_asked(name, now)
            case DrainDone():
                return self._drain_done()
            case ChildExited(status=status, signal=sig):
                return self._child_exited(status, sig, now)
        raise TypeError(f"not a lifecycle event: {event!r}")

    def _child_spawned(self, pid: int, now: float) -> Decision:
        if self.child_pid is not None or self.child_status is not None:
            raise LifecycleError(f"ChildSpawned(pid={pid}): one child only")
        if self.phase is P.STARTING:
            self.child_pid = pid
            return self._move(P.LOADING, now, f"child pid {pid} spawned")
        if self.phase in (P.DRAINING, P.FAILED):
            # Stop was decided while the spawn was in flight: stop the child now it exists.
            self.child_pid = pid
            return Decision(self.phase, False, (Action.FORWARD_SIGTERM,), "stopping late child")
        raise LifecycleError(f"ChildSpawned(pid={pid}) in {self.phase.value}")

    def _health_ok(self, now: float) -> Decision:
        self.health_failures = 0
        if self.phase is P.LOADING:
            return self._move(P.WARMING, now, "upstream healthy", Action.START_WARMUP)
        if self.phase is P.UNHEALTHY:
            self.unhealthy_since = None
            if self.rewarm_owed:  # the re-warm after a wake-up was cut short: run it again
                return self._move(
                    P.REWARMING, now, "upstream healthy again: re-warming", Action.START_REWARM
                )
            return self._move(P.READY, now, "upstream healthy again")
        return self._same()

    def _health_failed(self, reason: str, now: float) -> Decision:
        if self.phase not in (P.LOADING, P.WARMING, *_AFTER_READY):
            return self._same()
        self.health_failures += 1
        # Before Ready a failing /health just means "still loading"; the startup
        # timeout, not the threshold, bounds that wait.
        if self.phase is P.LOADING and now - self._transitions[0].at > self.startup_timeout:
            why = f"startup timed out: upstream not healthy within {self.startup_timeout:g} s"
            actions = [Action.FORWARD_SIGTERM] if self.child_pid is not None else []
            return self._fail(now, why, *actions, exit_reason="upstream_never_healthy")
        rewarming = self.phase is P.REWARMING
        tripped = self.health_failures >= self.unhealthy_threshold
        if (self.phase is P.READY or rewarming) and tripped:
            self.unhealthy_since = now
            why = f"health failed {self.health_failures} times in a row"
            actions = [Action.CANCEL_WARMUP] if rewarming else []
            return self._move(P.UNHEALTHY, now, f"{why}: {reason}" if reason else why, *actions)
        return self._same()

    def _warmup_finished(self, ok: bool, detail: str, now: float) -> Decision:
        late_rewarm = self.wakes > 0 and self.phase in _AFTER_READY
        if self.phase in (P.STARTING, P.LOADING, *_SERVING) and not late_rewarm:
            raise LifecycleError(f"WarmupFinished in {self.phase.value}: no warm-up was running")
        if self.phase is P.REWARMING:
            self.rewarm_owed = False
            if ok:
                return self._to_ready(now, "re-warm after wake-up finished")
            why = f"re-warm failed: {detail}" if detail else "re-warm failed"
            return self._to_ready(now, f"{why}; serving anyway (the engine is awake)")
        if self.phase is not P.WARMING:
            return self._same()  # a cancelled warm-up reporting late
        if ok:
            return self._to_ready(now, "warm-up finished")
        why = f"warm-up failed: {detail}" if detail else "warm-up failed"
        if self.on_warmup_failure == "ready":
            return self._to_ready(now, f"{why}; serving anyway (on_warmup_failure=ready)")
        return self._fail(now, why, Action.FORWARD_SIGTERM, exit_reason="warmup_failed")

    def _sigterm(self, now: float) -> Decision:
        if self.phase not in (P.STOPPED, P.FAILED):
            self.stop_signal = self.stop_signal or "SIGTERM"
        if self.phase in _AFTER_READY:
            self._drain_pending = True
            actions = [Action.CANCEL_WARMUP] if self.phase is P.REWARMING else []
            return self._move(P.DRAINING, now, "SIGTERM: draining", *actions, Action.START_DRAIN)
        if self.phase in _BEFORE_READY:
            actions = [Action.FORWARD_SIGTERM] if self.child_pid is not None else []
            if self.phase is P.WARMING:
                actions.insert(0, Action.CANCEL_WARMUP)
            return self._move(P.DRAINING, now, "SIGTERM before ready: stopping", *actions)
        if self.phase is P.DRAINING and self._drain_pending:
            self._drain_pending = False
            return Decision(
                self.phase,
                False,
                (Action.SKIP_DRAIN, Action.FORWARD_SIGTERM),
                "second SIGTERM: drain skipped, stopping now",
            )
        child_running = self.child_pid is not None and self.child_status is None
        if self.phase in (P.DRAINING, P.FAILED) and child_running:
            # Like tini: each further SIGTERM reaches the child, which may shorten its own exit.
            return Decision(self.phase, False, (Action.FORWARD_SIGTERM,), "SIGTERM forwarded again")
        return self._same()

    def _stop_asked(self, name: str, now: float) -> Decision:
        """The child already heard the signal: stop waiting for anything, forward nothing."""
        if self.phase in (P.STOPPED, P.FAILED):
            return self._same()
        self.stop_signal = self.stop_signal or name
        if self.phase is P.DRAINING:
            if not self._drain_pending:
                return self._same()
            self._drain_pending = False
            return Decision(self.phase, False, (Action.SKIP_DRAIN,), f"{name}: drain skipped")
        actions = [Action.CANCEL_WARMUP] if self.phase in (P.WARMING, P.REWARMING) else []
        return self._move(P.DRAINING, now, f"{name}: stopping", *actions)

    def _drain_done(self) -> Decision:
        if not self._drain_pending:
            return self._same()  # the drain was skipped, or the child already left
        self._drain_pending = False
        return Decision(self.phase, False, (Action.FORWARD_SIGTERM,), "drain done")

    def _child_exited(self, status: int, sig: int | None, now: float) -> Decision:
        if self.child_status is not None:
            raise LifecycleError(f"ChildExited({status}) in {self.phase.value}: no child running")
        self.child_status, self.child_signal = status, sig
        actions: list[Action] = []
        if self._drain_pending:
            self._drain_pending = False
            actions.append(Action.CANCEL_DRAIN)
        actions.append(Action.EXIT)
        if self.phase is P.DRAINING:
            return self._move(P.STOPPED, now, f"child exited with {status}", *actions)
        if self.phase is P.FAILED:
            return Decision(self.phase, False, tuple(actions), f"child exited with {status}")
        if self.phase is P.WARMING:
            actions.insert(0, Action.CANCEL_WARMUP)
            why = f"engine died during warm-up: child exited with {status}"
            return self._fail(now, why, *actions, exit_reason=ENGINE_DIED)
        if self.phase is P.REWARMING:
            actions.insert(0, Action.CANCEL_WARMUP)
        return self._fail(now, f"child exited unexpectedly with {status}", *actions)

    def _sleep(self, sleeping: bool, now: float) -> Decision:
        if sleeping and self.phase in _SERVING:
            self.unhealthy_since, self.health_failures = None, 0
            return self._move(P.SLEEPING, now, "upstream is sleeping")
        if sleeping and self.phase is P.REWARMING:
            return self._move(P.SLEEPING, now, "upstream is sleeping again", Action.CANCEL_WARMUP)
        if not sleeping and self.phase is P.SLEEPING:
            self.wakes += 1
            self.rewarm_owed = True
            return self._move(P.REWARMING, now, "upstream woke up: re-warming", Action.START_REWARM)
        return self._same()

    def _adapter_pending(self) -> Decision:
        if self.phase is not P.READY or self.adapter_warming:
            return self._same()
        self.adapter_warming = True
        return Decision(self.phase, False, (Action.START_ADAPTER_WARMUP,), "warming an adapter")

    # --- helpers ------------------------------------------------------------------

    def _to_ready(self, now: float, reason: str) -> Decision:
        if self.ready_since is None:
            self.ready_since = now
        self.health_failures = 0  # the threshold counts failures after Ready only
        return self._move(P.READY, now, reason)

    def _fail(
        self, now: float, reason: str, *actions: Action, exit_reason: str | None = None
    ) -> Decision:
        self.failure = reason
        self.startup_failure = exit_reason
        return self._move(P.FAILED, now, reason, *actions)

    def _move(self, to: Phase, now: float, reason: str, *actions: Action) -> Decision:
        if to not in ALLOWED[self.phase]:
            raise LifecycleError(f"illegal transition {self.phase.value} -> {to.value}")
        if self.adapter_warming:  # only ever while Ready, which this move leaves
            self.adapter_warming = False
            actions = (Action.STOP_ADAPTER_WARMUP, *actions)
        self._transitions.append(Transition(to, now, reason))
        return Decision(to, True, actions, reason)

    def _same(self) -> Decision:
        return Decision(self.phase)
