"""A cross-site federation run as a user runs it: `fedkube run crds/samples/sites.yaml`.

Three sites hold different shares of a real dataset (scikit-learn's bundled breast cancer
records) with different label mixes, each as CSV files in its own directory. The federated
model must come within 2 points of the same model trained centrally on all their rows, on
records that no site has seen.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fedkube.tasks.base import ClientContext
from fedkube.tasks.tabular import task

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "crds" / "samples" / "sites.yaml"
#: Each site's share of the benign and the malignant training records: the label mixes
#: differ as much as the sizes do.
SHARES = {"north": (0.7, 0.2), "south": (0.2, 0.3), "lab": (0.1, 0.5)}
CPU = torch.device("cpu")


def records() -> tuple[list[str], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [name.replace(" ", "_") for name in data.feature_names]
    labels = np.array([str(data.target_names[t]) for t in data.target])
    return names, data.data, labels


def write_csv(path: Path, names: list[str], features: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*names, "diagnosis"])
        for row, label in zip(features, labels, strict=True):
            writer.writerow([*(f"{value:.6g}" for value in row), label])


def split_sites(tmp_path: Path) -> tuple[dict[str, Path], np.ndarray, np.ndarray, Path]:
    """Site directories, the held-out test set, and one directory with every training row."""
    names, features, labels = records()
    order = np.random.default_rng(7).permutation(len(labels))
    test, train = order[: len(order) // 5], order[len(order) // 5:]
    by_label = {label: [i for i in train if labels[i] == label]
                for label in ("benign", "malignant")}
    dirs, start = {}, {"benign": 0, "malignant": 0}
    for site, (benign, malignant) in SHARES.items():
        rows = []
        for label, share in (("benign", benign), ("malignant", malignant)):
            count = round(share * len(by_label[label]))
            rows += by_label[label][start[label]:start[label] + count]
            start[label] += count
        dirs[site] = tmp_path / "sites" / site
        # Two files per site: the task reads every file its glob matches.
        half = len(rows) // 2
        write_csv(dirs[site] / "part-1.csv", names, features[rows[:half]], labels[rows[:half]])
        write_csv(dirs[site] / "part-2.csv", names, features[rows[half:]], labels[rows[half:]])
    everything = tmp_path / "central"
    write_csv(everything / "all.csv", names, features[train], labels[train])
    return dirs, features[test], labels[test], everything


def accuracy(model: torch.nn.Module, config: dict[str, Any], features: np.ndarray,
             labels: np.ndarray) -> float:
    classes = [str(c) for c in config["classes"]]
    with torch.no_grad():
        logits = model.eval()(torch.tensor(features, dtype=torch.float32))
    truth = torch.tensor([classes.index(label) for label in labels])
    return float((logits.argmax(dim=1) == truth).float().mean())


def central_accuracy(config: dict[str, Any], rounds: int, directory: Path,
                     features: np.ndarray, labels: np.ndarray) -> float:
    """The same model and settings, trained on every site's rows in one place."""
    model = task.model(config)
    data = task.client_data(ClientContext(0, 1, _partitioning(), site="central",
                                          data_dir=directory), config)
    for _ in range(rounds):
        task.train(model, data, config, device=CPU)
    return accuracy(model, config, features, labels)


def _partitioning() -> Any:
    from fedkube.api import PartitioningSpec

    return PartitioningSpec()


def test_sites_sample_trains_to_within_two_points_of_central(tmp_path: Path) -> None:
    dirs, test_features, test_labels, everything = split_sites(tmp_path)
    config = yaml.safe_load(SAMPLE.read_text())["spec"]["task"]["config"]
    rounds = 20
    fedkube = str(Path(sys.executable).with_name("fedkube"))
    run = subprocess.run(
        [fedkube, "run", str(SAMPLE), "--rounds", str(rounds), "-o", str(tmp_path / "run"),
         *(arg for site, d in dirs.items() for arg in ("--data", f"{site}={d}"))],
        capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [entry["round"] for entry in history] == list(range(1, rounds + 1))
    assert all(entry["clients"] == 3 for entry in history)
    # Federated evaluation: the aggregator holds no data, every site evaluated every round,
    # and the job's metrics are the sites' example-weighted reports.
    for entry in history:
        evaluation = entry["federated_evaluation"]
        assert evaluation["clients"] == 3
        assert (entry["loss"], entry["accuracy"]) == (evaluation["loss"], evaluation["accuracy"])
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert "accuracy" in run.stderr + run.stdout
    model = task.model(config)
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt", weights_only=True))
    federated = accuracy(model, config, test_features, test_labels)
    central = central_accuracy(config, rounds, everything, test_features, test_labels)
    print(f"test accuracy: federated {federated:.4f}, central {central:.4f}")
    assert federated >= central - 0.02, (federated, central)
    assert federated > 0.9


def test_a_site_without_its_data_is_named(tmp_path: Path) -> None:
    fedkube = str(Path(sys.executable).with_name("fedkube"))
    run = subprocess.run([fedkube, "run", str(SAMPLE), "--data", "north=/nonexistent"],
                         capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert run.returncode == 1
    assert "site 'north': data directory /nonexistent does not exist" in run.stderr
    assert "site 'south': its data volume is not a hostPath: give its directory here with " \
        "--data south=DIR" in run.stderr


def test_a_client_only_job_is_not_run_here_and_says_how_to_join(tmp_path: Path) -> None:
    fedkube = str(Path(sys.executable).with_name("fedkube"))
    sample = SAMPLE.with_name("client-only.yaml")
    run = subprocess.run([fedkube, "run", str(sample)], capture_output=True, text=True,
                         timeout=60, check=False, cwd=tmp_path)
    assert run.returncode == 1
    assert "is a client-only job (spec.remote): its aggregator runs elsewhere. Join it from " \
        "here with `fedkube client --bundle FILE --data DIR`" in " ".join(run.stderr.split())
    assert not (tmp_path / "runs").exists()
