"""Tensor transport round trips: every dtype, 16-bit transfer, odd shapes, chunk boundaries."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkube.api import TransportSpec
from fedkube.federation import protocol, transport
from fedkube.federation.proto import fedkube_pb2 as pb


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


def test_pieces_are_views_of_the_chunks_where_no_element_is_cut() -> None:
    wire = transport.encode({"a": torch.arange(10.0), "b": torch.arange(6.0)})
    chunks = list(transport.iter_chunks(wire, 16))
    reader = transport.StreamReader(transport.manifest(wire))
    pieces = [piece for chunk in chunks for piece in reader.feed(chunk)]
    reader.close()
    assert [(p.index, p.start, p.values.tolist()) for p in pieces][:2] == [
        (0, 0, [0.0, 1.0, 2.0, 3.0]), (0, 4, [4.0, 5.0, 6.0, 7.0])]
    for piece in pieces:
        assert piece.position is not None
        chunk = chunks[piece.position // 16]
        assert piece.values.numpy().tobytes() == chunk[piece.position % 16:][
            :piece.values.numel() * 4]


def test_an_element_cut_by_a_chunk_boundary_is_carried_over() -> None:
    wire = transport.encode({"a": torch.arange(3.0)})
    reader = transport.StreamReader(transport.manifest(wire))
    data = b"".join(transport.iter_chunks(wire, 1 << 10))
    first, second = reader.feed(data[:6]), reader.feed(data[6:])
    assert [p.values.tolist() for p in first] == [[0.0]]
    assert [(p.start, p.values.tolist(), p.position) for p in second] == [
        (1, [1.0], None), (2, [2.0], 8)]


header_messages = st.builds(
    pb.UpdateHeader, round=st.integers(0, 1 << 40), num_examples=st.integers(0, 1 << 20),
    metrics=st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False), max_size=3))


@given(kind=st.sampled_from(["header", "data"]), header=header_messages,
       data=st.binary(max_size=300), unknown=st.integers(3, 100))
@settings(max_examples=80, deadline=None)
def test_chunks_decode_as_protobuf_decodes_them(kind: str, header: pb.UpdateHeader,
                                                data: bytes, unknown: int) -> None:
    message = pb.UpdateChunk(header=header) if kind == "header" else pb.UpdateChunk(data=data)
    raw = message.SerializeToString()
    # An unknown field, as a newer client might send: skipped by protobuf and by fedkube.
    key = unknown << 3  # a varint field
    raw_with_unknown = raw + bytes([key & 0x7F | 0x80, key >> 7, 0x01])
    for encoded in (raw, raw_with_unknown):
        parsed = pb.UpdateChunk.FromString(encoded)
        assert (parsed.header, parsed.data) == (message.header, message.data)
        decoded = protocol.decode_chunk(encoded, pb.UpdateHeader)
        if kind == "header":
            assert decoded == header
        else:
            assert isinstance(decoded, memoryview) and bytes(decoded) == data
    if kind == "data":
        assert protocol.data_message(data) == raw


@given(raw=st.binary(max_size=40))
@settings(max_examples=200, deadline=None)
def test_malformed_chunks_are_refused_like_protobuf_refuses_them(raw: bytes) -> None:
    try:
        expected = pb.UpdateChunk.FromString(raw)
    except DecodeError:
        expected = None
    try:
        decoded = protocol.decode_chunk(raw, pb.UpdateHeader)
    except DecodeError:
        decoded = None
    if expected is None or expected.WhichOneof("kind") is None:
        assert decoded is None
    elif expected.WhichOneof("kind") == "data":
        assert isinstance(decoded, memoryview) and bytes(decoded) == expected.data
    else:
        assert decoded == expected.header


def test_a_header_after_the_first_is_a_protocol_error_in_either_form() -> None:
    """The aggregator and the client read decoded chunks, tests and benches protobuf messages:
    both are held to one rule, data only after the header."""
    header = pb.UpdateHeader(round=3)
    decoded = [protocol.decode_chunk(protocol.data_message(b"abcd"), pb.UpdateHeader),
               protocol.decode_chunk(pb.UpdateChunk(header=header).SerializeToString(),
                                     pb.UpdateHeader)]
    messages = [pb.UpdateChunk(data=b"abcd"), pb.UpdateChunk(header=header)]
    for chunks in (map(protocol.expect_data, decoded), protocol.data_chunks(iter(messages))):
        assert bytes(next(chunks)) == b"abcd"
        with pytest.raises(transport.TransportError, match="got another header"):
            next(chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoded_bytes_are_counted_without_encoding(dtype: torch.dtype) -> None:
    state = _state()
    wire = transport.encode(state, dtype)
    assert transport.encoded_nbytes(state, dtype) == sum(m.nbytes for m in transport.manifest(wire))


@pytest.mark.parametrize(("model_bytes", "chunk_bytes"), [
    (1, 256 << 10),                      # small models: the smallest automatic chunk
    (16 << 20, 256 << 10),               # a 64th is exactly the smallest
    (30_000_000, 512 << 10),             # a 64th (458 KiB) rounded up to 64 KiB
    (400_000_000, 6 << 20),              # 100M float32 parameters
    (4 << 30, 8 << 20),                  # large models: the largest automatic chunk
])
def test_unset_chunk_bytes_follow_the_model_size(model_bytes: int, chunk_bytes: int) -> None:
    assert TransportSpec().chunk_size(model_bytes) == chunk_bytes
    assert TransportSpec().largest_chunk == 8 << 20


def test_chunk_bytes_set_in_the_spec_win_whatever_the_model() -> None:
    spec = TransportSpec.model_validate({"chunkBytes": 65536})
    assert [spec.chunk_size(n) for n in (1, 400_000_000)] == [65536, 65536]
    assert spec.largest_chunk == 65536
