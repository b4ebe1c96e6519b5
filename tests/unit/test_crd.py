"""The generated CRD: current, structural, and as strict as the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.api import FederatedJob, FederatedJobSpec
from fedkube.api.crd import build_crd, openapi_schema, render_crd_yaml
from fedkube.api.validation import validate_document
from tests.apiserver_schema import (
    admit,
    apply_defaults,
    cel_failures,
    structural_problems,
    walk,
)

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "fedkube.io_federatedjobs.yaml"
SAMPLES = sorted((ROOT / "crds" / "samples").glob("*.yaml"))
SCHEMA = openapi_schema()


def job(spec: dict[str, Any] | None = None, name: str = "demo") -> dict[str, Any]:
    return {"apiVersion": "fedkube.io/v1alpha1", "kind": "FederatedJob",
            "metadata": {"name": name}, "spec": spec or {}}


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == render_crd_yaml(), "run `make crds` and commit the result"


def test_schema_is_structural() -> None:
    assert structural_problems(SCHEMA) == []


def test_unknown_fields_are_preserved_only_in_free_form_objects() -> None:
    preserved = {p for p, node in walk(SCHEMA) if node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {".spec.task.config", ".spec.scheduling.affinity",
                         ".spec.sites[].affinity", ".spec.sites[].data.volume"}


def test_names_columns_and_subresources() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "federatedjobs.fedkube.io"
    assert names["shortNames"] == ["fedjob", "fj"]
    assert names["categories"] == ["all", "fedkube"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Round", "Clients", "Accuracy", "Age"]
    paths = {p for p, _ in walk(SCHEMA)}
    for column, json_path in columns.items():
        if column != "Age":
            assert json_path in paths, f"column {column} points at no field: {json_path}"


def _without_empty(value: Any) -> Any:
    """Absent and empty collections mean the same to the API and the models."""
    if isinstance(value, dict):
        pruned = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    return value


def test_server_defaults_equal_model_defaults() -> None:
    """What the API server fills in must be what the operator assumes."""
    defaulted = apply_defaults(SCHEMA, job())["spec"]
    model = FederatedJobSpec().model_dump(mode="json", exclude_none=True)
    assert _without_empty(defaulted) == _without_empty(model)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_samples_are_admitted_by_schema_cel_and_models(sample: Path) -> None:
    document = yaml.safe_load(sample.read_text())
    assert admit(SCHEMA, document) == []
    assert validate_document(document) == []
    FederatedJob.model_validate(document)


# Each mistake, with what the API server says (schema or CEL) and what `fedkube validate` says.
MISTAKES = [
    pytest.param({"clients": {"replicas": 0}},
                 "spec.clients.replicas: 0 is less than the minimum of 1",
                 "spec.clients.replicas: Input should be greater than or equal to 1",
                 id="replicas-zero"),
    pytest.param({"strategy": {"name": "fedavgg"}},
                 "spec.strategy.name: 'fedavgg' is not one of",
                 "spec.strategy.name: Input should be 'fedavg'",
                 id="strategy-typo"),
    pytest.param({"strategy": {"minClients": 5}, "clients": {"replicas": 3}},
                 ".spec.strategy.minClients: strategy.minClients exceeds clients.replicas",
                 "spec.strategy.minClients: strategy.minClients exceeds clients.replicas",
                 id="min-clients-above-replicas"),
    pytest.param({"strategy": {"name": "krum", "minClients": 5,
                               "params": {"byzantineClients": 2}},
                  "clients": {"replicas": 5}},
                 ".spec.strategy.params.byzantineClients: Krum tolerates f byzantine clients",
                 "spec.strategy.params.byzantineClients: Krum tolerates f byzantine clients",
                 id="krum-too-many-byzantine"),
    pytest.param({"clients": {"resources": {"limits": {"nvidia.com/gpu": "0.5"}}}},
                 ".spec.clients.resources.limits['nvidia.com/gpu']: nvidia.com/gpu must be a "
                 "whole number",
                 "spec.clients.resources.limits['nvidia.com/gpu']: nvidia.com/gpu must be a "
                 "whole number",
                 id="fractional-gpu"),
    pytest.param({"privacy": {"noiseMultiplier": 1}},
                 ".spec.privacy.clipNorm: noise is scaled by the clipping norm",
                 "spec.privacy.clipNorm: noise is scaled by the clipping norm",
                 id="noise-without-clipping"),
    pytest.param({"aggregator": {"resources": {"limits": {"memory": "lots"}}}},
                 "spec.aggregator.resources.limits.memory: 'lots' does not match",
                 "spec.aggregator.resources.limits.memory: Value error, 'lots' is not a "
                 "Kubernetes quantity",
                 id="bad-quantity"),
    pytest.param({"aggregator": {"checkpoint": {"claimName": "mine", "size": "1Gi"}}},
                 ".spec.aggregator.checkpoint.size: set checkpoint.claimName (a claim of your "
                 "own) or checkpoint.size",
                 "spec.aggregator.checkpoint.size: set checkpoint.claimName (a claim of your "
                 "own) or checkpoint.size",
                 id="claim-and-size"),
    pytest.param({"strategy": {"params": {"trimFraction": 0.5}}},
                 "spec.strategy.params.trimFraction: 0.5 is greater than or equal to the maximum",
                 "spec.strategy.params.trimFraction: Input should be less than 0.5",
                 id="trim-half"),
]


@pytest.mark.parametrize(("spec", "apiserver_says", "validate_says"), MISTAKES)
def test_each_mistake_is_rejected_by_both_with_the_field_named(
    spec: dict[str, Any], apiserver_says: str, validate_says: str
) -> None:
    apiserver = admit(SCHEMA, job(spec))
    assert any(apiserver_says in line for line in apiserver), apiserver
    problems = [f"{p.path}: {p.message}" for p in validate_document(job(spec))]
    assert any(validate_says in line for line in problems), problems


def test_bad_job_name_is_rejected_by_both() -> None:
    document = job(name="Digits_Job")
    assert any("metadata.name must be at most 45" in e for e in admit(SCHEMA, document))
    assert [p.path for p in validate_document(document)] == ["metadata.name"]


def _rule_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Specs within every field bound, varying the fields that cross-field rules read."""
    gpu = st.one_of(st.integers(0, 4), st.sampled_from(["1", "2", "0.5", "1500m"]))
    resources = st.fixed_dictionaries({}, optional={
        "limits": st.dictionaries(st.just("nvidia.com/gpu"), gpu, max_size=1),
        "requests": st.dictionaries(st.just("nvidia.com/gpu"), gpu, max_size=1),
    })
    site = st.fixed_dictionaries({
        "name": st.sampled_from(["ward-a", "ward-b", "lab"]),
        "data": st.fixed_dictionaries({"volume": st.sampled_from([
            {"persistentVolumeClaim": {"claimName": "data"}}, {},
            {"name": "data", "hostPath": {"path": "/srv"}}])}),
    }, optional={"replicas": st.integers(1, 4)})
    return st.fixed_dictionaries({
        "sites": st.lists(site, max_size=4),
        "strategy": st.fixed_dictionaries({
            "name": st.sampled_from(["fedavg", "krum", "multikrum", "trimmedmean"]),
            "minClients": st.integers(1, 12),
            "params": st.fixed_dictionaries({"byzantineClients": st.integers(0, 5)},
                                            optional={"krumSelect": st.integers(1, 12)}),
        }),
        "clients": st.fixed_dictionaries({"replicas": st.integers(1, 12),
                                          "resources": resources}),
        "privacy": st.fixed_dictionaries(
            {"noiseMultiplier": st.sampled_from([0, 0.0, 0.5, 1])},
            optional={"clipNorm": st.floats(0.1, 10)},
        ),
        "aggregator": st.fixed_dictionaries({
            "port": st.sampled_from([9090, 50051]),
            "metricsPort": st.sampled_from([9090, 9100]),
            "checkpoint": st.fixed_dictionaries({}, optional={
                "claimName": st.just("mine"), "size": st.just("1Gi"),
                "storageClassName": st.just("fast")}),
        }),
    })


@settings(max_examples=150, deadline=None)
@given(_rule_fields())
def test_cel_rules_agree_with_the_models(spec: dict[str, Any]) -> None:
    document = apply_defaults(SCHEMA, job(spec))
    cel = {f.message for f in cel_failures(SCHEMA, document)}
    problems = validate_document(job(spec))
    assert bool(problems) == bool(cel), (problems, cel)
    for problem in problems:  # the models stop at a model's first failing rule
        assert problem.message in cel
