"""docker/grafana/warmgate.json queries only metrics that warmgate and the engine really serve.

The names come from the dashboard's own PromQL and are checked against what warmgate and
the simulator served in this test, never against a list written by hand. The one
exception is a vLLM metric the simulator does not model (REAL_VLLM_ONLY): this test checks
that the simulator indeed lacks it, and tests/e2e/test_dashboard_vllm.py checks it, with
every other vLLM name, against the real vLLM CPU build's /metrics in the e2e run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dashutil import (
    expressions,
    load,
    metric_names,
    panels,
    scrape_warmgate_over_sim,
    served_names,
    used_names,
)

from warmgate.telemetry import PHASES

# vLLM's time to first token: the simulator answers without a first-token clock.
REAL_VLLM_ONLY = {"vllm:time_to_first_token_seconds_bucket"}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (pod) (warmgate_phase{pod=~"$pod", phase="ready"}) == 1', {"warmgate_phase"}),
        (
            "histogram_quantile(0.95, sum by (pod, le) "
            '(rate(vllm:e2e_request_latency_seconds_bucket{pod=~"$pod"}[$__rate_interval])))',
            {"vllm:e2e_request_latency_seconds_bucket"},
        ),
        (
            'a_bytes{when="warm"} - ignoring(when) group_left(x) b_bytes offset 5m > bool 1e3',
            {"a_bytes", "b_bytes"},
        ),
        ("sum(rate(x_total[5m:30s])) by (le) / on(pod) count(y)", {"x_total", "y"}),
        ('{__name__="not_a_name"} or vector(0)', set()),
    ],
)
def test_metric_names_are_read_from_promql_as_prometheus_selects_them(
    expr: str, names: set[str]
) -> None:
    assert metric_names(expr) == names


def test_served_names_expand_each_family_to_its_series() -> None:
    text = (
        "# TYPE h histogram\n"
        'h_bucket{le="1.0"} 0\nh_bucket{le="+Inf"} 0\nh_count 0\nh_sum 0\n'
        "# TYPE c_total counter\nc_total 3\n"
        "# TYPE g gauge\n"  # declared, no label set yet: still served
        "# TYPE vllm:x gauge\nvllm:x 1\n"
    )
    assert {"h_bucket", "h_sum", "h_count", "c_total", "g", "vllm:x"} <= served_names(text)
    assert "h" not in served_names(text) and "c" not in served_names(text)


def test_dashboard_is_well_formed() -> None:
    dashboard = load()
    every = panels(dashboard)
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in every:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
    for expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert metric_names(expr), f"no metric in {expr!r}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "pod"} <= variables


def test_phase_timeline_names_every_lifecycle_phase() -> None:
    # One number per phase, summed from warmgate_phase (1 for the current phase), then
    # mapped back to the phase's name: a phase added to the lifecycle must be added here.
    (panel,) = [p for p in panels(load()) if p["title"] == "Phase per pod"]
    (target,) = panel["targets"]
    terms = re.findall(
        r'(\d+) \* sum by \(pod\) \(warmgate_phase\{[^}]*phase="(\w+)"\}\)', target["expr"]
    )
    (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
    assert {name: index for index, name in terms} == {
        o["text"]: index for index, o in mapping["options"].items()
    }
    assert sorted(name for _, name in terms) == sorted(PHASES)
    assert len({index for index, _ in terms}) == len(terms)


def test_every_dashboard_metric_is_served_by_warmgate_or_the_simulator(tmp_path: Path) -> None:
    scrapes = scrape_warmgate_over_sim(tmp_path / "cache")
    simulator = served_names(scrapes.simulator)
    used = used_names(load())
    ours = {n for n in used if n.startswith("warmgate_")}
    engine = used - ours
    assert ours and engine, f"the dashboard shows warmgate's metrics next to vLLM's: {used}"
    assert ours <= scrapes.warmgate, f"warmgate never served {sorted(ours - scrapes.warmgate)}"
    assert engine - REAL_VLLM_ONLY <= simulator, (
        f"the simulator does not serve {sorted(engine - REAL_VLLM_ONLY - simulator)}"
    )
    # The exceptions stay exceptions: each is used, and the simulator really lacks it.
    assert engine >= REAL_VLLM_ONLY and not REAL_VLLM_ONLY & simulator
