"""Tensor transport round trips: every dtype, 16-bit transfer, odd shapes, chunk boundaries."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.federation import transport


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(7, 5, generator=generator),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "count": torch.tensor(12, dtype=torch.int64),
        "ids": torch.arange(11, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "half": torch.randn(9, generator=generator).half(),
        "double": torch.randn(3, generator=generator, dtype=torch.float64),
        "transposed": torch.randn(4, 6, generator=generator).t(),
    }


def _round_trip(state: dict[str, torch.Tensor], chunk_bytes: int,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    wire = transport.encode(state, dtype)
    return transport.assemble(transport.manifest(wire), transport.iter_chunks(wire, chunk_bytes))


@given(chunk_bytes=st.integers(1, 400))
@settings(max_examples=60, deadline=None)
def test_every_chunk_size_reassembles_the_same_tensors(chunk_bytes: int) -> None:
    state = _state()
    received = _round_trip(state, chunk_bytes, torch.float64)
    assert list(received) == list(state)
    for name, tensor in state.items():
        expected = tensor.double() if tensor.is_floating_point() else tensor
        assert received[name].dtype == expected.dtype and torch.equal(received[name], expected)


def test_chunks_are_full_except_the_last() -> None:
    wire = transport.encode(_state())
    total = sum(m.nbytes for m in transport.manifest(wire))
    chunks = list(transport.iter_chunks(wire, 64))
    assert all(len(c) == 64 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 64
    assert sum(map(len, chunks)) == total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_transfer_halves_float_bytes_and_keeps_integers(dtype: torch.dtype) -> None:
    state = _state()
    received = _round_trip(state, 100, dtype)
    assert received["weight"].dtype == dtype
    assert torch.allclose(received["weight"].float(), state["weight"], rtol=1e-2, atol=1e-2)
    assert torch.equal(received["count"], state["count"])
    assert torch.equal(received["mask"], state["mask"])
    meta = {m.name: m for m in transport.manifest(transport.encode(state, dtype))}
    assert meta["weight"].nbytes == 7 * 5 * 2


def test_a_preallocated_buffer_is_filled_in_place() -> None:
    wire = transport.encode(_state())
    metas = transport.manifest(wire)
    buffer = transport.allocate(metas)
    out = transport.assemble(metas, transport.iter_chunks(wire, 33), out=buffer)
    assert out is buffer and torch.equal(buffer["weight"], wire["weight"])


def test_short_and_long_streams_are_refused() -> None:
    wire = transport.encode(_state())
    metas = transport.manifest(wire)
    chunks = list(transport.iter_chunks(wire, 50))
    with pytest.raises(transport.TransportError, match="stream ended after"):
        transport.assemble(metas, chunks[:-1])
    with pytest.raises(transport.TransportError, match="more than"):
        transport.assemble(metas, [*chunks, b"x"])


def test_unknown_dtypes_are_refused_with_the_allowed_list() -> None:
    with pytest.raises(transport.TransportError, match="float32"):
        transport.allocate([transport.TensorMeta("w", "complex64", (2,))])
    with pytest.raises(transport.TransportError, match="cannot be sent"):
        transport.manifest({"w": torch.zeros(2, dtype=torch.complex64)})
