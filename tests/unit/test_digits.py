"""The digits task learns under FedAvg, partitions properly, and load_task explains errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkube.api import PartitioningSpec
from fedkube.federation.strategies import build_strategy
from fedkube.tasks.base import ClientContext, ConfigurationError, Task, load_task
from fedkube.tasks.digits import DigitsTask, task
from fedkube.tasks.partition import partition

CPU = torch.device("cpu")
DEMO_CONFIG = {"hidden": 64, "lr": 0.1, "localEpochs": 2, "batchSize": 32}
NON_IID = PartitioningSpec(scheme="dirichlet", alpha=0.5, seed=0)


def federate(strategy_name: str, config, clients: int, rounds: int, spec, **params) -> float:
    torch.set_num_threads(1)
    global_model = task.model(config)
    data = [task.client_data(ClientContext(i, clients, spec), config) for i in range(clients)]
    strategy = build_strategy(strategy_name, **params)
    for _ in range(rounds):
        agg = strategy.new_round(global_model.state_dict(), clients)
        for shard in data:
            local = task.model(config)
            local.load_state_dict(global_model.state_dict())
            trained = task.train(
                local, shard, config, device=CPU, proximal_mu=strategy.proximal_mu
            )
            agg.add(local.state_dict(), trained.num_examples)
        global_model.load_state_dict(agg.result())
    return task.evaluate(global_model, config, device=CPU).accuracy


def test_demo_configuration_reaches_the_target_accuracy():
    """What `make demo` runs (crds/samples/digits.yaml), in process."""
    assert federate("fedavg", DEMO_CONFIG, 5, 20, NON_IID) >= 0.93


def test_fedprox_learns_too():
    assert federate("fedprox", DEMO_CONFIG, 3, 5, NON_IID, proximal_mu=0.1) >= 0.8


def test_model_init_is_deterministic_by_seed():
    a, b, c = task.model({}), task.model({"seed": 0}), task.model({"seed": 1})
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def test_train_reports_examples_and_moves_weights():
    model = task.model({})
    before = model.state_dict()["0.weight"].clone()
    data = task.client_data(ClientContext(0, 4, PartitioningSpec()), {})
    result = task.train(model, data, {}, device=CPU)
    assert result.num_examples == len(data) > 0
    assert result.metrics["loss"] > 0
    assert not torch.equal(before, model.state_dict()["0.weight"])
    evaluation = task.evaluate(model, {}, device=CPU)
    assert evaluation.num_examples == 359 and 0.0 <= evaluation.accuracy <= 1.0


@pytest.mark.parametrize("spec", [PartitioningSpec(scheme="iid", seed=3), NON_IID])
def test_partitions_are_disjoint_cover_and_deterministic(spec):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(labels, 7, spec)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1000))
    assert all(len(p) >= 1 for p in parts)
    again = partition(labels, 7, spec)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_skews_labels_more_than_iid():
    labels = np.random.default_rng(0).integers(0, 10, 2000)

    def skew(spec):
        parts = partition(labels, 5, spec)
        shares = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([np.abs(s - 0.1).sum() for s in shares]))

    assert skew(PartitioningSpec(scheme="dirichlet", alpha=0.1)) > 3 * skew(PartitioningSpec())


def test_every_client_gets_a_sample_even_with_extreme_skew():
    labels = np.repeat(np.arange(10), 5)
    parts = partition(labels, 50, PartitioningSpec(scheme="dirichlet", alpha=0.01))
    assert all(len(p) == 1 for p in parts)
    with pytest.raises(ConfigurationError, match=r"clients\.replicas"):
        partition(labels, 51, PartitioningSpec())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigurationError, match=r"spec.task.config.*localEpoch"):
        task.model({"localEpoch": 2})
    with pytest.raises(ConfigurationError, match=r"spec.task.config.batchSize"):
        task.model({"batchSize": 0})
    with pytest.raises(ConfigurationError, match=r"spec.task.config.hidden"):
        task.model({"hidden": 1.5})


def test_load_task_finds_the_builtin_and_explains_mistakes():
    loaded = load_task("fedkube.tasks.digits:task")
    assert isinstance(loaded, DigitsTask) and isinstance(loaded, Task)
    with pytest.raises(ConfigurationError, match=r"spec.task.entrypoint.*module:attribute"):
        load_task("fedkube.tasks.digits")
    with pytest.raises(ConfigurationError, match=r"cannot import module 'fedkube.tasks.nope'"):
        load_task("fedkube.tasks.nope:task")
    with pytest.raises(ConfigurationError, match=r"no attribute 'tsk'"):
        load_task("fedkube.tasks.digits:tsk")
    with pytest.raises(ConfigurationError, match=r"not a task.*lacks model, client_data, train"):
        load_task("fedkube.tasks.digits:TEST_FRACTION")
