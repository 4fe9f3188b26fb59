"""The charts of `warmgate bench`. The startup timeline: one bar per strategy, read left to right.

    spawn ── loading ──▶ healthy ── warm-up ──▶ Ready ── first request ──▶ first good response

The budget chart (`--budgets`): warmth against warm-up seconds, one point per start.

matplotlib is an optional extra (`pip install 'warmgate[chart]'`): without it the report
is written without the chart and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from warmgate.bench.budget import Point, over_sim
from warmgate.bench.core import Outcome

# (label, colour) of each segment; colours stay apart for colour-blind readers.
_LOADING = ("engine loading", "#9e9e9e")
_WARMUP = ("warm-up", "#e69f00")
_REFUSED = ("refused (not listening yet)", "#d55e00")
_FIRST = ("Ready → first good response", "#0072b2")


def segments(outcome: Outcome) -> list[tuple[float, float, str, str]]:
    """(start s, length s, label, colour) of each part of one strategy's start."""
    healthy, ready, good = (
        outcome.spawn_to_healthy_s,
        outcome.spawn_to_ready_s,
        outcome.first_good_s,
    )
    if healthy is None:
        return []
    if outcome.strategy == "none":  # Ready at spawn: clients were refused until it listened
        parts = [(0.0, healthy, *_REFUSED)]
        if good is not None:
            parts.append((healthy, good - healthy, *_FIRST))
        return parts
    parts = [(0.0, healthy, *_LOADING)]
    if ready is not None:
        parts.append((healthy, ready - healthy, *_WARMUP))
        if good is not None:
            parts.append((ready, good - ready, *_FIRST))
    return parts


def timeline(outcomes: Sequence[Outcome], path: Path, title: str) -> bool:
    """Write the chart to `path` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to the file
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [o for o in outcomes if segments(o)]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.6 * max(1, len(rows))), dpi=120)
    seen: set[str] = set()
    for y, outcome in enumerate(reversed(rows)):
        for start, length, label, colour in segments(outcome):
            ax.barh(
                y, length, left=start, height=0.55, color=colour,
                label=None if label in seen else label,
            )  # fmt: skip
            seen.add(label)
        if outcome.spawn_to_ready_s is not None:
            ax.plot([outcome.spawn_to_ready_s] * 2, [y - 0.35, y + 0.35], color="black", lw=1.5)
        end = max(s + n for s, n, _, _ in segments(outcome))
        ratio = outcome.max_ratio
        note = f"  max first/warm {ratio:.2f}" if ratio is not None else ""
        ax.text(end, y, note, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [o.strategy for o in reversed(rows)])
    ax.set_xlabel("seconds from container start (black tick: Ready)")
    ax.set_title(title, fontsize=10)
    ax.margins(x=0.18)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# The budget chart's markers and colours: budgets joined by a line, the rest points apart.
_POINT_STYLE = {
    "budget": ("o", "#0072b2"),
    "pairwise": ("s", "#d55e00"),
    "plan": ("^", "#009e73"),
}


def budget_chart(
    points: Sequence[Point], baselines: Sequence[Outcome], path: Path, title: str
) -> bool:
    """Warmth against warm-up time (`warmgate bench --budgets`): x the measured warm-up,
    y the held-out max first/warm, and over the simulator a second panel of the kernels
    it compiled after Ready. Baselines are dashed lines. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = point_groups(points)
    sim = any(over_sim(o) for o, _, _ in groups) or any(over_sim(o) for o in baselines)
    panels: list[tuple[str, Callable[[Outcome], float | None]]] = [
        ("held-out max first/warm", lambda o: o.max_ratio)
    ]
    if sim:
        panels.append(("kernels compiled after Ready (sim)", lambda o: o.compiled_after_ready))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), dpi=120)
    for ax, (ylabel, value) in zip(list(axes) if len(panels) > 1 else [axes], panels, strict=True):
        ratios = ylabel.startswith("held-out")
        ys = [y for o in [*(o for o, _, _ in groups), *baselines] if (y := value(o)) is not None]
        low = min(1.0, *ys) if ratios and ys else 0.0  # ratios from just under 1
        span = max(max(ys, default=1.0) - low, 0.1)
        ax.set_ylim(max(0.0, low - 0.08 * span), max(ys, default=1.0) + 0.15 * span)
        placed = sorted(
            (x, y, labels, kind) for o, labels, kind in groups
            if (x := o.warmup_s) is not None and (y := value(o)) is not None
        )  # fmt: skip
        line = [(x, y) for x, y, _, kind in placed if kind == "budget"]
        if line:
            ax.plot(*zip(*line, strict=True), color=_POINT_STYLE["budget"][1], lw=1, zorder=1)
        for x, y, labels, kind in placed:
            marker, colour = _POINT_STYLE.get(kind, _POINT_STYLE["budget"])
            ax.scatter([x], [y], marker=marker, color=colour, s=36, zorder=2)
            ax.annotate(  # slanted: the labels of close points run side by side
                " / ".join(labels), (x, y), xytext=(4, 5), textcoords="offset points",
                fontsize=8, rotation=30, rotation_mode="anchor",
            )  # fmt: skip
        for values, label in reference_lines(baselines, value, near=0.05 * span):
            for y in values:
                ax.axhline(y, color="#9e9e9e", ls="--", lw=1, zorder=0)
            ax.annotate(
                label, (1.0, max(values)), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                textcoords="offset points", ha="right", fontsize=8, color="#616161",
            )  # fmt: skip
        floor = _noise_floor(groups)
        if ratios and floor is not None:
            ax.axhline(floor[0], color="#9e9e9e", ls=":", lw=1, zorder=0)
            ax.annotate(
                f"noise floor {floor[0]:.3g} ({floor[1]})", (1.0, floor[0]),
                xycoords=("axes fraction", "data"), xytext=(-4, -10), ha="right",
                textcoords="offset points", fontsize=8, color="#616161",
            )  # fmt: skip
        ax.set_xlabel("warm-up s (healthy → Ready, measured)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(left=0)
        ax.margins(x=0.15)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def reference_lines(
    baselines: Sequence[Outcome], value: Callable[[Outcome], float | None], near: float
) -> list[tuple[list[float], str]]:
    """The baselines' lines, highest first: (values, one label) for each run of baselines
    less than `near` apart, whose labels would overlap."""
    known = sorted(
        ((y, o.strategy) for o in baselines if (y := value(o)) is not None), reverse=True
    )
    runs: list[list[tuple[float, str]]] = []
    for y, name in known:
        if runs and runs[-1][-1][0] - y < near:
            runs[-1].append((y, name))
        else:
            runs.append([(y, name)])
    return [([y for y, _ in run], " / ".join(f"{n} {y:.3g}" for y, n in run)) for run in runs]


def _noise_floor(groups: Sequence[tuple[Outcome, list[str], str]]) -> tuple[float, str] | None:
    """The noise floor of the budget start with the longest warm-up, and its label: a start
    that left shapes cold still compiles in its warm runs, which is no measurement noise."""
    budgets = [
        (o.warmup_s, floor, labels[0]) for o, labels, kind in groups
        if kind == "budget" and o.warmup_s is not None and (floor := o.noise_floor) is not None
    ]  # fmt: skip
    return max(budgets)[1:] if budgets else None


def point_groups(points: Sequence[Point]) -> list[tuple[Outcome, list[str], str]]:
    """The points by start: (outcome, its labels, kind), a start several budgets reuse once."""
    groups: dict[int, tuple[Outcome, list[str], str]] = {}
    for p in points:
        groups.setdefault(id(p.outcome), (p.outcome, [], p.kind))[1].append(p.label)
    return list(groups.values())
