"""A round's moving parts as data: what was sent to whom, who answered, what was recorded.

No gRPC and no event loop: the aggregator fills these in, the tests read them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from fedkube.federation import transport
from fedkube.federation.strategies import Round
from fedkube.federation.strategies.base import ReceivedUpdate


def sample_size(connected: int, fraction_fit: float, min_clients: int) -> int:
    """Clients to sample: ``fractionFit`` of those connected, at least ``minClients``."""
    return min(connected, max(min_clients, math.ceil(fraction_fit * connected)))


def sample(connected: Collection[str], count: int, seed: str) -> set[str]:
    """``count`` of ``connected``, the same for the same seed and clients (reproducible jobs)."""
    return set(random.Random(seed).sample(sorted(connected), count))


@dataclass
class Dispatch:
    """A global model sent to sampled clients, to train or to evaluate, and who answered."""

    number: int
    """The round (being trained, or whose model is evaluated)."""
    sampled: set[str]
    metas: list[transport.TensorMeta]
    wire: dict[str, Tensor] | None
    """The model as it goes on the wire (:func:`~fedkube.federation.transport.encode`: the
    global model's own tensors when they travel in their dtype), until :meth:`close`. Each
    client's stream serializes its chunks as it sends them, so no serialized copy of the
    model is kept."""
    dispatched: set[str] = field(default_factory=set)
    """Sampled clients the model is being sent to."""
    receiving: set[str] = field(default_factory=set)
    """Clients whose answer is arriving now."""
    answered: set[str] = field(default_factory=set)
    examples: int = 0
    closed: bool = False

    @property
    def complete(self) -> bool:
        return self.answered >= self.sampled

    def close(self) -> None:
        """No client is sent this model any more: streams under way keep the model they
        took, and the dispatch lets go of it, so a finished round does not keep the previous
        global model alive beside the next one."""
        self.closed = True
        self.wire = None

    def due(self, client_id: str) -> bool:
        """Whether ``client_id`` is to be sent this model when it asks for a task: sampled,
        and neither answered nor answering. Also when it was sent the model before: a client
        asks only when it is idle, so one that asks again lost its copy or its answer (its
        download broke off, or its upload did) and would otherwise sit out the round while
        the round waits for its answer."""
        return (not self.closed and client_id in self.sampled
                and client_id not in self.answered and client_id not in self.receiving)

    def may_hand_over(self, old: str) -> bool:
        """Whether ``old``'s place may go to a new session of its client: not once it
        answered, nor while its answer is arriving."""
        return old in self.sampled and old not in self.answered and old not in self.receiving

    def hand_over(self, old: str, new: str) -> bool:
        """Give the place of ``old``, a client that restarted, to its new session ``new``
        when :meth:`may_hand_over`; whether it did. The restarted client then takes part in
        the round it was sampled into instead of costing the round an answer."""
        if not self.may_hand_over(old):
            return False
        self.sampled = self.sampled - {old} | {new}
        self.dispatched.discard(old)
        return True


@dataclass
class PendingUpdate:
    """An accepted update waiting for its turn to be folded."""

    update: ReceivedUpdate
    num_examples: int
    held_bytes: int
    """Of the aggregator's in-memory budget, released once folded."""


@dataclass
class TrainingRound(Dispatch):
    """One attempt at one round.

    Accepted updates are folded in :attr:`fold_order`, whatever order they arrive in, so that
    the aggregate is bit for bit the same in every run with the same updates (float addition
    does not associate). An update arriving before its predecessors answered waits in
    :attr:`pending`.
    """

    aggregation: Round | None = None
    fold_order: list[str] = field(default_factory=list)
    """The sampled clients by index."""
    folded: int = 0
    """How many of :attr:`fold_order` are done with (folded, or nothing to fold)."""
    pending: dict[str, PendingUpdate] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    """Clients whose update was rejected."""
    spill_until_fold: int = -1
    """:attr:`folded` when an upload last gave up waiting for memory: until the next fold,
    uploads spill what does not fit rather than wait."""

    def may_hand_over(self, old: str) -> bool:
        """Also after a rejected update: a client whose upload was dropped as stalled (its
        host went away without closing the connection) and that restarted sends the whole
        update again (only an accepted update counts, so no client counts twice)."""
        return old in self.sampled and old not in self.receiving and (
            old not in self.answered or old in self.failed)

    def hand_over(self, old: str, new: str) -> bool:
        handed = super().hand_over(old, new)
        if handed:
            self.fold_order = [new if c == old else c for c in self.fold_order]
        return handed
    deadline: float = math.inf
    """When the round closes (``time.monotonic``) unless every sampled client answered."""
    accepted: int = 0
    rejected: int = 0
    metric_sums: dict[str, float] = field(default_factory=dict)
    """Example-weighted sums of the clients' training metrics."""

    def record_accepted(self, num_examples: int, metrics: Mapping[str, float]) -> None:
        self.accepted += 1
        self.examples += num_examples
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value * num_examples


@dataclass(frozen=True)
class EvaluationSummary:
    """The sites' evaluation of one global model, example-weighted."""

    loss: float
    accuracy: float
    examples: int
    clients: int


@dataclass
class EvaluationRound(Dispatch):
    """Federated evaluation of one round's global model by sampled clients."""

    loss_sum: float = 0.0
    accuracy_sum: float = 0.0

    def record(self, num_examples: int, loss: float, accuracy: float) -> None:
        self.examples += num_examples
        self.loss_sum += loss * num_examples
        self.accuracy_sum += accuracy * num_examples

    def summary(self) -> EvaluationSummary | None:
        """None without any report."""
        if self.examples == 0:
            return None
        return EvaluationSummary(self.loss_sum / self.examples, self.accuracy_sum / self.examples,
                                 self.examples, len(self.answered))


@dataclass(frozen=True)
class RoundRecord:
    """One completed round, as ``history.json``, ``/history`` and checkpoints hold it."""

    round: int
    loss: float | None
    """The job's loss: central evaluation, or the sites' when there is no central test set."""
    accuracy: float | None
    clients: int
    """Updates accepted."""
    rejected: int
    sampled: int
    duration_seconds: float
    client_metrics: dict[str, float]
    """The clients' training metrics, example-weighted."""
    federated_evaluation: EvaluationSummary | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        evaluation = data.get("federated_evaluation")
        return cls(**{**data, "federated_evaluation": None if evaluation is None
                      else EvaluationSummary(**evaluation)})
