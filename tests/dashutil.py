"""The Grafana dashboard's metric names, and the names a /metrics endpoint really serves.

tests/test_dashboard.py checks the dashboard against warmgate over the simulator,
tests/e2e/test_dashboard_vllm.py against the real vLLM; both read the dashboard and the
scrapes through these helpers, so the two checks cannot drift apart.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wgutil import Running, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "warmgate.json"

# --- the dashboard's PromQL ------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# `by (pod, le)`, `on(pod)`, `group_left(x)`: label names, never metrics.
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects, as Prometheus would look them up.

    Strings (label values, Grafana's "$pod"), label matchers, range and subquery windows
    and grouping label lists are cut first; what is left that is not a function call, a
    keyword or a number is a metric name (`vllm:` names keep their colon).
    """
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or an operator word
        if match.start() > 0 and text[match.start() - 1].isdigit():
            continue  # the unit of a duration or the exponent of a number: 5m, 1e3
        names.add(word)
    return names


def _label_values_metric(query: str) -> set[str]:
    """The metric of a Grafana `label_values(metric{...}, label)` variable query."""
    found = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
    return metric_names(found.group(1)) if found else metric_names(query)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_panels(dashboard["panels"]))


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def used_names(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name the dashboard queries: its panels and its template variables."""
    names = {name for expr in expressions(dashboard) for name in metric_names(expr)}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        names |= _label_values_metric(query["query"] if isinstance(query, dict) else query)
    return names


# --- what an endpoint serves -----------------------------------------------------------

# The series a family of each type puts into Prometheus (OpenMetrics' suffixes).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def served_names(text: str) -> set[str]:
    """The series names a Prometheus text exposition serves: every sample's name, and every
    declared family's series, labelled families with no child yet included (a family that
    is declared is served; its series appear with the first label set)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
    return names


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
    return body.decode()


# --- warmgate over the simulator, in every phase that changes what /metrics serves ----


@dataclass
class Scrapes:
    """What warmgate (ready, then draining) and the simulator served in one run."""

    warmgate_ready: str
    warmgate_draining: str
    simulator: str

    @property
    def warmgate(self) -> set[str]:
        return served_names(self.warmgate_ready) | served_names(self.warmgate_draining)


def scrape_warmgate_over_sim(cache_dir: Path) -> Scrapes:
    """Start `warmgate run --cache-dir` over `warmgate sim`, scrape both once Ready, then
    SIGTERM and scrape warmgate again while it drains (the drain gauges exist only then).
    A one-feature, one-bucket warm-up: what is served does not depend on the plan's size."""
    sim_port = free_port()
    gate = Running(
        [
            *("run", "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(cache_dir)),
            *("--features", "greedy", "--concurrency", "1", "--max-repeats", "2"),
            *("--max-tokens", "1", "--health-interval", "0.1", "--drain-min", "3"),
            *("--", sys.executable, "-m", "warmgate", "sim", "--host", "127.0.0.1"),
            *("--port", str(sim_port), "--load-seconds", "0", "--time-scale", "0"),
        ]
    )
    try:
        probe_port = int(gate.wait_event("listening", timeout=30)["port"])
        wait_for(
            lambda: http_get(probe_port, "/ready")[0] == 200 or gate.proc.poll() is not None,
            timeout=60,
            interval=0.1,
        )
        assert gate.proc.poll() is None, f"warmgate exited:\n{gate.stderr[-3000:]}"
        ready, simulator = scrape(probe_port), scrape(sim_port)
        gate.proc.send_signal(signal.SIGTERM)

        def while_draining() -> str | None:
            text = scrape(probe_port)  # the gauge appears with the drain's first poll
            return text if "\nwarmgate_drain_inflight " in text else None

        draining = wait_for(while_draining, timeout=10, interval=0.1)
        assert gate.wait(timeout=30) == 0, gate.stderr[-3000:]
        return Scrapes(ready, draining, simulator)
    finally:
        gate.stop()
