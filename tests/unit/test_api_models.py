"""The FederatedJob models: defaults, wire names, quantities, GPU rules."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from fedkube.api import FederatedJob, FederatedJobSpec, Phase, ResourceRequirements
from fedkube.api.runtime import AggregatorReport, RuntimeConfig
from fedkube.api.types import parse_quantity


def test_fields_are_camel_case_on_the_wire_and_snake_case_in_python() -> None:
    spec = FederatedJobSpec.model_validate({"runPolicy": {"backoffLimit": 7}})
    assert spec.run_policy.backoff_limit == 7
    assert spec.model_dump(mode="json")["runPolicy"]["backoffLimit"] == 7


def test_every_field_has_a_description() -> None:
    from fedkube.api.crd import openapi_schema
    from tests.apiserver_schema import walk

    missing = [path for path, node in walk(openapi_schema()["properties"]["spec"], ".spec")
               if not path.endswith(("|", "[]", "{}")) and not node.get("description")]
    assert missing == []


@pytest.mark.parametrize(("text", "value"), [
    ("500m", Decimal("0.5")), ("2Gi", Decimal(2**31)), ("1", Decimal(1)), (3, Decimal(3)),
    ("1.5k", Decimal(1500)),
])
def test_quantities_follow_kubernetes(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_gpu_count_and_rules() -> None:
    assert ResourceRequirements.model_validate({"limits": {"nvidia.com/gpu": "2"}}).gpus() == 2
    assert ResourceRequirements().gpus() == 0
    with pytest.raises(ValidationError, match="cannot be overcommitted"):
        ResourceRequirements.model_validate({"requests": {"nvidia.com/gpu": 1}})


def test_models_are_immutable() -> None:
    spec = FederatedJobSpec()
    with pytest.raises(ValidationError):
        spec.rounds = 3  # type: ignore[misc]


def test_metadata_keeps_cluster_fields() -> None:
    job = FederatedJob.model_validate({
        "metadata": {"name": "a", "namespace": "ml", "uid": "123", "resourceVersion": "9"},
    })
    assert job.namespace == "ml"
    assert job.metadata.model_dump()["uid"] == "123"


def test_phase_knows_when_a_job_is_finished() -> None:
    assert Phase.SUCCEEDED.finished and Phase.FAILED.finished
    assert not Phase.RUNNING.finished and not Phase.SUSPENDED.finished


def test_runtime_config_round_trips_through_yaml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = RuntimeConfig(job_name="digits", spec=FederatedJobSpec(rounds=4),
                           aggregator_address="digits-aggregator.ml.svc:50051")
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert RuntimeConfig.from_file(path) == config


def test_aggregator_report_is_camel_case_json() -> None:
    report = AggregatorReport(phase="Running", round=3, rounds=10, clients_connected=5)
    assert '"clientsConnected":5' in report.model_dump_json()
