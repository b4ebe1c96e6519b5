"""The pure reconcile decision, rule by rule, with no server."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from fedkube import pki
from fedkube.api import FederatedJob
from fedkube.api.runtime import EXIT_INVALID_CONFIGURATION, AggregatorReport
from fedkube.api.status import ConditionType, Phase
from fedkube.controller import builders, credentials
from fedkube.controller import reconcile as reconcile_module
from fedkube.controller.reconcile import (
    ANNOTATION_ACCEPTED_SPEC,
    Create,
    Decision,
    Delete,
    DeleteJob,
    Observed,
    Update,
    reconcile,
    spec_hash,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_job(**spec: Any) -> FederatedJob:
    base: dict[str, Any] = {"rounds": 3, "clients": {"replicas": 3},
                            "strategy": {"minClients": 2}}
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return FederatedJob.model_validate({"metadata": {"name": "j", "namespace": "ns", "uid": "u1"},
                                        "spec": base})


def pod(manifest: dict[str, Any], phase: str = "Running", **status: Any) -> dict[str, Any]:
    meta = {**manifest["metadata"], "creationTimestamp": T0.isoformat()}
    return {**manifest, "metadata": meta, "status": {"phase": phase, **status}}


def all_support(job: FederatedJob) -> frozenset[tuple[str, str]]:
    return frozenset((m["kind"], m["metadata"]["name"])
                     for m in builders.support_objects(job))


_ISSUED: dict[tuple[str, ...], dict[str, dict[str, Any]]] = {}


def issued(job: FederatedJob) -> dict[str, dict[str, Any]]:
    """The Secrets the operator issued for ``job`` (one CA per job and set of sites)."""
    key = (job.name, *(str(site) for site in builders.identities(job)))
    if key not in _ISSUED:
        plan = credentials.plan_secrets(job, {}, T0)
        _ISSUED[key] = {m["metadata"]["name"]: m for m in plan.create}
    return _ISSUED[key]


def running_pods(job: FederatedJob, phase: str = "Running") -> list[dict[str, Any]]:
    return [pod(builders.aggregator_pod(job), phase),
            *(pod(p, phase) for p in builders.client_pods(job))]


def step(job: FederatedJob, observed: Observed, now: datetime = T0,
         accepted: str | None = None) -> tuple[FederatedJob, Decision]:
    """Reconcile, then return the job as it looks with the new status written back."""
    annotations = {ANNOTATION_ACCEPTED_SPEC: accepted} if accepted else {}
    if observed.support and not observed.secrets:  # the children exist: so do the Secrets
        observed = dataclasses.replace(observed, secrets=issued(job))
    decision = reconcile(job, observed, now, generation=2, annotations=annotations)
    return job.model_copy(update={"status": decision.status}), decision


def creates(decision: Decision) -> list[str]:
    return [a.manifest["metadata"]["name"] for a in decision.actions if isinstance(a, Create)]


def deletes(decision: Decision) -> list[str]:
    return [a.name for a in decision.actions if isinstance(a, Delete)]


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def test_fresh_job_creates_everything_once() -> None:
    job = make_job()
    job2, d = step(job, Observed())
    assert creates(d) == ["j-config", "j-aggregator", "j-aggregator", "j-ca", "j-aggregator-tls",
                          "j-clients-tls", "j-aggregator", "j-client-0", "j-client-1",
                          "j-client-2"]
    secrets = {a.manifest["metadata"]["name"]: a.manifest["stringData"] for a in d.actions
               if isinstance(a, Create) and a.manifest["kind"] == "Secret"}
    ca = secrets["j-ca"]["ca.crt"]
    assert secrets["j-aggregator-tls"]["ca.crt"] == secrets["j-clients-tls"]["ca.crt"] == ca
    assert pki.identity_of(x509.load_pem_x509_certificate(
        secrets["j-clients-tls"]["tls.crt"].encode())) == pki.Identity("ns", "j")
    assert d.created and d.status.start_time == T0 and d.status.observed_generation == 2
    assert d.status.condition(ConditionType.CREATED).status == "True"
    assert reasons(d) == ["ChildrenCreated"]
    assert d.accepted_spec_hash == spec_hash(job)
    # Level-based: the same observation after creation asks for nothing more.
    _, again = step(job2, Observed(pods=running_pods(job, "Pending"),
                                   support=all_support(job)))
    assert creates(again) == [] and deletes(again) == [] and not again.created
    assert reasons(again) == []


def test_only_missing_children_are_created() -> None:
    job = make_job()
    job, _ = step(job, Observed())
    pods = [p for p in running_pods(job, "Pending") if p["metadata"]["name"] != "j-client-1"]
    support = all_support(job) - {("ConfigMap", "j-config")}
    _, d = step(job, Observed(pods=pods, support=support))
    assert creates(d) == ["j-config", "j-client-1"]


def test_running_then_report_moves_round_and_metrics() -> None:
    job, _ = step(make_job(), Observed())
    obs = Observed(pods=running_pods(job), support=all_support(job))
    job, d = step(job, obs)
    assert d.status.phase is Phase.RUNNING and reasons(d) == ["AggregatorRunning"]
    assert d.status.clients.ready == 3 and d.status.clients.desired == 3
    report = AggregatorReport(phase="Running", round=2, rounds=3, clients_connected=3,
                              metrics={"loss": 0.5, "accuracy": 0.8})
    job, d = step(job, Observed(pods=obs.pods, support=obs.support, report=report))
    assert (d.status.round, d.status.rounds) == (2, 3)
    assert d.status.metrics.accuracy == 0.8 and d.status.clients.active == 3
    assert reasons(d) == []  # no transition, no event
    assert d.status.message == "round 2/3, 3 clients connected"
    waiting = AggregatorReport(phase="Waiting", round=2, rounds=3, clients_connected=1,
                               message="waiting for clients: 1 of 2 connected")
    _, d = step(job, Observed(pods=obs.pods, support=obs.support, report=waiting))
    assert d.status.message == "round 2/3, waiting for clients: 1 of 2 connected"


@pytest.mark.parametrize(("policy", "deleted"), [
    ("Running", ["j-client-0", "j-client-1", "j-client-2"]),
    ("All", ["j-aggregator", "j-client-0", "j-client-1", "j-client-2"]),
    ("None", []),
])
def test_success_applies_clean_pod_policy(policy: str, deleted: list[str]) -> None:
    job, _ = step(make_job(runPolicy={"cleanPodPolicy": policy}), Observed())
    pods = running_pods(job)
    pods[0] = pod(builders.aggregator_pod(job), "Succeeded")
    job, d = step(job, Observed(pods=pods, support=all_support(job)), T0 + timedelta(seconds=9))
    assert d.status.phase is Phase.SUCCEEDED and d.completed is Phase.SUCCEEDED
    assert d.status.completion_time == T0 + timedelta(seconds=9)
    assert sorted(deletes(d)) == deleted
    assert "AggregatorSucceeded" in reasons(d)
    # Finished jobs never create anything again.
    _, d = step(job, Observed())
    assert creates(d) == []


def test_ttl_deletes_the_job_only_after_it_passed() -> None:
    job, _ = step(make_job(runPolicy={"ttlSecondsAfterFinished": 60}), Observed())
    pods = [pod(builders.aggregator_pod(job), "Succeeded")]
    job, _ = step(job, Observed(pods=pods), T0)
    _, early = step(job, Observed(), T0 + timedelta(seconds=59))
    assert not any(isinstance(a, DeleteJob) for a in early.actions)
    _, late = step(job, Observed(), T0 + timedelta(seconds=60))
    assert any(isinstance(a, DeleteJob) for a in late.actions)


def test_failed_client_is_recreated_and_counted_then_backoff_fails_the_job() -> None:
    job, _ = step(make_job(runPolicy={"backoffLimit": 1}), Observed())
    support = all_support(job)
    pods = running_pods(job)
    pods[1] = pod(builders.client_pod(job, 0), "Failed", reason="OOMKilled")
    job, d = step(job, Observed(pods=pods, support=support))
    assert deletes(d) == ["j-client-0"] and d.status.restarts == 1
    assert d.restarted_roles == ["client"] and "PodFailed" in reasons(d)
    assert d.status.condition(ConditionType.RESTARTING).status == "True"
    assert "OOMKilled" in next(e.message for e in d.events if e.reason == "PodFailed")
    # Next pass: the pod is gone, so it is created again (same name).
    job, d = step(job, Observed(pods=[p for p in pods if p["metadata"]["name"] != "j-client-0"],
                                support=support))
    assert creates(d) == ["j-client-0"]
    # Back to running clears Restarting.
    job, d = step(job, Observed(pods=running_pods(job), support=support))
    assert d.status.condition(ConditionType.RESTARTING).status == "False"
    # A second failure exceeds backoffLimit 1.
    pods = running_pods(job)
    pods[2] = pod(builders.client_pod(job, 1), "Failed")
    _, d = step(job, Observed(pods=pods, support=support))
    assert d.status.phase is Phase.FAILED and d.completed is Phase.FAILED
    failed = d.status.condition(ConditionType.FAILED)
    assert failed.reason == "BackoffLimitExceeded" and "j-client-1" in failed.message
    assert d.status.restarts == 1


def test_failed_aggregator_is_recreated_too() -> None:
    job, _ = step(make_job(), Observed())
    pods = running_pods(job)
    pods[0] = pod(builders.aggregator_pod(job), "Failed")
    _, d = step(job, Observed(pods=pods, support=all_support(job)))
    assert deletes(d) == ["j-aggregator"] and d.restarted_roles == ["aggregator"]


def terminated(manifest: dict[str, Any], exit_code: int, reason: str,
               message: str = "") -> dict[str, Any]:
    """A pod whose only container exited with ``exit_code``, as the kubelet reports it."""
    state = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}}
    return pod(manifest, "Failed", containerStatuses=[{"name": "c", "state": state}])


def test_a_failure_names_the_exit_code_and_the_last_log_line() -> None:
    job, _ = step(make_job(), Observed())
    pods = running_pods(job)
    pods[1] = terminated(builders.client_pod(job, 0), 137, "OOMKilled",
                         "round 3: training\nkilled while folding\n")
    _, d = step(job, Observed(pods=pods, support=all_support(job)))
    assert deletes(d) == ["j-client-0"] and d.status.restarts == 1
    message = next(e.message for e in d.events if e.reason == "PodFailed")
    assert "(OOMKilled, exit code 137: killed while folding)" in message


def test_an_invalid_configuration_fails_the_job_without_restarts() -> None:
    job, _ = step(make_job(runPolicy={"backoffLimit": 5}), Observed())
    pods = running_pods(job)
    pods[0] = terminated(builders.aggregator_pod(job), EXIT_INVALID_CONFIGURATION, "Error",
                         "invalid configuration: spec.task.entrypoint 'x:y': cannot import x")
    _, d = step(job, Observed(pods=pods, support=all_support(job)))
    assert d.status.phase is Phase.FAILED and d.completed is Phase.FAILED
    assert d.status.restarts == 0 and d.restarted_roles == []
    failed = d.status.condition(ConditionType.FAILED)
    assert failed.reason == "InvalidConfiguration"
    assert "aggregator pod j-aggregator" in failed.message
    assert "spec.task.entrypoint 'x:y': cannot import x" in failed.message


def test_scale_down_deletes_extra_clients_only() -> None:
    job, _ = step(make_job(), Observed())
    pods = running_pods(job)
    smaller = job.model_copy(update={"spec": job.spec.model_copy(
        update={"clients": job.spec.clients.model_copy(update={"replicas": 2})})})
    _, d = step(smaller, Observed(pods=pods, support=all_support(job)))
    assert deletes(d) == ["j-client-2"] and creates(d) == []
    assert "ScaledDown" in reasons(d) and d.status.clients.desired == 2
    assert d.status.clients.ready == 2


def test_suspend_deletes_pods_and_resume_recreates() -> None:
    job, _ = step(make_job(), Observed())
    support = all_support(job)
    job, _ = step(job, Observed(pods=running_pods(job), support=support))
    suspended = make_job(runPolicy={"suspend": True}).model_copy(update={"status": job.status})
    job, d = step(suspended, Observed(pods=running_pods(job), support=support))
    assert d.status.phase is Phase.SUSPENDED and len(deletes(d)) == 4
    assert d.status.condition(ConditionType.SUSPENDED).status == "True"
    assert d.status.condition(ConditionType.RUNNING).status == "False"
    _, again = step(job, Observed(support=support))
    assert again.actions == []  # stays suspended quietly
    resumed = make_job().model_copy(update={"status": job.status})
    _, d = step(resumed, Observed(support=support))
    assert len(creates(d)) == 4 and d.status.phase is Phase.PENDING
    assert d.status.condition(ConditionType.SUSPENDED).reason == "Resumed"
    assert not d.created  # a resume is not a first creation


def test_active_deadline_fails_the_job() -> None:
    job, _ = step(make_job(runPolicy={"activeDeadlineSeconds": 30}), Observed())
    obs = Observed(pods=running_pods(job), support=all_support(job))
    _, d = step(job, obs, T0 + timedelta(seconds=29))
    assert d.status.phase is Phase.RUNNING
    _, d = step(job, obs, T0 + timedelta(seconds=30))
    assert d.status.phase is Phase.FAILED
    assert d.status.condition(ConditionType.FAILED).reason == "DeadlineExceeded"
    assert len(deletes(d)) == 4  # cleanPodPolicy Running


@pytest.mark.parametrize(("status", "reason"), [
    ({"containerStatuses": [{"name": "client", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "pull access denied"}}}]}, "ImagePullBackOff"),
    ({"containerStatuses": [{"name": "client", "state": {"waiting": {
        "reason": "CrashLoopBackOff"}}}]}, "CrashLoopBackOff"),
    ({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes have nvidia.com/gpu",
                      "lastTransitionTime": T0.isoformat()}]}, "Unschedulable"),
])
def test_stuck_pod_fails_after_grace_period(status: dict[str, Any], reason: str) -> None:
    job, _ = step(make_job(runPolicy={"stuckPodTimeoutSeconds": 10}), Observed())
    pods = running_pods(job)
    pods[1] = pod(builders.client_pod(job, 0), "Pending", **status)
    obs = Observed(pods=pods, support=all_support(job))
    _, d = step(job, obs, T0 + timedelta(seconds=9))
    assert d.status.phase is not Phase.FAILED
    _, d = step(job, obs, T0 + timedelta(seconds=10))
    assert d.status.phase is Phase.FAILED
    failed = d.status.condition(ConditionType.FAILED)
    assert failed.reason == reason and "j-client-0" in failed.message
    assert "stuckPodTimeoutSeconds" in failed.message


def config_of(job: FederatedJob) -> dict[str, str]:
    return builders.configmap(job)["data"]


def test_scale_up_updates_the_configuration_new_clients_start_from() -> None:
    job, first = step(make_job(), Observed())
    observed = Observed(pods=running_pods(job), support=all_support(job), config=config_of(job))
    _, d = step(job, observed, accepted=first.accepted_spec_hash)
    assert not [a for a in d.actions if isinstance(a, Update)]  # in line: nothing to do
    bigger = make_job(clients={"replicas": 4}).model_copy(update={"status": job.status})
    _, d = step(bigger, observed, accepted=first.accepted_spec_hash)
    (update,) = [a for a in d.actions if isinstance(a, Update)]
    assert (update.kind, update.name) == ("ConfigMap", "j-config")
    assert update.patch == {"data": config_of(bigger)} and "replicas: 4" in \
        update.patch["data"]["config.yaml"]
    assert creates(d) == ["j-client-3"] and "ConfigUpdated" in reasons(d)


def test_a_rejected_spec_leaves_the_running_configuration_alone() -> None:
    job, first = step(make_job(), Observed())
    changed = make_job(strategy={"name": "fedprox"}, clients={"replicas": 4}).model_copy(
        update={"status": job.status})
    _, d = step(changed, Observed(pods=running_pods(job), support=all_support(job),
                                  config=config_of(job)), accepted=first.accepted_spec_hash)
    assert d.status.condition(ConditionType.SPEC_REJECTED).status == "True"
    assert not [a for a in d.actions if isinstance(a, Update)]


def test_immutable_change_of_a_started_job_is_rejected_then_cleared() -> None:
    job, first = step(make_job(), Observed())
    accepted = first.accepted_spec_hash
    changed = make_job(strategy={"name": "fedprox"}).model_copy(update={"status": job.status})
    job2, d = step(changed, Observed(pods=running_pods(job), support=all_support(job)),
                   accepted=accepted)
    rejected = d.status.condition(ConditionType.SPEC_REJECTED)
    assert rejected.status == "True" and rejected.reason == "ImmutableFieldChanged"
    assert "spec.strategy" in rejected.message and d.accepted_spec_hash == accepted
    assert creates(d) == [] and deletes(d) == []
    # Reverting the change clears the condition.
    reverted = make_job().model_copy(update={"status": job2.status})
    _, d = step(reverted, Observed(pods=running_pods(job), support=all_support(job)),
                accepted=accepted)
    assert d.status.condition(ConditionType.SPEC_REJECTED).status == "False"


def test_a_rejected_spec_changes_nothing_else_either() -> None:
    """Fewer clients in a spec that also changes the strategy: the job runs on as it was."""
    job, first = step(make_job(), Observed())
    changed = make_job(strategy={"name": "fedprox"}, clients={"replicas": 2}).model_copy(
        update={"status": job.status})
    _, d = step(changed, Observed(pods=running_pods(job), support=all_support(job),
                                  config=builders.configmap(job)["data"]),
                accepted=first.accepted_spec_hash)
    assert d.status.condition(ConditionType.SPEC_REJECTED).status == "True"
    assert deletes(d) == [] and not [a for a in d.actions if isinstance(a, Update)]


def test_min_clients_may_change_while_the_job_runs() -> None:
    """A site leaving may need a lower minClients; the aggregator takes it on."""
    job, first = step(make_job(), Observed())
    lower = make_job(strategy={"minClients": 1}).model_copy(update={"status": job.status})
    _, d = step(lower, Observed(pods=running_pods(job), support=all_support(job),
                                config=builders.configmap(job)["data"]),
                accepted=first.accepted_spec_hash)
    assert d.status.condition(ConditionType.SPEC_REJECTED) is None
    (update,) = [a for a in d.actions if isinstance(a, Update)]
    assert "minClients: 1" in update.patch["data"]["config.yaml"]


def test_change_before_start_is_accepted() -> None:
    old = spec_hash(make_job())
    _, d = step(make_job(strategy={"name": "fedprox"}), Observed(), accepted=old)
    assert d.accepted_spec_hash != old
    assert d.status.condition(ConditionType.SPEC_REJECTED) is None


def test_condition_time_moves_only_on_flip() -> None:
    job, _ = step(make_job(), Observed())
    obs = Observed(pods=running_pods(job), support=all_support(job))
    job, d = step(job, obs, T0 + timedelta(seconds=1))
    first = d.status.condition(ConditionType.RUNNING).last_transition_time
    _, d = step(job, obs, T0 + timedelta(seconds=50))
    assert d.status.condition(ConditionType.RUNNING).last_transition_time == first


def test_gang_and_network_policy_children() -> None:
    job = make_job(scheduling={"gang": True}, security={"networkPolicy": False})
    _, d = step(job, Observed())
    kinds = [a.manifest["kind"] for a in d.actions if isinstance(a, Create)]
    assert "PodGroup" in kinds and "NetworkPolicy" not in kinds
    group = next(a.manifest for a in d.actions
                 if isinstance(a, Create) and a.manifest["kind"] == "PodGroup")
    assert group["spec"]["minMember"] == 3
    pods = [a.manifest for a in d.actions
            if isinstance(a, Create) and a.manifest["kind"] == "Pod"]
    assert all(p["metadata"]["labels"][builders.LABEL_POD_GROUP] == "j" for p in pods)


def client_only_job() -> FederatedJob:
    return FederatedJob.model_validate({
        "metadata": {"name": "lab", "namespace": "ns", "uid": "u2"},
        "spec": {"remote": {"bundleSecret": "fl-lab-bundle"},
                 "sites": [{"name": "lab", "replicas": 2,
                            "data": {"volume": {"hostPath": {"path": "/srv/lab"}}}}]}})


def test_a_client_only_job_makes_only_its_sites_clients() -> None:
    job = client_only_job()
    job, d = step(job, Observed())
    assert creates(d) == ["lab-lab-0", "lab-lab-1"]
    assert d.status.message == ("created 2 client pods of site lab for a remote aggregator "
                                "(bundle fl-lab-bundle)")
    assert "PlaintextTransport" not in reasons(d)
    pods = [pod(p) for p in builders.pods(job)]
    job, d = step(job, Observed(pods=pods))
    assert d.status.phase is Phase.RUNNING and reasons(d) == ["ClientsRunning"]
    pods[0] = pod(builders.client_pod(job, 0), "Succeeded")
    job, d = step(job, Observed(pods=pods))
    assert d.status.phase is Phase.RUNNING  # one client still takes part
    pods[1] = pod(builders.client_pod(job, 1), "Succeeded")
    _, d = step(job, Observed(pods=pods))
    assert d.status.phase is Phase.SUCCEEDED
    assert d.status.condition(ConditionType.SUCCEEDED).reason == "ClientsSucceeded"


def test_jobs_started_by_the_previous_operator_are_not_taken_for_changed() -> None:
    """Their annotation holds the hash with minClients in it; the next pass writes today's."""
    job, _ = step(make_job(), Observed())
    old_hash = reconcile_module._spec_hash_with_min_clients(job)
    assert old_hash != spec_hash(job)
    _, d = step(job, Observed(pods=running_pods(job), support=all_support(job)),
                accepted=old_hash)
    assert d.status.condition(ConditionType.SPEC_REJECTED) is None
    assert d.accepted_spec_hash == spec_hash(job)


def test_a_failure_is_counted_once_when_the_pass_that_counted_it_was_cut_short() -> None:
    """The operator wrote restarts+1 and was killed before it deleted the failed pod: the
    next pass only deletes it."""
    job, _ = step(make_job(), Observed())
    support = all_support(job)
    pods = running_pods(job)
    failed = pod(builders.client_pod(job, 0), "Failed")
    failed["metadata"]["uid"] = "uid-of-the-failed-pod"
    pods[1] = failed
    job, d = step(job, Observed(pods=pods, support=support))
    assert d.status.restarts == 1 and d.status.restarted_pod_uids == ["uid-of-the-failed-pod"]
    # Killed after the status was written: the same failed pod is still there.
    _, again = step(job, Observed(pods=pods, support=support))
    assert deletes(again) == ["j-client-0"]
    assert again.status.restarts == 1 and again.restarted_roles == []
    assert "PodFailed" not in reasons(again)
