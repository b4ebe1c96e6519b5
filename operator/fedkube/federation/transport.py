"""Tensor (de)serialization for the wire: state dicts as one stream of raw byte chunks.

A state dict travels as a manifest (name, dtype, shape of every tensor, in order) and the
concatenation of the tensors' raw little-endian bytes, cut into chunks of a fixed size.
Chunks ignore tensor boundaries: a chunk may end inside a tensor or span many small ones,
so no message ever needs to hold a whole tensor (models over 2 GiB stream unchanged) and
no pickle is involved (a received update cannot run code).

Pure functions, no gRPC: the aggregator and the client wrap them in protobuf messages.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

#: dtypes allowed on the wire, by the name the manifest carries.
WIRE_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}

#: ``spec.transport.updateDtype`` -> the dtype floating-point tensors are sent in.
TRANSFER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


# Received chunks are immutable ``bytes``; the tensors viewing them are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)


class TransportError(ValueError):
    """A manifest or byte stream that does not describe a valid state dict."""


@dataclass(frozen=True)
class TensorMeta:
    """What the receiver needs to allocate one tensor before its bytes arrive."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return WIRE_DTYPES[self.dtype]
        except KeyError:
            raise TransportError(
                f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(WIRE_DTYPES)}"
            ) from None

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.torch_dtype.itemsize


def _require_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts to test on
        raise TransportError("fedkube's tensor transport needs a little-endian host")


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise TransportError(f"dtype {name!r} cannot be sent; use one of {sorted(WIRE_DTYPES)}")
    return name


def encode(state: Mapping[str, torch.Tensor],
           float_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors as they go on the wire: on the CPU, contiguous, floats cast to float_dtype.

    Integer and boolean tensors (e.g. BatchNorm's ``num_batches_tracked``) keep their dtype;
    floating-point ones travel as ``float_dtype`` (16-bit halves the bytes sent).
    """
    wire = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.is_floating_point() and tensor.dtype != float_dtype:
            tensor = tensor.to(float_dtype)
        wire[name] = tensor.cpu().contiguous()
    return wire


def encoded_nbytes(state: Mapping[str, torch.Tensor],
                   float_dtype: torch.dtype = torch.float32) -> int:
    """The bytes :func:`encode` of ``state`` puts on the wire, without encoding it."""
    return sum(t.numel() * (float_dtype.itemsize if t.is_floating_point() else t.element_size())
               for t in state.values())


def manifest(state: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    """The manifest of an (encoded) state dict, in iteration order."""
    return [TensorMeta(name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be contiguous and on the CPU)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def chunk_views(state: Mapping[str, torch.Tensor],
                chunk_bytes: int) -> Iterator[memoryview | bytes]:
    """The raw bytes of every tensor of an encoded state dict, concatenated, in chunks: views
    of the tensors where a chunk lies within one, a copy where it spans several.

    Every chunk but the last holds exactly ``chunk_bytes`` bytes. Memory stays at one chunk
    beyond the tensors themselves, whatever the model's size.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    _require_little_endian()
    pending = bytearray()
    for tensor in state.values():
        view = _raw_bytes(tensor)
        position = 0
        if pending:
            position = min(chunk_bytes - len(pending), len(view))
            pending += view[:position]
            if len(pending) < chunk_bytes:
                continue
            yield bytes(pending)
            pending = bytearray()
        while len(view) - position >= chunk_bytes:
            yield view[position:position + chunk_bytes]
            position += chunk_bytes
        pending += view[position:]
    if pending:
        yield bytes(pending)


def iter_chunks(state: Mapping[str, torch.Tensor], chunk_bytes: int) -> Iterator[bytes]:
    """:func:`chunk_views` as ``bytes``, as protobuf messages take them."""
    return map(bytes, chunk_views(state, chunk_bytes))


def allocate(metas: Iterable[TensorMeta]) -> dict[str, torch.Tensor]:
    """Empty CPU tensors for a manifest, ready for :func:`assemble`; reusable across rounds."""
    state: dict[str, torch.Tensor] = {}
    for meta in metas:
        if meta.name in state:
            raise TransportError(f"tensor {meta.name!r} appears twice in the manifest")
        if any(size < 0 for size in meta.shape):
            raise TransportError(f"tensor {meta.name!r} has a negative size: {meta.shape}")
        state[meta.name] = torch.empty(meta.shape, dtype=meta.torch_dtype)
    return state


@dataclass(frozen=True)
class Piece:
    """Consecutive elements of one tensor of the manifest, as they arrived."""

    index: int
    """The tensor's position in the manifest."""
    start: int
    """The first element's position in the flattened tensor."""
    values: torch.Tensor
    """1-D, in the manifest's dtype: a view of the received bytes, not a copy."""
    position: int | None
    """Where ``values`` starts in the stream, in bytes; None for an element that was cut
    by a chunk boundary (``values`` is then a copy)."""


class StreamReader:
    """Cuts the byte stream of a manifest into :class:`Piece` s as the chunks arrive.

    Chunk boundaries fall anywhere, even inside an element: the few bytes of an element cut
    in two are the only ones copied; every other piece is a view of the chunk it came in
    (``torch.frombuffer``), so a receiver can fold a chunk where it lands, without first
    assembling the whole state dict. The views keep their chunk alive and must be treated
    as read-only.
    """

    def __init__(self, metas: list[TensorMeta]) -> None:
        _require_little_endian()
        if len({m.name for m in metas}) != len(metas):
            raise TransportError("a tensor appears twice in the manifest")
        self._metas = metas
        self._dtypes = [m.torch_dtype for m in metas]
        self._sizes = [m.nbytes for m in metas]
        self.expected = sum(self._sizes)
        """Bytes the whole stream holds."""
        self.received = 0
        self._index = 0
        self._offset = 0
        """Bytes of tensor ``_index`` received so far."""
        self._carry = bytearray()
        """The start of an element cut by a chunk boundary."""
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._sizes) and self._sizes[self._index] == 0:
            self._index += 1

    def feed(self, chunk: bytes | memoryview) -> list[Piece]:
        """The pieces ``chunk`` completes; :class:`TransportError` past the stream's end."""
        start = self.received
        self.received += len(chunk)
        if self.received > self.expected:
            raise TransportError(f"received more than the {self.expected} bytes the manifest "
                                 "lists")
        pieces: list[Piece] = []
        position = 0
        while position < len(chunk):
            dtype = self._dtypes[self._index]
            itemsize = dtype.itemsize
            if self._carry:
                take = min(itemsize - len(self._carry), len(chunk) - position)
                self._carry += chunk[position:position + take]
                position += take
                if len(self._carry) < itemsize:
                    break
                pieces.append(Piece(self._index, self._offset // itemsize,
                                    torch.frombuffer(bytearray(self._carry), dtype=dtype), None))
                self._carry.clear()
                self._advance(itemsize)
                continue
            left = self._sizes[self._index] - self._offset
            whole = min(left, len(chunk) - position) // itemsize
            if whole:
                pieces.append(Piece(self._index, self._offset // itemsize, torch.frombuffer(
                    chunk, dtype=dtype, count=whole, offset=position), start + position))
                position += whole * itemsize
                self._advance(whole * itemsize)
            else:
                self._carry += chunk[position:]
                position = len(chunk)
        return pieces

    def _advance(self, count: int) -> None:
        self._offset += count
        if self._offset == self._sizes[self._index]:
            self._index, self._offset = self._index + 1, 0
            self._skip_empty()

    def close(self) -> None:
        """:class:`TransportError` unless the whole stream arrived."""
        if self.received != self.expected:
            raise TransportError(f"stream ended after {self.received} of {self.expected} "
                                 "bytes")


def fits(metas: list[TensorMeta], state: Mapping[str, torch.Tensor]) -> bool:
    """Whether :func:`assemble` can fill ``state`` with a stream of ``metas`` in place: the
    same tensors (names, dtypes, shapes) in the same order, contiguous, on the CPU."""
    return [(m.name, m.torch_dtype, m.shape) for m in metas] == [
        (name, t.dtype, tuple(t.shape)) for name, t in state.items()
    ] and all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())


def assemble(metas: list[TensorMeta], chunks: Iterable[bytes | memoryview],
             out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fill the tensors of a manifest from its byte chunks, whatever their boundaries.

    ``out`` (from :func:`allocate` of the same manifest, or any state dict that :func:`fits`
    it) is filled in place when given, so a receiver can keep one buffer instead of
    allocating a model per message, or fill its model's own tensors. Raises
    :class:`TransportError` when the stream is shorter or longer than the manifest says.
    """
    if out is None:
        out = allocate(metas)
    elif not fits(metas, out):
        raise TransportError("the preallocated buffer does not match the manifest")
    targets = [t.view(-1) for t in out.values()]
    reader = StreamReader(metas)
    for chunk in chunks:
        for piece in reader.feed(chunk):
            count = piece.values.numel()
            targets[piece.index][piece.start:piece.start + count].copy_(piece.values)
    reader.close()
    return out
