"""Kubernetes value types reused by the FederatedJob spec.

They follow the core API's conventions (quantities, resource requirements, tolerations) so
that users can paste what they already write in Pod specs.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from kubernetes.utils.quantity import parse_quantity as _k8s_parse_quantity
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from fedkube.api.rules import Rule

#: The regular expression the Kubernetes API server uses for ``resource.Quantity``.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected.

    Unknown fields are errors because the API server would prune them silently: a typo such
    as ``replica: 10`` must fail loudly instead of running one client.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=True,
    )

    #: Cross-field invariants: checked on validation, emitted as CEL into the CRD.
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in self.rules:
            if not rule.check(self):
                raise PydanticCustomError(
                    "cross_field", rule.message, {"field_path": rule.field_path}
                )
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        if cls.rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_crd() for rule in cls.rules]
        return schema


def parse_quantity(value: str | int | float) -> Decimal:
    """The numeric value of a Kubernetes quantity (``"500m"`` -> 0.5, ``"1Gi"`` -> 1073741824)."""
    try:
        parsed: Decimal = _k8s_parse_quantity(value)  # type: ignore[no-untyped-call]
    except ValueError as error:
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity (examples: 1, 500m, 2Gi)"
        ) from error
    return parsed


def _check_quantity(value: str | int) -> str | int:
    parse_quantity(value)
    return value


#: A ``resource.Quantity``: an integer or a string such as ``"500m"`` or ``"16Gi"``.
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]

#: Extended resources whose quantities must be whole numbers and whose request, when given,
#: must equal the limit (the device plugins' rule).
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")


def _gpu_is_whole(name: str) -> Rule:
    return Rule(
        cel=(
            f"!has(self.limits) || !('{name}' in self.limits) || "
            f"string(self.limits['{name}']).matches('^[0-9]+$')"
        ),
        message=f"{name} must be a whole number of GPUs, e.g. 1",
        check=lambda r: name not in r.limits or str(r.limits[name]).isdigit(),
        field_path=f".limits['{name}']",
    )


def _gpu_request_matches_limit(name: str) -> Rule:
    return Rule(
        cel=(
            f"!has(self.requests) || !('{name}' in self.requests) || (has(self.limits) && "
            f"'{name}' in self.limits && string(self.requests['{name}']) == "
            f"string(self.limits['{name}']))"
        ),
        message=f"{name} cannot be overcommitted: set its limit, and a request equal to it",
        check=lambda r: name not in r.requests
        or (name in r.limits and str(r.requests[name]) == str(r.limits[name])),
        field_path=f".requests['{name}']",
    )


class ResourceRequirements(ApiModel):
    """Compute resources of a container: ``limits`` and ``requests`` as in a Pod spec.

    GPUs go under ``limits`` (``nvidia.com/gpu: 1``); the device plugins' rules apply.
    """

    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources, e.g. ``{cpu: "2", memory: 8Gi, nvidia.com/gpu: 1}``."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources the scheduler reserves; defaults to the limits where unset."""

    rules = tuple(
        rule for name in GPU_RESOURCES
        for rule in (_gpu_is_whole(name), _gpu_request_matches_limit(name))
    )

    def gpus(self) -> int:
        """Number of GPUs asked for (any vendor), 0 when none."""
        return sum(int(parse_quantity(self.limits[name])) for name in GPU_RESOURCES
                   if name in self.limits)


class EnvVar(ApiModel):
    """An environment variable set in the container."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""

    value: str = ""
    """Variable value."""


class Toleration(ApiModel):
    """A Kubernetes toleration, e.g. for tainted GPU nodes."""

    key: str | None = None
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """How key and value are compared."""

    value: str | None = None
    """Taint value to match with operator Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""

    toleration_seconds: int | None = Field(default=None, ge=0)
    """How long a NoExecute taint is tolerated before eviction."""


#: Free-form JSON object passed through untouched (task configuration, node affinity).
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
