"""The task interface: what a FederatedJob trains, as a ``module:attribute`` entrypoint.

A task owns the model, the data and the training loop; the runtime only moves weights.
``spec.task.config`` reaches every method unchanged, so a task reads its own settings there,
and raises :class:`ConfigurationError` for settings that cannot work: the pod then exits
with one line naming the setting, and the operator fails the job instead of retrying it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from fedkube.api import PartitioningSpec
from fedkube.api.runtime import ConfigurationError as ConfigurationError  # for task authors


@dataclass(frozen=True)
class ClientContext:
    """Who a client is and where its data lives: what a task needs to load that client's data.

    In a job with ``spec.sites`` each client belongs to a site and reads the site's own files
    from ``data_dir`` (the site's volume, mounted read-only); without sites (simulations,
    benchmarks) a task splits a dataset of its own among ``num_clients`` by ``partitioning``.
    """

    index: int
    """This client among all the job's clients, ``0 .. num_clients - 1``."""

    num_clients: int
    """Clients in the job (all sites together)."""

    partitioning: PartitioningSpec
    """How a task that splits one dataset among the clients should split it."""

    site: str | None = None
    """The site's name (its identity); None in a job without sites."""

    site_index: int = 0
    """This client among its site's clients, ``0 .. site_replicas - 1``."""

    site_replicas: int = 1
    """Clients of this site (they may share the site's files, e.g. by shard)."""

    data_dir: Path | None = None
    """The site's data directory; None in a job without sites."""


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training reports."""

    num_examples: int
    """Examples the client trained on (the FedAvg weight of its update)."""

    metrics: dict[str, float]
    """Training metrics, e.g. ``{"loss": 0.31}``."""


@dataclass(frozen=True)
class EvalResult:
    """A model's quality on held-out data: the task's test set, or a client's validation
    split."""

    loss: float
    accuracy: float
    num_examples: int


@runtime_checkable
class Task(Protocol):
    """Model, client data, local training and evaluation of one learning problem."""

    def model(self, config: Mapping[str, Any]) -> torch.nn.Module:
        """A freshly initialised model, the same for the same ``config["seed"]`` (default 0)."""
        ...

    def client_data(self, client: ClientContext, config: Mapping[str, Any]) -> Any:
        """The client's training (and validation) data; opaque to the runtime."""
        ...

    def train(
        self,
        model: torch.nn.Module,
        data: Any,
        config: Mapping[str, Any],
        *,
        device: torch.device,
        proximal_mu: float = 0.0,
    ) -> TrainResult:
        """Train ``model`` in place from its current (global) weights on ``data``.

        With ``proximal_mu > 0`` (FedProx) the loss gains ``mu/2 * ||w - w_global||^2``,
        ``w_global`` being the weights at call time.
        """
        ...

    def evaluate(
        self, model: torch.nn.Module, config: Mapping[str, Any], *, device: torch.device
    ) -> EvalResult | None:
        """Loss and accuracy of ``model`` on the task's central test set, on the aggregator;
        None when the task has none (the data stays at the sites). ``model`` holds the global
        model's own tensors (no copy is made for evaluation): evaluate it, do not change it."""
        ...


@runtime_checkable
class Validator(Protocol):
    """What a task adds for federated evaluation (``spec.evaluation``): the clients evaluate
    the global model on their own validation data and the aggregator combines their reports."""

    def validate(
        self, model: torch.nn.Module, data: Any, config: Mapping[str, Any], *,
        device: torch.device
    ) -> EvalResult:
        """Loss and accuracy of ``model`` on the validation part of ``data`` (what
        :meth:`Task.client_data` returned); ``num_examples`` weighs the report."""
        ...


def config_number(value: Any, key: str, kind: type, minimum: float) -> Any:
    """``spec.task.config.<key>`` as ``kind`` (int or float), at least ``minimum``; a
    :class:`ConfigurationError` naming the key otherwise (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and not float(value).is_integer()):
        what = "an integer" if kind is int else "a number"
        raise ConfigurationError(f"spec.task.config.{key} must be {what}: {value!r}")
    if value < minimum:
        raise ConfigurationError(f"spec.task.config.{key} must be at least {minimum}: {value}")
    return kind(value)


def load_task(entrypoint: str) -> Task:
    """Import the task named ``module:attribute`` (``spec.task.entrypoint``)."""
    module_name, sep, attribute = entrypoint.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigurationError(
            f"spec.task.entrypoint {entrypoint!r} is not 'module:attribute': "
            "write e.g. 'fedkube.tasks.digits:task'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigurationError(
            f"spec.task.entrypoint {entrypoint!r}: cannot import module {module_name!r} "
            f"({error}): install the task's package in the runtime image or fix the name"
        ) from error
    try:
        task = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(
            f"spec.task.entrypoint {entrypoint!r}: module {module_name!r} has no attribute "
            f"{attribute!r}: fix the name after the colon"
        ) from None
    if not isinstance(task, Task):
        missing = [
            name
            for name in ("model", "client_data", "train", "evaluate")
            if not callable(getattr(task, name, None))
        ]
        raise ConfigurationError(
            f"spec.task.entrypoint {entrypoint!r} is a {type(task).__name__}, not a task: "
            f"it lacks {', '.join(missing)}; point it at an object with model, client_data, "
            "train and evaluate (see fedkube.tasks.base.Task)"
        )
    return task
