"""`fedkube validate`: every problem reported with file, line, field path and a hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedkube.api.validation import InvalidJobError, load_jobs
from fedkube.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted(str(p) for p in (ROOT / "crds" / "samples").glob("*.yaml"))

TYPO = """\
apiVersion: fedkube.io/v1alpha1
kind: FederatedJob
metadata:
  name: digits
spec:
  rounds: 3
  clients:
    replica: 10
    data:
      partitioning: {scheme: dirichlet, alfa: 0.3}
"""


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_samples_are_valid_through_the_installed_command() -> None:
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "fedkube"), "validate", *SAMPLES],
        capture_output=True, text=True, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.count("valid") == len(SAMPLES)


def test_typos_are_errors_naming_line_path_and_the_likely_field(tmp_path: Path) -> None:
    code, output = run("validate", write(tmp_path, TYPO))
    assert code == 1
    assert "job.yaml:8: spec.clients.replica: unknown field (did you mean 'replicas'?)" in output
    assert "job.yaml:10: spec.clients.data.partitioning.alfa: unknown field" in output
    assert "did you mean 'alpha'?" in output


def test_every_problem_of_every_file_is_reported(tmp_path: Path) -> None:
    bad = write(tmp_path, TYPO.replace("rounds: 3", "rounds: -1"), "bad.yaml")
    code, output = run("validate", SAMPLES[0], bad)
    assert code == 1
    assert "valid" in output  # the good file is still reported
    assert output.count("✗") == 3


def test_cross_field_rule_names_the_field_to_change(tmp_path: Path) -> None:
    text = TYPO.replace("replica: 10", "replicas: 2").replace("alfa", "alpha")
    text = text.replace("rounds: 3", "rounds: 3\n  strategy: {minClients: 4}")
    code, output = run("validate", write(tmp_path, text))
    assert code == 1
    assert "spec.strategy.minClients: strategy.minClients exceeds clients.replicas" in output
    assert "raise clients.replicas" in output


def test_invalid_yaml_reports_its_line(tmp_path: Path) -> None:
    code, output = run("validate", write(tmp_path, "kind: FederatedJob\nspec: [unclosed\n"))
    assert code == 1
    assert "job.yaml:3: not valid YAML" in output


def test_other_kinds_in_a_bundle_are_left_alone(tmp_path: Path) -> None:
    bundle = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n" + Path(
        SAMPLES[0]).read_text()
    code, output = run("validate", write(tmp_path, bundle))
    assert code == 0
    assert "1 FederatedJob(s) valid" in output


def test_wrong_kind_in_our_group_is_an_error(tmp_path: Path) -> None:
    text = TYPO.replace("kind: FederatedJob", "kind: FederatedJobs")
    code, output = run("validate", write(tmp_path, text))
    assert code == 1
    assert "kind: Input should be 'FederatedJob'" in output


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    code, output = run("validate", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert "cannot read" in output


def test_load_jobs_raises_with_every_problem(tmp_path: Path) -> None:
    with pytest.raises(InvalidJobError) as raised:
        load_jobs(Path(write(tmp_path, TYPO)))
    assert [p.path for p in raised.value.problems] == [
        "spec.clients.replica", "spec.clients.data.partitioning.alfa"]


def test_load_jobs_returns_models_with_defaults_resolved() -> None:
    (job,) = load_jobs(ROOT / "crds" / "samples" / "digits.yaml")
    assert job.name == "digits" and job.namespace == "default"
    assert job.spec.clients.replicas == 5
    assert job.spec.aggregator.port == 50051
