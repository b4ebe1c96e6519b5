"""Uploads are concurrent, a stalled one blocks nobody, idle clients hold no threads; a
download its client stops reading blocks nobody either, and a client that restarts, or whose
download or upload broke off, is sent the round's model again: a real aggregator process over
gRPC and mutual TLS, driven by hand-made clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

from fedkube.api.runtime import RuntimeConfig
from fedkube.federation import protocol, transport
from fedkube.federation.aggregator import TRANSFER_IDLE_SECONDS
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.proto import fedkube_pb2_grpc as pb_grpc
from fedkube.federation.security import TlsFiles, channel_credentials
from fedkube.federation.servicer import MAX_CONCURRENT_SENDS
from fedkube.local import client_tls_dir

pytestmark = pytest.mark.timeout(300)
CHUNK = 1 << 10


class HeldUpload(threading.Thread):
    """A PushUpdate that sends its header and the first ``sent`` data chunks, then waits for
    :attr:`resume` before sending the rest (or, with ``finish`` False, nothing more)."""

    def __init__(self, client: HandmadeClient, round_: int, state: State, sent: int,
                 finish: bool = True) -> None:
        super().__init__(daemon=True)
        self.client, self.round, self.state = client, round_, state
        self.sent, self.finish = sent, finish
        self.resume = threading.Event()
        self.started_sending = threading.Event()
        self.reply: pb.PushUpdateReply | None = None

    def messages(self) -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=pb.UpdateHeader(
            round=self.round, num_examples=10,
            tensors=protocol.to_specs(transport.manifest(self.state))))
        chunks = list(transport.iter_chunks(self.state, CHUNK))
        assert len(chunks) > self.sent
        for data in chunks[:self.sent]:
            yield pb.UpdateChunk(data=data)
        self.started_sending.set()
        self.resume.wait()
        if self.finish:
            for data in chunks[self.sent:]:
                yield pb.UpdateChunk(data=data)

    def run(self) -> None:
        # A stream cut by its own client's timeout leaves no reply, which the test checks.
        with contextlib.suppress(grpc.RpcError):
            self.reply = self.client.stub.PushUpdate(self.messages(),
                                                     metadata=self.client.metadata, timeout=120)


def _four_clients_in_a_round(config: Path) -> tuple[list[HandmadeClient], int, list[State]]:
    """Four clients joined and sent the first round's model; the round's number, and each
    client's update (the model plus ``0.25 * (index + 1)``)."""
    clients = [HandmadeClient.joined(config, i) for i in range(4)]
    pulled = [client.pull() for client in clients]
    updates = [{k: v + 0.25 * (i + 1) for k, v in state.items()}
               for i, (_, state) in enumerate(pulled)]
    return clients, pulled[0][0], updates


def _assert_the_mean_of(tmp_path: Path, updates: list[State]) -> None:
    """The job's final model is FedAvg of ``updates`` (equal weights)."""
    final = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    for name in final:
        expected = sum(update[name] for update in updates) / len(updates)
        torch.testing.assert_close(final[name], expected.to(final[name].dtype))


def test_a_stalled_upload_blocks_neither_other_uploads_nor_the_round(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=4, min_clients=3, timeout=120)
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients, round_, updates = _four_clients_in_a_round(config)
        # Client 0 stops in the middle of its update and resumes later; client 3 stalls for
        # good. Clients 1 and 2 upload in full meanwhile, and are accepted meanwhile.
        paused = HeldUpload(clients[0], round_, updates[0], sent=2)
        stalled = HeldUpload(clients[3], round_, updates[3], sent=1, finish=False)
        for upload in (paused, stalled):
            upload.start()
            assert upload.started_sending.wait(30)
        for i in (1, 2):
            assert clients[i].push(round_, updates[i]).status == pb.PushUpdateReply.ACCEPTED
        assert paused.is_alive() and stalled.is_alive(), (paused.reply, stalled.reply)
        paused.resume.set()
        paused.join(60)
        assert paused.reply is not None
        assert paused.reply.status == pb.PushUpdateReply.ACCEPTED
        # The stalled upload is dropped after TRANSFER_IDLE_SECONDS, long before the round's
        # 120 s timeout: the round completes with the three others.
        wait_for(lambda: status(config)["phase"] == "Succeeded", 3 * TRANSFER_IDLE_SECONDS + 30,
                 "the round to complete without the stalled upload")
        stalled.join(60)
        assert stalled.reply is not None
        assert stalled.reply.status == pb.PushUpdateReply.REJECTED
        assert "sent nothing" in stalled.reply.reason
        stalled.resume.set()
    record = json.loads((tmp_path / "output" / "history.json").read_text())[0]
    assert (record["clients"], record["rejected"]) == (3, 1)
    # FedAvg of the three accepted updates, equal weights: interleaving changed nothing.
    _assert_the_mean_of(tmp_path, [updates[i] for i in range(3)])


def test_a_client_restarted_after_the_model_went_out_is_sent_it_again(tmp_path: Path) -> None:
    """Every sampled client has the model, then one restarts: its new session takes the old
    one's place in the round, is sent the whole model again and its update counts."""
    config = make_config(tmp_path, rounds=1, clients=2, min_clients=2, timeout=120)
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients = [HandmadeClient.joined(config, i) for i in range(2)]
        (round_, model), _ = [client.pull() for client in clients]
        restarted = HandmadeClient.joined(config, 0)
        again, resent = restarted.pull()
        assert again == round_
        for name, tensor in model.items():
            assert torch.equal(resent[name], tensor), name
        updates = [{k: v + 1.0 for k, v in model.items()}, {k: v + 3.0 for k, v in model.items()}]
        for client, update in zip((restarted, clients[1]), updates, strict=True):
            assert client.push(round_, update).status == pb.PushUpdateReply.ACCEPTED
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round to complete")
    _assert_the_mean_of(tmp_path, updates)


def _metric(config: Path, name: str) -> float:
    return metric_value(http_get(config, "/metrics"), name, job="test")


def _ask_for_a_task(client: HandmadeClient, wait_seconds: float) -> tuple[pb.TaskHeader, Any]:
    """One PullTask: its header, and the stream of the model that follows it."""
    stream = client.stub.PullTask(pb.PullTaskRequest(wait_seconds=wait_seconds),
                                  metadata=client.metadata, timeout=60)
    return next(stream).header, stream


def test_a_client_whose_download_or_upload_broke_off_is_sent_the_round_again(
        tmp_path: Path) -> None:
    """The same sessions, no restart: one client's download breaks off after the header, the
    other's upload after its first chunk. Each asks again and is sent the round's model,
    rather than told to wait while the round waits for it until roundTimeoutSeconds (or, for
    the upload, counted as answered with a rejected update: the round short of one)."""
    config = make_config(tmp_path, rounds=1, clients=2, min_clients=2, timeout=120)
    with processes(tmp_path) as group:
        group.aggregator(config)
        downloading, uploading = (HandmadeClient.joined(config, i) for i in range(2))
        header, broken = _ask_for_a_task(downloading, 5)
        assert header.action == pb.TaskHeader.TRAIN
        broken.cancel()
        round_, model = uploading.pull()

        update = {k: v + 3.0 for k, v in model.items()}
        send_the_rest = threading.Event()

        def first_chunk_only() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=pb.UpdateHeader(
                round=round_, num_examples=10,
                tensors=protocol.to_specs(transport.manifest(update))))
            yield pb.UpdateChunk(data=next(transport.iter_chunks(update, CHUNK)))
            send_the_rest.wait(60)

        upload = uploading.stub.PushUpdate.future(first_chunk_only(),
                                                  metadata=uploading.metadata, timeout=60)
        try:
            wait_for(lambda: _metric(config, "fedkube_update_bytes_in_memory") > 0, 30,
                     "the first chunk to arrive")
            upload.cancel()
        finally:
            send_the_rest.set()

        for client in (downloading, uploading):
            header, stream = _ask_for_a_task(client, 10)
            assert (header.action, header.round) == (pb.TaskHeader.TRAIN, round_)
            resent = transport.assemble(protocol.from_specs(header.tensors),
                                        protocol.data_chunks(stream))
            for name, tensor in model.items():
                assert torch.equal(resent[name], tensor), name
        updates = [{k: v + 1.0 for k, v in model.items()}, update]
        for client, sent in zip((downloading, uploading), updates, strict=True):
            assert client.push(round_, sent).status == pb.PushUpdateReply.ACCEPTED
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round to complete")
        assert _metric(config, "fedkube_update_bytes_in_memory") == 0
    assert "broke off (stream ended after 1024 of" in group.log("aggregator")
    record = json.loads((tmp_path / "output" / "history.json").read_text())[0]
    assert (record["clients"], record["rejected"]) == (2, 0)
    _assert_the_mean_of(tmp_path, updates)


def test_clients_that_stop_reading_their_download_hold_up_no_other(tmp_path: Path) -> None:
    """As many clients as the aggregator streams models to at once take the header and read
    nothing more, with an 18 MB model that their connections cannot buffer (they use the
    shipped client's fixed flow-control windows): one more client is still sent the model,
    once the stalled downloads are dropped."""
    config = make_config(tmp_path, rounds=1, clients=MAX_CONCURRENT_SENDS + 1,
                         min_clients=MAX_CONCURRENT_SENDS + 1, timeout=120,
                         task_config={"hidden": 60_000})
    options = protocol.channel_options(
        RuntimeConfig.from_file(config).spec.transport.largest_chunk)
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients = [HandmadeClient.joined(config, i, options)
                   for i in range(MAX_CONCURRENT_SENDS + 1)]
        stalled = []
        for client in clients[:-1]:
            header, stream = _ask_for_a_task(client, 5)
            assert header.action == pb.TaskHeader.TRAIN
            stalled.append(stream)
        round_, model = clients[-1].pull()
        assert round_ == header.round and transport.encoded_nbytes(model) > 18_000_000
        for stream in stalled:
            with pytest.raises(grpc.RpcError) as dropped:
                for _ in stream:
                    pass
            assert dropped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "the download took nothing for 10 s" in str(dropped.value.details())
        assert group.log("aggregator").count("dropped the download") == MAX_CONCURRENT_SENDS


SPILLED = "fedkube_update_bytes_spilled_total"
WAITING = "fedkube_uploads_waiting_for_memory"



def test_uploads_past_the_memory_budget_wait_for_folds_rather_than_spill(
        tmp_path: Path) -> None:
    """Four updates at once, each a model's worth, hold more than the aggregator keeps in
    memory: those behind the next to fold wait for it instead of writing to the spill file."""
    config = make_config(tmp_path, rounds=1, clients=4, min_clients=4, timeout=120,
                         task_config={"hidden": 4096, "lr": 0.1})
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients, round_, updates = _four_clients_in_a_round(config)
        replies: list[pb.PushUpdateReply | None] = [None] * 4

        def push(index: int) -> None:
            replies[index] = clients[index].push(round_, updates[index])

        uploads = [threading.Thread(target=push, args=(i,), daemon=True) for i in (3, 2, 1, 0)]
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join(60)
        assert [reply.status if reply else None for reply in replies] == [
            pb.PushUpdateReply.ACCEPTED] * 4
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round")
        assert _metric(config, SPILLED) == 0
    _assert_the_mean_of(tmp_path, updates)


def test_the_upload_behind_one_being_folded_waits_for_its_memory(tmp_path: Path) -> None:
    """Client 1 uploads first and fills the half model of memory that uploads behind the next
    to fold may hold, then waits. Client 0, next to fold, uploads a whole model. While client
    0 is being folded its bytes are still held: client 1, next to fold from then on, must wait
    for that memory rather than spill the chunk that does not fit beside it."""
    config = make_config(tmp_path, rounds=1, clients=2, min_clients=2, timeout=120,
                         task_config={"hidden": 4096, "lr": 0.1})
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients = [HandmadeClient.joined(config, i) for i in range(2)]
        (round_, model), _ = [client.pull() for client in clients]
        updates = [{k: v + 0.5 * (i + 1) for k, v in model.items()} for i in range(2)]
        replies: list[pb.PushUpdateReply | None] = [None]

        def push_behind() -> None:
            replies[0] = clients[1].push(round_, updates[1])

        behind = threading.Thread(target=push_behind, daemon=True)
        behind.start()
        wait_for(lambda: _metric(config, WAITING) == 1, 30, "client 1 to wait for memory")
        assert clients[0].push(round_, updates[0]).status == pb.PushUpdateReply.ACCEPTED
        behind.join(60)
        assert replies[0] is not None and replies[0].status == pb.PushUpdateReply.ACCEPTED
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round")
        assert _metric(config, SPILLED) == 0
        assert _metric(config, WAITING) == 0
    _assert_the_mean_of(tmp_path, updates)


def test_uploads_behind_a_stalled_one_spill_and_a_rejected_one_leaves_no_trace(
        tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=4, min_clients=3, timeout=120)
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients, round_, updates = _four_clients_in_a_round(config)
        # Client 0's upload, the next to fold, stops before its last chunk: the others wait
        # MEMORY_WAIT_SECONDS for a fold, then write what the memory budget does not hold to
        # the spill file. Client 2's last chunk holds a NaN: it is rejected after the rest of
        # its update was checked, held or spilled.
        last = list(updates[2])[-1]
        updates[2][last].view(-1)[-1] = float("nan")
        chunks = len(list(transport.iter_chunks(updates[0], CHUNK)))
        # Four uploads all but complete at once: 4 models' worth, over twice the budget.
        uploads = [HeldUpload(client, round_, update, sent=chunks - 1)
                   for client, update in zip(clients, updates, strict=True)]
        for upload in uploads:
            upload.start()
            assert upload.started_sending.wait(30)

        wait_for(lambda: _metric(config, SPILLED), 30,
                 "chunks past the memory budget to be spilled")
        for upload in uploads:
            upload.resume.set()
            upload.join(60)
        replies = [upload.reply for upload in uploads]
        assert all(reply is not None for reply in replies), replies
        assert [reply.status for reply in replies if reply is not None] == [
            pb.PushUpdateReply.ACCEPTED, pb.PushUpdateReply.ACCEPTED,
            pb.PushUpdateReply.REJECTED, pb.PushUpdateReply.ACCEPTED]
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round")
        assert 0 < _metric(config, SPILLED) < 4 * chunks * CHUNK
    _assert_the_mean_of(tmp_path, [updates[i] for i in (0, 1, 3)])


async def _long_poll(address: str, credentials: grpc.ChannelCredentials, index: int,
                     joined: asyncio.Event, release: asyncio.Event, counter: list[int],
                     total: int) -> None:
    """One client on its own connection: join, then long-poll until released."""
    async with grpc.aio.secure_channel(address, credentials,
                                       options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.FederationStub(channel)
        reply = await stub.Join(pb.JoinRequest(index=index), wait_for_ready=True, timeout=120)
        counter[0] += 1
        if counter[0] == total:
            joined.set()
        metadata = ((protocol.CLIENT_ID_KEY, reply.client_id),)
        while not release.is_set():
            async for _ in stub.PullTask(pb.PullTaskRequest(wait_seconds=5), metadata=metadata,
                                         timeout=30):
                pass


def test_idle_clients_hold_no_threads(tmp_path: Path) -> None:
    idle = 300
    # More clients than will ever connect: the aggregator waits for them, every one polling.
    config = make_config(tmp_path, rounds=1, clients=idle + 1, min_clients=idle + 1,
                         timeout=120)
    with processes(tmp_path) as group:
        aggregator = psutil.Process(group.aggregator(config).pid)
        first = HandmadeClient.joined(config, 0)
        first.stub.PullTask(pb.PullTaskRequest(wait_seconds=0), metadata=first.metadata)
        wait_for(lambda: status(config)["clientsConnected"] == 1, 30, "the first client")
        threads_before = aggregator.num_threads()

        async def drive() -> tuple[int, int]:
            address = RuntimeConfig.from_file(config).aggregator_address
            credentials = channel_credentials(TlsFiles.read(client_tls_dir(
                config.parent / "tls", None)))
            joined, release, counter = asyncio.Event(), asyncio.Event(), [0]
            tasks = [asyncio.create_task(_long_poll(address, credentials, index, joined,
                                                    release, counter, idle))
                     for index in range(1, idle + 1)]
            await asyncio.wait_for(joined.wait(), 180)
            # Every client is now parked in a long poll on the aggregator.
            peak = max(aggregator.num_threads() for _ in range(20))
            connected = status(config)["clientsConnected"]
            release.set()
            await asyncio.gather(*tasks)
            return peak, connected

        threads_during, connected = asyncio.run(drive())
    assert connected == idle + 1
    # grpc.aio: a connection is a coroutine, not a thread. A few worker threads may start.
    assert threads_during <= threads_before + 4, (threads_before, threads_during)




def _one_round(tmp_path: Path, arrival: list[int]) -> dict[str, torch.Tensor]:
    """A one-round job of four clients whose updates arrive in ``arrival`` order; its model."""
    config = make_config(tmp_path, rounds=1, clients=4, min_clients=4, timeout=60)
    with processes(tmp_path) as group:
        group.aggregator(config)
        clients = [HandmadeClient.joined(config, i) for i in range(4)]
        pulled = [client.pull() for client in clients]
        for i in arrival:
            round_, state = pulled[i]
            # Values whose weighted sums round differently in another order.
            update = {k: v * (1.0 + 0.37 * i) + 1e3 * (i % 2) for k, v in state.items()}
            assert clients[i].push(round_, update).status == pb.PushUpdateReply.ACCEPTED
        wait_for(lambda: status(config)["phase"] == "Succeeded", 60, "the round")
    return torch.load(tmp_path / "output" / "model.pt", weights_only=True)


def test_the_aggregate_is_the_same_bits_whatever_order_updates_arrive_in(
        tmp_path: Path) -> None:
    first = _one_round(tmp_path / "a", [0, 1, 2, 3])
    second = _one_round(tmp_path / "b", [3, 1, 0, 2])
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
