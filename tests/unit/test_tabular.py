"""The built-in tabular task on real records, run in process with no gRPC. It reads
scikit-learn's bundled breast cancer data, written as three sites' CSV files whose sizes and
label mixes differ (the rows are sorted by label), and keeps a held-out test set away from
every site."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkube.api import PartitioningSpec
from fedkube.tasks.base import ClientContext, ConfigurationError, Task, Validator
from fedkube.tasks.tabular import SiteRows, Standardize, task

CPU = torch.device("cpu")
LABEL = "diagnosis"
ROUNDS = 20


@dataclass(frozen=True)
class Federation:
    names: list[str]
    classes: list[str]
    dirs: dict[str, Path]
    rows: dict[str, int]
    test_x: torch.Tensor
    test_y: torch.Tensor


def write_csv(path: Path, header: Sequence[str], rows: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    names = [str(name) for name in data.feature_names]
    classes = [str(name) for name in data.target_names]  # malignant (0), benign (1)
    x, y = data.data, data.target
    order = np.random.default_rng(0).permutation(len(y))
    test, pool = order[: len(y) // 5], order[len(y) // 5:]
    pool = pool[np.argsort(y[pool], kind="stable")]  # label skew: malignant rows first
    root = tmp_path_factory.mktemp("sites")
    dirs, rows = {}, {}
    # Site a: 60 rows, all malignant; b: 140, 115 malignant; c: 256, all benign.
    for site, part in zip("abc", np.split(pool, [60, 200]), strict=True):
        dirs[site] = root / site
        rows[site] = len(part)
        write_csv(dirs[site] / "records.csv", [*names, LABEL],
                  ([*features, classes[label]] for features, label in zip(x[part], y[part],
                                                                          strict=True)))
    return Federation(names, classes, dirs, rows,
                      torch.tensor(x[test], dtype=torch.float32), torch.tensor(y[test]))


def settings(federation: Federation, **extra: Any) -> dict[str, Any]:
    return {"label": LABEL, "features": federation.names, "classes": federation.classes,
            **extra}


def client(data_dir: Path | None, site: str = "a", site_index: int = 0,
           replicas: int = 1) -> ClientContext:
    return ClientContext(index=site_index, num_clients=3, partitioning=PartitioningSpec(),
                         site=site, site_index=site_index, site_replicas=replicas,
                         data_dir=data_dir)


def standardize_of(model: torch.nn.Module) -> Standardize:
    layer = next(model.children())
    assert isinstance(layer, Standardize)
    return layer


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Every state-dict entry, buffers included, averaged with example weights (FedAvg)."""
    total = sum(weights)
    averaged = {}
    for key, like in states[0].items():
        weighted = torch.zeros_like(like, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            weighted += state[key].double() * weight
        averaged[key] = (weighted / total).to(like.dtype)
    return averaged


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def test_the_task_fits_the_protocols(federation: Federation) -> None:
    assert isinstance(task, Task) and isinstance(task, Validator)
    model = task.model(settings(federation))
    buffers = dict(model.named_buffers())
    assert {name: tensor.dtype for name, tensor in buffers.items()} == {
        "0.mean": torch.float32, "0.mean_of_squares": torch.float32, "0.ready": torch.float32}
    assert float(buffers["0.ready"]) == 0.0
    x = federation.test_x[:5]
    assert torch.equal(standardize_of(model)(x), x)  # identity until statistics arrive
    same = task.model(settings(federation))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 same.state_dict().values(), strict=True))
    mlp = task.model(settings(federation, model="mlp", hidden=8))
    assert [tuple(p.shape) for p in mlp.parameters()] == [(8, 30), (8,), (2, 8), (2,)]


def test_fedavg_pools_the_statistics_and_matches_central_training(
        federation: Federation) -> None:
    # Two passes over each site's rows per round, in batches of 16.
    config = settings(federation, localEpochs=2, batchSize=16)
    sites = [task.client_data(client(d, site), config) for site, d in federation.dirs.items()]
    assert [len(s.train_y) + len(s.val_y) for s in sites] == list(federation.rows.values())
    train_x = torch.cat([s.train_x for s in sites])

    global_model = task.model(config)
    for round_number in range(1, ROUNDS + 1):
        states, weights = [], []
        for rows in sites:
            local = task.model(config)
            local.load_state_dict(global_model.state_dict())
            result = task.train(local, rows, config, device=CPU)
            assert result.num_examples == len(rows.train_y)
            assert np.isfinite(result.metrics["loss"])
            states.append(local.state_dict())
            weights.append(result.num_examples)
        global_model.load_state_dict(fedavg(states, weights))
        if round_number == 1:
            standardize = standardize_of(global_model)
            assert float(standardize.ready) == 1.0
            every_row = train_x.double()
            torch.testing.assert_close(standardize.mean.double(), every_row.mean(dim=0),
                                       rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(standardize.mean_of_squares.double(),
                                       every_row.square().mean(dim=0), rtol=1e-5, atol=1e-7)
            scaled = standardize(train_x).double()
            torch.testing.assert_close(scaled.mean(dim=0), torch.zeros(30, dtype=torch.float64),
                                       rtol=0, atol=1e-4)
            torch.testing.assert_close(scaled.std(dim=0, correction=0),
                                       torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-4)

    # Federated evaluation on the sites' validation rows.
    reports = [task.validate(global_model, rows, config, device=CPU) for rows in sites]
    assert [r.num_examples for r in reports] == [len(s.val_y) for s in sites]
    validated = sum(r.accuracy * r.num_examples for r in reports) / sum(
        r.num_examples for r in reports)
    assert validated > 0.9
    assert task.evaluate(global_model, config, device=CPU) is None  # no central test set

    # The same model, trained centrally on the union of the sites' training rows (standardised
    # with the union's statistics) for as many passes over each row.
    union_x = train_x.double()
    union = SiteRows(train_x, torch.cat([s.train_y for s in sites]), train_x[:0],
                     torch.zeros(0, dtype=torch.long), union_x.mean(dim=0).float(),
                     union_x.square().mean(dim=0).float())
    central = task.model(config)
    torch.manual_seed(0)
    task.train(central, union, {**config, "localEpochs": 2 * ROUNDS}, device=CPU)

    federated_accuracy = accuracy(global_model, federation.test_x, federation.test_y)
    central_accuracy = accuracy(central, federation.test_x, federation.test_y)
    assert central_accuracy > 0.93
    assert federated_accuracy >= central_accuracy - 0.02, (federated_accuracy, central_accuracy)


def test_a_client_trains_with_the_received_statistics_and_reports_its_own(
        federation: Federation) -> None:
    config = settings(federation)
    other = task.client_data(client(federation.dirs["c"], "c"), config)

    def site_b() -> SiteRows:
        return task.client_data(client(federation.dirs["b"], "b"), config)

    def trained(received: SiteRows | None) -> torch.nn.Module:
        torch.manual_seed(0)  # as the client seeds every round
        model = task.model(config)
        if received is not None:  # an aggregate arrived: ready is set
            standardize_of(model).hold(received.mean, received.mean_of_squares)
        task.train(model, site_b(), config, device=CPU)
        return model

    rows = site_b()
    first_round, with_own, with_other = trained(None), trained(rows), trained(other)
    # Nothing aggregated yet: the client trains with its own rows' statistics...
    for key, value in first_round.state_dict().items():
        assert torch.equal(value, with_own.state_dict()[key]), key
    # ...and otherwise with the statistics it received.
    assert not torch.allclose(with_other.state_dict()["1.weight"],
                              with_own.state_dict()["1.weight"])
    for model in (first_round, with_own, with_other):  # it reports its own, for FedAvg
        standardize = standardize_of(model)
        assert torch.equal(standardize.mean, rows.mean)
        assert torch.equal(standardize.mean_of_squares, rows.mean_of_squares)
        assert float(standardize.ready) == 1.0


def test_an_mlp_trains_with_adam_and_the_proximal_term(federation: Federation) -> None:
    config = settings(federation, model="mlp", hidden=16, optimizer="adam", localEpochs=3)
    own = task.client_data(client(federation.dirs["b"], "b"), config)
    start = task.model(config)
    standardize_of(start).hold(own.mean, own.mean_of_squares)
    drift = {}
    for mu in (0.0, 1.0):
        rows = task.client_data(client(federation.dirs["b"], "b"), config)
        model = task.model(config)
        model.load_state_dict(start.state_dict())
        before = task.validate(model, rows, config, device=CPU)
        result = task.train(model, rows, config, device=CPU, proximal_mu=mu)
        after = task.validate(model, rows, config, device=CPU)
        assert result.metrics["loss"] > 0 and after.loss < before.loss
        assert after.accuracy >= 0.9 and after.num_examples == len(rows.val_y) == 28
        with torch.no_grad():
            drift[mu] = sum(float((a - b).square().sum()) for a, b in zip(
                model.parameters(), start.parameters(), strict=True))
    assert drift[1.0] < drift[0.0]  # FedProx keeps the weights nearer the global ones


def test_clients_of_one_site_take_disjoint_rows(federation: Federation) -> None:
    config = settings(federation)
    parts = [task.client_data(client(federation.dirs["c"], "c", index, replicas=2), config)
             for index in range(2)]
    seen = [{tuple(row.tolist()) for row in torch.cat([p.train_x, p.val_x])} for p in parts]
    assert seen[0].isdisjoint(seen[1])
    assert len(seen[0]) + len(seen[1]) == federation.rows["c"]
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    again = task.client_data(client(federation.dirs["c"], "c", 1, replicas=2), config)
    assert torch.equal(again.train_x, parts[1].train_x)  # the split is reproducible
    assert torch.equal(again.val_x, parts[1].val_x)


def test_settings_and_files_that_cannot_work_name_the_problem(
        federation: Federation, tmp_path: Path) -> None:
    config = settings(federation)
    site_a = federation.dirs["a"]
    with pytest.raises(ConfigurationError, match=re.escape(
            "the tabular task reads each site's own files: give the job spec.sites with a "
            "data volume")):
        task.client_data(client(None), config)
    with pytest.raises(ConfigurationError,
                       match=re.escape("records.csv has no column 'outcome' (named in")):
        task.client_data(client(site_a), {**config, "label": "outcome"})
    with pytest.raises(ConfigurationError,
                       match=re.escape("records.csv has no column 'mean radios'")):
        task.client_data(client(site_a), {**config, "features": [
            "mean radios", *federation.names[1:]]})
    with pytest.raises(ConfigurationError, match=re.escape(
            "records.csv, line 2: label 'diagnosis' is 'benign', which is not in "
            "spec.task.config.classes (malignant, healthy)")):
        task.client_data(client(federation.dirs["c"], "c"),
                         {**config, "classes": ["malignant", "healthy"]})
    with pytest.raises(ConfigurationError, match="unknown keys epochs for the tabular task"):
        task.model({**config, "epochs": 3})
    without_features = {k: v for k, v in config.items() if k != "features"}
    with pytest.raises(ConfigurationError, match=re.escape(
            "spec.task.config.features is required")):
        task.model(without_features)
    with pytest.raises(ConfigurationError, match=re.escape("spec.task.config.optimizer")):
        task.model({**config, "optimizer": "lbfgs"})
    with pytest.raises(ConfigurationError, match=r"no file in \S+ \(site a\) matches"):
        task.client_data(client(site_a), {**config, "files": "*.parquet"})
    write_csv(tmp_path / "gaps.csv", ["x", "y", "label"], [[1, 2, "yes"], [3, "n/a", "no"]])
    with pytest.raises(ConfigurationError, match=re.escape(
            "gaps.csv, line 3: feature 'y' is 'n/a', not a finite number")):
        task.client_data(client(tmp_path),
                         {"label": "label", "features": ["x", "y"], "classes": ["yes", "no"]})


def test_parquet_files_read_like_csv_and_numeric_labels_match(
        federation: Federation, tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow reads Parquet files")
    import pyarrow.parquet as parquet

    with (federation.dirs["b"] / "records.csv").open(newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader)
        rows = list(reader)
    codes = [federation.classes.index(row[-1]) for row in rows]  # labels as numbers 0 and 1
    write_csv(tmp_path / "csv" / "records.csv", header, (
        [*row[:-1], code] for row, code in zip(rows, codes, strict=True)))
    columns = {name: [float(row[i]) for row in rows] for i, name in enumerate(header[:-1])}
    (tmp_path / "parquet").mkdir()
    parquet.write_table(pyarrow.table({**columns, LABEL: codes}),
                        tmp_path / "parquet" / "part-0.parquet")
    as_csv = task.client_data(client(tmp_path / "csv", "b"),
                              settings(federation, classes=[0, 1]))
    as_parquet = task.client_data(client(tmp_path / "parquet", "b"),
                                  settings(federation, classes=["0", "1.0"],
                                           files="*.parquet"))
    for field in ("train_x", "train_y", "val_x", "val_y", "mean", "mean_of_squares"):
        assert torch.equal(getattr(as_csv, field), getattr(as_parquet, field)), field
    assert int(as_parquet.train_y.sum() + as_parquet.val_y.sum()) == sum(codes)
