"""Flattening of model states into one float32 vector, and the checks updates must pass.

Every strategy works on one flat vector per model: a single ``add_``/``sort``/``matmul`` over
all parameters instead of one per tensor, and one preallocated buffer per role. Tensors that
are not floating point (e.g. BatchNorm's ``num_batches_tracked``) are not part of the vector.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class UpdateRejected(Exception):
    """A client update that does not fit the global model; it was not folded in."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpdateIncomplete(UpdateRejected):
    """An update stream that ended before the update did: its upload broke off (the client
    hung up, or its connection did), so the update may come again."""


@dataclass(frozen=True)
class Span:
    """Where one floating-point tensor lives in the flat vector."""

    key: str
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(frozen=True)
class FlatLayout:
    """The order, shapes and dtypes of a model state, as the global model defines them."""

    order: tuple[str, ...]
    """Keys in the global state's order (results keep it)."""

    spans: tuple[Span, ...]
    others: dict[str, tuple[torch.Size, torch.dtype]]
    """Non-floating tensors: kept out of the vector, combined by maximum (see Round)."""

    @classmethod
    def of(cls, state: Mapping[str, Tensor]) -> FlatLayout:
        spans: list[Span] = []
        others: dict[str, tuple[torch.Size, torch.dtype]] = {}
        offset = 0
        for key, tensor in state.items():
            if tensor.is_floating_point():
                spans.append(Span(key, offset, tensor.shape, tensor.dtype))
                offset += tensor.numel()
            else:
                others[key] = (tensor.shape, tensor.dtype)
        return cls(tuple(state), tuple(spans), others)

    @property
    def size(self) -> int:
        """Number of floating-point values in the model."""
        return self.spans[-1].offset + self.spans[-1].numel if self.spans else 0

    def check(self, update: Mapping[str, Tensor]) -> None:
        """Raise :class:`UpdateRejected` unless ``update`` has exactly this layout's tensors."""
        expected = {span.key for span in self.spans} | set(self.others)
        missing = sorted(expected - update.keys())
        if missing:
            raise UpdateRejected(f"missing tensors: {', '.join(missing[:5])}")
        unexpected = sorted(update.keys() - expected)
        if unexpected:
            raise UpdateRejected(f"unexpected tensors: {', '.join(unexpected[:5])}")
        for span in self.spans:
            self._check_tensor(span.key, update[span.key], span.shape, floating=True)
        for key, (shape, _) in self.others.items():
            self._check_tensor(key, update[key], shape, floating=False)

    @staticmethod
    def _check_tensor(key: str, tensor: object, shape: torch.Size, *, floating: bool) -> None:
        if not isinstance(tensor, Tensor):
            raise UpdateRejected(f"{key}: expected a tensor, got {type(tensor).__name__}")
        if tensor.shape != shape:
            raise UpdateRejected(
                f"{key}: shape {tuple(tensor.shape)} differs from the global {tuple(shape)}"
            )
        if tensor.is_floating_point() != floating:
            kind = "floating-point" if floating else "integer or boolean"
            raise UpdateRejected(f"{key}: dtype {tensor.dtype} is not {kind} like the global's")

    def unflatten(self, flat: Tensor, others: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A state dict in the global's key order and dtypes, floats taken from ``flat``."""
        floats = {
            span.key: flat[span.offset : span.offset + span.numel]
            .view(span.shape)
            .to(span.dtype)
            for span in self.spans
        }
        return {key: floats[key] if key in floats else others[key] for key in self.order}
