"""The operator's Prometheus metrics (names are a contract with the dashboards)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.api.constants import ROLE_AGGREGATOR, ROLE_CLIENT
from fedkube.api.status import Phase


class OperatorMetrics:
    """Exactly the operator metrics named in ARCHITECTURE.md, on their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconcile_total = Counter(
            "fedkube_operator_reconcile_total", "Reconcile passes by result (ok, error).",
            ["result"], registry=self.registry)
        self.reconcile_duration = Histogram(
            "fedkube_operator_reconcile_duration_seconds", "Duration of one reconcile pass.",
            registry=self.registry)
        self.jobs = Gauge("fedkube_jobs", "FederatedJobs by namespace and phase.",
                          ["namespace", "phase"], registry=self.registry)
        self.jobs_created = Counter("fedkube_jobs_created_total",
                                    "FederatedJobs whose children were created.",
                                    registry=self.registry)
        self.jobs_completed = Counter("fedkube_jobs_completed_total",
                                      "FederatedJobs finished, by result (Succeeded, Failed).",
                                      ["result"], registry=self.registry)
        self.pod_restarts = Counter("fedkube_pod_restarts_total",
                                    "Failed pods recreated, by role.", ["role"],
                                    registry=self.registry)
        self._phases: dict[tuple[str, str], str] = {}
        # Series for every known label value exist from the start, at 0, so that a dashboard
        # shows "0 errors" and rate() sees the first increment, instead of "No data".
        for result in ("ok", "error"):
            self.reconcile_total.labels(result=result)
        for phase in (Phase.SUCCEEDED, Phase.FAILED):
            self.jobs_completed.labels(result=phase.value)
        for role in (ROLE_AGGREGATOR, ROLE_CLIENT):
            self.pod_restarts.labels(role=role)

    def set_phase(self, namespace: str, name: str, phase: Phase | None) -> None:
        """Record a job's phase (None: the job is gone) and refresh ``fedkube_jobs``."""
        if phase is None:
            self._phases.pop((namespace, name), None)
        else:
            self._phases[(namespace, name)] = phase.value
        namespaces = {ns for ns, _ in self._phases} | {namespace}
        for ns in namespaces:
            for p in Phase:
                count = sum(1 for (n, _), v in self._phases.items() if n == ns and v == p.value)
                self.jobs.labels(namespace=ns, phase=p.value).set(count)
