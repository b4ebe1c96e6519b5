"""Glue between the generated gRPC code and :mod:`fedkube.federation.transport`.

Both ends use these helpers so that the metadata key, message limits and tensor manifests
are spelled once. The aggregator also encodes and decodes data chunks itself
(:func:`data_message`, :func:`decode_chunk`): a ``TaskChunk`` or ``UpdateChunk`` carrying
``data`` is the field's tag, its length and the bytes, so the model a round sends is
serialized once for all clients, and a received chunk's tensor data is a view of the bytes
gRPC handed over rather than two further copies through protobuf objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message

from fedkube.federation import transport
from fedkube.federation.proto import fedkube_pb2 as pb

CLIENT_ID_KEY = "fedkube-client-id"

#: Room for the header (manifest, metrics) on top of a data chunk.
_MESSAGE_HEADROOM = 16 << 20
#: gRPC's message prefix and the chunk's protobuf tag and length; HTTP/2's largest frame.
_FRAME_HEADROOM, _LARGEST_FRAME = 64, (1 << 24) - 1


def channel_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """gRPC options for both ends: messages up to one chunk plus its header."""
    limit = chunk_bytes + _MESSAGE_HEADROOM
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Clients long-poll; keepalives notice a dead peer without waiting for TCP timeouts.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Fixed flow-control windows: with BDP probing each waiting update stream may grow
        # a multi-megabyte receive buffer, and aggregator memory would grow with clients.
        ("grpc.http2.bdp_probe", 0),
        # A data chunk in one HTTP/2 frame rather than 16 KiB ones: 7-9% less aggregator CPU
        # per GB in hack/bench_aggregator_memory.py, paired runs, no memory change.
        ("grpc.http2.max_frame_size", min(chunk_bytes + _FRAME_HEADROOM, _LARGEST_FRAME)),
    ]


def to_specs(metas: Iterable[transport.TensorMeta]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=m.name, dtype=m.dtype, shape=list(m.shape)) for m in metas]


def from_specs(specs: Iterable[pb.TensorSpec]) -> list[transport.TensorMeta]:
    return [transport.TensorMeta(s.name, s.dtype, tuple(s.shape)) for s in specs]


def expect_data(chunk: Message | memoryview) -> memoryview:
    """A decoded chunk's data (see :func:`decode_chunk`): a stream carries its header first
    and data only after it, so another header is a :class:`~transport.TransportError`."""
    if not isinstance(chunk, memoryview):
        raise transport.TransportError("expected a data chunk, got another header")
    return chunk


def data_chunks(messages: Iterator[pb.TaskChunk] | Iterator[pb.UpdateChunk],
                ) -> Iterator[memoryview]:
    """The data of protobuf chunk messages that follow a header (:func:`expect_data`)."""
    for message in messages:
        yield expect_data(memoryview(message.data) if message.WhichOneof("kind") == "data"
                          else message.header)


#: ``data`` is field 2 of both ``TaskChunk`` and ``UpdateChunk``; ``header`` is field 1.
_DATA_FIELD, _HEADER_FIELD = 2, 1
_LENGTH_DELIMITED = 2

M = TypeVar("M", bound=Message)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def data_message(data: bytes | memoryview) -> bytes:
    """A serialized ``TaskChunk``/``UpdateChunk`` holding ``data``: what
    ``TaskChunk(data=data).SerializeToString()`` gives, with one copy."""
    return b"".join((_varint(_DATA_FIELD << 3 | _LENGTH_DELIMITED), _varint(len(data)), data))


def data_messages(state: Mapping[str, torch.Tensor], chunk_bytes: int) -> Iterator[bytes]:
    """An encoded state dict's data chunks as serialized messages, one at a time: a stream
    holds one chunk of its own, not a serialized copy of the model."""
    for view in transport.chunk_views(state, chunk_bytes):
        yield data_message(view)


def _read_varint(raw: memoryview, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(raw) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = raw[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def decode_chunk(raw: bytes, header_type: type[M]) -> M | memoryview:
    """A serialized ``TaskChunk``/``UpdateChunk``: its header (a ``header_type``), or its data
    as a view of ``raw``. Protobuf's rules hold: unknown fields are skipped and the last of the
    oneof's fields wins. :class:`DecodeError` for malformed bytes or a chunk with neither."""
    view = memoryview(raw)
    position, found = 0, None
    while position < len(view):
        key, position = _read_varint(view, position)
        number, kind = key >> 3, key & 7
        if kind == 0:
            _, position = _read_varint(view, position)
        elif kind == 1 or kind == 5:
            position += 8 if kind == 1 else 4
        elif kind == _LENGTH_DELIMITED:
            length, position = _read_varint(view, position)
            if position + length > len(view):
                raise DecodeError("a field runs past the end of the message")
            if number == _DATA_FIELD:
                found = view[position:position + length]
            elif number == _HEADER_FIELD:
                found = header_type.FromString(view[position:position + length])
            position += length
        else:
            raise DecodeError(f"unsupported wire type {kind}")
        if position > len(view):
            raise DecodeError("a field runs past the end of the message")
    if found is None:
        raise DecodeError("the chunk holds neither a header nor data")
    return found


def serialize_chunk(message: Message | bytes) -> bytes:
    """A chunk message for gRPC: data chunks come serialized already (:func:`data_message`),
    headers do not."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def method(name: str) -> str:
    """The gRPC path of a method of the Federation service."""
    service = pb.DESCRIPTOR.services_by_name["Federation"].full_name
    return f"/{service}/{name}"
