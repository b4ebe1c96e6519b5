"""Server optimizers over the mean delta: FedAvgM (Hsu et al. 2019) and FedAdagrad, FedAdam,
FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

The mean client delta is the pseudo-gradient; the server takes one optimizer step with it.
As in the paper, the adaptive methods use no bias correction and start the second moment at
``tau**2``. Their moments are flat float32 vectors on the strategy's device.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedkube.federation.strategies.base import Fold, MeanFold, Strategy


class ServerOptimizer(Strategy):
    """A strategy whose step keeps named moment vectors between rounds."""

    default_learning_rate = 0.1
    moments: tuple[str, ...] = ()

    def __init__(
        self, *, device: torch.device, server_learning_rate: float | None, **privacy: Any
    ) -> None:
        super().__init__(device=device, **privacy)
        self.learning_rate = (
            self.default_learning_rate if server_learning_rate is None else server_learning_rate
        )
        self._state: dict[str, Tensor] = {}

    def new_fold(self, size: int, max_updates: int) -> Fold:
        return MeanFold(size, self.device)

    def step(self, delta: Tensor) -> Tensor:
        if not self._state:
            self._state = {name: self._initial(name, delta) for name in self.moments}
        elif self._state[self.moments[0]].shape != delta.shape:
            raise ValueError(
                f"{self.name}: the model has {delta.numel()} parameters but the server "
                f"optimizer state was built for {self._state[self.moments[0]].numel()}"
            )
        # A new tensor: the direction may be a moment, which the round must not change.
        return self.update(delta).mul(self.learning_rate)

    def _initial(self, name: str, delta: Tensor) -> Tensor:
        return torch.zeros_like(delta)

    @abstractmethod
    def update(self, delta: Tensor) -> Tensor:
        """Advance the moments with this round's pseudo-gradient; return the step direction."""

    def _extra_state(self) -> dict[str, Any]:
        return {"moments": {name: t.cpu() for name, t in self._state.items()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._state = {
            name: t.to(self.device, torch.float32) for name, t in state["moments"].items()
        }


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = beta * m + delta``; ``x += lr * m``."""

    name = "fedavgm"
    default_learning_rate = 1.0
    moments = ("momentum",)

    def __init__(self, *, server_momentum: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.momentum = server_momentum

    def update(self, delta: Tensor) -> Tensor:
        return self._state["momentum"].mul_(self.momentum).add_(delta)


class _Adaptive(ServerOptimizer):
    """Shared first moment and step of FedAdagrad, FedAdam and FedYogi."""

    moments = ("m", "v")

    def __init__(
        self, *, tau: float, beta1: float = 0.0, beta2: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def _initial(self, name: str, delta: Tensor) -> Tensor:
        return torch.full_like(delta, self.tau**2 if name == "v" else 0.0)

    def update(self, delta: Tensor) -> Tensor:
        m, v = self._state["m"], self._state["v"]
        m.mul_(self.beta1).add_(delta, alpha=1 - self.beta1)
        self.second_moment_(v, delta.square())
        return m / (v.sqrt() + self.tau)

    @abstractmethod
    def second_moment_(self, v: Tensor, squared: Tensor) -> None:
        """Advance the second moment ``v`` in place with the squared pseudo-gradient."""


class FedAdagrad(_Adaptive):
    """``v += delta^2``, without first-moment decay (beta1 = 0): the step is the delta itself."""

    name = "fedadagrad"

    def second_moment_(self, v: Tensor, squared: Tensor) -> None:
        v.add_(squared)


class FedAdam(_Adaptive):
    """``v = beta2 * v + (1 - beta2) * delta^2``."""

    name = "fedadam"

    def second_moment_(self, v: Tensor, squared: Tensor) -> None:
        v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)


class FedYogi(_Adaptive):
    """``v -= (1 - beta2) * delta^2 * sign(v - delta^2)``: additive, so v adapts slowly."""

    name = "fedyogi"

    def second_moment_(self, v: Tensor, squared: Tensor) -> None:
        v.sub_(squared * torch.sign(v - squared), alpha=1 - self.beta2)
