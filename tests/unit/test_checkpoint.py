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


def _model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64, 64), value), "b": torch.zeros(64, dtype=torch.bfloat16)}


def _save(folder: Path, round_: int) -> None:
    checkpoint.save(folder, checkpoint.Checkpoint(round_, _model(float(round_)), {}, [],
                                                  "ns/job"))


def test_the_previous_checkpoint_is_kept_and_nothing_else(tmp_path: Path) -> None:
    for round_ in (1, 2, 3):
        _save(tmp_path, round_)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.PREVIOUS,
                                                          checkpoint.FILENAME]
    saved = checkpoint.load(tmp_path)
    assert saved is not None and saved.round == 3


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "missing"])
def test_a_torn_or_corrupt_checkpoint_falls_back_to_the_previous(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    current = tmp_path / checkpoint.FILENAME
    data = current.read_bytes()
    if damage == "truncated":  # a write cut short
        current.write_bytes(data[:len(data) // 2])
    elif damage == "flipped byte":  # inside the model's tensor bytes, which a zip still reads
        weights = torch.full((64, 64), 2.0).numpy().tobytes()
        at = data.index(weights) + 100
        current.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])
    else:  # killed between keeping the previous and renaming the new one into place
        current.unlink()
    saved = checkpoint.load(tmp_path)
    assert saved is not None and saved.round == 1
    assert torch.equal(saved.model["w"], _model(1.0)["w"])
    if damage != "missing":
        assert "skipping a checkpoint" in caplog.text
        assert "resuming from the previous checkpoint, after round 1" in caplog.text


def test_no_whole_checkpoint_left_is_a_clear_error(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    for name in (checkpoint.FILENAME, checkpoint.PREVIOUS):
        (tmp_path / name).write_bytes(b"torn")
    with pytest.raises(ConfigurationError, match="no whole checkpoint is left; delete the "
                                                 "folder"):
        checkpoint.load(tmp_path)
