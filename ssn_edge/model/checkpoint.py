"""Training checkpoints: one typed record (CheckpointRecord), written atomically and read back in this module only.

Format version 2. A record holds what rebuilds the model (kind, recipe, heads, backbone identity), what it was
trained on (supervision summary, epoch, history) and, for a plain SSN run, what resuming needs (optimiser,
scheduler, random states, the learned-noise generator) and its collapse check (optional: a file without one reads
as not checked). A tiled record holds every location's heads, the tiling and the features they learned on.
Version-1 files (a flat dict, ssn-edge before format 2) are read and migrated.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssn_edge.config import recipe_from_dict, recorded_val_split, upgrade_recipe_dict
from ssn_edge.data.supervision import Supervision
from ssn_edge.model.backbones import weights_fingerprint
from ssn_edge.train.collapse import CollapseCheck

FORMAT = "ssn-edge-checkpoint"
VERSION = 2
KIND_SSN, KIND_TILED, KIND_KNN = "ssn", "tiled", "knn"
TRAINED_ON = ("shared_backbone", "independent_tiles")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class BackboneIdentity:
    """The frozen backbone the heads were trained on; a model is rebuilt only on the same weights."""

    name: str
    weights_source: str = "unknown"
    fingerprint: str | None = None

    @classmethod
    def of(cls, name: str, trunk: nn.Module) -> BackboneIdentity:
        return cls(name, getattr(trunk, "weights_source", "unknown"), weights_fingerprint(trunk))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ResumeState:
    """What continuing a plain SSN run needs besides its heads."""

    optimizer: dict
    scheduler: dict
    rng: dict  # {"torch": torch's RNG state (ByteTensor), "numpy": the training numpy generator's state}
    generator: dict | None = None  # noise.kind learned: {"state", "optimizer", "heads_steps"}


@dataclass
class TiledHeads:
    """A tiled model's trained part: one adaptor + heads state per tile location (one for mode single)."""

    heads: list[dict]
    tiling: dict  # ssn_edge.runtime.tiling.TilingConfig.to_dict()
    trained_on: str  # TRAINED_ON: the features the heads learned on

    def __post_init__(self) -> None:
        if self.trained_on not in TRAINED_ON:
            raise ValueError(f"tiled heads trained_on {self.trained_on!r} is not one of {', '.join(TRAINED_ON)}")


@dataclass
class CheckpointRecord:
    kind: str  # KIND_SSN | KIND_TILED | KIND_KNN
    recipe: dict  # the recipe as trained (Recipe.to_dict(), setting resolved)
    backbone: BackboneIdentity
    heads: dict | None = None  # ssn, knn: the trained state dict; tiled: None (tiled.heads)
    epoch: int = 0  # epochs trained (tiled: of each location)
    supervision: Supervision | None = None  # what the run trained on (setting and image counts)
    history: list | dict = field(default_factory=list)  # per-epoch records (tiled: per location)
    resume: ResumeState | None = None
    tiled: TiledHeads | None = None
    # the collapse check at the end of training (ssn_edge.train.collapse); None: not run (tiled, knn, no held-out
    # normal images) or a checkpoint from before it existed
    collapse: CollapseCheck | None = None

    def __post_init__(self) -> None:
        if (self.kind == KIND_TILED) != (self.tiled is not None) or (self.tiled is None) == (self.heads is None):
            raise ValueError(f"a {self.kind} checkpoint record holds {'tiled' if self.kind == KIND_TILED else 'plain'} "
                             "heads only")

    def to_payload(self) -> dict[str, Any]:
        as_dict = lambda x: None if x is None else dataclasses.asdict(x)  # noqa: E731
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "recipe": self.recipe,
                "backbone": self.backbone.to_dict(), "heads": self.heads, "epoch": self.epoch,
                "supervision": as_dict(self.supervision), "history": self.history,
                "resume": as_dict(self.resume), "tiled": as_dict(self.tiled), "collapse": as_dict(self.collapse)}

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> CheckpointRecord:
        sup, resume, tiled, collapse = (data.get(k) for k in ("supervision", "resume", "tiled", "collapse"))
        return cls(kind=data["kind"], recipe=data["recipe"], backbone=BackboneIdentity(**data["backbone"]),
                   heads=data.get("heads"), epoch=int(data.get("epoch", 0)),
                   supervision=None if sup is None else Supervision(**sup), history=data.get("history", []),
                   resume=None if resume is None else ResumeState(**resume),
                   tiled=None if tiled is None else TiledHeads(**tiled),
                   collapse=None if collapse is None else CollapseCheck.from_dict(collapse))


def save_checkpoint(path: str | Path, record: CheckpointRecord) -> Path:
    """Write to a temporary file beside the target, then rename: a crash never leaves half a checkpoint."""
    if not isinstance(record, CheckpointRecord):
        raise TypeError(f"save_checkpoint takes a CheckpointRecord, got {type(record).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(record.to_payload(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> CheckpointRecord:
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
    if version not in (1, VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {version}, this ssn-edge reads versions 1 and {VERSION}")
    needed = ("recipe", "backbone", "heads") if version == 1 else ("kind", "recipe", "backbone")
    for key in needed:
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}' (truncated or written by another tool)")
    try:
        # a recipe recorded before data.val_fraction existed held no normal image out (config.recorded_val_split)
        return CheckpointRecord.from_payload(_from_version_1(data) if version == 1
                                             else {**data, "recipe": recorded_val_split(data["recipe"])})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint record is malformed ({type(exc).__name__}: {exc})") from None


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 checkpoint (one flat dict) as a version-2 payload: the recipe in the current layout, the resume
    state and a tiled model's heads, tiling and features gathered in their own parts."""
    kind = data.get("kind", KIND_SSN)
    sup = data.get("supervision")
    if sup is not None:
        sup = {k: v for k, v in sup.items() if k != "pasted"}  # train.paste_copies is gone (config.REMOVED)
    resume = None
    if "optimizer" in data:
        resume = {"optimizer": data["optimizer"], "scheduler": data["scheduler"], "rng": data["rng"],
                  "generator": data.get("generator")}
    tiled = None
    if kind == KIND_TILED:
        # tiled checkpoints from before the record of trained_on held heads trained on lone tiles
        tiled = {"heads": data["heads"], "tiling": data["tiling"],
                 "trained_on": data.get("trained_on", "independent_tiles")}
    history = data.get("history", [data["fit"]] if "fit" in data else [])
    recipe = recipe_from_dict(upgrade_recipe_dict(data["recipe"])).to_dict()  # every key, as a new one records
    return {"kind": kind, "recipe": recipe, "backbone": data["backbone"],
            "heads": None if tiled else data["heads"], "epoch": data.get("epoch", 0), "supervision": sup,
            "history": history, "resume": resume, "tiled": tiled}
