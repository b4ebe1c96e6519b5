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


def manifest(state: Mapping[str, torch.Tensor]) -> list[TensorMeta]:
    """The manifest of an (encoded) state dict, in iteration order."""
    return [TensorMeta(name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()]


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be contiguous and on the CPU)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def iter_chunks(state: Mapping[str, torch.Tensor], chunk_bytes: int) -> Iterator[bytes]:
    """The raw bytes of every tensor of an encoded state dict, concatenated, in chunks.

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
            yield bytes(view[position:position + chunk_bytes])
            position += chunk_bytes
        pending += view[position:]
    if pending:
        yield bytes(pending)


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


def assemble(metas: list[TensorMeta], chunks: Iterable[bytes],
             out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fill the tensors of a manifest from its byte chunks, whatever their boundaries.

    ``out`` (from :func:`allocate` of the same manifest) is filled in place when given, so a
    receiver can keep one buffer instead of allocating a model per message. Raises
    :class:`TransportError` when the stream is shorter or longer than the manifest says.
    """
    _require_little_endian()
    if out is None:
        out = allocate(metas)
    elif [(m.name, m.torch_dtype, m.shape) for m in metas] != [
        (name, t.dtype, tuple(t.shape)) for name, t in out.items()
    ]:
        raise TransportError("the preallocated buffer does not match the manifest")
    targets = [_raw_bytes(t) for t in out.values() if t.numel() > 0]
    expected = sum(len(t) for t in targets)
    index, offset, received = 0, 0, 0
    for chunk in chunks:
        source = memoryview(chunk)
        received += len(source)
        if received > expected:
            raise TransportError(f"received more than the {expected} bytes the manifest lists")
        while len(source):
            target = targets[index]
            count = min(len(target) - offset, len(source))
            target[offset:offset + count] = source[:count]
            source = source[count:]
            offset += count
            if offset == len(target):
                index, offset = index + 1, 0
    if received != expected:
        raise TransportError(f"stream ended after {received} of {expected} bytes")
    return out
