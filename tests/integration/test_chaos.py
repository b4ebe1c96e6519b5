"""Chaos with an exact answer: processes of a job are SIGKILLed at random points and
restarted, and the job still ends with the model of an uninterrupted run, bit for bit.

A job is reproducible: the aggregator folds updates in client order whatever their arrival
order, every client seeds its training per round and index, and the aggregator resumes from
its last checkpoint. So whatever dies when (the aggregator while it receives, folds, evaluates
or writes a checkpoint; a client while it downloads, trains or uploads), redoing the lost work
gives the same bits. Each fault is SIGKILL to a random process at a random moment, followed
by a restart of that process (as the kubelet restarts a container).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import urllib.error
from pathlib import Path

import pytest
import torch
from runtime_support import make_config, processes, status, wait_for

pytestmark = pytest.mark.timeout(900)
CLIENTS = 3
#: Enough local epochs that a round takes a few tenths of a second: the faults are timed by
#: the job's progress, and rounds of a few milliseconds would outrun them.
TASK = {"hidden": 16, "lr": 0.1, "localEpochs": 30}


def _job(tmp_path: Path, rounds: int) -> Path:
    # Every round needs every client: an update lost to a fault must be redone, not skipped.
    return make_config(tmp_path, rounds=rounds, clients=CLIENTS, min_clients=CLIENTS,
                       timeout=30, task_config=TASK)


def _round(config: Path) -> int:
    """Rounds completed, as the aggregator says (-1 while it does not answer)."""
    try:
        return int(status(config)["round"])
    except (OSError, urllib.error.URLError):
        return -1


def _phase(config: Path) -> str:
    """What the aggregator says it is doing, for the report."""
    try:
        report = status(config)
    except (OSError, urllib.error.URLError):
        return "starting"
    return f"{report['phase'].lower()} after round {report['round']}"


def run(tmp_path: Path, rounds: int, faults: int, seed: int,
        ) -> tuple[dict[str, torch.Tensor], list[dict[str, object]], list[str]]:
    """A job whose processes suffer ``faults`` SIGKILLs; its model, history and the faults."""
    rng = random.Random(seed)
    config = _job(tmp_path, rounds)
    injected: list[str] = []
    # Each fault strikes during a random round (leaving a few to go, so that the job cannot
    # end first), at a random moment of it.
    moments = sorted(rng.randrange(rounds - 4) for _ in range(faults))
    with processes(tmp_path) as group:
        running = {"aggregator": group.aggregator(config)}
        for index in range(CLIENTS):
            running[f"client-{index}"] = group.client(config, index)
        for moment in moments:
            aggregator = running["aggregator"]
            wait_for(lambda m=moment, a=aggregator: _round(config) >= m or a.poll() is not None,
                     300, f"round {moment}")
            if aggregator.poll() is not None:
                break  # the job ended first: the assertion below says so
            with contextlib.suppress(subprocess.TimeoutExpired):
                running["aggregator"].wait(timeout=rng.uniform(0.0, 0.8))
            target = rng.choice(sorted(running))
            victim = running[target]
            phase = _phase(config)
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            injected.append(f"{target} ({phase})")
            running[target] = (group.aggregator(config) if target == "aggregator"
                               else group.client(config, int(target.removeprefix("client-"))))
        assert running["aggregator"].wait(300) == 0, group.log("aggregator")[-3000:]
    model = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    history = json.loads((tmp_path / "output" / "history.json").read_text())
    return model, history, injected


@pytest.mark.parametrize(("rounds", "faults"), [
    (6, 6), pytest.param(20, 30, marks=pytest.mark.slow)])
def test_a_job_killed_at_random_ends_with_the_uninterrupted_model(
        tmp_path: Path, rounds: int, faults: int) -> None:
    expected, expected_history, _ = run(tmp_path / "calm", rounds, 0, seed=0)
    model, history, injected = run(tmp_path / "chaos", rounds, faults, seed=rounds * 1009)
    equal = [name for name in expected if torch.equal(model[name], expected[name])]
    print(f"chaos: {len(injected)} SIGKILLs survived ({'; '.join(injected)}), "
          f"{len(history)} of {rounds} rounds completed, {len(equal)} of {len(expected)} "
          f"tensors equal bit for bit to the uninterrupted run's")
    assert len(injected) == faults, "the job ended before every fault was injected"
    assert [entry["round"] for entry in history] == list(range(1, rounds + 1))
    # Every round's global model was the same: so was its central evaluation.
    assert [entry["loss"] for entry in history] == [e["loss"] for e in expected_history]
    assert equal == list(expected), "the final model differs from the uninterrupted run's"
