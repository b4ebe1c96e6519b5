"""A real Prometheus (the Debian package's binary) on 127.0.0.1 for the e2e tests.

:class:`Prometheus` writes a scrape config for static targets, starts the server with its
storage in a temporary directory, waits until it is ready, and answers PromQL through the
HTTP API. The scrape interval is 100 ms so that a run of a second or two leaves enough
samples for ``rate()`` windows.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# A local run's rounds take tens of milliseconds: scrape often enough to see several of them.
SCRAPE_INTERVAL_MS = 100
SCRAPE_INTERVAL_S = SCRAPE_INTERVAL_MS / 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary() -> str | None:
    """The prometheus binary (installed by hack/install_prometheus.sh), or None."""
    return shutil.which("prometheus")


@dataclass(frozen=True)
class Series:
    """One series of a range query: its labels and its (time, value) samples."""

    labels: dict[str, str]
    values: list[tuple[float, float]]

    def finite(self) -> list[float]:
        return [v for _, v in self.values if math.isfinite(v)]


class Prometheus:
    """One Prometheus process scraping ``targets`` (scrape job name -> host:port list)."""

    def __init__(self, workdir: Path, targets: dict[str, list[str]]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_MS}ms",
                       "scrape_timeout": f"{SCRAPE_INTERVAL_MS}ms"},
            "scrape_configs": [
                # honor_labels: the aggregator's own `job` label (the FederatedJob's name) must
                # win over the scrape job's, as in the chart's PodMonitor.
                {"job_name": name, "honor_labels": True,
                 "static_configs": [{"targets": addresses}]}
                for name, addresses in targets.items()
            ],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        path = binary()
        if path is None:
            raise RuntimeError("prometheus is not installed: run hack/install_prometheus.sh")
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [path, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self._process.returncode}:\n"
                                   f"{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout_s}s:\n{self.log.read_text()}")

    def _get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health ('up', 'down', 'unknown') of every active target."""
        data = self._get("/api/v1/targets", state="active")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def wait_targets(self, healthy: set[str], timeout_s: float = 30) -> None:
        """Wait until every target has been scraped with a health in ``healthy``.

        Prometheus applies discovered targets only every five seconds after it starts; a
        test that produces samples before the first scrape would lose them.
        """
        deadline = time.monotonic() + timeout_s
        while not (health := self.targets_up()) or not set(health.values()) <= healthy:
            if time.monotonic() > deadline:
                raise TimeoutError(f"targets not {healthy} after {timeout_s}s: {health}")
            time.sleep(0.2)

    def wait_targets_up(self, timeout_s: float = 30) -> None:
        self.wait_targets({"up"}, timeout_s)

    def wait_scraping(self, timeout_s: float = 30) -> None:
        """Wait until Prometheus scrapes every target, up or not yet listening."""
        self.wait_targets({"up", "down"}, timeout_s)

    def wait_scrapes(self, count: int = 1, timeout_s: float = 30) -> None:
        """Wait until every target has been scraped ``count`` more times: what a test needs
        after producing samples, however slow the machine (a fixed sleep is not enough)."""
        def last_scrapes() -> dict[str, str]:
            data = self._get("/api/v1/targets", state="active")
            return {t["scrapeUrl"]: t["lastScrape"] for t in data["activeTargets"]}

        for _ in range(count):
            before = last_scrapes()
            deadline = time.monotonic() + timeout_s
            while any(after == before.get(url) for url, after in last_scrapes().items()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no new scrape of every target after {timeout_s}s")
                time.sleep(0.05)

    def label_values(self, label: str, match: str, start: float, end: float) -> list[str]:
        """Values of ``label`` on series matching ``match``: Grafana's ``label_values()``."""
        return sorted(self._get(f"/api/v1/label/{label}/values",
                                **{"match[]": match, "start": start, "end": end}))

    def query_range(self, expr: str, start: float, end: float,
                    step_s: float = SCRAPE_INTERVAL_S) -> list[Series]:
        """Evaluate ``expr`` at every step of [start, end], as a Grafana time series panel does."""
        data = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step_s)
        return [Series(item["metric"], [(float(t), float(v)) for t, v in item["values"]])
                for item in data["result"]]
