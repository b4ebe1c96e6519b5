"""A client that hangs up while its update is being folded: the aggregator, in process.

The window is a fold's few milliseconds, so a real client cannot hit it on purpose: the
round's aggregation here blocks its first fold until the test lets it go, and everything
else (the aggregator's round loop, its reading, memory accounting and folding) is the real
code that ``PushUpdate`` drives.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedkube.api.runtime import RuntimeConfig
from fedkube.federation import protocol, transport
from fedkube.federation.aggregator import Aggregator
from fedkube.federation.proto import fedkube_pb2 as pb
from fedkube.federation.strategies.base import ReceivedUpdate
from tests.integration.runtime_support import make_config

State = dict[str, torch.Tensor]


async def until(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


class HeldFirstFold:
    """Wraps a round's ``accept`` (run in worker threads): the first call waits until
    :attr:`release` is set; every call is counted, and so are calls that overlap."""

    def __init__(self, accept: Callable[[ReceivedUpdate, int], None]) -> None:
        self._accept = accept
        self._lock = threading.Lock()
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.running = 0
        self.most_at_once = 0

    def __call__(self, update: ReceivedUpdate, num_examples: int) -> None:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if first:
                self.started.set()
                assert self.release.wait(30), "the test never let the first fold go"
            self._accept(update, num_examples)
        finally:
            with self._lock:
                self.running -= 1


def header(state: State, num_examples: int) -> pb.UpdateHeader:
    return pb.UpdateHeader(round=1, num_examples=num_examples,
                           tensors=protocol.to_specs(transport.manifest(state)))


async def chunks(state: State) -> AsyncIterator[bytes]:
    for data in transport.iter_chunks(state, 1 << 14):
        yield data


def sample_value(aggregator: Aggregator, name: str, **labels: Any) -> float | None:
    return aggregator.metrics.registry.get_sample_value(
        name, {"job": "test", "namespace": "ns", **labels})


@pytest.mark.timeout(120)
async def test_an_update_whose_client_hangs_up_during_its_fold_is_folded_alone_and_freed(
        tmp_path: Path) -> None:
    config = RuntimeConfig.from_file(make_config(tmp_path, rounds=1, tls=False,
                                                 task_config={"hidden": 64}))
    aggregator = Aggregator(config)
    first, second = aggregator.join(0, None), aggregator.join(1, None)
    job = asyncio.create_task(aggregator.run())
    held: HeldFirstFold | None = None
    try:
        dispatch = await aggregator.next_assignment(first.client_id, 30)
        assert dispatch is not None and aggregator.current is dispatch
        assert await aggregator.next_assignment(second.client_id, 30) is dispatch
        assert dispatch.fold_order == [first.client_id, second.client_id]
        assert dispatch.wire is not None and dispatch.aggregation is not None
        global_state = {k: v.clone() for k, v in dispatch.wire.items()}
        held = HeldFirstFold(dispatch.aggregation.accept)
        dispatch.aggregation.accept = held  # type: ignore[method-assign]

        first_update = {k: v + 1 for k, v in global_state.items()}
        first_push = asyncio.create_task(aggregator.receive_update(
            first.client_id, header(first_update, 1), chunks(first_update)))
        await until(held.started.is_set)
        first_push.cancel()  # what grpc.aio does to a handler whose client hung up
        with pytest.raises(asyncio.CancelledError):
            await first_push

        second_update = {k: v + 3 for k, v in global_state.items()}
        second_push = asyncio.create_task(aggregator.receive_update(
            second.client_id, header(second_update, 3), chunks(second_update)))
        await until(lambda: second.client_id in dispatch.answered)
        # A fold that did not wait for the first one is under way beside it by now.
        held.release.set()
        assert await second_push == (pb.PushUpdateReply.ACCEPTED, "")

        await until(lambda: aggregator.completed == 1)
        assert held.calls == 2 and held.most_at_once == 1, "two folds ran at once"
        # Both updates, weighted 1 and 3: the global plus (1·1 + 3·3) / 4.
        for key, value in aggregator.global_state.items():
            torch.testing.assert_close(value, global_state[key] + 2.5)
        assert sample_value(aggregator, "fedkube_update_bytes_in_memory") == 0
        assert sample_value(aggregator, "fedkube_updates_total", status="accepted") == 2
    finally:
        if held is not None:
            held.release.set()
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
        aggregator.close()
