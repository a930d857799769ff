"""Training checkpoints: trainable weights + full recipe + backbone identity, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "ssn-edge-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file beside the target, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a corrupt zip/pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an ssn-edge checkpoint")
    version = data.get("version")
    if version != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this ssn-edge reads version {VERSION}"
        )
    for key in ("recipe", "heads", "backbone"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (truncated or written by another tool)")
    return data
