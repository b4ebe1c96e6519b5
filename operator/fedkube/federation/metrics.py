"""The aggregator's Prometheus metrics: the names the chart's dashboards query.

Importable without torch: the chart's tests import :data:`METRIC_NAMES` to check that every
dashboard query names a metric the aggregator really registers. Every metric carries the
labels ``job`` and ``namespace`` of the FederatedJob.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedkube.federation.security import REFUSAL_REASONS

LABELS = ("job", "namespace")

#: Buckets for round and aggregation durations: from a fast CPU toy to hour-long LLM rounds.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

#: Update outcomes counted by ``fedkube_updates_total{status}``.
UPDATE_STATUSES = ("accepted", "rejected", "late")
#: Evaluation report outcomes counted by ``fedkube_evaluations_total{status}``.
EVALUATION_STATUSES = ("accepted", "late")


class AggregatorMetrics:
    """One aggregator's metrics, registered in their own registry and bound to its job."""

    def __init__(self, job: str, namespace: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        labels = {"job": job, "namespace": namespace}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry).labels(**labels)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, LABELS, registry=self.registry,
                             buckets=DURATION_BUCKETS).labels(**labels)

        self.round = gauge("fedkube_round", "Rounds completed so far.")
        self.rounds_total = gauge("fedkube_rounds_total", "Rounds the job asks for.")
        self.round_duration = histogram(
            "fedkube_round_duration_seconds",
            "Wall time of a round, from sampling clients to the evaluated global model.")
        self.clients_connected = gauge("fedkube_clients_connected", "Clients currently joined.")
        self.clients_sampled = gauge(
            "fedkube_clients_sampled", "Clients sampled for the current round.")
        updates = Counter("fedkube_updates_total",
                          "Client updates received, by outcome (accepted, rejected, late).",
                          (*LABELS, "status"), registry=self.registry)
        self.updates = {s: updates.labels(status=s, **labels) for s in UPDATE_STATUSES}
        self.update_bytes = counter(
            "fedkube_update_bytes_total", "Bytes of client updates received.")
        self.spilled_bytes = counter(
            "fedkube_update_bytes_spilled_total",
            "Bytes of client updates written to the aggregator's spill file because more "
            "uploads were in flight than its memory budget holds (read back when folded).")
        self.update_bytes_in_memory = gauge(
            "fedkube_update_bytes_in_memory",
            "Bytes of client updates received and held in memory until folded (at most 1.5 "
            "models; past that, uploads wait for a fold or spill).")
        self.uploads_waiting = gauge(
            "fedkube_uploads_waiting_for_memory",
            "Uploads paused until a fold frees memory for their next chunk (gRPC flow control "
            "holds their clients meanwhile); an upload that waits too long spills instead.")
        self.model_bytes = counter(
            "fedkube_model_bytes_sent_total", "Bytes of global models streamed to clients.")
        self.aggregation_duration = histogram(
            "fedkube_aggregation_duration_seconds",
            "Time spent folding updates into the aggregate and computing the new model.")
        self.global_loss = gauge(
            "fedkube_global_loss",
            "Loss of the global model: central evaluation, or the sites' when the task has no "
            "central test set.")
        self.global_accuracy = gauge("fedkube_global_accuracy",
                                     "Accuracy of the global model (as fedkube_global_loss).")
        self.federated_loss = gauge(
            "fedkube_federated_loss",
            "Loss of the global model on the sampled sites' validation data, example-weighted.")
        self.federated_accuracy = gauge(
            "fedkube_federated_accuracy",
            "Accuracy of the global model on the sampled sites' validation data.")
        evaluations = Counter("fedkube_evaluations_total",
                              "Federated evaluation reports received, by outcome.",
                              (*LABELS, "status"), registry=self.registry)
        self.evaluations = {s: evaluations.labels(status=s, **labels)
                            for s in EVALUATION_STATUSES}
        refusals = Counter(
            "fedkube_refusals_total",
            "Calls refused after the TLS handshake, by reason: another job's or a removed "
            "site's certificate, an index not the site's, a replayed or unsampled update...",
            (*LABELS, "reason"), registry=self.registry)
        self.refusals = {r: refusals.labels(reason=r, **labels) for r in REFUSAL_REASONS}
        self.tls_handshakes = counter(
            "fedkube_tls_handshakes_total",
            "TLS handshakes begun on the gRPC port (connections attempted).")
        self.tls_sessions = counter(
            "fedkube_tls_sessions_total",
            "Connections that completed the mutual TLS handshake and made a call. Handshakes "
            "minus sessions: connections refused by TLS (no certificate, another CA, expired, "
            "plaintext).")
        self.round_failures = counter(
            "fedkube_round_failures_total",
            "Rounds retried because fewer than minClients answered before the timeout.")


def _registered_names() -> frozenset[str]:
    registry = CollectorRegistry()
    AggregatorMetrics("job", "namespace", registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return frozenset(names)


#: Every series name the aggregator exports, as PromQL queries spell them
#: (``fedkube_updates_total``, ``fedkube_round_duration_seconds_bucket``...).
METRIC_NAMES: frozenset[str] = _registered_names()
