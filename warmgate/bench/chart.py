"""The startup timeline chart of `warmgate bench`: one bar per strategy, read left to right.

    spawn ── loading ──▶ healthy ── warm-up ──▶ Ready ── first request ──▶ first good response

matplotlib is an optional extra (`pip install 'warmgate[chart]'`): without it the report
is written without the chart and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
