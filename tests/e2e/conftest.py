"""Fixtures of the e2e tests: a real Prometheus, skipped visibly where none can be installed."""

from __future__ import annotations

import pytest

from tests.e2e import prometheus


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    path = prometheus.binary()
    if path is None:
        pytest.skip("prometheus is not installed and hack/install_prometheus.sh could not "
                    "install it here (it needs root and apt-get; `make test` runs it)")
    return path
