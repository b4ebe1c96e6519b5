"""Central differential privacy: per-update clipping and Gaussian noise on the aggregate.

This is DP-FedAvg with fixed clipping (McMahan et al., "Learning Differentially Private
Recurrent Language Models"): each client's delta is clipped to ``clip_norm`` in L2 over the
whole model, so one client changes the sum of deltas by at most ``clip_norm``, and noise of
standard deviation ``noise_multiplier * clip_norm`` is added to that sum. Privacy accounting
(epsilon) is left to the user.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class GaussianNoise:
    """Seeded Gaussian noise on the strategy's device; its state is checkpointed."""

    def __init__(self, device: torch.device, seed: int | None) -> None:
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self._device = device

    def add_(self, out: Tensor, std: float) -> Tensor:
        """Add N(0, std^2) to every element of ``out`` in place."""
        noise = torch.randn(
            out.shape, generator=self._generator, device=self._device, dtype=out.dtype
        )
        return out.add_(noise, alpha=std)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
