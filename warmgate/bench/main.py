"""`warmgate bench`: run the strategies one after another and print the report."""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Callable
from pathlib import Path

from warmgate.bench import budget
from warmgate.bench.chart import budget_chart, timeline
from warmgate.bench.core import (
    STRATEGIES,
    Outcome,
    ServerRecipe,
    as_json,
    combine,
    command_upstream,
    report,
    run_strategy,
    sim_upstream,
)
from warmgate.errors import WarmgateError
from warmgate.options import option

# `--warm-runs` for the strategies a spec such as `warmgate=3` leaves out: its default.
WARM_RUNS = int(option("bench", "warm_runs").default)


def bench_main(
    command: str | None,
    sim_args: str,
    strategies: str,
    plan: Path | None,
    warm_runs: str,
    warmgate_args: str,
    out: Path | None,
    pin_output: bool,
    starts: str,
    budgets: str,
    mix: str,
    profile_requests: int,
) -> int:
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise WarmgateError(f"--strategies {strategies!r}: choose from {', '.join(STRATEGIES)}")
    if "plan" in chosen and plan is None:
        raise WarmgateError("the plan strategy needs --plan FILE")
    if plan is not None and not plan.is_file():
        raise WarmgateError(f"--plan {plan}: no such file")
    try:
        sweep_budgets = budget.parse_budgets(budgets)
    except ValueError as exc:
        raise WarmgateError(f"--budgets {budgets!r}: {exc} (e.g. 2,5,10,auto)") from None
    counts = per_strategy("--starts", starts, chosen, default=1)
    # Every strategy's: the sweep starts warmgate and warmgate-pairwise whatever was chosen.
    warm = per_strategy("--warm-runs", warm_runs, list(STRATEGIES), default=WARM_RUNS)
    if command:
        recipe = command_upstream(command, "vLLM" if "vllm" in command else "--command")
    else:
        recipe = sim_upstream(shlex.split(sim_args))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(warmgate_args)

    def start(strategy: str, log_name: str, budget_s: str | None = None) -> Outcome:
        run = asyncio.run(
            run_strategy(
                strategy,
                recipe,
                plan=plan,
                warm_runs=warm[strategy],
                warmgate_args=extra,
                log_dir=out,
                pin_output=pin_output,
                log_name=log_name,
                budget=budget_s,
                mix_name=mix,
                profile_requests=profile_requests,
            )
        )
        print(
            f"# {log_name.removesuffix('.log')}: ready in {run.spawn_to_ready_s or 0:.1f} s "
            f"(warm-up {run.warmup_s or 0:.1f} s), max first/warm {run.max_ratio or 0:.2f}"
            f"{f', error: {run.error}' if run.error else ''}",
            flush=True,
        )
        return run

    outcomes: list[Outcome] = []
    for strategy in chosen:
        several = counts[strategy] > 1
        runs = [
            start(strategy, f"{strategy}.{n}.log" if several else f"{strategy}.log")
            for n in range(1, counts[strategy] + 1)
        ]
        outcomes.append(combine(runs))
    points: list[budget.Point] = []
    if sweep_budgets:
        points = budget_sweep(sweep_budgets, outcomes, extra, start)
    text = report(outcomes)
    print(text)
    if points:
        print(budget.table(points, budget.baselines(outcomes)))
    if out is not None:
        write(out, outcomes, points, recipe)
    every = [*outcomes, *(p.outcome for p in points)]
    return 0 if all(o.error is None for o in every) else 1


def budget_sweep(
    budgets: list[str],
    outcomes: list[Outcome],
    warmgate_args: list[str],
    start: Callable[..., Outcome],
) -> list[budget.Point]:
    """The sweep's points: a start per budget (the warmgate row stands for auto when its
    budget was the default), the pairwise sweep (a start of its own when the strategies did
    not include it) and the user plan's row."""
    rows = {o.strategy: o for o in outcomes}
    default_budget = not any(a.startswith("--warmup-budget") for a in warmgate_args)
    auto_row = rows.get("warmgate") if default_budget else None
    points = budget.sweep(
        budgets, lambda b: start("warmgate", f"warmgate.budget-{b}.log", b), auto_row
    )
    pairwise = rows.get("warmgate-pairwise") or start("warmgate-pairwise", "warmgate-pairwise.log")
    points.append(budget.Point("pairwise", pairwise))
    if "plan" in rows:
        points.append(budget.Point("plan", rows["plan"]))
    return points


def write(
    out: Path, outcomes: list[Outcome], points: list[budget.Point], recipe: ServerRecipe
) -> None:
    """report.md, report.json and timeline.png; budget.md, budget.json and budget.png after
    a sweep."""
    (out / "report.md").write_text(report(outcomes) + "\n")
    (out / "report.json").write_text(json.dumps(as_json(outcomes), indent=2) + "\n")
    title = f"time to Ready and first request over {recipe.name}"
    if not timeline(outcomes, out / "timeline.png", title):
        print("# no chart: pip install 'warmgate[chart]' for matplotlib", flush=True)
    if not points:
        return
    baselines = budget.baselines(outcomes)
    (out / "budget.md").write_text(budget.table(points, baselines) + "\n")
    data = budget.as_json_points(points, baselines)
    (out / "budget.json").write_text(json.dumps(data, indent=2) + "\n")
    title = f"warmth against warm-up time over {recipe.name} (--warmup-budget)"
    budget_chart(points, baselines, out / "budget.png", title)


def per_strategy(option: str, spec: str, strategies: list[str], default: int) -> dict[str, int]:
    """`--starts`, `--warm-runs`: N for every strategy, or N,STRATEGY=M,... (`1,warmgate=3`);
    strategies the spec leaves out get `default`."""
    counts: dict[str, int] = {}
    try:
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.rpartition("=")
            if name and name not in STRATEGIES:
                raise ValueError(f"unknown strategy {name!r}")
            if int(value) < 1:
                raise ValueError("a count must be at least 1")
            if name:
                counts[name] = int(value)
            else:
                default = int(value)
    except ValueError as exc:
        raise WarmgateError(f"{option} {spec!r}: {exc} (e.g. 3, or 3,warmgate=5)") from None
    return {s: counts.get(s, default) for s in strategies}
