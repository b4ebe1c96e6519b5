"""Malformed and poisoned updates, sent by a rogue client over real gRPC, are rejected."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from runtime_support import (
    WINE_TASK,
    HandmadeClient,
    State,
    http_get,
    make_config,
    metric_value,
    processes,
    wait_for,
    write_wine_rows,
)

from fedkube.federation.proto import fedkube_pb2 as pb


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
        rogue = HandmadeClient.joined(config, 1)
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


def test_federated_evaluations_only_from_the_asked_once_with_sane_numbers(
        tmp_path: Path) -> None:
    """A site's client may report one evaluation, for the model it was sent, with a finite
    loss and an accuracy in [0, 1]; everything else is refused and counted, and the round's
    federated metrics are the example-weighted mean of what was accepted."""
    data = tmp_path / "site"
    write_wine_rows(data / "rows.csv")
    config = make_config(
        tmp_path, rounds=1, min_clients=2, timeout=60,
        task={"entrypoint": "fedkube.tasks.tabular:task", "config": WINE_TASK},
        sites=[{"name": "lab", "replicas": 2, "data": {"volume": {"hostPath": {
            "path": str(data)}}}}],
        evaluation={"mode": "federated"})
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        group.client(config, 0, data_dir=data)
        rogue = HandmadeClient.joined(config, 1)
        round_, state = rogue.pull()
        assert rogue.push(round_, state).status == pb.PushUpdateReply.ACCEPTED
        evaluated, _ = rogue.pull(pb.TaskHeader.EVALUATE)
        assert evaluated == 1

        def report(**fields: float) -> pb.PushEvaluationReply:
            values = {"round": 1, "num_examples": 30, "loss": 0.25, "accuracy": 0.9, **fields}
            return rogue.stub.PushEvaluation(pb.EvaluationReport(**values),
                                             metadata=rogue.metadata)

        assert report(round=2).status == pb.PushEvaluationReply.LATE
        for bad in ({"accuracy": 1.5}, {"loss": float("nan")}, {"num_examples": -1}):
            with pytest.raises(grpc.RpcError) as refused:
                report(**bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert report().status == pb.PushEvaluationReply.ACCEPTED
        assert report().status == pb.PushEvaluationReply.LATE  # once only

        def both_reports_in() -> str | None:
            text = http_get(config, "/metrics")
            accepted = metric_value(text, "fedkube_evaluations_total", status="accepted")
            return text if accepted == 2 else None

        # The honest client reports when it is done, maybe after the rogue.
        text = wait_for(both_reports_in, 30, "the honest client's evaluation")
        assert aggregator.wait(60) == 0, group.log("aggregator")
    # Another round's is late; a second one for this round is a refused replay, or late
    # when the honest client's report had already closed the evaluation.
    late = metric_value(text, "fedkube_evaluations_total", status="late")
    replayed = metric_value(text, "fedkube_refusals_total", reason="duplicate")
    assert late >= 1 and late + replayed == 2
    honest = re.search(r"evaluated the global model on (\d+) validation examples: loss "
                       r"([0-9.]+), accuracy ([0-9.]+)", group.log("client-0"))
    assert honest is not None
    examples, loss, accuracy = int(honest[1]), float(honest[2]), float(honest[3])
    (entry,) = json.loads((tmp_path / "output" / "history.json").read_text())
    federated = entry["federated_evaluation"]
    assert (federated["clients"], federated["examples"]) == (2, examples + 30)
    assert federated["loss"] == pytest.approx((loss * examples + 0.25 * 30) / (examples + 30),
                                              abs=1e-4)
    assert federated["accuracy"] == pytest.approx(
        (accuracy * examples + 0.9 * 30) / (examples + 30), abs=1e-4)
    assert entry["accuracy"] == federated["accuracy"]


