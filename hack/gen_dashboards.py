#!/usr/bin/env python3
"""Generate the chart's Grafana dashboards (``charts/fedkube/dashboards/*.json``).

The dashboards are code so that every query is written once, reviewed as Python, and checked
by tests: ``tests/chart`` compares the committed JSON with :func:`dashboards` and checks every
metric a query names against what the operator and aggregator really register; ``tests/e2e``
runs every query against a real Prometheus scraping a real run.

Usage: ``python hack/gen_dashboards.py`` (rewrite the files) or ``--check`` (exit 1 when the
committed files differ).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "charts" / "fedkube" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
# The job dashboard's selector: both template variables, on every aggregator series.
JOB = 'namespace="$namespace", job="$job"'
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A Grafana panel: a title, what it shows, its queries, and how to render them."""

    title: str
    description: str
    targets: tuple[Target, ...]
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    options: dict[str, Any] = field(default_factory=dict)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    refs = (chr(ord("A") + i) for i in range(len(panel.targets)))
    field_config: dict[str, Any] = {"defaults": {"unit": panel.unit}, "overrides": []}
    if panel.unit == "percentunit":
        field_config["defaults"] |= {"min": 0, "max": 1}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": field_config,
        "options": panel.options,
        "targets": [
            {"refId": ref, "datasource": DATASOURCE, "expr": t.expr,
             "legendFormat": t.legend or "__auto", "range": True}
            for ref, t in zip(refs, panel.targets, strict=True)
        ],
    }


def _layout(panels: list[Panel]) -> Iterator[dict[str, Any]]:
    """Place panels left to right in rows 24 units wide."""
    x = y = row_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        yield _panel_json(panel, panel_id, x, y)
        x += panel.width
        row_height = max(row_height, panel.height)


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query, "refresh": 2, "sort": 1,
        "includeAll": False, "multi": False, "current": {},
    }


def _dashboard(uid: str, title: str, description: str, panels: list[Panel],
               variables: list[dict[str, Any]]) -> dict[str, Any]:
    datasource_variable = {
        "name": "datasource", "label": "Data source", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0,
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["fedkube"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "templating": {"list": [datasource_variable, *variables]},
        "annotations": {"list": []},
        "panels": list(_layout(panels)),
    }


def _quantiles(metric: str, by: str = "", selector: str = "") -> tuple[Target, ...]:
    group = f"le, {by}" if by else "le"
    return tuple(
        Target(f"histogram_quantile({q}, sum by ({group}) "
               f"(rate({metric}_bucket{{{selector}}}[{RATE}])))", f"p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    )


def operator_dashboard() -> dict[str, Any]:
    """The operator's health: how often and how fast it reconciles, and the jobs it runs."""
    panels = [
        Panel("Reconciles per second", "Reconciles of FederatedJobs, by result.",
              (Target(f"sum by (result) (rate(fedkube_operator_reconcile_total[{RATE}]))",
                      "{{result}}"),), unit="ops"),
        Panel("Reconcile errors", "Share of reconciles that failed (they are retried).",
              (Target(f'sum(rate(fedkube_operator_reconcile_total{{result="error"}}[{RATE}]))'
                      f" / sum(rate(fedkube_operator_reconcile_total[{RATE}]))",
                      "error ratio"),), unit="percentunit"),
        Panel("Reconcile latency", "Time one reconcile takes: p50, p95, p99.",
              _quantiles("fedkube_operator_reconcile_duration_seconds"), unit="s"),
        Panel("Jobs by phase", "FederatedJobs the operator follows, by namespace and phase.",
              (Target("sum by (phase) (fedkube_jobs)", "{{phase}}"),)),
        Panel("Jobs created and completed", "Jobs the operator started and finished.",
              (Target(f"sum(increase(fedkube_jobs_created_total[{RATE}]))", "created"),
               Target(f"sum by (result) (increase(fedkube_jobs_completed_total[{RATE}]))",
                      "completed {{result}}"))),
        Panel("Pod restarts", "Aggregator and client pods the operator replaced, by role.",
              (Target(f"sum by (role) (increase(fedkube_pod_restarts_total[{RATE}]))",
                      "{{role}}"),)),
    ]
    return _dashboard("fedkube-operator", "fedkube / Operator",
                      "The fedkube operator: reconcile rate, errors and latency; jobs.", panels, [])


def job_dashboard() -> dict[str, Any]:
    """One federated job, round by round, from its aggregator's metrics."""
    panels = [
        Panel("Round", "Rounds completed out of the rounds the job asks for.",
              (Target(f"max(fedkube_round{{{JOB}}})", "round"),
               Target(f"max(fedkube_rounds_total{{{JOB}}})", "rounds")),
              kind="stat", width=6, height=5),
        Panel("Progress", "Share of the job's rounds completed.",
              (Target(f"max(fedkube_round{{{JOB}}}) / max(fedkube_rounds_total{{{JOB}}})",
                      "progress"),),
              kind="gauge", unit="percentunit", width=6, height=5),
        Panel("Clients connected", "Clients joined to the aggregator.",
              (Target(f"sum(fedkube_clients_connected{{{JOB}}})", "connected"),),
              width=12, height=5),
        Panel("Round duration", "Wall time of a round: p50, p95, p99.",
              _quantiles("fedkube_round_duration_seconds", selector=JOB), unit="s"),
        Panel("Aggregation time", "Time spent folding updates and computing the new model.",
              _quantiles("fedkube_aggregation_duration_seconds", selector=JOB), unit="s"),
        Panel("Updates", "Client updates received per second, by outcome.",
              (Target(f"sum by (status) (rate(fedkube_updates_total{{{JOB}}}[{RATE}]))",
                      "{{status}}"),), unit="ops"),
        Panel("Bytes received", "Client update bytes received per second.",
              (Target(f"sum(rate(fedkube_update_bytes_total{{{JOB}}}[{RATE}]))", "received"),),
              unit="Bps"),
        Panel("Global loss", "Loss of the global model after each round.",
              (Target(f"max(fedkube_global_loss{{{JOB}}})", "loss"),)),
        Panel("Global accuracy", "Accuracy of the global model after each round.",
              (Target(f"max(fedkube_global_accuracy{{{JOB}}})", "accuracy"),),
              unit="percentunit"),
        Panel("Federated accuracy",
              "Accuracy of the global model on the sampled sites' own validation data "
              "(federated evaluation), example-weighted.",
              (Target(f"max(fedkube_federated_accuracy{{{JOB}}})", "sites"),),
              unit="percentunit"),
        Panel("Evaluation reports",
              "Federated evaluation reports received per second, by outcome (late: for "
              "a round already over).",
              (Target(f"sum by (status) (rate(fedkube_evaluations_total{{{JOB}}}[{RATE}]))",
                      "{{status}}"),), unit="ops"),
        Panel("Refused callers",
              "Calls refused per second, by reason: after the TLS handshake (another job's or "
              "a revoked site's certificate, another site's index or session, a replayed or "
              "unasked answer), and connections TLS refused (no certificate, another CA, "
              "expired, plaintext: handshakes that never carried a call).",
              (Target(f"sum by (reason) (rate(fedkube_refusals_total{{{JOB}}}[{RATE}]))",
                      "{{reason}}"),
               Target(f"sum(rate(fedkube_tls_handshakes_total{{{JOB}}}[{RATE}])) - "
                      f"sum(rate(fedkube_tls_sessions_total{{{JOB}}}[{RATE}]))",
                      "refused by TLS")), unit="ops"),
    ]
    variables = [
        _variable("namespace", "Namespace", "label_values(fedkube_round, namespace)"),
        _variable("job", "Job", 'label_values(fedkube_round{namespace="$namespace"}, job)'),
    ]
    return _dashboard("fedkube-job", "fedkube / Federated job",
                      "One FederatedJob: rounds, clients, updates, aggregation, loss, accuracy.",
                      panels, variables)


def dashboards() -> dict[str, str]:
    """File name -> JSON text of every dashboard, as committed."""
    built = {"operator.json": operator_dashboard(), "federated-job.json": job_dashboard()}
    return {name: json.dumps(board, indent=2, sort_keys=True) + "\n"
            for name, board in built.items()}


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    stale = []
    for name, text in dashboards().items():
        path = DASHBOARD_DIR / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale dashboards {stale}: run `make dashboards`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
