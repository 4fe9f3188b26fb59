"""`warmgate bench`: run the strategies one after another and print the report."""

from __future__ import annotations

import asyncio
import json
import shlex
from pathlib import Path

from warmgate.bench.chart import timeline
from warmgate.bench.core import (
    STRATEGIES,
    Outcome,
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
) -> int:
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STRATEGIES]
    if unknown or not chosen:
        raise WarmgateError(f"--strategies {strategies!r}: choose from {', '.join(STRATEGIES)}")
    if "plan" in chosen and plan is None:
        raise WarmgateError("the plan strategy needs --plan FILE")
    if plan is not None and not plan.is_file():
        raise WarmgateError(f"--plan {plan}: no such file")
    counts = per_strategy("--starts", starts, chosen, default=1)
    warm = per_strategy("--warm-runs", warm_runs, chosen, default=WARM_RUNS)
    if command:
        recipe = command_upstream(command, "vLLM" if "vllm" in command else "--command")
    else:
        recipe = sim_upstream(shlex.split(sim_args))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    for strategy in chosen:
        runs = []
        several = counts[strategy] > 1
        for start in range(1, counts[strategy] + 1):
            run = asyncio.run(
                run_strategy(
                    strategy,
                    recipe,
                    plan=plan,
                    warm_runs=warm[strategy],
                    warmgate_args=shlex.split(warmgate_args),
                    log_dir=out,
                    pin_output=pin_output,
                    log_name=f"{strategy}.{start}.log" if several else f"{strategy}.log",
                )
            )
            runs.append(run)
            print(
                f"# {strategy}{f' start {start}' if several else ''}: ready in "
                f"{run.spawn_to_ready_s or 0:.1f} s, max first/warm {run.max_ratio or 0:.2f}",
                flush=True,
            )
        outcomes.append(combine(runs))
    text = report(outcomes)
    print(text)
    if out is not None:
        (out / "report.md").write_text(text + "\n")
        (out / "report.json").write_text(json.dumps(as_json(outcomes), indent=2) + "\n")
        title = f"time to Ready and first request over {recipe.name}"
        if not timeline(outcomes, out / "timeline.png", title):
            print("# no chart: pip install 'warmgate[chart]' for matplotlib", flush=True)
    return 0 if all(o.error is None for o in outcomes) else 1


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
