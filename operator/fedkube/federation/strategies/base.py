"""The strategy protocol: a strategy opens one :class:`Round` per federated round.

A round flattens the global model into one float32 vector on the strategy's device, and
folds each client update in as it arrives: the update is checked, copied into a buffer the
strategy's *fold* lends (a scratch vector for the mean-based strategies, the next row of a
preallocated stack for the robust ones), turned into a delta to the global model, clipped,
and committed. A rejected update leaves the round as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedkube.api.runtime import ConfigurationError
from fedkube.federation.strategies.layout import FlatLayout, UpdateRejected
from fedkube.federation.strategies.privacy import GaussianNoise, clip_


class Fold(ABC):
    """Where a round keeps the deltas it accepted (sized once, when the round opens)."""

    @abstractmethod
    def buffer(self) -> Tensor:
        """A vector the next update's delta is written into; not yet accepted."""

    @abstractmethod
    def commit(self, weight: float) -> None:
        """Accept the delta last written into :meth:`buffer`."""

    @abstractmethod
    def finish(self) -> Tensor:
        """The aggregated delta of the accepted updates."""


class MeanFold(Fold):
    """Weighted mean of deltas in one accumulator: memory independent of the client count."""

    def __init__(self, size: int, device: torch.device) -> None:
        self._scratch = torch.empty(size, dtype=torch.float32, device=device)
        self._sum = torch.zeros(size, dtype=torch.float32, device=device)
        self._weight = 0.0

    def buffer(self) -> Tensor:
        return self._scratch

    def commit(self, weight: float) -> None:
        self._sum.add_(self._scratch, alpha=weight)
        self._weight += weight

    def finish(self) -> Tensor:
        return self._sum.div_(self._weight)


class StackFold(Fold):
    """All deltas of a round as rows of one preallocated ``[max_updates, size]`` tensor."""

    def __init__(self, size: int, max_updates: int, device: torch.device, combine: Any) -> None:
        self._rows = torch.empty((max_updates, size), dtype=torch.float32, device=device)
        self._count = 0
        self._combine = combine

    def buffer(self) -> Tensor:
        if self._count == self._rows.shape[0]:
            raise UpdateRejected(f"the round already holds its {self._count} sampled updates")
        return self._rows[self._count]

    def commit(self, weight: float) -> None:
        self._count += 1

    def finish(self) -> Tensor:
        combined: Tensor = self._combine(self._rows[: self._count])
        return combined


class Round:
    """One round's aggregation: ``add`` each update as it arrives, then ``result`` once.

    Non-floating tensors (BatchNorm's ``num_batches_tracked`` and the like: counters and
    flags, which no average makes sense of) become the element-wise maximum of the global's
    and the accepted updates' values, so counters keep growing.

    Results live on the strategy's device, in the global state's dtypes and key order.
    """

    def __init__(
        self, strategy: Strategy, global_state: Mapping[str, Tensor], max_updates: int
    ) -> None:
        if max_updates < 1:
            raise ValueError(f"max_updates must be at least 1, got {max_updates}")
        device = strategy.device
        self._strategy = strategy
        self._layout = FlatLayout.of(global_state)
        self._global = torch.empty(self._layout.size, dtype=torch.float32, device=device)
        self._layout.flatten_into(global_state, self._global)
        self._others = {
            key: global_state[key].to(device, copy=True) for key in self._layout.others
        }
        self._fold = strategy.new_fold(self._layout.size, max_updates)
        self._done = False
        self.count = 0
        """Updates accepted so far."""

    def add(self, update_state: Mapping[str, Tensor], num_examples: int) -> None:
        """Fold one client's full model state in, or raise :class:`UpdateRejected`."""
        if self._done:
            raise RuntimeError("the round's result was already taken; open a new round")
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise UpdateRejected(f"num_examples must be an integer, got {num_examples!r}")
        if num_examples < 1:
            raise UpdateRejected(f"num_examples must be at least 1, got {num_examples}")
        self._layout.check(update_state)
        delta = self._layout.flatten_into(update_state, self._fold.buffer())
        # NaN and infinities propagate into the sum: one pass without a mask tensor, ~30x
        # faster than isfinite().all() on CPU. Only values near float32's limit (~3e38),
        # garbage in any model, are rejected besides.
        if not bool(torch.isfinite(delta.sum())):
            raise UpdateRejected("the update holds NaN or infinite values")
        delta.sub_(self._global)
        strategy = self._strategy
        if strategy.clip_norm is not None:
            clip_(delta, strategy.clip_norm)
        # The noise bounds one client's influence on the *sum*, so with noise every client
        # counts once; weighting by examples would let a large client exceed the bound.
        self._fold.commit(1.0 if strategy.noise_multiplier > 0 else float(num_examples))
        for key, value in self._others.items():
            torch.maximum(value, update_state[key].to(value.device), out=value)
        self.count += 1

    def result(self) -> dict[str, Tensor]:
        """The new global state; the round is spent afterwards."""
        if self.count == 0:
            raise RuntimeError("no update was accepted this round; there is nothing to aggregate")
        if self._done:
            raise RuntimeError("the round's result was already taken; open a new round")
        self._done = True
        strategy = self._strategy
        delta = self._fold.finish()
        if strategy.noise_multiplier > 0:
            assert strategy.clip_norm is not None  # checked when the strategy was built
            strategy.noise.add_(delta, strategy.noise_multiplier * strategy.clip_norm / self.count)
        new_global = strategy.step(self._global, delta)
        return self._layout.unflatten(new_global, self._others)


class Strategy(ABC):
    """How updates become the next global model; holds the state that outlives a round."""

    name: ClassVar[str]

    def __init__(
        self,
        *,
        device: torch.device,
        clip_norm: float | None = None,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if noise_multiplier > 0 and clip_norm is None:
            raise ValueError(
                "noise is scaled by the clipping norm: set privacy.clipNorm when "
                "privacy.noiseMultiplier is above 0"
            )
        self.device = device
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.noise = GaussianNoise(device, seed)

    @property
    def proximal_mu(self) -> float:
        """Weight of the clients' proximal term; 0 except for FedProx."""
        return 0.0

    def new_round(self, global_state: Mapping[str, Tensor], max_updates: int) -> Round:
        """Open a round for up to ``max_updates`` updates (the clients sampled)."""
        return Round(self, global_state, max_updates)

    @abstractmethod
    def new_fold(self, size: int, max_updates: int) -> Fold:
        """The buffers a round of this strategy keeps its accepted deltas in."""

    def step(self, global_flat: Tensor, delta: Tensor) -> Tensor:
        """The next global vector from the aggregated delta (plain averaging by default)."""
        return global_flat.add_(delta)

    def state_dict(self) -> dict[str, Any]:
        """What must survive an aggregator restart (tensors on CPU and plain values)."""
        return {"strategy": self.name, "noise": self.noise.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, e.g. from a checkpoint."""
        if state.get("strategy") != self.name:
            raise ConfigurationError(
                f"the checkpoint holds state of strategy {state.get('strategy')!r}, not "
                f"{self.name!r}: spec.strategy.name changed since it was written"
            )
        self.noise.load_state_dict(state["noise"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None
