"""LoRA adapters loaded at run time: which are warm, which wait. Pure bookkeeping, no I/O.

vLLM (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `POST /v1/load_lora_adapter`) lists a
loaded adapter in `/v1/models` with `parent` naming its base model. The gate polls that
list after Ready and hands each answer to `AdapterBook.served`; the book says which
adapter to warm next, and keeps what /status and /metrics show:

    (appears) -> pending -> warming -> warm | failed
    warming --Ready left (sleep, drain, unhealthy)--> pending: warmed again once Ready
    (gone from /v1/models) -> forgotten; a reload with the same name is a new adapter

Adapters the start-up warm-up already planned (served before Ready) count as warm.
Times are seconds on the caller's clock; they are only subtracted from each other.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["STATES", "Adapter", "AdapterBook", "State"]

State = Literal["pending", "warming", "warm", "failed"]
STATES: tuple[State, ...] = ("pending", "warming", "warm", "failed")


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    parent: str  # the base model
    state: State
    seen_at: float  # when a poll first listed it
    warm_at: float | None = None  # when its warm-up ended well
    error: str | None = None  # why it failed
    at_startup: bool = False  # the start-up warm-up planned it

    def as_dict(self, started: float) -> dict[str, object]:
        """For /status; `started` is the clock's value at warmgate's start (times relative)."""
        return {
            "name": self.name,
            "parent": self.parent,
            "state": self.state,
            "seen_s": round(self.seen_at - started, 3),
            "warm_after_s": None if self.warm_at is None else round(self.warm_at - self.seen_at, 3),
            "error": self.error,
            "at_startup": self.at_startup,
        }


class AdapterBook:
    """Every adapter the upstream serves, in the order first seen, and its warm-up state."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}

    @property
    def adapters(self) -> tuple[Adapter, ...]:
        return tuple(self._adapters.values())

    def served(
        self, listed: Mapping[str, str], now: float, warmed_at_startup: Collection[str] = ()
    ) -> list[str]:
        """One /v1/models answer (adapter name -> base model): the names new since the last.

        An adapter no longer listed was unloaded: it is forgotten (if its warm-up runs,
        that warm-up fails on its own and `finished` then ignores it).
        """
        for gone in [name for name in self._adapters if name not in listed]:
            del self._adapters[gone]
        new = [name for name in listed if name not in self._adapters]
        for name in new:
            known = name in warmed_at_startup
            self._adapters[name] = Adapter(
                name,
                listed[name],
                "warm" if known else "pending",
                now,
                now if known else None,
                at_startup=known,
            )
        return new

    def next_pending(self) -> str | None:
        """The adapter to warm next: the first seen of those waiting; None if none waits."""
        return next((a.name for a in self._adapters.values() if a.state == "pending"), None)

    def warming(self) -> str | None:
        return next((a.name for a in self._adapters.values() if a.state == "warming"), None)

    def started(self, name: str) -> None:
        self._set(name, "warming")

    def finished(self, name: str, now: float, error: str | None = None) -> None:
        """Its warm-up ended: warm, or failed with `error` (it stays failed until reloaded)."""
        if error is None:
            self._set(name, "warm", warm_at=now)
        else:
            self._set(name, "failed", error=error)

    def stopped(self, name: str) -> None:
        """Its warm-up was stopped before the end (Ready was left): it waits again."""
        self._set(name, "pending")

    def counts(self) -> dict[str, int]:
        """Adapters by state, every state present (for a gauge that drops to 0)."""
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for adapter in self._adapters.values():
            counts[adapter.state] += 1
        return counts

    def as_status(self, started: float) -> list[dict[str, object]]:
        return [a.as_dict(started) for a in self._adapters.values()]

    def _set(
        self, name: str, state: State, *, warm_at: float | None = None, error: str | None = None
    ) -> None:
        adapter = self._adapters.get(name)
        if adapter is not None:  # unloaded meanwhile: nothing to record
            self._adapters[name] = replace(adapter, state=state, warm_at=warm_at, error=error)
