"""The built-in task: an MLP on scikit-learn's bundled handwritten digits (no download).

1797 8x8 images, scaled to [0, 1]; a fixed 20% test split (by ``seed``) is held out for
:meth:`DigitsTask.evaluate`, and the rest is partitioned among the clients.

``spec.task.config`` keys: ``hidden`` (64), ``lr`` (0.1), ``localEpochs`` (1),
``batchSize`` (32), ``momentum`` (0.0), ``seed`` (0).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
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
from fedkube.tasks.partition import partition

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsConfig:
    """The task's settings, read from ``spec.task.config``."""

    hidden: int = 64
    lr: float = 0.1
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.0
    seed: int = 0

    _KEYS = {
        "hidden": ("hidden", int, 1),
        "lr": ("lr", float, 0.0),
        "localEpochs": ("local_epochs", int, 1),
        "batchSize": ("batch_size", int, 1),
        "momentum": ("momentum", float, 0.0),
        "seed": ("seed", int, 0),
    }

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> DigitsConfig:
        unknown = sorted(set(config) - set(cls._KEYS))
        if unknown:
            raise ConfigurationError(
                f"spec.task.config has unknown keys {', '.join(unknown)} for the digits task: "
                f"it takes {', '.join(cls._KEYS)}"
            )
        return cls(**{field: config_number(config[key], key, kind, minimum)
                      for key, (field, kind, minimum) in cls._KEYS.items() if key in config})


@dataclass(frozen=True)
class ClientData:
    """One client's training samples. Their order each epoch comes from torch's global
    generator, which the client seeds for every round (reproducible jobs)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def _split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train features, train labels, test features, test labels (cached per seed)."""
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = np.split(order, [int(TEST_FRACTION * len(labels))])
    x = torch.from_numpy(features / 16.0).float()
    y = torch.from_numpy(labels).long()
    return x[train], y[train], x[test], y[test]


class DigitsTask:
    """An MLP ``64 -> hidden -> 10`` trained with SGD on the digits data."""

    def model(self, config: Mapping[str, Any]) -> nn.Module:
        settings = DigitsConfig.of(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            return nn.Sequential(
                nn.Linear(64, settings.hidden), nn.ReLU(), nn.Linear(settings.hidden, 10)
            )

    def client_data(self, client: ClientContext, config: Mapping[str, Any]) -> ClientData:
        """The client's part of the bundled training set, split by ``client.partitioning``
        (the digits are bundled: a site's ``data_dir`` is not read)."""
        index, num_clients = client.index, client.num_clients
        if not 0 <= index < num_clients:
            raise ValueError(f"client index {index} is outside 0..{num_clients - 1}")
        settings = DigitsConfig.of(config)
        features, labels, _, _ = _split(settings.seed)
        mine = torch.from_numpy(partition(labels.numpy(), num_clients, client.partitioning)[index])
        return ClientData(features[mine], labels[mine])

    def train(
        self,
        model: nn.Module,
        data: ClientData,
        config: Mapping[str, Any],
        *,
        device: torch.device,
        proximal_mu: float = 0.0,
    ) -> TrainResult:
        settings = DigitsConfig.of(config)
        model.to(device).train()
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum
        )
        features, labels = data.features.to(device), data.labels.to(device)
        total, batches = 0.0, 0
        for _ in range(settings.local_epochs):
            order = torch.randperm(len(data)).to(device)
            for batch in torch.split(order, settings.batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(features[batch]), labels[batch])
                if anchor:
                    drift = sum(
                        (p - a).square().sum()
                        for p, a in zip(model.parameters(), anchor, strict=True)
                    )
                    loss = loss + proximal_mu / 2 * drift
                torch.autograd.backward(loss)
                optimizer.step()
                total += loss.item()
                batches += 1
        return TrainResult(num_examples=len(data), metrics={"loss": total / max(batches, 1)})

    def evaluate(
        self, model: nn.Module, config: Mapping[str, Any], *, device: torch.device
    ) -> EvalResult:
        settings = DigitsConfig.of(config)
        _, _, features, labels = _split(settings.seed)
        model.to(device).eval()
        with torch.no_grad():
            logits = model(features.to(device))
            labels = labels.to(device)
            loss = F.cross_entropy(logits, labels).item()
            accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
        return EvalResult(loss=loss, accuracy=accuracy, num_examples=len(labels))


task = DigitsTask()
