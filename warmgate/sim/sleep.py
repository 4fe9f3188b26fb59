"""vLLM 0.32's sleep mode, as its engine core and executor keep it. No I/O, no clock.

`POST /sleep?level=L&mode=M` pauses the scheduler (`mode`: abort the requests in flight,
wait for them, or keep them paused) and, at level 1 or 2, puts the executor to sleep:
its tags `weights` and `kv_cache` sleep together. `POST /wake_up[?tags=T...]` wakes the
tags named (all without any); the scheduler resumes only once no tag sleeps. The tag
`scheduling` wakes a level-0 sleep. `GET /is_sleeping` is true while paused or while any
tag sleeps. (vllm/v1/engine/core.py sleep/wake_up/is_sleeping, v1/executor/abstract.py.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

SLEEP_TAGS = frozenset({"weights", "kv_cache"})
MODES = ("abort", "wait", "keep")  # vllm.v1.engine.PauseMode
LEVELS = range(3)


@dataclass(slots=True)
class SleepState:
    paused: bool = False
    tags: set[str] = field(default_factory=set)  # the executor's sleeping tags
    level: int = 0  # of the executor's sleep; 0 while awake

    @property
    def is_sleeping(self) -> bool:
        return self.paused or bool(self.tags)

    def sleep(self, level: int) -> bool:
        """Pause; at level >= 1 the executor sleeps too. True when it fell asleep now
        (False when it already slept: vLLM warns "Executor is already sleeping.")."""
        self.paused = True
        if level < 1 or "weights" in self.tags:
            return False
        self.tags = set(SLEEP_TAGS)
        self.level = level
        return True

    def wake(self, tags: list[str] | None) -> tuple[frozenset[str], bool]:
        """(the executor's tags woken now, whether fully awake and scheduling again)."""
        executor_tags = None if tags is None else [t for t in tags if t != "scheduling"]
        woken: frozenset[str] = frozenset()
        if executor_tags is None or executor_tags:
            woken = self._wake_executor(executor_tags)
        fully_awake = not self.tags
        if fully_awake:
            self.paused = False
            self.level = 0
        return woken, fully_awake

    def _wake_executor(self, tags: list[str] | None) -> frozenset[str]:
        if not self.tags:
            return frozenset()  # vLLM: "Executor is not sleeping."
        if tags and any(tag not in self.tags for tag in tags):
            return frozenset()  # vLLM: "Tag T is not in sleeping tags ...", and no change
        woken = frozenset(tags) if tags else frozenset(self.tags)
        self.tags -= woken
        return woken
