"""Checkpoints: written atomically, read back as written, refused when foreign."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedkube.api.runtime import ConfigurationError
from fedkube.federation import checkpoint


def test_a_checkpoint_reads_back_as_written(tmp_path: Path) -> None:
    model = {"w": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor(4)}
    checkpoint.save(tmp_path, checkpoint.Checkpoint(
        3, model, {"strategy": "fedavg"}, [{"round": 1}], "ns/job"))
    saved = checkpoint.load(tmp_path)
    assert saved is not None
    assert (saved.round, saved.strategy, saved.history, saved.job) == (
        3, {"strategy": "fedavg"}, [{"round": 1}], "ns/job")
    assert all(torch.equal(saved.model[k], model[k]) for k in model)
    assert checkpoint.model_mismatch(saved.model, model) is None
    assert list(tmp_path.iterdir()) == [tmp_path / checkpoint.FILENAME]  # no temporary left


def test_a_checkpoint_of_another_format_is_a_configuration_error(tmp_path: Path) -> None:
    torch.save({"format": 99}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(ConfigurationError, match="checkpoint format 99, this fedkube reads 1"):
        checkpoint.load(tmp_path)


def test_model_mismatch_names_the_first_difference() -> None:
    model = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    assert checkpoint.model_mismatch({"w": torch.zeros(2, 3)}, model) == (
        "tensors missing: ['b'], unexpected: []")
    assert checkpoint.model_mismatch({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, model) == (
        "w is torch.float32[3, 2], the model's is torch.float32[2, 3]")
    assert checkpoint.model_mismatch(
        {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64)}, model) == (
        "b is torch.float64[3], the model's is torch.float32[3]")
