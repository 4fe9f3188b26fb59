"""The warm-up budget sweep of `warmgate bench --budgets`: warmth against warm-up time.

The warmgate strategy runs once per `--warmup-budget` value; each start is a point, x its
measured warm-up (healthy to Ready), y the held-out mix's max first/warm (and, over the
simulator, the kernels it compiled after Ready). The pairwise sweep and a user plan are
points of their own; the baselines are reference lines. A user picks a budget by looking.

A budget at or above one whose warm-up it did not bind (no shape left cold, no repeats cut
short) would run the same warm-up again: that point reuses the earlier start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from warmgate.bench.core import Outcome, _fmt, as_json, shapes_cell

BASELINES = ("none", "health", "warmup.sh")
AUTO = "auto"


@dataclass(slots=True)
class Point:
    """One point of the chart: a start (or a strategy's row) and what it stands for."""

    label: str  # "5 s", "auto (30 s)", "pairwise", "plan"
    outcome: Outcome
    budget: str | None = None  # the --warmup-budget asked for; None for pairwise and plan
    same_as: str | None = None  # the budget whose start this one reuses

    @property
    def budget_s(self) -> float | None:
        """The budget in seconds: the one asked for, else the one warmgate resolved."""
        if self.budget is not None and self.budget != AUTO:
            return float(self.budget)
        return self.outcome.budget_s

    @property
    def kind(self) -> str:
        """budget | pairwise | plan: how the chart draws it."""
        strategy = self.outcome.strategy
        return "budget" if strategy == "warmgate" else strategy.removeprefix("warmgate-")


def parse_budgets(spec: str) -> list[str]:
    """'20,2,auto,5' -> ['2', '5', '20', 'auto']: seconds ascending, then auto."""
    seconds: list[float] = []
    auto = False
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == AUTO:
            auto = True
            continue
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise ValueError(f"{item!r} is neither auto nor a positive number of seconds")
        seconds.append(value)
    return [f"{s:g}" for s in sorted(set(seconds))] + ([AUTO] if auto else [])


def sweep(
    budgets: Sequence[str], run: Callable[[str], Outcome], auto_row: Outcome | None = None
) -> list[Point]:
    """A point per budget, running `run(budget)` for those no earlier start answers.
    `auto_row`: the warmgate strategy's own row, a start under the default budget (auto)."""
    points: list[Point] = []
    # (budget label, start) of the starts whose budget did not cut their warm-up short
    unbound: list[tuple[str, Outcome]] = []
    if auto_row is not None and auto_row.budget_s is not None and not auto_row.budget_bound:
        unbound.append((AUTO, auto_row))
    for budget in budgets:
        if budget == AUTO:
            outcome = auto_row if auto_row is not None else run(AUTO)
            resolved = f" ({outcome.budget_s:g} s)" if outcome.budget_s is not None else ""
            points.append(Point(f"auto{resolved}", outcome, AUTO))
            continue
        seconds = float(budget)
        earlier = [
            (label, o)
            for label, o in unbound
            if o.budget_s is not None and o.budget_s <= seconds and o.error is None
        ]
        if earlier:
            label, outcome = earlier[0]
            points.append(Point(f"{budget} s", outcome, budget, same_as=label))
            continue
        outcome = run(budget)
        points.append(Point(f"{budget} s", outcome, budget))
        if outcome.budget_s is not None and not outcome.budget_bound and outcome.error is None:
            unbound.append((budget, outcome))
    return points


def baselines(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """The strategies' rows the chart draws as reference lines."""
    return [o for o in outcomes if o.strategy in BASELINES]


def table(points: Sequence[Point], references: Sequence[Outcome]) -> str:
    """Markdown: one row per point, then the baselines' rows for reference."""
    lines = [
        "| point | budget s | warm-up s | warm-up / healthy | warm-up shapes | max first/warm | "
        "noise floor | worst request | kernels compiled after Ready (sim) | note |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|---|",
    ]
    for p in points:
        o = p.outcome
        note = (
            f"the {_budget_name(p.same_as)} start: its warm-up ended within it" if p.same_as else ""
        )
        if o.error:
            note = f"error: {o.error}"
        lines.append(_row(p.label, p.budget_s, o, note))
    for o in references:
        lines.append(_row(o.strategy, None, o, "baseline (reference line)"))
    lines += [
        "",
        "Each point is one start of the warmgate strategy with that --warmup-budget (pairwise:",
        "--coverage pairwise, budget = --warmup-timeout; plan: the user plan). Budget s: what",
        "warmgate resolved (auto: max(30 s, 0.25 x spawn→healthy)). Warm-up s: healthy to",
        "Ready, measured. Max first/warm: the held-out mix's, as in the table above.",
    ]
    return "\n".join(lines)


def _budget_name(budget: str) -> str:
    return "auto" if budget == AUTO else f"{budget} s"


def _row(label: str, budget_s: float | None, o: Outcome, note: str) -> str:
    kernels = o.compiled_after_ready if over_sim(o) else None
    budget = "-" if budget_s is None else f"{budget_s:g}"
    return (
        f"| {label} | {budget} | {_fmt(o.warmup_s)} | {_fmt(o.warmup_per_healthy, 2)} | "
        f"{shapes_cell(o)} | {_fmt(o.max_ratio, 2)} | {_fmt(o.noise_floor, 2)} | {o.worst} | "
        f"{_fmt(kernels, 0)} | {note} |"
    )


def over_sim(o: Outcome) -> bool:
    """True when the upstream reported its costs (the simulator): kernel counts mean something."""
    return any(m.first_cost_ms is not None for m in o.requests) or any(map(over_sim, o.runs))


def as_json_points(points: Sequence[Point], references: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "points": [
            {"label": p.label, "budget": p.budget, "same_as": p.same_as, **as_json([p.outcome])[0]}
            for p in points
        ],
        "baselines": as_json(references),
    }
