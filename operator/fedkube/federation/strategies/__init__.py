"""Aggregation strategies in torch, on the aggregator's device (CUDA when it has one).

``build_strategy(name, ...)`` returns a :class:`Strategy`; each round,
``agg = strategy.new_round(global_state, max_updates)``, then ``agg.add(update, num_examples)``
for each client update as it arrives (a bad one raises :class:`UpdateRejected` and is not
folded in), then ``agg.result()`` for the new global state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fedkube.api import StrategyParams
from fedkube.api.types import parse_quantity
from fedkube.federation.strategies.adaptive import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedkube.federation.strategies.base import Round, Strategy
from fedkube.federation.strategies.fedavg import FedAvg, FedProx
from fedkube.federation.strategies.layout import UpdateIncomplete, UpdateRejected
from fedkube.federation.strategies.robust import FedMedian, Krum, MultiKrum, TrimmedMean

if TYPE_CHECKING:
    from fedkube.api import FederatedJobSpec

#: Each strategy and the ``StrategyParams`` fields it takes.
STRATEGIES: dict[str, tuple[type[Strategy], tuple[str, ...]]] = {
    "fedavg": (FedAvg, ()),
    "fedprox": (FedProx, ("proximal_mu",)),
    "fedavgm": (FedAvgM, ("server_learning_rate", "server_momentum")),
    "fedadagrad": (FedAdagrad, ("server_learning_rate", "tau")),
    "fedadam": (FedAdam, ("server_learning_rate", "beta1", "beta2", "tau")),
    "fedyogi": (FedYogi, ("server_learning_rate", "beta1", "beta2", "tau")),
    "fedmedian": (FedMedian, ()),
    "trimmedmean": (TrimmedMean, ("trim_fraction",)),
    "krum": (Krum, ("byzantine_clients",)),
    "multikrum": (MultiKrum, ("byzantine_clients", "krum_select")),
}


def build_strategy(
    name: str,
    *,
    device: torch.device | str = "cpu",
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    seed: int | None = None,
    stack_memory_bytes: int | None = None,
    **params: Any,
) -> Strategy:
    """The strategy ``name`` with ``params`` (snake_case ``StrategyParams`` fields).

    Parameters a strategy does not use are accepted and ignored, as in the resource; their
    values are validated with the resource's own rules. ``clip_norm`` and
    ``noise_multiplier`` turn on central differential privacy; ``seed`` makes its noise
    reproducible. The robust strategies keep a round's updates in a memory-mapped file when
    they would take more than ``stack_memory_bytes`` (no limit when None).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r} (spec.strategy.name): use one of {', '.join(STRATEGIES)}"
        )
    unknown = sorted(params.keys() - StrategyParams.model_fields.keys())
    if unknown:
        raise TypeError(
            f"unknown strategy parameters {', '.join(unknown)}: "
            f"spec.strategy.params takes {', '.join(StrategyParams.model_fields)}"
        )
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"privacy.clipNorm must be above 0, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"privacy.noiseMultiplier must be at least 0, got {noise_multiplier}")
    values = StrategyParams.model_validate(params)
    cls, fields = STRATEGIES[name]
    return cls(
        device=torch.device(device),
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        seed=seed,
        stack_memory_bytes=stack_memory_bytes,
        **{field: getattr(values, field) for field in fields},
    )


def build_strategy_from_spec(
    spec: FederatedJobSpec, *, device: torch.device | str = "cpu", seed: int | None = None
) -> Strategy:
    """The strategy a FederatedJob asks for, privacy included."""
    return build_strategy(
        spec.strategy.name,
        device=device,
        clip_norm=spec.privacy.clip_norm,
        noise_multiplier=spec.privacy.noise_multiplier,
        seed=seed,
        stack_memory_bytes=int(parse_quantity(spec.aggregator.stack_memory)),
        **spec.strategy.params.model_dump(by_alias=False),
    )


__all__ = [
    "STRATEGIES",
    "Round",
    "Strategy",
    "UpdateIncomplete",
    "UpdateRejected",
    "build_strategy",
    "build_strategy_from_spec",
]
