"""The strategy protocol: a strategy opens one :class:`Round` per federated round.

An update reaches a round as the pieces it arrived in (:class:`ReceivedUpdate`: views of the
received bytes, or of a state dict's tensors), each checked for NaN and infinities as it
lands, while it is still in cache. Once the whole update is in and valid, :meth:`Round.accept`
folds it in one pass: the mean-based strategies add ``weight * piece`` to one float32
accumulator (12 bytes moved per parameter: read the piece, read and write the sum), the
robust ones write ``piece - global`` into the next row of a preallocated stack. A rejected
or incomplete update was never folded, so it leaves no trace. Accumulating models rather
than deltas keeps the global model out of the per-update pass; ``Σw·x/Σw - global`` is the
same delta the strategies step with.
"""

from __future__ import annotations

import math
import mmap
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedkube.api.runtime import ConfigurationError
from fedkube.federation import transport
from fedkube.federation.spill import SpillFile
from fedkube.federation.strategies.layout import (
    FlatLayout,
    Span,
    UpdateIncomplete,
    UpdateRejected,
)
from fedkube.federation.strategies.privacy import GaussianNoise

#: Spilled pieces are read back this many bytes at a time when an update is folded.
SPILL_READ_BYTES = 4 << 20


@dataclass(frozen=True)
class _Spilled:
    """Values written to a spill file, read back a piece at a time when folded."""

    position: int
    count: int
    dtype: torch.dtype


@dataclass
class ReceivedUpdate:
    """One client's update, complete and checked, not yet folded. A context manager: leaving
    it releases what it holds in the spill file."""

    pieces: list[tuple[Span, int, Tensor | _Spilled]] = field(default_factory=list)
    """``(tensor, first element, values)`` covering every floating-point value once."""
    others: dict[str, Tensor] = field(default_factory=dict)
    """The non-floating tensors (counters and flags), whole."""
    spill: SpillFile | None = None
    regions: list[tuple[int, int]] = field(default_factory=list)
    """``(position, size)`` of what the update holds in :attr:`spill`."""

    def batches(self, buffer_bytes: int = SPILL_READ_BYTES
                ) -> Iterator[list[tuple[Span, int, Tensor]]]:
        """The pieces with their values, in lists that a fold takes in one call (a piece is
        chunk-sized, and a torch call per piece costs as much as a tenth of its data).

        Pieces held in memory come as they are; spilled ones are read back into one
        reusable buffer of ``buffer_bytes`` (the page cache stays out of the process's
        memory), so a list is valid only until the next is taken.
        """
        spilled = [values.count * values.dtype.itemsize for _, _, values in self.pieces
                   if isinstance(values, _Spilled)]
        # Never more than the update's spilled bytes (plus alignment): a small model's
        # updates must not each allocate the whole buffer.
        buffer_size = min(buffer_bytes, sum(spilled) + 64 * len(spilled))
        buffer = torch.empty(0, dtype=torch.uint8)
        used = 0
        batch: list[tuple[Span, int, Tensor]] = []
        for span, start, values in self.pieces:
            if isinstance(values, _Spilled):
                assert self.spill is not None
                size = values.count * values.dtype.itemsize
                if used + size > buffer.numel():
                    if batch:
                        yield batch
                        batch = []
                    used = 0
                    if size > buffer.numel():
                        buffer = torch.empty(max(size, buffer_size), dtype=torch.uint8)
                self.spill.read_into(buffer[used:used + size].numpy().data,
                                     values.position)
                values = buffer[used:used + size].view(values.dtype)
                used += -size % 64 + size  # the next piece starts cache-line aligned
            batch.append((span, start, values))
        if batch:
            yield batch

    def values(self) -> Iterator[tuple[Span, int, Tensor]]:
        """The pieces with their values, one at a time (see :meth:`batches`)."""
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        """Release the spill file's regions."""
        if self.spill is not None:
            for position, size in self.regions:
                self.spill.release(position, size)
            self.regions.clear()

    def __enter__(self) -> ReceivedUpdate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_num_examples(num_examples: int) -> None:
    """:class:`UpdateRejected` unless ``num_examples`` can weigh an update."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise UpdateRejected(f"num_examples must be an integer, got {num_examples!r}")
    if num_examples < 1:
        raise UpdateRejected(f"num_examples must be at least 1, got {num_examples}")


def _check_finite(values: Tensor) -> None:
    # NaN and infinities propagate into the sum: one pass without a mask tensor, ~30x faster
    # than isfinite().all() on CPU. Values near float32's limit (~3e38), garbage in any model,
    # are rejected besides, and so are float64 values that float32 cannot hold. The test is
    # on the Python float: a tensor op and its bool() would double the cost on a chunk.
    if not math.isfinite(values.sum(dtype=torch.float32).item()):
        raise UpdateRejected("the update holds NaN or infinite values")


class UpdateReader:
    """Turns one update's byte stream into a :class:`ReceivedUpdate`, a chunk at a time.

    Floating-point pieces stay views of their chunk (no copy); non-floating tensors, a few
    counters, are copied out. :class:`UpdateRejected` as soon as a chunk proves the update
    bad (wrong layout, NaN, too many bytes), so a bad update costs no more than its bytes.

    A chunk fed with a ``spill`` file is checked all the same, then written to that file
    instead of being kept: the caller's way to bound the memory that many uploads arriving at
    once hold, without making any of them wait. The update :meth:`finish` returns reads
    those pieces back from the file when it is folded.
    """

    def __init__(self, layout: FlatLayout, metas: list[transport.TensorMeta]) -> None:
        spans = {span.key: span for span in layout.spans}
        expected = list(layout.order)
        names = [meta.name for meta in metas]
        if names != expected:
            missing = sorted(set(expected) - set(names))
            unexpected = sorted(set(names) - set(expected))
            raise UpdateRejected(
                f"missing tensors: {', '.join(missing[:5])}" if missing else
                f"unexpected tensors: {', '.join(unexpected[:5])}" if unexpected else
                "tensors are not in the global model's order")
        self._targets: list[Span | Tensor] = []
        for meta in metas:
            shape = torch.Size(meta.shape)
            span = spans.get(meta.name)
            floating = meta.torch_dtype.is_floating_point
            wanted_shape, wanted_floating = (
                (span.shape, True) if span is not None else (layout.others[meta.name][0], False))
            if shape != wanted_shape:
                raise UpdateRejected(f"{meta.name}: shape {tuple(shape)} differs from the "
                                     f"global {tuple(wanted_shape)}")
            if floating != wanted_floating:
                kind = "floating-point" if wanted_floating else "integer or boolean"
                raise UpdateRejected(f"{meta.name}: dtype {meta.dtype} is not {kind} like the "
                                     "global's")
            self._targets.append(span if span is not None
                                 else torch.empty(shape, dtype=meta.torch_dtype))
        self._names = names
        self._stream = transport.StreamReader(metas)
        self._pieces: list[tuple[Span, int, Tensor | _Spilled]] = []
        self._spill: SpillFile | None = None
        self._regions: list[tuple[int, int]] = []
        self.held = 0
        """Bytes of received chunks held in memory."""

    @property
    def received(self) -> int:
        return self._stream.received

    def feed(self, chunk: bytes | memoryview, spill: SpillFile | None = None) -> None:
        try:
            pieces = self._stream.feed(chunk)
        except transport.TransportError as error:
            raise UpdateRejected(str(error)) from None
        # Where the chunk goes in the spill file: pieces are found by their stream position.
        shift = 0
        if spill is not None:
            self._spill = spill
            position = spill.write(chunk)
            self._regions.append((position, len(chunk)))
            shift = position - (self._stream.received - len(chunk))
        for piece in pieces:
            target = self._targets[piece.index]
            if not isinstance(target, Span):
                count = piece.values.numel()
                target.view(-1)[piece.start:piece.start + count].copy_(piece.values)
                continue
            _check_finite(piece.values)
            if spill is not None and piece.position is not None:
                self._pieces.append((target, piece.start, _Spilled(
                    piece.position + shift, piece.values.numel(), piece.values.dtype)))
            else:
                self._pieces.append((target, piece.start, piece.values))
        if spill is None:
            self.held += len(chunk)

    def finish(self) -> ReceivedUpdate:
        try:
            self._stream.close()
        except transport.TransportError as error:
            raise UpdateIncomplete(str(error)) from None
        others = {name: target for name, target in zip(self._names, self._targets, strict=True)
                  if isinstance(target, Tensor)}
        update = ReceivedUpdate(self._pieces, others, self._spill, self._regions)
        self._regions = []
        return update

    def close(self) -> None:
        """Release what an update that will not be finished holds in the spill file."""
        if self._spill is not None:
            for position, size in self._regions:
                self._spill.release(position, size)
            self._regions = []


class Fold(ABC):
    """Where a round keeps the updates it accepted (sized once, when the round opens)."""

    @abstractmethod
    def add(self, update: ReceivedUpdate, weight: float, scale: float,
            global_flat: Mapping[str, Tensor]) -> None:
        """Fold ``update`` in with ``weight``, its delta scaled by ``scale`` (clipping);
        ``UpdateRejected`` before changing anything when there is no room."""

    @abstractmethod
    def finish(self, global_flat: Mapping[str, Tensor], layout: FlatLayout) -> Tensor:
        """The aggregated delta of the accepted updates, as one flat float32 vector."""


class MeanFold(Fold):
    """Weighted mean in one accumulator: memory independent of the client count.

    It sums ``c·x`` (``c = weight · scale``) and the weights, so that the mean delta is
    ``(Σc·x - Σc·global) / Σweight``: the global model is read once per round, not per update.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self._sum = torch.zeros(size, dtype=torch.float32, device=device)
        self._weight = 0.0
        self._coefficient = 0.0

    def add(self, update: ReceivedUpdate, weight: float, scale: float,
            global_flat: Mapping[str, Tensor]) -> None:
        coefficient = weight * scale
        target = self._sum
        for batch in update.batches():
            # One call per batch, not per piece: pieces are chunk-sized, and a call per piece
            # cost ~7% of the fold (and .to() is not free even on the CPU).
            values = [v for _, _, v in batch]
            if target.device.type != "cpu":
                values = [v.to(target.device, non_blocking=True) for v in values]
            sums = [target[span.offset + start:span.offset + start + v.numel()]
                    for (span, start, _), v in zip(batch, values, strict=True)]
            torch._foreach_add_(sums, values, alpha=coefficient)
        self._weight += weight
        self._coefficient += coefficient

    def finish(self, global_flat: Mapping[str, Tensor], layout: FlatLayout) -> Tensor:
        delta = self._sum.div_(self._weight)
        share = self._coefficient / self._weight
        for span in layout.spans:
            delta[span.offset:span.offset + span.numel].sub_(global_flat[span.key], alpha=share)
        return delta


class StackFold(Fold):
    """All deltas of a round as rows of one preallocated ``[max_updates, size]`` tensor.

    On the CPU, a stack larger than ``memory_limit`` bytes is a shared memory map of an
    anonymous temporary file: its pages are the page cache's, which the kernel writes out
    under memory pressure instead of failing the process, and the file is gone with the fold.
    """

    def __init__(self, size: int, max_updates: int, device: torch.device, combine: Any,
                 memory_limit: int | None = None) -> None:
        nbytes = max_updates * size * 4
        self.mapped = (device.type == "cpu" and memory_limit is not None
                       and nbytes > memory_limit)
        """Whether the rows live in a memory-mapped file."""
        if self.mapped:
            with tempfile.TemporaryFile() as file:
                file.truncate(nbytes)
                # The map outlives the file object: it holds its own reference to the file.
                # Populated at once (Linux): faulting 4 KiB pages in one by one cost ~25% more.
                rows = mmap.mmap(file.fileno(), nbytes,
                                 flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
            self._rows = torch.frombuffer(rows, dtype=torch.float32).view(max_updates, size)
        else:
            self._rows = torch.empty((max_updates, size), dtype=torch.float32, device=device)
        self._count = 0
        self._combine = combine

    def add(self, update: ReceivedUpdate, weight: float, scale: float,
            global_flat: Mapping[str, Tensor]) -> None:
        if self._count == self._rows.shape[0]:
            raise UpdateRejected(f"the round already holds its {self._count} sampled updates")
        row = self._rows[self._count]
        for span, start, values in update.values():
            offset, count = span.offset + start, values.numel()
            torch.sub(values.to(row.device, non_blocking=True),
                      global_flat[span.key][start:start + count],
                      out=row[offset:offset + count])
        if scale != 1.0:
            row.mul_(scale)
        self._count += 1

    def finish(self, global_flat: Mapping[str, Tensor], layout: FlatLayout) -> Tensor:
        combined: Tensor = self._combine(self._rows[: self._count])
        return combined


class Round:
    """One round's aggregation: :meth:`accept` (or :meth:`add`) each update, then
    :meth:`result` once.

    Non-floating tensors (BatchNorm's ``num_batches_tracked`` and the like: counters and
    flags, which no average makes sense of) become the element-wise maximum of the global's
    and the accepted updates' values, so counters keep growing.

    Results live on the strategy's device, in the global state's dtypes and key order. The
    round keeps a reference to ``global_state``, not a copy: it must not change meanwhile.
    """

    def __init__(
        self, strategy: Strategy, global_state: Mapping[str, Tensor], max_updates: int
    ) -> None:
        if max_updates < 1:
            raise ValueError(f"max_updates must be at least 1, got {max_updates}")
        device = strategy.device
        self._strategy = strategy
        self.layout = FlatLayout.of(global_state)
        self._global = {span.key: global_state[span.key].to(device).reshape(-1)
                        for span in self.layout.spans}
        self._others = {
            key: global_state[key].to(device, copy=True) for key in self.layout.others
        }
        self._fold = strategy.new_fold(self.layout.size, max_updates)
        self._done = False
        self.count = 0
        """Updates accepted so far."""

    def reader(self, metas: list[transport.TensorMeta]) -> UpdateReader:
        """A reader for one update's byte stream in the layout ``metas`` describe."""
        return UpdateReader(self.layout, metas)

    def add(self, update_state: Mapping[str, Tensor], num_examples: int) -> None:
        """Fold one client's full model state in, or raise :class:`UpdateRejected`."""
        self.layout.check(update_state)
        update = ReceivedUpdate(
            [(span, 0, update_state[span.key].reshape(-1)) for span in self.layout.spans],
            {key: update_state[key] for key in self.layout.others})
        for _, _, values in update.values():
            _check_finite(values)
        self.accept(update, num_examples)

    def accept(self, update: ReceivedUpdate, num_examples: int) -> None:
        """Fold a complete, checked update in, or raise :class:`UpdateRejected`."""
        if self._done:
            raise RuntimeError("the round's result was already taken; open a new round")
        check_num_examples(num_examples)
        strategy = self._strategy
        scale = 1.0
        if strategy.clip_norm is not None:
            scale = min(1.0, strategy.clip_norm / (self._delta_norm(update) + 1e-12))
        # The noise bounds one client's influence on the *sum*, so with noise every client
        # counts once; weighting by examples would let a large client exceed the bound.
        weight = 1.0 if strategy.noise_multiplier > 0 else float(num_examples)
        self._fold.add(update, weight, scale, self._global)
        for key, value in self._others.items():
            torch.maximum(value, update.others[key].to(value.device), out=value)
        self.count += 1

    def _delta_norm(self, update: ReceivedUpdate) -> float:
        """The L2 norm of the update's delta to the global model (for clipping)."""
        squares = torch.zeros((), dtype=torch.float64, device=self._strategy.device)
        for span, start, values in update.values():
            part = values.to(self._strategy.device, torch.float32) - \
                self._global[span.key][start:start + values.numel()]
            squares += torch.linalg.vector_norm(part, dtype=torch.float64) ** 2
        return float(squares.sqrt())

    def result(self) -> dict[str, Tensor]:
        """The new global state; the round is spent afterwards."""
        if self.count == 0:
            raise RuntimeError("no update was accepted this round; there is nothing to aggregate")
        if self._done:
            raise RuntimeError("the round's result was already taken; open a new round")
        self._done = True
        strategy = self._strategy
        delta = self._fold.finish(self._global, self.layout)
        if strategy.noise_multiplier > 0:
            assert strategy.clip_norm is not None  # checked when the strategy was built
            strategy.noise.add_(delta, strategy.noise_multiplier * strategy.clip_norm / self.count)
        # The global is added to the step in place (the step is often the delta itself): a
        # flat copy of the global here was a fourth model at the round's peak.
        new_global = strategy.step(delta)
        for span in self.layout.spans:
            new_global[span.offset:span.offset + span.numel].add_(self._global[span.key])
        return self.layout.unflatten(new_global, self._others)


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
        stack_memory_bytes: int | None = None,
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
        self.stack_memory_bytes = stack_memory_bytes
        """Beyond this, a round that keeps every update keeps them in a memory-mapped file."""

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

    def step(self, delta: Tensor) -> Tensor:
        """What the aggregated ``delta`` adds to the global vector: ``delta`` itself by default
        (plain averaging). The round adds the global to what this returns, in place, so it
        must not be state that outlives the round."""
        return delta

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
