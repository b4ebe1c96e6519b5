"""The aggregator's checkpoint: enough to resume a job after the last completed round.

Written atomically (temporary file, fsync, ``os.replace``, fsync of the folder) so that an
aggregator killed while saving leaves a whole checkpoint behind, and the one before is kept
as ``checkpoint.previous.pt``. A checkpoint carries a CRC32 of its model's bytes; one that
does not load or does not match (a torn write on a volume that lied about fsync, a flipped
bit) is reported and the previous one is used. Loaded with ``weights_only=True``: a
checkpoint holds tensors and plain values, never code.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedkube.api.runtime import ConfigurationError

FILENAME = "checkpoint.pt"
PREVIOUS = "checkpoint.previous.pt"
FORMAT = 1

log = logging.getLogger("fedkube.checkpoint")


@dataclass
class Checkpoint:
    """The state after ``round`` completed rounds."""

    round: int
    model: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    job: str = ""
    """``namespace/name`` of the job that wrote it ("" when written before this was kept)."""


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path, keep_previous: str | None = None) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``
    (first renaming the file there to ``keep_previous``, when given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, path.with_name(keep_previous))
        os.replace(temporary, path)
        _fsync_folder(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def checksum(model: dict[str, torch.Tensor]) -> int:
    """CRC32 over the model's tensors (names, dtypes, shapes and bytes, in name order)."""
    crc = 0
    for name in sorted(model):
        tensor = model[name].detach().cpu().contiguous()
        crc = zlib.crc32(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy().data, crc)
    return crc


def save(directory: str | Path, checkpoint: Checkpoint) -> Path:
    path = Path(directory) / FILENAME
    model = {k: v.detach().cpu() for k, v in checkpoint.model.items()}
    atomic_save({
        "format": FORMAT,
        "round": checkpoint.round,
        "model": model,
        "checksum": checksum(model),
        "strategy": checkpoint.strategy,
        "history": checkpoint.history,
        "job": checkpoint.job,
    }, path, keep_previous=PREVIOUS)
    return path


class Unreadable(ValueError):
    """A checkpoint file that is torn or corrupt."""


def _read(path: Path) -> Checkpoint:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError...
        raise Unreadable(f"{path} does not load ({type(error).__name__}: "
                         f"{str(error)[:200]})") from None
    if not isinstance(data, dict):
        raise Unreadable(f"{path} is not a fedkube checkpoint")
    if data.get("format") != FORMAT:
        raise ConfigurationError(
            f"{path}: checkpoint format {data.get('format')!r}, this fedkube reads {FORMAT}: "
            "resume with the fedkube version that wrote it, or delete it to start over")
    expected = data.get("checksum")
    if expected is not None and checksum(data["model"]) != expected:
        raise Unreadable(f"{path}: the model does not match its checksum (corrupt)")
    return Checkpoint(data["round"], data["model"], data["strategy"], data["history"],
                      data.get("job", ""))


def load(directory: str | Path) -> Checkpoint | None:
    """The latest whole checkpoint in ``directory``: the current one, or the previous one when
    the current is torn or corrupt (or was being replaced); None when there is none yet."""
    folder = Path(directory)
    candidates = [folder / name for name in (FILENAME, PREVIOUS) if (folder / name).exists()]
    problems = []
    for path in candidates:
        try:
            saved = _read(path)
        except Unreadable as error:
            log.warning("skipping a checkpoint: %s", error)
            problems.append(str(error))
            continue
        if problems:
            log.warning("resuming from the previous checkpoint, after round %d", saved.round)
        return saved
    if problems:
        raise ConfigurationError(
            "; ".join(problems) + ": no whole checkpoint is left; delete the folder "
            f"{folder} to start the job over")
    return None


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
