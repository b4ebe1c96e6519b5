"""The whole FederatedJob resource: type metadata, object metadata, spec and status."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedkube.api.constants import API_VERSION, KIND, MAX_JOB_NAME_LENGTH
from fedkube.api.rules import Rule
from fedkube.api.spec import FederatedJobSpec
from fedkube.api.status import FederatedJobStatus
from fedkube.api.types import ApiModel

#: A DNS-1035 label: child Services are named after the job, and Services need one.
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class ObjectMeta(BaseModel):
    """The part of ``metadata`` that fedkube reads; other fields (uid, resourceVersion, ...)
    are kept as they are, because objects read from a cluster carry them."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=MAX_JOB_NAME_LENGTH, pattern=JOB_NAME_PATTERN)
    """Job name: lower-case letters, digits and '-', starting with a letter."""

    namespace: str | None = Field(default=None, max_length=63)
    """Namespace of the job; the current one when unset."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FederatedJob(ApiModel):
    """A federated learning job: an aggregator and N clients training one model together."""

    api_version: Literal["fedkube.io/v1alpha1"] = Field(default=API_VERSION)
    """Always ``fedkube.io/v1alpha1``."""

    kind: Literal["FederatedJob"] = Field(default=KIND)
    """Always ``FederatedJob``."""

    metadata: ObjectMeta
    """Standard object metadata."""

    spec: FederatedJobSpec = Field(default_factory=FederatedJobSpec)
    """Desired state of the job."""

    status: FederatedJobStatus | None = None
    """Observed state, written by the operator."""

    #: The API server checks only name and generateName in a CRD's metadata, so the name
    #: rule is expressed in CEL at the root, where ``self.metadata.name`` is visible.
    rules = (
        Rule(
            cel=(
                f"size(self.metadata.name) <= {MAX_JOB_NAME_LENGTH} && "
                f"self.metadata.name.matches('{JOB_NAME_PATTERN}')"
            ),
            message=(
                f"metadata.name must be at most {MAX_JOB_NAME_LENGTH} characters of lower-case "
                "letters, digits and '-', starting with a letter (child pods are named after it)"
            ),
            check=lambda _: True,  # ObjectMeta's field constraints already enforce it
            field_path=".metadata.name",
        ),
    )

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"
