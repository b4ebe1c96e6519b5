"""The aggregator's checkpoint: enough to resume a job after the last completed round.

Written atomically (temporary file, then ``os.replace``) so that an aggregator killed while
saving leaves the previous checkpoint intact, never a torn one. Loaded with
``weights_only=True``: a checkpoint holds tensors and plain values, never code.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedkube.api.runtime import ConfigurationError

FILENAME = "checkpoint.pt"
FORMAT = 1


@dataclass
class Checkpoint:
    """The state after ``round`` completed rounds."""

    round: int
    model: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    job: str = ""
    """``namespace/name`` of the job that wrote it ("" when written before this was kept)."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save(directory: str | Path, checkpoint: Checkpoint) -> Path:
    path = Path(directory) / FILENAME
    atomic_save({
        "format": FORMAT,
        "round": checkpoint.round,
        "model": {k: v.detach().cpu() for k, v in checkpoint.model.items()},
        "strategy": checkpoint.strategy,
        "history": checkpoint.history,
        "job": checkpoint.job,
    }, path)
    return path


def load(directory: str | Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None when there is none yet."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT:
        raise ConfigurationError(
            f"{path}: checkpoint format {data.get('format')!r}, this fedkube reads {FORMAT}: "
            "resume with the fedkube version that wrote it, or delete it to start over")
    return Checkpoint(data["round"], data["model"], data["strategy"], data["history"],
                      data.get("job", ""))


def model_mismatch(saved: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> str | None:
    """How a checkpointed model differs from a job's model (names, shapes, dtypes), or None."""
    if saved.keys() != model.keys():
        missing, extra = sorted(model.keys() - saved.keys()), sorted(saved.keys() - model.keys())
        return f"tensors missing: {missing[:3]}, unexpected: {extra[:3]}"
    for name, tensor in model.items():
        if saved[name].shape != tensor.shape or saved[name].dtype != tensor.dtype:
            return (f"{name} is {saved[name].dtype}{list(saved[name].shape)}, the model's is "
                    f"{tensor.dtype}{list(tensor.shape)}")
    return None
