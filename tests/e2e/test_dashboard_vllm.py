"""docker/grafana/warmgate.json against the real vLLM CPU build, in the e2e run.

Every vLLM name the dashboard queries must be on the shared e2e vLLM's /metrics, scraped
here (no list written by hand, and no exception: tests/test_dashboard.py exempts the names
the simulator lacks because this test checks them). warmgate's names must be on the e2e
warmgate's /metrics, or, for the families warmgate serves only with --cache-dir or while
draining (the shared start has no cache and must not be drained before test_vllm.py's
drain test), on a warmgate over the simulator scraped in this same test.

The file is not named test_dashboard.py: pytest would refuse a second module of that
name (tests/ has no __init__.py), and it must sort before test_vllm.py, whose drain test
stops the shared start.
"""

from __future__ import annotations

from pathlib import Path

from conftest import Served
from dashutil import load, scrape, scrape_warmgate_over_sim, served_names, used_names


def test_every_dashboard_metric_is_served_by_real_vllm_and_warmgate(
    served: Served, tmp_path: Path
) -> None:
    assert served.gate.proc.poll() is None, "the shared e2e warmgate has already stopped"
    vllm = served_names(scrape(served.vllm_port))
    gate = served_names(scrape(served.probe_port))
    used = used_names(load())
    engine = {n for n in used if n.startswith("vllm:")}
    ours = used - engine
    assert engine, "the dashboard shows vLLM's metrics next to warmgate's"
    assert engine <= vllm, f"the real vLLM does not serve {sorted(engine - vllm)}"

    # Only what the shared start cannot show (no --cache-dir, not draining) may come from
    # the simulator run; everything else the real pod served itself.
    conditional = scrape_warmgate_over_sim(tmp_path / "cache").warmgate - gate
    assert ours <= gate | conditional, f"warmgate never served {sorted(ours - gate - conditional)}"
    assert ours & gate, "the e2e warmgate served none of the dashboard's warmgate metrics"
