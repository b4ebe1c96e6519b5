"""The observed state of a FederatedJob (``status``), written by the operator."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from fedkube.api.types import ApiModel


class Phase(StrEnum):
    """Where a job is in its life."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def finished(self) -> bool:
        """Whether the job has ended for good."""
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    """Condition types, in the order a job usually meets them."""

    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SPEC_REJECTED = "SpecRejected"


class Condition(ApiModel):
    """One aspect of the job's state, with the reason it is so (Kubernetes conventions)."""

    type: ConditionType
    """What this condition is about."""

    status: Literal["True", "False", "Unknown"]
    """Whether it holds."""

    reason: str = Field(max_length=128, pattern=r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$")
    """Machine-readable reason, in CamelCase (e.g. ``BackoffLimitExceeded``)."""

    message: str = Field(default="", max_length=32768)
    """Human-readable explanation."""

    last_transition_time: datetime
    """When the status last changed."""


class ClientCounts(ApiModel):
    """Client pods by state."""

    desired: int = Field(default=0, ge=0)
    """Clients the spec asks for."""

    ready: int = Field(default=0, ge=0)
    """Client pods running and ready."""

    active: int = Field(default=0, ge=0)
    """Clients connected to the aggregator."""

    failed: int = Field(default=0, ge=0)
    """Client pods that failed (each is recreated within the backoff limit)."""


class JobMetrics(ApiModel):
    """The global model's latest evaluation."""

    loss: float | None = None
    """Loss of the global model after the latest round."""

    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    """Accuracy of the global model after the latest round."""


#: Failed pods remembered as counted (a pass replaces at most a few at once).
RESTARTED_PODS_KEPT = 64


class FederatedJobStatus(ApiModel):
    """What the operator observed of the job, and why."""

    phase: Phase = Phase.PENDING
    """Pending, Running, Succeeded, Failed or Suspended."""

    conditions: list[Condition] = Field(default_factory=list)
    """Latest observations of the job's state, each with a reason."""

    round: int = Field(default=0, ge=0)
    """Rounds completed so far."""

    rounds: int = Field(default=0, ge=0)
    """Rounds asked for."""

    clients: ClientCounts = Field(default_factory=ClientCounts)
    """Client pods by state."""

    metrics: JobMetrics = Field(default_factory=JobMetrics)
    """The global model's latest evaluation."""

    start_time: datetime | None = None
    """When the job's pods were first created."""

    completion_time: datetime | None = None
    """When the job succeeded or failed."""

    observed_generation: int = Field(default=0, ge=0)
    """The ``metadata.generation`` this status was computed for."""

    restarts: int = Field(default=0, ge=0)
    """Pods recreated after a failure, counted against ``runPolicy.backoffLimit``."""

    restarted_pod_uids: list[str] = Field(default_factory=list, max_length=RESTARTED_PODS_KEPT)
    """The uids of the latest failed pods counted in ``restarts``: an operator restarted in
    the middle of replacing one does not count it twice."""

    message: str = Field(default="", max_length=32768)
    """A one-line summary of the job's state."""

    def condition(self, type_: ConditionType) -> Condition | None:
        """The condition of that type, if the job has one."""
        return next((c for c in self.conditions if c.type == type_), None)
