"""A model over 2 GiB (gRPC's single-message limit) streams intact over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch

from fedkube.federation import protocol, transport
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.local import free_port

CHUNK = 64 << 20


class _ModelServer(pb_grpc.FederationServicer):
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def PullTask(self, request: pb.PullTaskRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:
        yield pb.TaskChunk(header=pb.TaskHeader(
            action=pb.TaskHeader.TRAIN, round=1,
            tensors=protocol.to_specs(transport.manifest(self.state))))
        for data in transport.iter_chunks(self.state, CHUNK):
            yield pb.TaskChunk(data=data)


@pytest.mark.slow
def test_a_model_over_2_gib_streams_intact() -> None:
    generator = torch.Generator().manual_seed(0)
    # 2.25 GiB in total, the big tensor alone over 2 GiB, with odd sizes so that chunk
    # boundaries fall inside tensors.
    state = {
        "embedding": torch.empty((1 << 29) + 7).bernoulli_(0.5, generator=generator),
        "bias": torch.randn(1000, generator=generator).to(torch.bfloat16),
        "head": torch.randn((1 << 25) + 3, generator=generator, dtype=torch.float16),
    }
    total = sum(m.nbytes for m in transport.manifest(state))
    assert total > 2**31
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         options=protocol.channel_options(CHUNK))
    pb_grpc.add_FederationServicer_to_server(_ModelServer(state), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=protocol.channel_options(CHUNK)) as channel:
            stream = pb_grpc.FederationStub(channel).PullTask(pb.PullTaskRequest())
            header = next(stream).header
            received = transport.assemble(protocol.from_specs(header.tensors),
                                          protocol.data_chunks(stream))
    finally:
        server.stop(grace=None)
    assert list(received) == list(state)
    for name, tensor in state.items():
        assert received[name].dtype == tensor.dtype, name
        assert torch.equal(received[name], tensor), name
