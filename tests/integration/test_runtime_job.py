"""A whole job with real aggregator and client processes over 127.0.0.1 gRPC."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from runtime_support import http_get, make_config, metric_value, processes, status, wait_for

from fedkube.api.runtime import EXIT_INVALID_CONFIGURATION
from fedkube.federation import checkpoint, runtime
from fedkube.federation.strategies import build_strategy
from fedkube.tasks.base import load_task


def test_a_job_completes_with_model_history_and_exit_codes(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=3, clients=2)
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        clients = [group.client(config, i) for i in range(2)]
        assert aggregator.wait(120) == 0, group.log("aggregator")
        assert [c.wait(30) for c in clients] == [0, 0], group.log("client-0")
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2, 3]
    assert all(entry["clients"] == 2 and entry["rejected"] == 0 for entry in history)
    assert history[-1]["accuracy"] > 0.5
    model = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    saved = checkpoint.load(tmp_path / "checkpoints")
    assert saved is not None and saved.round == 3
    assert model.keys() == saved.model.keys()
    assert all(torch.equal(model[k], saved.model[k]) for k in model)


def test_a_larger_model_streams_both_ways_in_chunks_sized_to_it(tmp_path: Path) -> None:
    # A hidden layer of 120,000: ~9.0M parameters, 36 MB on the wire, so the model and the
    # updates stream in 576 KiB chunks (a 64th of the model), past the 256 KiB that smaller
    # models use: both ends' gRPC limits must admit them, over mutual TLS.
    config = make_config(tmp_path, rounds=2, clients=2, task_config={"hidden": 120_000})
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        clients = [group.client(config, i) for i in range(2)]
        assert aggregator.wait(180) == 0, group.log("aggregator")
        assert [c.wait(30) for c in clients] == [0, 0], group.log("client-0")
        log = group.log("aggregator")
    assert "streamed in 576 KiB chunks" in log, log
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    assert [(entry["clients"], entry["rejected"]) for entry in history] == [(2, 0), (2, 0)]


def test_a_client_killed_mid_round_does_not_stop_the_round(tmp_path: Path) -> None:
    # Slow local training (many epochs) so that the kill lands while the client trains.
    # The first round waits (up to the round timeout) for all three clients to join.
    config = make_config(tmp_path, rounds=3, clients=3, min_clients=2, timeout=6,
                         task_config={"hidden": 16, "localEpochs": 40})
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        clients = [group.client(config, i) for i in range(3)]
        wait_for(lambda: status(config)["phase"] == "Running", 60, "the first round")
        clients[2].send_signal(signal.SIGKILL)
        assert aggregator.wait(120) == 0, group.log("aggregator")
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2, 3]
    assert history[0]["sampled"] == 3 and history[0]["clients"] == 2, history[0]


def test_the_first_round_starts_without_a_client_that_never_joins(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=3, min_clients=2, timeout=3)
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        [group.client(config, i) for i in range(2)]
        assert aggregator.wait(120) == 0, group.log("aggregator")
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    assert history[0]["sampled"] == 2 and history[0]["clients"] == 2, history[0]


def test_a_restarted_aggregator_resumes_after_its_last_checkpoint(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=12, clients=2,
                         task_config={"hidden": 16, "localEpochs": 5})
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        clients = [group.client(config, i) for i in range(2)]
        wait_for(lambda: status(config)["round"] >= 2, 60, "two rounds")
        aggregator.send_signal(signal.SIGKILL)
        aggregator.wait()
        saved = checkpoint.load(tmp_path / "checkpoints")
        assert saved is not None and 2 <= saved.round < 12
        restarted = group.aggregator(config)
        wait_for(lambda: status(config)["round"] >= saved.round, 60, "the restarted aggregator")
        # Straight after the restart, the aggregator serves the checkpointed round and model.
        assert status(config)["round"] in (saved.round, saved.round + 1)
        assert restarted.wait(120) == 0, group.log("aggregator")
        assert [c.wait(30) for c in clients] == [0, 0], group.log("client-0")
    log = group.log("aggregator")
    assert f"resumed from the checkpoint after round {saved.round}" in log
    assert f"round {saved.round + 1}/12:" in log.split("resumed from the checkpoint")[1]
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    assert [entry["round"] for entry in history] == list(range(1, 13))
    assert history[:saved.round] == saved.history


def test_the_restored_model_is_the_checkpointed_one(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=2, clients=2)
    with processes(tmp_path) as group:
        aggregator = group.aggregator(config)
        [group.client(config, i) for i in range(2)]
        assert aggregator.wait(120) == 0, group.log("aggregator")
        saved = checkpoint.load(tmp_path / "checkpoints")
        assert saved is not None
        (tmp_path / "output" / "model.pt").unlink()
        # An aggregator restarted after its final checkpoint writes that very model out.
        assert group.aggregator(config).wait(60) == 0, group.log("aggregator")
    model = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    assert all(torch.equal(model[k], saved.model[k]) for k in saved.model)


def test_metrics_and_status_are_served(tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=200, clients=2)
    with processes(tmp_path) as group:
        group.aggregator(config)
        wait_for(lambda: http_get(config, "/healthz") == "ok\n", 60, "/healthz")
        assert status(config)["phase"] == "Waiting"
        text = http_get(config, "/metrics")
        assert metric_value(text, "fedkube_rounds_total", job="test", namespace="ns") == 200
        [group.client(config, i) for i in range(2)]
        wait_for(lambda: status(config)["round"] >= 2, 60, "two rounds")
        text = http_get(config, "/metrics")
        report = status(config)
    completed = metric_value(text, "fedkube_round", job="test", namespace="ns")
    assert completed >= 2
    assert metric_value(text, "fedkube_updates_total", status="accepted") >= 2 * completed
    assert metric_value(text, "fedkube_global_accuracy", job="test") > 0
    assert metric_value(text, "fedkube_clients_connected", job="test") == 2
    assert report["phase"] == "Running" and report["rounds"] == 200
    assert report["metrics"]["accuracy"] > 0


def test_an_invalid_configuration_exits_with_one_line_that_names_the_field(
        tmp_path: Path) -> None:
    config = make_config(tmp_path, rounds=1, clients=2)
    config.write_text(config.read_text().replace("fedkube.tasks.digits:task", "nosuch.mod:task"))
    with processes(tmp_path) as group:
        assert group.aggregator(config).wait(60) == EXIT_INVALID_CONFIGURATION
        assert group.client(config, 5).wait(60) == EXIT_INVALID_CONFIGURATION
    last_line = group.log("aggregator").strip().splitlines()[-1]
    assert "invalid configuration: spec.task.entrypoint 'nosuch.mod:task'" in last_line
    assert "Traceback" not in group.log("aggregator")
    assert "--index 5 is outside 0..1" in group.log("client-5")


def test_an_invalid_configuration_is_the_pods_termination_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, rounds=1, clients=2)
    (tmp_path / "tls" / "aggregator" / "tls.key").unlink()
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # the kubelet creates it in a pod
    monkeypatch.setattr(runtime, "TERMINATION_LOG", termination_log)
    assert runtime.run_aggregator(config) == EXIT_INVALID_CONFIGURATION
    assert termination_log.read_text() == (
        f"invalid configuration: tls_dir {tmp_path / 'tls' / 'aggregator'}: cannot read "
        "tls.key (No such file or directory); mount the job's TLS Secret there (the operator "
        "does), or set spec.security.tls.mode Disabled for plaintext\n")


@pytest.mark.parametrize(("job", "hidden", "problem"), [
    ("ns/test", 32, r"does not fit this job's model \(0.weight is torch.float32\[32, 64\]"),
    ("ns/another", 16, "belongs to job ns/another, not ns/test"),
])
def test_a_checkpoint_of_another_job_or_model_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, job: str, hidden: int,
        problem: str) -> None:
    config = make_config(tmp_path, rounds=3, clients=2)  # the digits MLP with hidden 16
    other = load_task("fedkube.tasks.digits:task").model({"hidden": hidden}).state_dict()
    checkpoint.save(tmp_path / "checkpoints", checkpoint.Checkpoint(
        1, other, build_strategy("fedavg").state_dict(), [], job))
    assert runtime.run_aggregator(config) == EXIT_INVALID_CONFIGURATION
    assert re.search(problem, caplog.text), caplog.text
