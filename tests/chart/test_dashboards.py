"""The Grafana dashboards: generated from code, and querying only metrics the code exports."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry

from tests.promql import dashboard_exprs, metric_names

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "fedkube" / "dashboards"

# Until the operator's metrics module exists, its names as ARCHITECTURE.md fixes them.
_ARCHITECTURE_OPERATOR_SERIES = frozenset({
    "fedkube_operator_reconcile_total",
    "fedkube_operator_reconcile_duration_seconds_bucket",
    "fedkube_operator_reconcile_duration_seconds_sum",
    "fedkube_operator_reconcile_duration_seconds_count",
    "fedkube_jobs", "fedkube_jobs_created_total", "fedkube_jobs_completed_total",
    "fedkube_pod_restarts_total",
})

_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
             "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("_sum", "_count", "_created"), "info": ("_info",)}


def series_names(registry: CollectorRegistry) -> frozenset[str]:
    """Every series name a registry exposes, as PromQL spells it (``x_total``, ``x_bucket``)."""
    return frozenset(family.name + suffix for family in registry.collect()
                     for suffix in _SUFFIXES[family.type])


def aggregator_series() -> frozenset[str]:
    from fedkube.federation.metrics import AggregatorMetrics

    return series_names(AggregatorMetrics("job", "namespace").registry)


def operator_series() -> frozenset[str]:
    if importlib.util.find_spec("fedkube.controller.metrics") is None:
        return _ARCHITECTURE_OPERATOR_SERIES
    from fedkube.controller.metrics import OperatorMetrics

    return series_names(OperatorMetrics().registry)


def test_committed_dashboards_are_the_generated_ones(gen_dashboards: ModuleType) -> None:
    generated = gen_dashboards.dashboards()
    assert sorted(generated) == sorted(p.name for p in DASHBOARDS.glob("*.json"))
    for name, text in generated.items():
        assert (DASHBOARDS / name).read_text() == text, f"{name} is stale: run `make dashboards`"


@pytest.mark.parametrize(("board", "exporter"), [
    ("operator.json", operator_series), ("federated-job.json", aggregator_series)])
def test_every_query_names_only_registered_metrics(board: str, exporter) -> None:
    registered = exporter()
    exprs = dashboard_exprs(DASHBOARDS / board)
    assert exprs
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= registered, f"{title}: {sorted(names - registered)} not exported"


def test_job_dashboard_queries_select_the_chosen_job() -> None:
    board = json.loads((DASHBOARDS / "federated-job.json").read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= set(variables)
    for name in ("namespace", "job"):
        query = variables[name]["query"]["query"]
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match and match.group(2) == name
        assert metric_names(match.group(1)) <= aggregator_series()
    for title, expr in dashboard_exprs(DASHBOARDS / "federated-job.json"):
        for selector in re.findall(r"fedkube_\w+(\{[^}]*\})?", expr):
            assert selector == '{namespace="$namespace", job="$job"}', f"{title}: {expr}"


def test_dashboards_cover_what_users_watch() -> None:
    def titles(board: str) -> set[str]:
        return {p["title"] for p in json.loads((DASHBOARDS / board).read_text())["panels"]}

    assert titles("operator.json") == {
        "Reconciles per second", "Reconcile errors", "Reconcile latency", "Jobs by phase",
        "Jobs created and completed", "Pod restarts"}
    assert titles("federated-job.json") == {
        "Round", "Progress", "Round duration", "Clients connected", "Updates",
        "Bytes received", "Aggregation time", "Global loss", "Global accuracy",
        "Federated accuracy", "Evaluation reports", "Refused callers"}


@pytest.mark.parametrize("board", ["operator.json", "federated-job.json"])
def test_dashboard_layout_and_datasource(board: str) -> None:
    """Grafana places panels on a 24-wide grid; overlapping or unnamed queries misrender."""
    dashboard = json.loads((DASHBOARDS / board).read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    assert dashboard["uid"].startswith("fedkube-")
