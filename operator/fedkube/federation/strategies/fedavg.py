"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): the example-weighted mean."""

from __future__ import annotations

from typing import Any

import torch

from fedkube.federation.strategies.base import Fold, MeanFold, Strategy


class FedAvg(Strategy):
    """The new global model is the mean of the client models, weighted by examples."""

    name = "fedavg"

    def new_fold(self, size: int, max_updates: int) -> Fold:
        return MeanFold(size, self.device)


class FedProx(FedAvg):
    """FedAvg on the server; clients add ``mu/2 * ||w - w_global||^2`` to their loss."""

    name = "fedprox"

    def __init__(self, *, device: torch.device, proximal_mu: float, **privacy: Any) -> None:
        super().__init__(device=device, **privacy)
        self._mu = proximal_mu

    @property
    def proximal_mu(self) -> float:
        return self._mu
