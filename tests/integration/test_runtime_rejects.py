"""Malformed and poisoned updates, sent by a rogue client over real gRPC, are rejected."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch
from runtime_support import http_get, make_config, metric_value, processes, wait_for

from fedkube.api.runtime import RuntimeConfig
from fedkube.federation import protocol, transport
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc

State = dict[str, torch.Tensor]


class Rogue:
    """A client speaking the protocol by hand, so that it can send anything."""

    def __init__(self, config: Path, index: int) -> None:
        runtime = RuntimeConfig.from_file(config)
        self.token = Path(runtime.token_file or "").read_text()
        self.channel = grpc.insecure_channel(runtime.aggregator_address)
        self.stub = pb_grpc.FederationStub(self.channel)
        reply = self.stub.Join(pb.JoinRequest(token=self.token, index=index),
                               wait_for_ready=True, timeout=60)
        self.metadata = protocol.auth_metadata(self.token, reply.client_id)

    def pull(self) -> tuple[int, State]:
        while True:
            stream = self.stub.PullTask(pb.PullTaskRequest(wait_seconds=5),
                                        metadata=self.metadata)
            header = next(stream).header
            if header.action == pb.TaskHeader.TRAIN:
                metas = protocol.from_specs(header.tensors)
                return header.round, transport.assemble(metas, protocol.data_chunks(stream))

    def push(self, round_: int, state: State) -> pb.PushUpdateReply:
        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=pb.UpdateHeader(
                round=round_, num_examples=10,
                tensors=protocol.to_specs(transport.manifest(state))))
            for data in transport.iter_chunks(state, 1 << 14):
                yield pb.UpdateChunk(data=data)
        return self.stub.PushUpdate(messages(), metadata=self.metadata)


def _wrong_shape(state: State) -> State:
    name = next(iter(state))
    return {**state, name: torch.zeros(3, 3)}


def _poisoned(state: State) -> State:
    name = next(iter(state))
    bad = state[name].clone()
    bad.view(-1)[0] = float("nan")
    return {**state, name: bad}


def test_malformed_and_poisoned_updates_are_rejected_and_counted(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=2, min_clients=2, timeout=30)
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        group.client(config, 0)
        rogue = Rogue(config, 1)
        # Each rejection leaves the round one accepted update short of minClients, so the
        # aggregator retries it; the third attempt gets an honest update and completes.
        sends: list[Callable[[State], State]] = [_wrong_shape, _poisoned, lambda s: s]
        replies = []
        for corrupt in sends:
            round_, state = rogue.pull()
            assert round_ == 1
            replies.append(rogue.push(round_, corrupt(state)))
        text = wait_for(lambda: http_get(tmp_path / "config.yaml", "/metrics"), 10, "metrics")
        assert aggregator.wait(60) == 0, group.log("aggregator")
    statuses = [pb.PushUpdateReply.Status.Name(r.status) for r in replies]
    assert statuses == ["REJECTED", "REJECTED", "ACCEPTED"], replies
    assert "do not match the global model" in replies[0].reason
    assert "NaN" in replies[1].reason
    assert metric_value(text, "fedkube_updates_total", status="rejected") == 2
    log = group.log("aggregator")
    assert log.count("rejected update from client-1-") == 2
