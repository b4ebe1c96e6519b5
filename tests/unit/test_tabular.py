"""The built-in tabular task on real records (scikit-learn's bundled wine data), in process."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedkube.api import PartitioningSpec
from fedkube.tasks.base import ClientContext, ConfigurationError
from fedkube.tasks.tabular import TabularConfig, task

CPU = torch.device("cpu")


def wine() -> tuple[list[str], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_wine

    data = load_wine()
    return [str(n) for n in data.feature_names], data.data, data.target


def write(path: Path, names: list[str], x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*names, "cultivar"])
        writer.writerows([*row, f"class_{label}"] for row, label in zip(x, y, strict=True))


def config(names: list[str], **extra: Any) -> dict[str, Any]:
    return {"label": "cultivar", "features": names,
            "classes": ["class_0", "class_1", "class_2"], **extra}


def client(directory: Path | None, site: str = "a", index: int = 0, replicas: int = 1,
           site_index: int = 0) -> ClientContext:
    return ClientContext(index, 3, PartitioningSpec(), site=site, site_index=site_index,
                         site_replicas=replicas, data_dir=directory)


@pytest.fixture
def sites(tmp_path: Path) -> tuple[list[str], dict[str, Path]]:
    names, x, y = wine()
    order = np.argsort(y, kind="stable")  # label skew: each site sees mostly one cultivar
    dirs = {}
    for site, part in zip(("a", "b", "c"), np.array_split(order, [40, 110]), strict=True):
        dirs[site] = tmp_path / site
        write(dirs[site] / "rows.csv", names, x[part], y[part])
    return names, dirs


def test_fedavg_of_the_buffers_is_the_statistics_of_all_sites_rows(
        sites: tuple[list[str], dict[str, Path]]) -> None:
    names, dirs = sites
    settings = config(names)
    data = [task.client_data(client(d, site), settings) for site, d in dirs.items()]
    states, weights = [], []
    for rows in data:
        model = task.model(settings)
        weights.append(task.train(model, rows, settings, device=CPU).num_examples)
        states.append(model.state_dict())
    total = sum(weights)
    averaged = {k: sum(s[k] * w for s, w in zip(states, weights, strict=True)) / total
                for k in states[0]}
    every_row = torch.cat([rows.train_x for rows in data])
    torch.testing.assert_close(averaged["0.mean"], every_row.mean(dim=0))
    torch.testing.assert_close(averaged["0.mean_of_squares"], every_row.square().mean(dim=0),
                               rtol=1e-5, atol=1e-2)
    assert float(averaged["0.ready"]) == 1.0
    # The next round's model standardises every site's rows with the global statistics.
    model = task.model(settings)
    model.load_state_dict(averaged)
    standardized = model[0](every_row)
    torch.testing.assert_close(standardized.mean(dim=0), torch.zeros(len(names)), atol=1e-4,
                               rtol=0)


def test_a_site_trains_and_validates_on_its_own_rows(
        sites: tuple[list[str], dict[str, Path]]) -> None:
    names, dirs = sites
    settings = config(names, localEpochs=20, model="mlp", hidden=8)
    rows = task.client_data(client(dirs["b"], "b"), settings)
    assert len(rows.val_y) == round(0.2 * 70) and len(rows.train_y) == 70 - len(rows.val_y)
    model = task.model(settings)
    before = task.validate(model, rows, settings, device=CPU)
    task.train(model, rows, settings, device=CPU)
    after = task.validate(model, rows, settings, device=CPU)
    assert after.loss < before.loss and after.accuracy >= 0.9
    assert after.num_examples == len(rows.val_y)
    assert task.evaluate(model, settings, device=CPU) is None  # no central test set


def test_clients_of_one_site_take_disjoint_rows(
        sites: tuple[list[str], dict[str, Path]]) -> None:
    names, dirs = sites
    settings = config(names, validationFraction=0.0)
    parts = [task.client_data(client(dirs["c"], "c", replicas=2, site_index=i), settings)
             for i in range(2)]
    rows = [{tuple(r.tolist()) for r in part.train_x} for part in parts]
    assert rows[0].isdisjoint(rows[1])
    assert len(rows[0]) + len(rows[1]) == 68


def test_bad_settings_and_files_name_the_problem(
        sites: tuple[list[str], dict[str, Path]], tmp_path: Path) -> None:
    names, dirs = sites
    with pytest.raises(ConfigurationError, match="reads each site's own files"):
        task.client_data(client(None), config(names))
    with pytest.raises(ConfigurationError, match="unknown keys epochs"):
        TabularConfig.of(config(names, epochs=3))
    with pytest.raises(ConfigurationError, match="features must list"):
        TabularConfig.of({"label": "cultivar", "classes": ["x", "y"]})
    with pytest.raises(ConfigurationError, match=re.escape("rows.csv has no column prolin ")):
        task.client_data(client(dirs["a"]), config([*names[:-1], "prolin"]))
    unknown_label = re.escape("rows.csv, row 1: label 'class_0' is not in")
    with pytest.raises(ConfigurationError, match=unknown_label):
        task.client_data(client(dirs["a"]), {**config(names), "classes": ["class_1", "class_2"]})
    with pytest.raises(ConfigurationError, match=r"no file in \S+ matches"):
        task.client_data(client(tmp_path / "a"), config(names, files="*.parquet"))


def test_parquet_files_are_read_like_csv(tmp_path: Path) -> None:
    pyarrow = pytest.importorskip("pyarrow", reason="pyarrow reads Parquet; not installed")
    import pyarrow.parquet as parquet

    names, x, y = wine()
    (tmp_path / "p").mkdir()
    parquet.write_table(pyarrow.table({**{n: x[:30, i] for i, n in enumerate(names)},
                                       "cultivar": [f"class_{v}" for v in y[:30]]}),
                        tmp_path / "p" / "rows.parquet")
    settings = config(names, files="*.parquet", validationFraction=0.0)
    rows = task.client_data(client(tmp_path / "p"), settings)
    torch.testing.assert_close(rows.train_x.sort(dim=0).values,
                               torch.tensor(x[:30], dtype=torch.float32).sort(dim=0).values)
