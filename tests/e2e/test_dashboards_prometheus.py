"""Every dashboard panel returns data from a real Prometheus scraping a real local run.

Prometheus (the Debian package) scrapes the aggregator of a `fedkube run` job and the
operator's metrics port every second; after the run each panel's PromQL, with Grafana's
template variables filled in the way Grafana fills them (``label_values`` through the label
API), is evaluated as a range query over the run, and must return at least one finite sample.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import start_http_server

from fedkube.controller.metrics import OperatorMetrics
from fedkube.federation.metrics import AggregatorMetrics
from tests.e2e.prometheus import SCRAPE_INTERVAL_MS, SCRAPE_INTERVAL_S, Prometheus, free_port
from tests.promql import dashboard_exprs, substitute

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "fedkube" / "dashboards"
# Grafana's $__rate_interval is max(4 x scrape interval, step + scrape interval).
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL_MS}ms"

JOB = """\
apiVersion: fedkube.io/v1alpha1
kind: FederatedJob
metadata: {name: e2e-digits, namespace: e2e}
spec:
  task:
    entrypoint: fedkube.tasks.digits:task
    config: {hidden: 64, lr: 0.1, localEpochs: 3}
  rounds: 20
  strategy: {name: fedavg, minClients: 2, roundTimeoutSeconds: 60}
  clients:
    replicas: 2
"""


def _run_command() -> list[str]:
    """`fedkube run` with a metrics-port option, or a visible skip until it exists."""
    from fedkube.cli import main

    command = main.commands.get("run")
    if command is None:
        pytest.skip("`fedkube run` is not in fedkube.cli yet")
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    if "--metrics-port" not in options:
        pytest.skip(f"`fedkube run` has no --metrics-port option (it has {sorted(options)})")
    return [sys.executable, "-m", "fedkube.cli", "run"]


def _variables(prom: Prometheus, board: str, start: float, end: float) -> dict[str, str]:
    """The dashboard's template variables, each set to the first value Grafana would offer."""
    values = {"__rate_interval": RATE_INTERVAL}
    templating = json.loads((DASHBOARDS / board).read_text())["templating"]["list"]
    for variable in templating:
        if variable["type"] != "query":
            continue
        query = substitute(variable["query"]["query"], values)
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match, f"{board}: variable {variable['name']}: {query!r}"
        offered = prom.label_values(match.group(2), match.group(1), start, end)
        assert offered, f"{board}: variable {variable['name']} offers nothing: {query!r}"
        values[variable["name"]] = offered[0]
    return values


def assert_every_panel_returns_data(prom: Prometheus, board: str, start: float, end: float,
                                    rewrite: Callable[[str], str] = lambda expr: expr) -> None:
    variables = _variables(prom, board, start, end)
    empty = []
    for title, expr in dashboard_exprs(DASHBOARDS / board):
        query = rewrite(substitute(expr, variables))
        series = prom.query_range(query, start, end)
        if not any(s.finite() for s in series):
            empty.append(f"{title}: {query}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_job_dashboard_panels_return_data_after_a_real_run(tmp_path: Path,
                                                           prometheus_binary: str) -> None:
    command = _run_command()
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with Prometheus(tmp_path, {"aggregator": [f"127.0.0.1:{port}"]}) as prom:
        prom.wait_scraping()
        start = time.time()
        run = subprocess.run([*command, str(job), "--metrics-port", str(port),
                              "--output", str(tmp_path / "run")],
                             capture_output=True, text=True, env=env, timeout=240,
                             cwd=tmp_path, check=False)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # Let the last scrapes land in the TSDB.
        prom.wait_scrapes(2)
        end = time.time()
        assert_every_panel_returns_data(prom, "federated-job.json", start, end)
        # The scrapes saw the training, not only the metrics' initial zeros.
        selector = '{namespace="e2e", job="e2e-digits"}'
        (rounds,) = prom.query_range(f"fedkube_round{selector}", start, end)
        assert max(rounds.finite()) >= 2
        (accuracy,) = prom.query_range(f"fedkube_global_accuracy{selector}", start, end)
        assert max(accuracy.finite()) > 0.2


def test_job_dashboard_queries_on_prometheus_over_the_aggregator_registry(
        tmp_path: Path, prometheus_binary: str) -> None:
    """Every job-dashboard query is PromQL this Prometheus accepts and finds data for, over the
    aggregator's real metric registry updated round by round as the aggregator does.

    Independent of `fedkube run`, so that a query typo (a wrong label, a wrong suffix) fails
    here even where the run cannot be made; the test above is the end-to-end one.
    """
    metrics = AggregatorMetrics("digits", "ml")
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        with Prometheus(tmp_path, {"aggregator": [f"127.0.0.1:{port}"]}) as prom:
            prom.wait_targets_up()
            start = time.time()
            metrics.rounds_total.set(5)
            metrics.clients_connected.set(2)
            for round_ in range(1, 6):
                prom.wait_scrapes()
                metrics.updates["accepted"].inc(2)
                metrics.update_bytes.inc(2 * 4096)
                metrics.aggregation_duration.observe(0.02)
                metrics.round_duration.observe(SCRAPE_INTERVAL_S)
                metrics.round.set(round_)
                metrics.global_loss.set(1 / round_)
                metrics.global_accuracy.set(0.5 + round_ / 20)
                metrics.federated_accuracy.set(0.45 + round_ / 20)
                metrics.evaluations["accepted"].inc(2)
                metrics.refusals["revoked"].inc()
                metrics.tls_handshakes.inc(3)
                metrics.tls_sessions.inc(2)
            prom.wait_scrapes(2)
            assert_every_panel_returns_data(prom, "federated-job.json", start, time.time())
            # A label the code does not export leaves a panel empty, and the check says so.
            with pytest.raises(AssertionError, match="Round: max\\(fedkube_round\\{phase"):
                assert_every_panel_returns_data(prom, "federated-job.json", start, time.time(),
                                                rewrite=lambda e: e.replace(
                                                    "fedkube_round{", 'fedkube_round{phase="x", '))
    finally:
        server.shutdown()
        thread.join()


async def test_operator_dashboard_panels_return_data_from_a_real_operator(
        tmp_path: Path, prometheus_binary: str) -> None:
    """Every operator-dashboard panel returns data while the real kopf operator reconciles a
    job against the API emulator: created, Running, a client pod failed and replaced, and
    Succeeded. Prometheus scrapes the operator's registry on its own port, as in a cluster."""
    from tests.integration.emulator import (
        Cluster,
        operator_settings,
        running_operator,
        serve_emulator,
        wait_until,
    )

    metrics = OperatorMetrics()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)

    async def job_phase(cluster: Cluster, want: str) -> bool:
        job = await cluster.job("digits")
        return ((job or {}).get("status") or {}).get("phase") == want

    async def pod_count(cluster: Cluster, want: int) -> bool:
        return len(await cluster.pods("digits")) >= want

    try:
        with Prometheus(tmp_path, {"operator": [f"127.0.0.1:{port}"]}) as prom:
            await asyncio.to_thread(prom.wait_targets_up)
            start = time.time()
            async with serve_emulator() as (emulator, url), \
                    aiohttp.ClientSession() as session:
                cluster = Cluster(url, session)
                async with running_operator(emulator, operator_settings(url), metrics):
                    await cluster.create_job("digits", {
                        "rounds": 3, "clients": {"replicas": 2},
                        "runPolicy": {"backoffLimit": 2}})
                    await wait_until(lambda: pod_count(cluster, 3), what="3 pods")
                    for name in await cluster.pods("digits"):
                        await cluster.set_pod_status(name, {"phase": "Running"})
                    await wait_until(lambda: job_phase(cluster, "Running"), what="Running")
                    await asyncio.to_thread(prom.wait_scrapes, 3)
                    await cluster.set_pod_status("digits-client-0", {"phase": "Failed"})
                    await wait_until(lambda: restarted(metrics), what="client-0 replaced")
                    await asyncio.to_thread(prom.wait_scrapes, 3)
                    await cluster.set_pod_status("digits-aggregator", {"phase": "Succeeded"})
                    await wait_until(lambda: job_phase(cluster, "Succeeded"), what="Succeeded")
                    await asyncio.to_thread(prom.wait_scrapes, 8)
            await asyncio.to_thread(assert_every_panel_returns_data, prom, "operator.json",
                                    start, time.time())
    finally:
        server.shutdown()
        thread.join()


def restarted(metrics: OperatorMetrics) -> bool:
    return bool(metrics.registry.get_sample_value("fedkube_pod_restarts_total",
                                                  {"role": "client"}))
