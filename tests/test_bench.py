"""`warmgate bench` over the simulator: the smoke test of the benchmark report.

One run of three strategies on real processes (sim under each, warmgate as a real
supervisor). Over the simulator each first/warm ratio is the simulator's own cost report,
deterministic whatever the machine's load, so the ordering of the strategies is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wgutil import run

from warmgate.bench.core import Measured, Outcome, combine
from warmgate.bench.main import per_strategy

SIM = "--max-model-len 2048 --time-scale 0.02 --load-seconds 0.5"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--strategies", "none,health,warmgate", "--sim-args", SIM,
            "--warm-runs", "1", "--out", str(out)]  # fmt: skip
    code, stdout, stderr = run(args, timeout=420)
    assert code == 0, f"bench failed:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    return code, stdout, out


def test_report_has_a_row_per_strategy_and_the_files(bench: tuple[int, str, Path]) -> None:
    _, stdout, out = bench
    table = (out / "report.md").read_text()
    for strategy in ("none", "health", "warmgate"):
        assert f"| {strategy} |" in table
    assert stdout.rstrip().endswith(table.rstrip().splitlines()[-1])
    logs = {p.name for p in out.glob("*.log")}
    assert logs == {"none.log", "health.log", "warmgate.log"}
    # matplotlib is in the dev extra, so the chart must be there.
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warmgate_beats_both_baselines_on_the_held_out_mix(bench: tuple[int, str, Path]) -> None:
    _, _, out = bench
    rows = {o["strategy"]: o for o in json.loads((out / "report.json").read_text())}
    assert all(o["error"] is None for o in rows.values())
    assert all(len(o["requests"]) == 24 for o in rows.values())
    warm = rows["warmgate"]
    assert warm["max_ratio"] <= 1.15  # the goal over the simulator
    for baseline in ("none", "health"):
        assert rows[baseline]["max_ratio"] > 1.5 > warm["max_ratio"]
    # The simulator prints a JIT-monitor line per kernel it compiles: the baselines leave
    # dozens to the first clients, warmgate one (a JSON schema no warm-up can know).
    assert warm["jit_after_ready"] <= 2 < rows["health"]["jit_after_ready"]


def test_timeline_order_matches_each_strategy(bench: tuple[int, str, Path]) -> None:
    _, _, out = bench
    rows = {o["strategy"]: o for o in json.loads((out / "report.json").read_text())}
    none, health, warm = rows["none"], rows["health"], rows["warmgate"]
    # Ready at the container's start: clients were refused until the server listened.
    assert none["spawn_to_ready_s"] == 0.0 and none["refused_before_good"] >= 1
    assert none["first_good_s"] >= none["spawn_to_healthy_s"]
    # /health readiness: Ready when healthy; warmgate: healthy, then the warm-up, then Ready.
    assert health["spawn_to_ready_s"] == health["spawn_to_healthy_s"]
    assert warm["spawn_to_healthy_s"] < warm["spawn_to_ready_s"] <= warm["first_good_s"]


def test_several_starts_combine_into_the_median(tmp_path: Path) -> None:
    """`--starts 1,health=2`: two fresh upstreams for `health` and one for `none`; each
    request's ratio the median (for two, the mean) of its ratios in the two starts.
    `--warm-runs 2,health=3`: each request runs warm twice under `none`, three times under
    `health`."""
    args = ["bench", "--strategies", "none,health", "--starts", "1,health=2", "--sim-args", SIM,
            "--warm-runs", "2,health=3", "--out", str(tmp_path)]  # fmt: skip
    code, stdout, stderr = run(args, timeout=300)
    assert code == 0, f"bench failed:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    logs = {p.name for p in tmp_path.glob("*.log")}
    assert logs == {"none.log", "health.1.log", "health.2.log"}
    table = (tmp_path / "report.md").read_text()
    assert "| none | 1 | 2 |" in table and "| health | 2 | 3 |" in table
    none, row = json.loads((tmp_path / "report.json").read_text())
    assert none["runs"] == []
    assert {len(r["warm_ms"]) for r in none["requests"]} == {2}
    assert {len(r["warm_ms"]) for start in row["runs"] for r in start["requests"]} == {3}
    assert len(row["runs"]) == 2
    for i, request in enumerate(row["requests"]):
        each = [start["requests"][i]["ratio"] for start in row["runs"]]
        assert request["ratio"] == pytest.approx(sum(each) / 2)
        assert request["ratio"] > 0
    assert row["max_ratio"] == max(r["ratio"] for r in row["requests"])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("3", {"health": 3, "warmgate": 3}),
        ("1,warmgate=3", {"health": 1, "warmgate": 3}),
        ("warmgate=2", {"health": 1, "warmgate": 2}),
    ],
)
def test_per_strategy_spec(spec: str, expected: dict[str, int]) -> None:
    assert per_strategy("--starts", spec, ["health", "warmgate"], default=1) == expected


@pytest.mark.parametrize("option", ["--starts", "--warm-runs"])
@pytest.mark.parametrize("spec", ["0", "x", "1,bogus=2", "warmgate=0", "1,warmgate="])
def test_bad_counts_are_one_usage_line(option: str, spec: str) -> None:
    code, stdout, stderr = run(["bench", option, spec], timeout=30)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and option in stderr and "Traceback" not in stderr


def test_unpinned_output_is_compared_with_warm_runs_of_its_length() -> None:
    """Structured output ends where the grammar lets it: a first run of 96 tokens is judged
    against the warm runs of 96 tokens, not against the median of runs that stopped at 4."""
    m = Measured("json", first_ms=240.0, warm_ms=[242.0, 78.0, 85.0], first_tokens=96)
    m.warm_tokens = [96, 4, 4]
    assert m.ratio == pytest.approx(240 / 242)
    m.warm_tokens = [50, 4, 4]  # none as long: the warm runs' line, kept inside their lengths
    assert m.length_fitted and m.ratio == pytest.approx(240 / 242)


def test_a_combined_row_never_reads_start_medians_as_runs() -> None:
    """Structured output has no warm-as-first ratio in a start (its runs differ in length).
    Combined, its warm_ms are the starts' warm medians: judging the first start's median
    against the others' is no noise floor (it made one at 1.70 where every start was <= 1.43)."""
    starts = []
    for warm in ([352.0, 300.0, 310.0], [240.0, 230.0, 250.0], [175.0, 180.0, 170.0]):
        m = Measured("json", first_ms=warm[0], warm_ms=warm, first_tokens=96)
        m.warm_tokens = [96, 4, 4]
        steady = Measured("chat", first_ms=100.0, warm_ms=[100.0, 100.0, 110.0])
        starts.append(Outcome("warmgate", requests=[m, steady]))
    assert starts[0].requests[0].warm_ratio is None
    row = combine(starts)
    assert row.requests[0].warm_ratio is None
    assert row.noise_floor == pytest.approx(1.0 / 1.05)
    assert row.requests[0].ratio == pytest.approx(1.0)  # each start: 96 tokens against 96
    empty = combine([Outcome("health", requests=[Measured("x", error="HTTP 500")])] * 2)
    assert empty.requests[0].ratio is None and empty.max_ratio is None
