"""The level-based reconcile, as a pure decision: (job, observed children, now) -> actions.

Given what exists, it says what to create and delete, which Events to post and what the
status becomes. It never talks to a cluster, so every rule is unit-tested without a server,
and running it twice on the same observation gives the same answer (idempotent; only the
random keys of certificates it issues differ): the glue in :mod:`fedkube.controller.handlers`
performs the actions, treating 409 and 404 as done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from fedkube.api import FederatedJob
from fedkube.api.constants import GROUP, LABEL_ROLE, LABEL_SITE, ROLE_CLIENT
from fedkube.api.runtime import EXIT_INVALID_CONFIGURATION, AggregatorReport, last_line
from fedkube.api.status import (
    RESTARTED_PODS_KEPT,
    Condition,
    ConditionType,
    FederatedJobStatus,
    Phase,
)
from fedkube.controller import builders, credentials
from fedkube.controller.builders import Manifest

#: Annotation on the job holding the hash of the spec parts a started job cannot change.
ANNOTATION_ACCEPTED_SPEC = f"{GROUP}/accepted-spec-hash"
#: Spec fields baked into running pods' config; changing them mid-job is rejected.
IMMUTABLE_FIELDS = ("task", "rounds", "strategy", "privacy", "transport")
#: ...except these, which the aggregator takes on while it runs (with the sites and the
#: clients): a site leaving a federation may need a lower minClients.
MUTABLE_STRATEGY_FIELDS = ("min_clients",)
STUCK_WAITING_REASONS = frozenset({"ImagePullBackOff", "ErrImagePull", "CrashLoopBackOff",
                                   "InvalidImageName", "CreateContainerConfigError"})


@dataclass(frozen=True)
class Create:
    manifest: Manifest


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str


@dataclass(frozen=True)
class Update:
    """Merge ``patch`` into an existing child."""

    kind: str
    name: str
    patch: Manifest


@dataclass(frozen=True)
class DeleteJob:
    """Delete the FederatedJob itself (``ttlSecondsAfterFinished`` passed)."""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


Action = Create | Update | Delete | DeleteJob | Event


@dataclass(frozen=True)
class Observed:
    """What exists of a job's children right now."""

    pods: list[Manifest] = field(default_factory=list)
    """The job's pods (already filtered by the ``fedkube.io/job`` label)."""
    support: frozenset[tuple[str, str]] = frozenset()
    """``(kind, name)`` of the ConfigMap, Secret, Service, NetworkPolicy, PodGroup present."""
    report: AggregatorReport | None = None
    """The aggregator's ``/status``, when it answered."""
    config: dict[str, str] | None = None
    """The data of the job's ConfigMap, when it exists."""
    secrets: dict[str, Manifest] = field(default_factory=dict)
    """The job's Secrets (labelled with it) by name: its CA and certificates."""


@dataclass
class Decision:
    actions: list[Action]
    status: FederatedJobStatus
    accepted_spec_hash: str
    """Value for :data:`ANNOTATION_ACCEPTED_SPEC` (unchanged when the spec was rejected)."""
    restarted_roles: list[str] = field(default_factory=list)
    created: bool = False
    completed: Phase | None = None

    @property
    def events(self) -> list[Event]:
        return [a for a in self.actions if isinstance(a, Event)]


def spec_hash(job: FederatedJob) -> str:
    """Hash of the spec fields a started job cannot take on (see :data:`IMMUTABLE_FIELDS`)."""
    return _digest(job.spec.model_dump(mode="json", include=set(IMMUTABLE_FIELDS),
                                       exclude={"strategy": set(MUTABLE_STRATEGY_FIELDS)}))


def _spec_hash_with_min_clients(job: FederatedJob) -> str:
    """The hash as operators before minClients became mutable wrote it, so that the jobs they
    started are not taken for changed ones after an upgrade (the next pass writes the new
    hash)."""
    return _digest(job.spec.model_dump(mode="json", include=set(IMMUTABLE_FIELDS)))


def _digest(dumped: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]


def pod_phase(pod: Manifest) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


#: Longest part of a container's termination message carried into events and conditions.
MESSAGE_LIMIT = 400


def failure_of(pod: Manifest) -> tuple[str, int | None, str]:
    """``(reason, exit code, message)`` of a failed pod: from its first container that
    exited with an error (the runtime's last log line is its termination message), else from
    the pod itself (e.g. ``Evicted``, with no exit code)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        if terminated.get("exitCode"):
            return (terminated.get("reason") or "Error", int(terminated["exitCode"]),
                    last_line(terminated.get("message"))[:MESSAGE_LIMIT])
    status = pod.get("status") or {}
    return (status.get("reason") or "Error", None,
            last_line(status.get("message"))[:MESSAGE_LIMIT])


def _describe_failure(reason: str, exit_code: int | None, message: str) -> str:
    described = reason if exit_code is None else f"{reason}, exit code {exit_code}"
    return f"{described}: {message}" if message else described


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def _pod_condition(pod: Manifest, type_: str) -> Manifest | None:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), None)


def stuck_reason(pod: Manifest) -> tuple[str, str] | None:
    """``(reason, message)`` when the pod cannot make progress on its own, else None."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING_REASONS:
            return waiting["reason"], waiting.get("message", "")
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and \
            scheduled.get("reason") == "Unschedulable":
        return "Unschedulable", scheduled.get("message", "")
    return None


def stuck_since(pod: Manifest) -> datetime | None:
    """When the pod last stopped being ready (or was created): the stuck clock's start."""
    for type_ in ("Ready", "PodScheduled"):
        condition = _pod_condition(pod, type_)
        if condition and condition.get("status") == "False":
            since = _parse_time(condition.get("lastTransitionTime"))
            if since is not None:
                return since
    return _parse_time((pod.get("metadata") or {}).get("creationTimestamp"))


def set_condition(status: FederatedJobStatus, type_: ConditionType, value: bool, reason: str,
                  message: str, now: datetime) -> tuple[FederatedJobStatus, bool]:
    """Set a condition; its lastTransitionTime moves only when its status flips.

    Returns the new status and whether the condition flipped (a transition worth an Event)."""
    new: Literal["True", "False"] = "True" if value else "False"
    old = status.condition(type_)
    if old is None and not value:
        return status, False  # a condition that never held needs no False entry
    flipped = old is None or old.status != new
    since = now if flipped or old is None else old.last_transition_time
    condition = Condition(type=type_, status=new, reason=reason, message=message,
                          last_transition_time=since)
    conditions = [c for c in status.conditions if c.type != type_] + [condition]
    return status.model_copy(update={"conditions": conditions}), flipped


class _Reconciler:
    """One pass of the decision; a class only to share the pass's state between steps."""

    def __init__(self, job: FederatedJob, generation: int, annotations: dict[str, str],
                 observed: Observed, now: datetime) -> None:
        self.job, self.observed, self.now = job, observed, now
        self.spec = job.spec
        self.status = (job.status or FederatedJobStatus()).model_copy(
            update={"observed_generation": generation, "rounds": self.spec.rounds})
        self.accepted = annotations.get(ANNOTATION_ACCEPTED_SPEC)
        self.decision = Decision(actions=[], status=self.status, accepted_spec_hash="")
        self.pods = {p["metadata"]["name"]: p for p in observed.pods
                     if not p["metadata"].get("deletionTimestamp")}

    # --- helpers -------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        """Replace status fields (the API models are immutable)."""
        self.status = self.status.model_copy(update=fields)

    def update_clients(self, **fields: Any) -> None:
        self.update(clients=self.status.clients.model_copy(update=fields))

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.decision.actions.append(Event(type_, reason, message))

    def condition(self, type_: ConditionType, value: bool, reason: str, message: str,
                  event: Literal["Normal", "Warning"] | None = None) -> None:
        self.status, flipped = set_condition(self.status, type_, value, reason, message,
                                             self.now)
        if flipped and event:
            self.event(event, reason, message)

    def delete_pod(self, name: str) -> None:
        self.decision.actions.append(Delete("Pod", name))
        self.pods.pop(name, None)

    def desired_pods(self) -> dict[str, Manifest]:
        return {pod["metadata"]["name"]: pod for pod in builders.pods(self.job)}

    # --- steps ---------------------------------------------------------------------------
    def run(self) -> Decision:
        self.check_spec()
        if self.status.phase.finished:
            self.finished()
        elif self.spec.run_policy.suspend:
            self.suspend()
        else:
            self.active()
        self.count_clients()
        self.decision.status = self.status
        return self.decision

    def check_spec(self) -> None:
        current = spec_hash(self.job)
        started = self.status.start_time is not None
        unchanged = self.accepted in (current, _spec_hash_with_min_clients(self.job))
        if self.accepted is None or unchanged or not started:
            self.decision.accepted_spec_hash = current
            if self.status.condition(ConditionType.SPEC_REJECTED):
                self.condition(ConditionType.SPEC_REJECTED, False, "SpecAccepted",
                               "the spec matches the one the job runs with", "Normal")
            return
        self.decision.accepted_spec_hash = self.accepted
        self.condition(
            ConditionType.SPEC_REJECTED, True, "ImmutableFieldChanged",
            f"spec.{', spec.'.join(IMMUTABLE_FIELDS)} (but strategy.minClients) cannot change "
            "once the job started; "
            "the job keeps running with its original values. Revert the change, or delete "
            "the job and create a new one", "Warning")

    def finished(self) -> None:
        self.cleanup()
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        done = self.status.completion_time
        if ttl is not None and done is not None and (self.now - done).total_seconds() >= ttl:
            self.event("Normal", "TTLExpired",
                       f"deleting the job {ttl}s after it finished (ttlSecondsAfterFinished)")
            self.decision.actions.append(DeleteJob())

    def cleanup(self) -> None:
        policy = self.spec.run_policy.clean_pod_policy
        for name, pod in list(self.pods.items()):
            if policy == "All" or (policy == "Running" and
                                   pod_phase(pod) not in ("Succeeded", "Failed")):
                self.delete_pod(name)

    def finish(self, phase: Phase, reason: str, message: str) -> None:
        self.update(phase=phase, completion_time=self.now, message=message)
        failed = phase is Phase.FAILED
        self.condition(ConditionType.RUNNING, False, reason, message)
        self.condition(ConditionType.RESTARTING, False, reason, message)
        self.condition(ConditionType.FAILED if failed else ConditionType.SUCCEEDED, True,
                       reason, message, "Warning" if failed else "Normal")
        self.decision.completed = phase
        self.cleanup()

    def suspend(self) -> None:
        for name in list(self.pods):
            self.delete_pod(name)
        self.update_clients(active=0)
        if self.status.phase is not Phase.SUSPENDED:
            message = "suspended: pods deleted; unsuspend to resume from checkpoint"
            self.update(phase=Phase.SUSPENDED, message=message)
            self.condition(ConditionType.RUNNING, False, "Suspended", message)
            self.condition(ConditionType.SUSPENDED, True, "Suspended", message, "Normal")

    def active(self) -> None:
        if self.status.phase is Phase.SUSPENDED:
            self.update(phase=Phase.PENDING)
            self.condition(ConditionType.SUSPENDED, False, "Resumed",
                           "unsuspended: pods recreated, the aggregator resumes from its "
                           "checkpoint", "Normal")
        deadline = self.spec.run_policy.active_deadline_seconds
        start = self.status.start_time
        if deadline is not None and start is not None and \
                (self.now - start).total_seconds() >= deadline:
            self.finish(Phase.FAILED, "DeadlineExceeded",
                        f"the job ran longer than activeDeadlineSeconds ({deadline}s)")
            return
        self.apply_report()
        if self.succeeded():
            return
        if self.handle_failed_pods() or self.handle_stuck_pods():
            return
        if self.decision.accepted_spec_hash == spec_hash(self.job):
            # A rejected spec changes nothing: the job runs on with the spec it accepted.
            self.scale_down()
            self.sync_config()
            self.revoke_removed_sites()
        self.create_missing()
        self.update_running()

    def succeeded(self) -> bool:
        """Finish the job when it is done: its aggregator exited 0, or, in a client-only job,
        every client did (the remote aggregator told them the job is over)."""
        if self.spec.remote is None:
            aggregator = self.pods.get(builders.aggregator_name(self.job.name))
            if aggregator is not None and pod_phase(aggregator) == "Succeeded":
                self.finish(Phase.SUCCEEDED, "AggregatorSucceeded",
                            f"all {self.spec.rounds} rounds completed")
                return True
            return False
        clients = [self.pods.get(name) for name in self.desired_pods()]
        if all(pod is not None and pod_phase(pod) == "Succeeded" for pod in clients):
            self.finish(Phase.SUCCEEDED, "ClientsSucceeded",
                        f"the remote aggregator finished the job: all {len(clients)} clients "
                        f"of site {self.spec.sites[0].name} exited")
            return True
        return False

    def apply_report(self) -> None:
        report = self.observed.report
        if report is None:
            return
        self.update(round=report.round)
        self.update_clients(active=report.clients_connected)
        if report.metrics.loss is not None or report.metrics.accuracy is not None:
            self.update(metrics=report.metrics)

    def handle_failed_pods(self) -> bool:
        """Recreate failed pods within the backoff limit; True when the job failed."""
        limit = self.spec.run_policy.backoff_limit
        for name, pod in sorted(self.pods.items()):
            if pod_phase(pod) != "Failed":
                continue
            uid = pod["metadata"].get("uid", "")
            if uid and uid in self.status.restarted_pod_uids:
                self.delete_pod(name)  # counted by a pass cut short before it deleted it
                continue
            role = pod["metadata"].get("labels", {}).get(LABEL_ROLE, ROLE_CLIENT)
            reason, exit_code, detail = failure_of(pod)
            why = _describe_failure(reason, exit_code, detail)
            if exit_code == EXIT_INVALID_CONFIGURATION:
                self.finish(Phase.FAILED, "InvalidConfiguration",
                            f"{role} pod {name} cannot run this job ({why}); fix the spec and "
                            "create the job again")
                return True
            if self.status.restarts >= limit:
                self.finish(Phase.FAILED, "BackoffLimitExceeded",
                            f"{role} pod {name} failed ({why}) after {self.status.restarts} "
                            f"restarts, the runPolicy.backoffLimit of {limit}")
                return True
            counted = [*self.status.restarted_pod_uids, uid] if uid else \
                self.status.restarted_pod_uids
            self.update(restarts=self.status.restarts + 1,
                        restarted_pod_uids=counted[-RESTARTED_PODS_KEPT:])
            self.decision.restarted_roles.append(role)
            self.delete_pod(name)
            message = (f"{role} pod {name} failed ({why}); recreating it "
                       f"(restart {self.status.restarts} of {limit})")
            self.event("Warning", "PodFailed", message)
            self.condition(ConditionType.RESTARTING, True, "PodFailed", message)
        return False

    def handle_stuck_pods(self) -> bool:
        """Fail the job when a pod is stuck past the grace period; True when it did."""
        timeout = self.spec.run_policy.stuck_pod_timeout_seconds
        for name, pod in sorted(self.pods.items()):
            stuck = stuck_reason(pod)
            since = stuck_since(pod)
            if stuck is None or since is None:
                continue
            waited = (self.now - since).total_seconds()
            if waited >= timeout:
                reason, detail = stuck
                self.finish(Phase.FAILED, reason,
                            f"pod {name} stuck in {reason} for {int(waited)}s "
                            f"(runPolicy.stuckPodTimeoutSeconds is {timeout})"
                            + (f": {detail}" if detail else ""))
                return True
        return False

    def scale_down(self) -> None:
        desired = set(self.desired_pods())
        for name in sorted(set(self.pods) - desired):
            self.delete_pod(name)
            self.event("Normal", "ScaledDown",
                       f"deleted {name}: the job now has {self.spec.num_clients} clients")

    def sync_config(self) -> None:
        """Keep the ConfigMap that pods start from in line with the accepted spec: a client
        added by scaling up or a new site reads its place there (immutable fields cannot have
        changed, or the spec was rejected and the ConfigMap keeps the running values)."""
        current = self.observed.config
        if current is None or self.decision.accepted_spec_hash != spec_hash(self.job):
            return
        wanted = builders.configmap(self.job)
        if current != wanted["data"]:
            self.decision.actions.append(Update("ConfigMap", wanted["metadata"]["name"],
                                                {"data": wanted["data"]}))
            self.event("Normal", "ConfigUpdated",
                       f"updated the pods' configuration: the job has {self.spec.num_clients} "
                       "clients" + (f" in {len(self.spec.sites)} sites" if self.spec.sites
                                    else ""))

    def revoke_removed_sites(self) -> None:
        """A site removed from the spec loses its certificate's Secret (and Certificate); the
        aggregator refuses it once it reads the ConfigMap that :meth:`sync_config` updated."""
        for name in credentials.stale_site_secrets(self.job, self.observed.secrets):
            self.decision.actions.append(Delete("Secret", name))
            if self.spec.security.tls.mode == "CertManager":
                self.decision.actions.append(Delete("Certificate", name))
            site = self.observed.secrets[name]["metadata"]["labels"][LABEL_SITE]
            self.event("Normal", "SiteRevoked",
                       f"site {site} is no longer in the job: deleted its certificate {name}; "
                       "the aggregator refuses it")

    def create_missing(self) -> None:
        job = self.job
        for manifest in builders.support_objects(job):
            if (manifest["kind"], manifest["metadata"]["name"]) not in self.observed.support:
                self.decision.actions.append(Create(manifest))
        plan = credentials.plan_secrets(job, self.observed.secrets, self.now)
        self.decision.actions += [Create(manifest) for manifest in plan.create]
        for manifest in plan.replace:
            self.decision.actions.append(Update("Secret", manifest["metadata"]["name"], {
                "metadata": {"annotations": manifest["metadata"].get("annotations")},
                "stringData": manifest["stringData"]}))
        missing = [pod for name, pod in self.desired_pods().items() if name not in self.pods]
        for pod in missing:
            self.decision.actions.append(Create(pod))
        if self.status.start_time is None and missing:
            self.decision.created = True
            message = (f"created the aggregator and {len(missing) - 1} client pods"
                       if job.spec.remote is None else
                       f"created {len(missing)} client pods of site {job.spec.sites[0].name} "
                       f"for a remote aggregator (bundle {job.spec.remote.bundle_secret})")
            self.update(start_time=self.now, message=message)
            self.condition(ConditionType.CREATED, True, "ChildrenCreated", message, "Normal")
            if job.spec.security.tls.mode == "Disabled" and job.spec.remote is None:
                self.event("Warning", "PlaintextTransport",
                           "spec.security.tls.mode is Disabled: gRPC is plaintext and any "
                           "client that reaches the aggregator can join")

    def update_running(self) -> None:
        if self.spec.remote is None:
            aggregator = self.pods.get(builders.aggregator_name(self.job.name))
            running = aggregator is not None and pod_phase(aggregator) == "Running"
            reason, message = "AggregatorRunning", "the aggregator is running"
        else:
            running = any(pod_phase(p) == "Running" for p in self.pods.values())
            reason = "ClientsRunning"
            message = f"site {self.spec.sites[0].name}'s clients are running"
        if running and self.status.phase is not Phase.RUNNING:
            self.update(phase=Phase.RUNNING)
            self.condition(ConditionType.RUNNING, True, reason, message, "Normal")
        restarting = self.status.condition(ConditionType.RESTARTING)
        expected = self.desired_pods()
        if restarting is not None and restarting.status == "True" and \
                all(pod_phase(self.pods.get(n, {})) == "Running" for n in expected):
            self.condition(ConditionType.RESTARTING, False, "AllPodsRunning",
                           "every recreated pod is running again", "Normal")
        if self.status.phase is Phase.RUNNING:
            progress = f"round {self.status.round}/{self.spec.rounds}"
            report = self.observed.report
            if report is not None and report.phase == "Waiting" and report.message:
                # e.g. "waiting for clients: 1 of 3 connected": why no round is running
                self.update(message=f"{progress}, {report.message}")
            else:
                self.update(message=f"{progress}, {self.status.clients.active} clients "
                                    "connected")

    def count_clients(self) -> None:
        """Ready counts the pods that remain after this pass; failed, those seen failed."""
        def clients(pods: Iterable[Manifest]) -> list[str]:
            return [pod_phase(p) for p in pods
                    if p["metadata"].get("labels", {}).get(LABEL_ROLE) == ROLE_CLIENT]
        self.update_clients(desired=self.spec.num_clients,
                            ready=clients(self.pods.values()).count("Running"),
                            failed=clients(self.observed.pods).count("Failed"))


def reconcile(job: FederatedJob, observed: Observed, now: datetime, *, generation: int = 0,
              annotations: dict[str, str] | None = None) -> Decision:
    """Decide what to do for ``job`` given what exists; pure apart from the random keys of
    the certificates it issues."""
    return _Reconciler(job, generation, annotations or {}, observed, now).run()


__all__ = ["ANNOTATION_ACCEPTED_SPEC", "Action", "Create", "Decision",
           "Delete", "DeleteJob", "Event", "Observed", "Update", "reconcile", "spec_hash"]
