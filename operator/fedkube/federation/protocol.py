"""Glue between the generated gRPC code and :mod:`fedkube.federation.transport`.

Both ends use these helpers so that the metadata key, message limits and tensor manifests
are spelled once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from fedkube.federation import transport
from fedkube.federation.proto import fedkube_pb2 as pb

CLIENT_ID_KEY = "fedkube-client-id"

#: Room for the header (manifest, metrics) on top of a data chunk.
_MESSAGE_HEADROOM = 16 << 20


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
    ]


def to_specs(metas: Iterable[transport.TensorMeta]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=m.name, dtype=m.dtype, shape=list(m.shape)) for m in metas]


def from_specs(specs: Iterable[pb.TensorSpec]) -> list[transport.TensorMeta]:
    return [transport.TensorMeta(s.name, s.dtype, tuple(s.shape)) for s in specs]


def data_chunks(messages: Iterator[pb.TaskChunk] | Iterator[pb.UpdateChunk],
                ) -> Iterator[bytes]:
    """The data payloads that follow a header; a second header is a protocol error."""
    for message in messages:
        if message.WhichOneof("kind") != "data":
            raise transport.TransportError("expected a data chunk, got another header")
        yield message.data
