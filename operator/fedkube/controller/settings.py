"""Operator settings, from the environment so that the chart and tests can tune them."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Where the operator polls an aggregator's AggregatorReport. Placeholders: ``service``,
#: ``namespace``, ``port``. Tests point it at a local HTTP server.
DEFAULT_STATUS_URL = "http://{service}.{namespace}.svc:{port}/status"


@dataclass(frozen=True)
class ControllerSettings:
    resync_seconds: float = 10.0
    """Interval of the per-job resync that re-runs the reconcile (deadlines, TTL, stuck pods,
    aggregator polling) even when nothing changes."""
    status_url: str = DEFAULT_STATUS_URL
    """Template of the aggregator's status URL."""
    status_timeout_seconds: float = 2.0
    """Timeout of one status poll; a slow aggregator must not stall the reconcile."""
    create_concurrency: int = 32
    """Children created at once for one job."""
    kube_server: str | None = None
    """API server URL to use instead of in-cluster/kubeconfig login (development, tests)."""
    watch_certificates: bool = False
    """Cache cert-manager Certificates from a watch (needs list/watch on them: the chart's
    ``rbac.certManager``); otherwise a pass of a CertManager job reads them by name."""
    watch_podgroups: bool = False
    """Cache PodGroups from a watch (the chart's ``rbac.gangScheduling``); otherwise a pass
    of a gang-scheduled job reads its PodGroup by name."""

    @classmethod
    def from_env(cls) -> ControllerSettings:
        env = os.environ
        return cls(
            resync_seconds=float(env.get("FEDKUBE_RESYNC_SECONDS", cls.resync_seconds)),
            status_url=env.get("FEDKUBE_STATUS_URL", DEFAULT_STATUS_URL),
            status_timeout_seconds=float(env.get("FEDKUBE_STATUS_TIMEOUT_SECONDS",
                                                 cls.status_timeout_seconds)),
            create_concurrency=int(env.get("FEDKUBE_CREATE_CONCURRENCY",
                                           cls.create_concurrency)),
            kube_server=env.get("FEDKUBE_KUBE_SERVER") or None,
            watch_certificates=_flag(env.get("FEDKUBE_WATCH_CERTIFICATES")),
            watch_podgroups=_flag(env.get("FEDKUBE_WATCH_PODGROUPS")),
        )

    def aggregator_status_url(self, service: str, namespace: str, port: int) -> str:
        return self.status_url.format(service=service, namespace=namespace, port=port)


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}
