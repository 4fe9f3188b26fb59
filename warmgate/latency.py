"""A warm-latency model, fitted online, that tells a warm first run from a cold one.

A shape needs a second run only to show that its first one paid the one-time costs
(kernel compiles, autotuning, allocator growth) and the shape is now fast. When the
first run is already as fast as a warm engine would be, the second run proves nothing.
"As fast as a warm engine" is a linear model of warm batch latency:

    ms = a + b * prompt tokens + c * decode steps + d * decode steps x sequences

(one engine step serves every running sequence, so decode cost grows with steps and,
more slowly, with the batch). It is fitted on runs known to be warm only: repeats of a
shape, and first runs the model itself judged warm (at no more than it predicted); never
other first runs, which on a fresh engine are cold. Coefficients are kept
non-negative (a negative cost per token is noise, and would predict a long prompt as
faster than a short one).

The module does no I/O and reads no clock; the runner feeds it milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MIN_POINTS", "Batch", "LatencyModel", "is_warm", "prior_ms"]

MIN_POINTS = 4  # warm runs before the model predicts (it has 4 coefficients)
_REACH_TOKENS = 64  # predictions reach twice the largest prompt seen, plus this
_RIDGE = 1e-6  # keeps the normal equations solvable when two runs have the same shape


@dataclass(frozen=True, slots=True)
class Batch:
    """What one run of a shape asks of the engine."""

    prompt_tokens: int  # all requests together
    decode_steps: int  # max_tokens (steps until the batch is done)
    seqs: int  # sequences decoded at once (requests x n)

    def terms(self) -> tuple[float, float, float, float]:
        return (
            1.0,
            float(self.prompt_tokens),
            float(self.decode_steps),
            float(self.decode_steps * self.seqs),
        )


def prior_ms(batch: Batch) -> float:
    """A rough cost before anything is measured, for ordering a plan by value: shaped
    like the vLLM CPU build (about 0.4 ms per prompt token, 4 ms per decode step)."""
    return 20.0 + 0.4 * batch.prompt_tokens + batch.decode_steps * (4.0 + 0.1 * batch.seqs)


class LatencyModel:
    """Least squares over the warm runs seen so far, refitted on demand."""

    def __init__(self) -> None:
        self._points: list[tuple[Batch, float]] = []
        self._coef: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self._points)

    def observe(self, batch: Batch, ms: float) -> None:
        """Add a run known to be warm."""
        if ms < 0:
            raise ValueError(f"latency must be >= 0 ms, got {ms}")
        self._points.append((batch, ms))
        self._coef = None

    def predict(self, batch: Batch) -> float | None:
        """Warm milliseconds for `batch`; None until MIN_POINTS warm runs are in, and for
        a batch more than twice as big as any seen (a line fitted on short prompts says
        little about long ones: such a shape repeats, and becomes a point itself)."""
        if len(self._points) < MIN_POINTS or not self._within_reach(batch):
            return None
        if self._coef is None:
            self._coef = _fit([b.terms() for b, _ in self._points], [ms for _, ms in self._points])
        return sum(c * t for c, t in zip(self._coef, batch.terms(), strict=True))

    def _within_reach(self, batch: Batch) -> bool:
        seen = [b for b, _ in self._points]
        return (
            batch.prompt_tokens <= 2 * max(b.prompt_tokens for b in seen) + _REACH_TOKENS
            and batch.seqs <= 2 * max(b.seqs for b in seen) + 1
            and batch.decode_steps <= 2 * max(b.decode_steps for b in seen) + 1
        )


def is_warm(first_ms: float, predicted_ms: float | None, tolerance: float, slack_ms: float) -> bool:
    """Whether a first run looks warm: within `tolerance` (a fraction) plus `slack_ms` of
    the prediction. A miss only costs a second run, so the bar can be generous; a pass
    only skips a run whose kernels the first run compiled anyway."""
    if predicted_ms is None:
        return False
    return first_ms <= predicted_ms * (1 + tolerance) + slack_ms


def _fit(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> tuple[float, ...]:
    """Non-negative least squares of the *relative* error (each run weighted by 1/ms, as
    the verdict is relative: a 2 s batch must not drown the 60 ms ones), the simple way:
    solve, drop the terms that came out negative, solve again (at most 4 rounds)."""
    weights = [1.0 / max(y, 1.0) for y in ys]
    rows = [[t * w for t in row] for row, w in zip(rows, weights, strict=True)]
    ys = [y * w for y, w in zip(ys, weights, strict=True)]
    active = list(range(len(rows[0])))
    while True:
        solved = _solve([[row[i] for i in active] for row in rows], ys)
        negative = [i for i, c in zip(active, solved, strict=True) if c < 0]
        if not negative:
            coef = [0.0] * len(rows[0])
            for i, c in zip(active, solved, strict=True):
                coef[i] = c
            return tuple(coef)
        active = [i for i in active if i not in negative]
        if not active:
            return tuple(0.0 for _ in rows[0])


def _solve(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares via the normal equations (scaled per column, with a small ridge)."""
    k = len(rows[0])
    scale = [max(abs(row[j]) for row in rows) or 1.0 for j in range(k)]
    x = [[row[j] / scale[j] for j in range(k)] for row in rows]
    a = [
        [sum(r[i] * r[j] for r in x) + (_RIDGE if i == j else 0.0) for j in range(k)]
        for i in range(k)
    ]
    b = [sum(r[i] * y for r, y in zip(x, ys, strict=True)) for i in range(k)]
    return [c / s for c, s in zip(_gauss(a, b), scale, strict=True)]


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a x = b by Gaussian elimination with partial pivoting (a is small and SPD)."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if m[col][col] == 0:
            continue
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in reversed(range(n)):
        if m[r][r] != 0:
            out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out
