"""Hostile traffic against a live aggregator, over real gRPC and mutual TLS.

A seeded mutational fuzzer derives malformed calls from valid ones: update streams whose
header lies (round, tensor names, dtypes, shapes, enormous sizes, example counts), whose data
is truncated, oversized, reordered, split into empty chunks or poisoned with NaN, streams with
no header or two; joins with impossible indices; polls and pushes with unknown client ids.
Every fuzzing client takes one index of a 64-client job, so that each round sees one attempt
per index, and one honest client takes part throughout.

What must hold: the aggregator stays up and answers every call with a refusal it means
(REJECTED or LATE, or INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, RESOURCE_EXHAUSTED:
never UNKNOWN or INTERNAL, which is an exception escaping a handler); every round completes
with the honest update alone, so the final model is the honest client's; its memory stays
bounded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from runtime_support import (
    HandmadeClient,
    State,
    http_get,
    make_config,
    metric_value,
    processes,
    status,
    wait_for,
)

from fedkube.federation import protocol, transport
from fedkube.federation.proto import fedkube_pb2 as pb

pytestmark = pytest.mark.timeout(900)
CLIENTS = 64
SEED = 20261124
#: Answers that mean "refused, and the aggregator knew why".
MEANT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE}

Messages = list[pb.UpdateChunk]


def valid_stream(round_: int, state: State, chunk: int = 1 << 12) -> Messages:
    header = pb.UpdateHeader(round=round_, num_examples=10,
                             tensors=protocol.to_specs(transport.manifest(state)))
    return [pb.UpdateChunk(header=header),
            *(pb.UpdateChunk(data=d) for d in transport.iter_chunks(state, chunk))]


def _header(messages: Messages) -> pb.UpdateHeader:
    header = pb.UpdateHeader()
    header.CopyFrom(messages[0].header)
    return header


def _with_header(messages: Messages, header: pb.UpdateHeader) -> Messages:
    return [pb.UpdateChunk(header=header), *messages[1:]]


def _lie_about_a_tensor(rng: random.Random, messages: Messages) -> Messages:
    header = _header(messages)
    spec = rng.choice(header.tensors)
    lie = rng.choice(["name", "dtype", "shape", "enormous", "negative", "drop", "extra"])
    if lie == "name":
        spec.name = spec.name + "x"
    elif lie == "dtype":
        spec.dtype = rng.choice(["float64", "int8", "complex64", "bogus", ""])
    elif lie == "shape":
        spec.shape.append(2)
    elif lie == "enormous":
        del spec.shape[:]
        spec.shape.extend([1 << 20, 1 << 20, 1 << 10])
    elif lie == "negative":
        spec.shape[0] = -spec.shape[0]
    elif lie == "drop":
        header.tensors.remove(spec)
    else:
        header.tensors.add(name="extra", dtype="float32", shape=[4])
    return _with_header(messages, header)


def _lie_in_the_header(rng: random.Random, messages: Messages) -> Messages:
    header = _header(messages)
    field = rng.choice(["round", "examples", "metrics"])
    if field == "round":
        header.round = rng.choice([0, -1, header.round + 1, 1 << 62])
    elif field == "examples":
        header.num_examples = rng.choice([0, -5])
    else:
        header.metrics["loss"] = float("nan")
    return _with_header(messages, header)


def _truncate(rng: random.Random, messages: Messages) -> Messages:
    return messages[:rng.randrange(1, len(messages))]


def _overflow(rng: random.Random, messages: Messages) -> Messages:
    return [*messages, pb.UpdateChunk(data=rng.randbytes(rng.choice([1, 7, 4096])))]


def _cut_a_byte(rng: random.Random, messages: Messages) -> Messages:
    at = rng.randrange(1, len(messages))
    return [*messages[:at], pb.UpdateChunk(data=messages[at].data[:-1]), *messages[at + 1:]]


def _empty_chunks(rng: random.Random, messages: Messages) -> Messages:
    out = list(messages)
    for _ in range(rng.randint(1, 50)):
        out.insert(rng.randrange(1, len(out) + 1), pb.UpdateChunk(data=b""))
    return out


def _reorder(rng: random.Random, messages: Messages) -> Messages:
    header, data = messages[0], messages[1:]
    choice = rng.choice(["data first", "two headers", "no header", "shuffled"])
    if choice == "data first":
        return [*data[:1], header, *data[1:]]
    if choice == "two headers":
        return [header, *data[:1], header, *data[1:]]
    if choice == "no header":
        return data
    shuffled = list(data)
    rng.shuffle(shuffled)
    return [header, *shuffled] if shuffled != data else [header, *data[::-1], *data[:1]]


def _poison(rng: random.Random, messages: Messages) -> Messages:
    at = rng.randrange(1, len(messages))
    data = bytearray(messages[at].data)
    offset = rng.randrange(0, max(len(data) - 4, 1)) & ~3
    data[offset:offset + 4] = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"])  # NaN, Inf
    return [*messages[:at], pb.UpdateChunk(data=bytes(data)), *messages[at + 1:]]


MUTATIONS: list[Callable[[random.Random, Messages], Messages]] = [
    _lie_about_a_tensor, _lie_in_the_header, _truncate, _overflow, _cut_a_byte,
    _empty_chunks, _reorder, _poison]


def _mutations(rng: random.Random, messages: Messages) -> Messages:
    for mutation in rng.sample(MUTATIONS, rng.randint(1, 3)):
        has_header = messages[0].WhichOneof("kind") == "header"
        needs = {_lie_about_a_tensor: has_header, _lie_in_the_header: has_header,
                 _reorder: has_header and len(messages) > 1}.get(mutation, len(messages) > 1)
        if needs:
            messages = mutation(rng, messages) or messages
    return messages


def mutate(rng: random.Random, valid: Messages) -> Messages:
    """One to three mutations of a valid stream (those that work on data chunks only while
    the stream still has some, and headers only while it starts with one). A result that is
    a well-formed update of other content (a byte cut here and one added there) is drawn
    again: it is not malformed, only a different model, and the test checks the aggregate."""
    while True:
        mutated = _mutations(rng, valid)
        if equivalent(mutated, valid) or not _same_shape(mutated, valid):
            return mutated


def _same_shape(mutated: Messages, valid: Messages) -> bool:
    """The same single header first, and as many data bytes."""
    headers = [m for m in mutated if m.WhichOneof("kind") == "header"]
    size = sum(len(m.data) for m in mutated if m.WhichOneof("kind") == "data")
    return (len(headers) == 1 and mutated[0] == valid[0]
            and size == sum(len(m.data) for m in valid[1:]))


def equivalent(mutated: Messages, valid: Messages) -> bool:
    """Whether a mutated stream still says the same thing (e.g. only empty chunks added):
    the same single header first, then the same bytes."""
    def meaning(messages: Messages) -> tuple[list[bytes], bytes]:
        headers = [m.header.SerializeToString() for m in messages
                   if m.WhichOneof("kind") == "header"]
        return headers, b"".join(m.data for m in messages if m.WhichOneof("kind") == "data")
    starts = bool(mutated) and mutated[0].WhichOneof("kind") == "header"
    return starts and meaning(mutated) == meaning(valid)


def push(client: HandmadeClient, messages: Messages) -> str:
    """The outcome of one push: the reply's status, or the gRPC error's code."""
    try:
        reply = client.stub.PushUpdate(iter(messages), metadata=client.metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code().name
    return pb.PushUpdateReply.Status.Name(reply.status)


def strays(rng: random.Random, config: Path) -> Iterator[str]:
    """Calls outside any round: impossible joins, unknown client ids."""
    stray = HandmadeClient.of_site(config, None)
    for index, replica in ((CLIENTS, 0), (1 << 30, 0), (-1, CLIENTS), (-1, -3)):
        try:
            stray.join(index, replica)
            yield "OK"
        except grpc.RpcError as error:
            yield error.code().name
    stray.client_id = f"client-{rng.randrange(CLIENTS)}-forged"
    try:
        next(stray.stub.PullTask(pb.PullTaskRequest(wait_seconds=0), metadata=stray.metadata))
        yield "OK"
    except grpc.RpcError as error:
        yield error.code().name
    yield push(stray, [pb.UpdateChunk(header=pb.UpdateHeader(round=1))])


@pytest.mark.parametrize("rounds", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_hostile_traffic_is_refused_and_honest_rounds_complete(tmp_path: Path,
                                                                rounds: int) -> None:
    rng = random.Random(SEED + rounds)
    # A fuzzer that answered for another round leaves its sampled place empty: the round
    # closes at its timeout with the honest update.
    config = make_config(tmp_path, rounds=rounds, clients=CLIENTS, min_clients=1, timeout=5,
                         task_config={"hidden": 8, "lr": 0.1})
    outcomes: dict[str, int] = {}

    def count(outcome: str) -> None:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        honest = HandmadeClient.joined(config, 0)
        fuzzers = [HandmadeClient.joined(config, i) for i in range(1, CLIENTS)]
        process = psutil.Process(aggregator.pid)
        for outcome in strays(rng, config):
            count(outcome)
        rss = []
        honest_state: State = {}
        accepted_equivalents = 0
        for _ in range(rounds):
            round_, state = honest.pull()
            honest_state = {k: v + 0.5 for k, v in state.items()}
            valid = valid_stream(round_, honest_state)
            for fuzzer in fuzzers:
                fuzzer.pull()
                mutated = mutate(rng, valid)
                outcome = push(fuzzer, mutated)
                if equivalent(mutated, valid):  # a legal encoding of the same update
                    assert outcome == "ACCEPTED", outcome
                    accepted_equivalents += 1
                else:
                    count(outcome)
            assert push(honest, valid) == "ACCEPTED"
            wait_for(lambda r=round_: status(config)["round"] >= r, 60, f"round {round_}")
            rss.append(process.memory_info().rss)
        text = http_get(config, "/metrics")
        assert aggregator.wait(60) == 0, group.log("aggregator")
        assert "Traceback" not in group.log("aggregator")
    tried = sum(outcomes.values())
    print(f"fuzz: {tried} hostile calls, outcomes {dict(sorted(outcomes.items()))}, "
          f"{accepted_equivalents} mutations that still said the same (accepted), "
          f"aggregator RSS after each round {[r >> 20 for r in rss]} MiB")
    assert not {"UNKNOWN", "INTERNAL", "OK", "ACCEPTED"} & set(outcomes), outcomes
    assert set(outcomes) <= {"REJECTED", "LATE", *(code.name for code in MEANT)}, outcomes
    # Every refused update is counted; the honest ones alone were accepted.
    updates = {s: metric_value(text, "fedkube_updates_total", status=s)
               for s in ("accepted", "rejected", "late")}
    assert updates["accepted"] == rounds + accepted_equivalents
    assert updates["rejected"] == outcomes.get("REJECTED", 0) + outcomes.get(
        "INVALID_ARGUMENT", 0)  # a stream without its header is a rejected update too
    # Every round ended with the honest update alone: the final model is the honest one.
    final = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    for name, tensor in honest_state.items():
        torch.testing.assert_close(final[name], tensor.to(final[name].dtype))
    assert max(rss) - min(rss) < 64 << 20, rss
