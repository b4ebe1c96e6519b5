"""The Prometheus harness itself: it scrapes a real exporter and answers range queries."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import start_http_server

from fedkube.federation.metrics import AggregatorMetrics
from tests.e2e.prometheus import Prometheus, free_port


def test_scrapes_an_exporter_keeping_its_job_label(tmp_path: Path,
                                                   prometheus_binary: str) -> None:
    metrics = AggregatorMetrics("digits", "ml")
    metrics.round.set(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        with Prometheus(tmp_path, {"aggregator": [f"127.0.0.1:{port}"]}) as prom:
            start = time.time()
            prom.wait_targets_up()
            deadline = time.monotonic() + 20
            while not (series := prom.query_range("fedkube_round", start, time.time())):
                assert time.monotonic() < deadline, "no sample of fedkube_round scraped"
                time.sleep(0.5)
    finally:
        server.shutdown()
        thread.join()
    (only,) = series
    # honor_labels: the exporter's job label (the FederatedJob), not the scrape job's name.
    assert only.labels["job"] == "digits"
    assert only.labels["namespace"] == "ml"
    assert only.finite()[-1] == 3
