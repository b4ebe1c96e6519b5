"""The built-in tabular task: a site federates its own CSV or Parquet files, no Python needed.

Each client reads the files in its site's ``data_dir`` that match ``files``. It keeps the
``features`` columns (in that order) and the ``label`` column, and holds out a seeded
validation split for federated evaluation. The model is a logistic regression or a small MLP
behind a :class:`Standardize` layer.

Feature standardisation is federated, and no row leaves a site. The layer's buffers hold
the per-feature mean and mean of squares plus a ``ready`` flag, so they travel in the
state dict. A client trains with the statistics it received. In the first round nothing has
been aggregated yet (``ready`` < 0.5), so it trains with its own training rows' statistics.
After training, each client writes its own training rows' statistics into the buffers, with
``ready`` = 1. FedAvg weights each update by :attr:`TrainResult.num_examples`, the client's
training rows, so its average of those buffers is exactly the mean and mean of squares over
the training rows of every client in the round. The next round trains with these, and so do
:meth:`TabularTask.validate` and anyone who loads the saved model (``forward`` standardises
whenever ``ready`` is set). The variance is ``meanOfSquares - mean**2``.

The statistics are exact only under plain example-weighted averaging (``fedavg`` and
``fedprox``), with float32 transfers (the default) and with every client training in the
round. Otherwise they are approximate:

* The server optimisers (``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``) take a step
  towards the pooled statistics rather than landing on them. ``ready`` rises the same way.
  The buffers settle on the pooled values over the rounds, and until ``ready`` passes 0.5
  the clients keep training with their own statistics.
* Robust strategies (``fedmedian``, ``trimmedmean``, ``krum``, ``multikrum``) produce a robust
  combination of the sites' statistics, not their pooled value.
* With central DP, every client counts once, and noise is added to the buffers as well.
  Update clipping (``privacy.clipNorm``) also counts the statistics' change towards the
  norm. Raw features far from unit scale then swamp the weights in the clipped update, so
  pre-scale such columns when you clip.
* With client sampling (``fractionFit`` < 1), each round's statistics are those of the
  round's participants.
* ``transport.updateDtype`` ``bfloat16`` keeps about three significant digits of the
  statistics. ``float16`` overflows for features above about 256 in magnitude (their
  squares pass 65504), and the aggregator then rejects the update.

``spec.task.config`` keys:

* ``label`` (the label column's name), ``features`` (the feature columns' names, in the
  model's input order) and ``classes`` (the label values, strings or numbers, in the model's
  output order): all three are required.
* ``files``: a glob relative to the site's data directory, ``"*.csv"`` by default.
  ``.parquet`` files need pyarrow.
* ``model``: ``logistic`` (the default) or ``mlp``. ``hidden`` (32) is the MLP's hidden
  width.
* ``optimizer``: ``sgd`` (the default) or ``adam``. Adam's moments start afresh each round and
  are not federated. On sites whose label mixes differ a lot, Adam drifts more than SGD.
* ``lr``: 0.1 for sgd, 0.01 for adam.
* ``localEpochs`` (1), ``batchSize`` (32), ``validationFraction`` (0.2) and ``seed`` (0).
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedkube.tasks.base import (
    ClientContext,
    ConfigurationError,
    EvalResult,
    TrainResult,
    config_number,
)

#: Smallest variance a feature is divided by (a constant column stays finite).
MIN_VARIANCE = 1e-8

#: Default learning rate of each optimizer (``spec.task.config.lr`` overrides it).
DEFAULT_LR = {"sgd": 0.1, "adam": 0.01}

_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class TabularConfig:
    """The task's settings, read from ``spec.task.config``."""

    label: str
    features: tuple[str, ...]
    classes: tuple[str, ...]
    files: str = "*.csv"
    model: str = "logistic"
    hidden: int = 32
    optimizer: str = "sgd"
    lr: float | None = None
    local_epochs: int = 1
    batch_size: int = 32
    validation_fraction: float = 0.2
    seed: int = 0

    _NUMBERS = {
        "hidden": ("hidden", int, 1),
        "lr": ("lr", float, 0.0),
        "localEpochs": ("local_epochs", int, 1),
        "batchSize": ("batch_size", int, 1),
        "validationFraction": ("validation_fraction", float, 0.0),
        "seed": ("seed", int, 0),
    }
    _CHOICES = {"model": ("logistic", "mlp"), "optimizer": ("sgd", "adam")}
    _KEYS = ("label", "features", "classes", "files", "model", "hidden", "optimizer", "lr",
             "localEpochs", "batchSize", "validationFraction", "seed")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> TabularConfig:
        unknown = sorted(set(config) - set(cls._KEYS))
        if unknown:
            raise ConfigurationError(
                f"spec.task.config has unknown keys {', '.join(map(str, unknown))} for the "
                f"tabular task: it takes {', '.join(cls._KEYS)}")
        label = config.get("label")
        if isinstance(label, str):
            label = label.strip()
        if not isinstance(label, str) or not label:
            raise ConfigurationError(
                "spec.task.config.label is required: set it to the label column's name")
        features = _listed(config, "features", "the feature columns' names, in order",
                           lambda v: str(v).strip())
        classes = _listed(config, "classes", "the label values, in the model's output order",
                          _label_text)
        if len(classes) < 2:
            raise ConfigurationError(
                f"spec.task.config.classes lists {len(classes)} label value: a classifier "
                "needs at least two")
        values: dict[str, Any] = {"label": label, "features": features, "classes": classes}
        for key, (field, kind, minimum) in cls._NUMBERS.items():
            if key in config:
                values[field] = config_number(config[key], key, kind, minimum)
        if values.get("lr", 1.0) <= 0:
            raise ConfigurationError(f"spec.task.config.lr must be above 0: {values['lr']}")
        if values.get("validation_fraction", 0.0) >= 1.0:
            raise ConfigurationError(
                "spec.task.config.validationFraction must be below 1 (the rest trains): "
                f"{values['validation_fraction']}")
        for key, choices in cls._CHOICES.items():
            if key in config:
                if config[key] not in choices:
                    raise ConfigurationError(
                        f"spec.task.config.{key} must be one of {', '.join(choices)}: "
                        f"{config[key]!r}")
                values[key] = config[key]
        if "files" in config:
            files = config["files"]
            if (not isinstance(files, str) or not files or Path(files).is_absolute()
                    or ".." in Path(files).parts):
                raise ConfigurationError(
                    f"spec.task.config.files must be a glob relative to the site's data "
                    f"directory, without '..', e.g. '*.csv' or 'train/*.parquet': {files!r}")
            values["files"] = files
        return cls(**values)


def _listed(config: Mapping[str, Any], key: str, what: str, spell: Any) -> tuple[str, ...]:
    value = config.get(key)
    if value is None:
        raise ConfigurationError(f"spec.task.config.{key} is required: list {what}")
    if not isinstance(value, list | tuple) or not value or not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        raise ConfigurationError(
            f"spec.task.config.{key} must be a non-empty list of {what}: {value!r}")
    names = tuple(spell(v) for v in value)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigurationError(
            f"spec.task.config.{key} lists {', '.join(map(repr, twice))} more than once")
    return names


def _label_text(value: Any) -> str:
    """A label value as one string, whether a file or ``classes`` spells it as a number or
    text: 1, 1.0, "1" and "1.0" are all "1"."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return repr(number) if np.isfinite(number) else text


class Standardize(nn.Module):
    """``(x - mean) / sqrt(meanOfSquares - mean**2)``. The statistics live in float32
    buffers, so they travel in the state dict and FedAvg averages them (see the module
    docstring). The layer is the identity until ``ready`` > 0.5."""

    mean: torch.Tensor
    mean_of_squares: torch.Tensor
    ready: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("mean_of_squares", torch.ones(features))
        self.register_buffer("ready", torch.zeros(()))

    @property
    def is_ready(self) -> bool:
        """Whether the buffers hold statistics (an average of the clients' 1.0 flags)."""
        return bool(self.ready > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_ready:
            return x
        variance = (self.mean_of_squares - self.mean.square()).clamp_min(MIN_VARIANCE)
        return (x - self.mean) / variance.sqrt()

    def hold(self, mean: torch.Tensor, mean_of_squares: torch.Tensor) -> None:
        """Hold these statistics, and mark them ready."""
        with torch.no_grad():
            self.mean.copy_(mean)
            self.mean_of_squares.copy_(mean_of_squares)
            self.ready.fill_(1.0)


@dataclass(frozen=True)
class SiteRows:
    """One client's rows: training and validation features (float32) and class indices,
    and the training rows' statistics. Their order each epoch comes from torch's global
    generator, which the client seeds for every round (reproducible jobs)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: torch.Tensor
    """Per-feature mean of the training rows (computed in float64, stored as float32)."""
    mean_of_squares: torch.Tensor
    """Per-feature mean of the squared training rows (likewise)."""

    def __len__(self) -> int:
        return len(self.train_y)


class TabularTask:
    """Logistic regression or a one-hidden-layer MLP on each site's own tabular files."""

    def model(self, config: Mapping[str, Any]) -> nn.Module:
        """``Standardize`` then the classifier, sized from ``features`` and ``classes``
        (the aggregator builds it without any data)."""
        settings = TabularConfig.of(config)
        inputs, outputs = len(settings.features), len(settings.classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            if settings.model == "mlp":
                head: nn.Module = nn.Sequential(
                    nn.Linear(inputs, settings.hidden), nn.ReLU(),
                    nn.Linear(settings.hidden, outputs))
            else:
                head = nn.Linear(inputs, outputs)
        return nn.Sequential(Standardize(inputs), head)

    def client_data(self, client: ClientContext, config: Mapping[str, Any]) -> SiteRows:
        """The client's share of its site's rows (every ``site_replicas``-th row when
        the site has several clients), split into training and validation rows."""
        settings = TabularConfig.of(config)
        if client.data_dir is None:
            raise ConfigurationError(
                "the tabular task reads each site's own files: give the job spec.sites with "
                "a data volume")
        if not 0 <= client.site_index < client.site_replicas:
            raise ValueError(f"site index {client.site_index} is outside "
                             f"0..{client.site_replicas - 1}")
        root = Path(client.data_dir)
        paths = sorted(p for p in root.glob(settings.files) if p.is_file())
        if not paths:
            raise ConfigurationError(
                f"no file in {root} (site {client.site}) matches spec.task.config.files "
                f"{settings.files!r}: fix the glob or the site's data volume")
        read = [_read(path, path.relative_to(root).as_posix(), settings) for path in paths]
        x_all = np.concatenate([x for x, _ in read])
        y_all = np.concatenate([y for _, y in read])
        mine = np.arange(client.site_index, len(y_all), client.site_replicas)
        key = zlib.crc32(f"{client.site}/{client.site_index}".encode())
        order = np.random.default_rng([settings.seed, key]).permutation(mine)
        held_out = round(settings.validation_fraction * len(order))
        val, train = order[:held_out], order[held_out:]
        if len(train) == 0:
            raise ConfigurationError(
                f"site {client.site}: client {client.site_index} of {client.site_replicas} "
                f"gets {len(order)} rows, none left to train on after the validation split: "
                "add rows or lower spec.task.config.validationFraction")
        mean = x_all[train].mean(axis=0)
        mean_of_squares = np.square(x_all[train]).mean(axis=0)
        overflow = np.flatnonzero(~np.isfinite(mean_of_squares.astype(np.float32)))
        if len(overflow):
            column = settings.features[overflow[0]]
            raise ConfigurationError(
                f"site {client.site}: feature {column!r} is too large for float32 statistics "
                "(its mean square overflows): rescale the column")
        x = torch.from_numpy(x_all).float()
        y = torch.from_numpy(y_all)
        return SiteRows(x[train], y[train], x[val], y[val],
                        torch.from_numpy(mean).float(), torch.from_numpy(mean_of_squares).float())

    def train(self, model: nn.Module, data: SiteRows, config: Mapping[str, Any], *,
              device: torch.device, proximal_mu: float = 0.0) -> TrainResult:
        """Train from the received weights and statistics. Then write this client's
        training statistics into the buffers, for FedAvg to average."""
        settings = TabularConfig.of(config)
        standardize = _standardize(model)
        received_ready = standardize.is_ready
        if not received_ready:  # the first round: no aggregate yet, so the site's own statistics
            standardize.hold(data.mean, data.mean_of_squares)
        model.to(device).train()
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
        optimizer: torch.optim.Optimizer = (
            torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
            if settings.optimizer == "adam"
            else torch.optim.SGD(model.parameters(), lr=settings.learning_rate))
        features, labels = data.train_x.to(device), data.train_y.to(device)
        total, batches = 0.0, 0
        for _ in range(settings.local_epochs):
            order = torch.randperm(len(labels)).to(device)
            for batch in torch.split(order, settings.batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(features[batch]), labels[batch])
                if anchor:
                    drift = sum((p - a).square().sum()
                                for p, a in zip(model.parameters(), anchor, strict=True))
                    loss = loss + proximal_mu / 2 * drift
                torch.autograd.backward(loss)
                optimizer.step()
                total += loss.item()
                batches += 1
        # This client's share of the global statistics: FedAvg's example-weighted mean of the
        # clients' buffers is the mean over all their training rows.
        standardize.hold(data.mean, data.mean_of_squares)
        return TrainResult(num_examples=len(labels), metrics={"loss": total / max(batches, 1)})

    def evaluate(self, model: nn.Module, config: Mapping[str, Any], *,
                 device: torch.device) -> EvalResult | None:
        """None: there is no central test set, because the sites' rows never reach the
        aggregator. Use federated evaluation (:meth:`validate`)."""
        return None

    def validate(self, model: nn.Module, data: SiteRows, config: Mapping[str, Any], *,
                 device: torch.device) -> EvalResult:
        """Loss and accuracy on this client's validation rows. The model standardises
        them with the statistics it carries."""
        if len(data.val_y) == 0:
            return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
        model.to(device).eval()
        with torch.no_grad():
            logits = model(data.val_x.to(device))
            labels = data.val_y.to(device)
            loss = F.cross_entropy(logits, labels).item()
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=len(labels))


def _standardize(model: nn.Module) -> Standardize:
    first = next(iter(model.children()), None)
    if not isinstance(first, Standardize):
        raise TypeError("the tabular task trains the models its model() builds "
                        "(a Standardize layer first)")
    return first


def _read(path: Path, name: str, settings: TabularConfig) -> tuple[np.ndarray, np.ndarray]:
    """The feature matrix (float64) and class indices of one file."""
    if path.suffix.lower() not in _SUFFIXES:
        raise ConfigurationError(
            f"{name}: the tabular task reads .csv and .parquet files; narrow "
            f"spec.task.config.files ({settings.files!r}) to those")
    wanted = [*settings.features, settings.label]
    columns: Mapping[str, Any]
    lines: list[int] | None = None  # a CSV row's line in the file (the header is line 1)
    if path.suffix.lower() == ".parquet":
        columns = _read_parquet(path, name, wanted)
    else:
        columns, lines = _read_csv(path, name, wanted)

    def where(row: int) -> str:
        return f"{name}, line {lines[row]}" if lines is not None else f"{name}, row {row + 1}"

    x = np.empty((len(columns[settings.label]), len(settings.features)), dtype=np.float64)
    for j, feature in enumerate(settings.features):
        values = columns[feature]
        try:
            x[:, j] = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            x[:, j] = [_float(value) for value in values]
        bad = np.flatnonzero(~np.isfinite(x[:, j]))
        if len(bad):
            raise ConfigurationError(
                f"{where(bad[0])}: feature {feature!r} is {values[bad[0]]!r}, not a finite "
                "number: the tabular task takes numeric features without missing values")
    index = {value: i for i, value in enumerate(settings.classes)}
    labels = columns[settings.label]
    spelled = {value: _label_text(value) for value in set(labels) if value is not None}
    y = np.empty(len(labels), dtype=np.int64)
    for row, value in enumerate(labels):
        position = index.get(spelled[value]) if value in spelled else None
        if position is None:
            raise ConfigurationError(
                f"{where(row)}: label {settings.label!r} is {value!r}, which is not in "
                f"spec.task.config.classes ({', '.join(settings.classes)}): add it there or "
                "drop the row")
        y[row] = position
    return x, y


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _missing(name: str, header: list[str], wanted: list[str]) -> None:
    missing = [column for column in wanted if column not in header]
    if missing:
        raise ConfigurationError(
            f"{name} has no column {', '.join(map(repr, missing))} (named in "
            f"spec.task.config.features or label); its columns are "
            f"{', '.join(map(repr, header[:30]))}{' ...' if len(header) > 30 else ''}")
    twice = sorted({column for column in wanted if header.count(column) > 1})
    if twice:
        raise ConfigurationError(
            f"{name} has more than one column named {', '.join(map(repr, twice))}: rename one")


def _read_csv(path: Path, name: str, wanted: list[str]) -> tuple[dict[str, list[str]], list[int]]:
    """The ``wanted`` columns of a CSV file with a header row, and each row's line number."""
    with path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = [column.strip() for column in next(reader, [])]
        if not header:
            raise ConfigurationError(f"{name} is empty: it needs a header row naming the columns")
        _missing(name, header, wanted)
        positions = [header.index(column) for column in wanted]
        columns: dict[str, list[str]] = {column: [] for column in wanted}
        lines: list[int] = []
        for cells in reader:
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise ConfigurationError(
                    f"{name}, line {reader.line_num}: {len(cells)} cells under a header of "
                    f"{len(header)} columns")
            for column, position in zip(wanted, positions, strict=True):
                columns[column].append(cells[position])
            lines.append(reader.line_num)
    return columns, lines


def _read_parquet(path: Path, name: str, wanted: list[str]) -> dict[str, np.ndarray]:
    """The ``wanted`` columns of a Parquet file."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigurationError(
            f"{name}: reading Parquet files needs pyarrow in the runtime image "
            "(pip install pyarrow), or give the site CSV files") from None
    _missing(name, parquet.read_schema(path).names, wanted)
    table = parquet.read_table(path, columns=wanted)
    return {column: table.column(column).to_numpy() for column in wanted}


task = TabularTask()
