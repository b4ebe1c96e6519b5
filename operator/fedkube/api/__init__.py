"""The FederatedJob API (``fedkube.io/v1alpha1``): the single source of truth for its schema.

The pydantic models here validate specs for ``fedkube validate``, the operator and the
runtime, and generate the CRD that the API server validates with.
"""

from fedkube.api.constants import API_VERSION, GROUP, KIND, PLURAL, VERSION
from fedkube.api.resource import FederatedJob, ObjectMeta
from fedkube.api.spec import (
    ROBUST_STRATEGIES,
    AggregatorSpec,
    CheckpointSpec,
    ClientSlot,
    ClientsSpec,
    DataSpec,
    EvaluationSpec,
    FederatedJobSpec,
    PartitioningSpec,
    PrivacySpec,
    RunPolicy,
    SchedulingSpec,
    SecuritySpec,
    SiteDataSpec,
    SiteSpec,
    StrategyName,
    StrategyParams,
    StrategySpec,
    TaskSpec,
    TransportSpec,
)
from fedkube.api.status import (
    ClientCounts,
    Condition,
    ConditionType,
    FederatedJobStatus,
    JobMetrics,
    Phase,
)
from fedkube.api.types import EnvVar, ResourceRequirements, Toleration

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "ROBUST_STRATEGIES",
    "VERSION",
    "AggregatorSpec",
    "CheckpointSpec",
    "ClientCounts",
    "ClientSlot",
    "ClientsSpec",
    "Condition",
    "ConditionType",
    "DataSpec",
    "EnvVar",
    "EvaluationSpec",
    "FederatedJob",
    "FederatedJobSpec",
    "FederatedJobStatus",
    "JobMetrics",
    "ObjectMeta",
    "PartitioningSpec",
    "Phase",
    "PrivacySpec",
    "ResourceRequirements",
    "RunPolicy",
    "SchedulingSpec",
    "SecuritySpec",
    "SiteDataSpec",
    "SiteSpec",
    "StrategyName",
    "StrategyParams",
    "StrategySpec",
    "TaskSpec",
    "Toleration",
    "TransportSpec",
]
