"""Byzantine-robust strategies: coordinate-wise median and trimmed mean (Yin et al. 2018),
Krum and Multi-Krum (Blanchard et al. 2017).

They need every update of a round at once, so a round keeps the deltas as rows of one
preallocated ``[clients sampled, parameters]`` tensor. Updates count equally, whatever their
number of examples: weighting would let one client with a large claimed count win.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fedkube.federation.strategies.base import Fold, StackFold, Strategy

#: Elements sorted at once by the coordinate-wise strategies: bounds their working copy (and
#: on a GPU the sort's values and int64 indices) to a few MB, whatever the model size.
_SORT_ELEMENTS = 1 << 18


class _Stacked(Strategy):
    """Keeps a round's deltas stacked; subclasses combine the rows into one delta."""

    def new_fold(self, size: int, max_updates: int) -> Fold:
        return StackFold(size, max_updates, self.device, self.combine, self.stack_memory_bytes)

    @abstractmethod
    def combine(self, rows: Tensor) -> Tensor:
        """One delta from the ``[n, parameters]`` accepted deltas."""


def _sorted_rows(values: Tensor) -> Tensor:
    """``values`` (contiguous, 2-D) with each row sorted; in place on the CPU."""
    if values.device.type == "cpu":
        # numpy's vectorized sort orders rows of a few dozen float32 values ~10x faster
        # than torch's on one CPU thread; on a GPU torch's sort is the fast one.
        values.numpy().sort(axis=1)
        return values
    return values.sort(dim=1).values


def _by_sorted_columns(rows: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """One value per column of ``rows``: ``reduce`` of the column's sorted values.

    ``reduce`` gets a ``[columns, n]`` tensor, one column's values per row in ascending
    order, and reduces along dimension 1: sorting contiguous rows beats sorting down
    columns. Columns are taken a slice at a time to bound the working copy.
    """
    n, size = rows.shape
    out = torch.empty(size, dtype=rows.dtype, device=rows.device)
    width = max(1, _SORT_ELEMENTS // n)
    for start in range(0, size, width):
        columns = rows[:, start : start + width].T.contiguous()
        out[start : start + width] = reduce(_sorted_rows(columns))
    return out


class FedMedian(_Stacked):
    """Coordinate-wise median (the mean of the two middle values for an even count)."""

    name = "fedmedian"

    def combine(self, rows: Tensor) -> Tensor:
        n = rows.shape[0]
        low, high = (n - 1) // 2, n // 2
        return _by_sorted_columns(rows, lambda s: (s[:, low] + s[:, high]) / 2)


class TrimmedMean(_Stacked):
    """Coordinate-wise mean after cutting ``int(trim_fraction * n)`` values at each end."""

    name = "trimmedmean"

    def __init__(self, *, trim_fraction: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trim_fraction = trim_fraction

    def combine(self, rows: Tensor) -> Tensor:
        n = rows.shape[0]
        cut = int(self.trim_fraction * n)
        return _by_sorted_columns(rows, lambda s: s[:, cut : n - cut].mean(dim=1))


def krum_scores(rows: Tensor, byzantine: int) -> Tensor:
    """Each row's sum of squared distances to its ``n - f - 2`` nearest other rows."""
    n = rows.shape[0]
    # The Gram matrix is one matmul; deltas are small, so float32 cancellation stays mild.
    gram = rows @ rows.T
    squared_norms = gram.diagonal()
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp_(min=0)
    distances.fill_diagonal_(float("inf"))
    neighbours = min(max(1, n - byzantine - 2), n - 1)
    return distances.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


class Krum(_Stacked):
    """The single update closest to its ``n - f - 2`` nearest neighbours."""

    name = "krum"

    def __init__(self, *, byzantine_clients: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.byzantine = byzantine_clients

    def selected(self, n: int) -> int:
        """How many best-scored updates are averaged."""
        return 1

    def combine(self, rows: Tensor) -> Tensor:
        n = rows.shape[0]
        if n == 1:
            return rows[0].clone()
        best = krum_scores(rows, self.byzantine).topk(self.selected(n), largest=False).indices
        # Summed a row at a time: rows[best] would copy the selected rows, nearly the whole
        # stack for Multi-Krum, out of a memory-mapped one.
        total = torch.zeros_like(rows[0])
        for index in best.tolist():
            total.add_(rows[index])
        return total.div_(len(best))


class MultiKrum(Krum):
    """The unweighted mean of the ``m`` best Krum-scored updates (default ``m = n - f``)."""

    name = "multikrum"

    def __init__(self, *, krum_select: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.krum_select = krum_select

    def selected(self, n: int) -> int:
        m = n - self.byzantine if self.krum_select is None else self.krum_select
        return min(max(1, m), n)
