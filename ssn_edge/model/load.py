"""Rebuild a trained model from its checkpoint, plain, tiled or knn: what export, evaluation and the report use.
Nothing here trains; the backbone is reloaded and must be the one the heads were trained on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ssn_edge.config import Recipe, recipe_from_dict, with_map_gate
from ssn_edge.model.backbones import weights_fingerprint
from ssn_edge.model.checkpoint import (KIND_KNN, KIND_SSN, KIND_TILED, BackboneIdentity, CheckpointError,
                                       CheckpointRecord, load_checkpoint)
from ssn_edge.model.knn import KnnDetector, KnnHead
from ssn_edge.model.memory_bank import MemoryBank
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.model.tiled import TiledSSN
from ssn_edge.runtime.tiling import TilingConfig

__all__ = ["KIND_KNN", "KIND_SSN", "KIND_TILED", "LoadedModel", "heads_trained_on", "is_tiled_checkpoint",
           "knn_from_checkpoint", "load_model", "model_from_checkpoint", "tiled_from_checkpoint"]


@dataclass
class LoadedModel:
    """A trained model in eval mode and the record of how it was trained: what export, evaluation and the report
    read of a checkpoint (read these properties, not the raw record, which is the checkpoint format's business)."""

    model: SuperSimpleNet | TiledSSN | KnnDetector
    recipe: Recipe  # as trained, with any load-time override (map gate, weights path)
    state: CheckpointRecord  # the checkpoint's contents

    @property
    def tiled(self) -> bool:
        return isinstance(self.model, TiledSSN)

    @property
    def kind(self) -> str:
        """The model family and shape: "ssn", "tiled" or "knn"."""
        return self.state.kind

    @property
    def recipe_dict(self) -> dict:
        """The recipe as the checkpoint recorded it (provenance; a version-1 one in the current layout)."""
        return self.state.recipe

    @property
    def backbone(self) -> dict:
        """{name, weights_source, fingerprint} of the frozen backbone the heads were trained on."""
        return self.state.backbone.to_dict()

    @property
    def epoch(self) -> int | None:
        return self.state.epoch

    @property
    def supervision(self) -> dict | None:
        """The supervision summary training recorded (setting and image counts); None: not recorded."""
        sup = self.state.supervision
        return None if sup is None else sup.to_dict()

    @property
    def collapse_check(self) -> dict | None:
        """Training's collapse check (ssn_edge.train.collapse); None: not run or not recorded."""
        check = self.state.collapse
        return None if check is None else check.to_dict()

    @property
    def trained_on(self) -> str | None:
        """Tiled models: the features the heads learned on ("shared_backbone" | "independent_tiles")."""
        return heads_trained_on(self.state) if self.tiled else None


def load_model(path: str | Path, weights: str | None = None, map_gate: str | None = None,
               graph: str | None = None) -> LoadedModel:
    """The model of any ssn-edge checkpoint. graph: for a tiled one, which way it runs (None: as recorded)."""
    path = Path(path)
    record = load_checkpoint(path)
    if is_tiled_checkpoint(record):
        return LoadedModel(*_tiled(path, record, weights, graph, map_gate))
    return LoadedModel(*_plain(path, record, weights, map_gate))


def model_from_checkpoint(path: Path, weights: str | None = None, map_gate: str | None = None
                          ) -> tuple[SuperSimpleNet | KnnDetector, Recipe, CheckpointRecord]:
    """Rebuild the trained model; the backbone is reloaded and must match the one it was trained with.
    map_gate: model.map_gate for this model instead of the recipe's (it has no parameters; None: the recipe's).
    A knn checkpoint gives its KnnDetector (same outputs, so export and evaluation take either)."""
    return _plain(Path(path), load_checkpoint(path), weights, map_gate)


def tiled_from_checkpoint(path: Path, weights: str | None = None, graph: str | None = None,
                          map_gate: str | None = None) -> tuple[TiledSSN, Recipe, CheckpointRecord]:
    """Rebuild a tiled model. graph: which way it runs ("image": shared backbone, "tiles": independent);
    map_gate: as in model_from_checkpoint."""
    record = load_checkpoint(path)
    if not is_tiled_checkpoint(record):
        raise CheckpointError(f"{path}: not a tiled checkpoint")
    return _tiled(Path(path), record, weights, graph, map_gate)


def heads_trained_on(record: CheckpointRecord) -> str:
    """Which features a tiled checkpoint's heads learned on ("shared_backbone" | "independent_tiles")."""
    return record.tiled.trained_on


def is_tiled_checkpoint(record: CheckpointRecord) -> bool:
    return record.kind == KIND_TILED


def _recipe(path: Path, record: CheckpointRecord, weights: str | None, map_gate: str | None) -> Recipe:
    recipe = with_map_gate(recipe_from_dict(record.recipe), map_gate, path)
    if weights is not None:
        recipe.model.weights = weights
    return recipe


def _check_backbone(path: Path, trunk: nn.Module, identity: BackboneIdentity, trained: str = "it was trained with") -> None:
    found = weights_fingerprint(trunk)
    if identity.fingerprint and found != identity.fingerprint:
        raise ValueError(
            f"{path}: backbone weights differ from the ones {trained} (fingerprint {found}, expected "
            f"{identity.fingerprint}, from {identity.weights_source}); pass the same weights file with --weights"
        )


def _load_heads(path: Path, heads: nn.Module, state: dict) -> None:
    """The trained heads' weights into heads built from the recorded recipe: a mismatch (a recipe edited after
    training, another model's weights) is one line naming the first parameter that does not fit."""
    try:
        heads.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).strip())
        detail = detail if len(detail) <= 240 else detail[:237] + "..."
        raise CheckpointError(f"{path}: the heads' weights do not fit the recipe it records ({detail}); the "
                              "checkpoint was edited or mixes two models") from None


def _plain(path: Path, record: CheckpointRecord, weights: str | None, map_gate: str | None
           ) -> tuple[SuperSimpleNet | KnnDetector, Recipe, CheckpointRecord]:
    if record.kind == KIND_KNN:
        return knn_from_checkpoint(path, record, weights, map_gate)
    if record.kind != KIND_SSN:
        raise CheckpointError(f"{path}: a {record.kind} checkpoint, not a plain SSN one")
    recipe = _recipe(path, record, weights, map_gate)
    model = SuperSimpleNet(recipe.model)
    if recipe.model.memory_bank:
        model.heads.memory_bank = _memory_bank(path, record.heads, recipe)
    _load_heads(path, model.heads, record.heads)
    _check_backbone(path, model.features.trunk, record.backbone)
    return model.eval(), recipe, record


def _memory_bank(path: Path, heads: dict, recipe: Recipe) -> MemoryBank:
    """model.memory_bank's fitted bank, from the heads' state (keys memory_bank.*)."""
    prefix = "memory_bank."
    state = {k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{path}: model.memory_bank is on but the checkpoint holds no bank (it is fitted when "
                              "training ends; this training did not finish)")
    try:
        return MemoryBank.from_state_dict(state, recipe.knn.neighbours, recipe.model.memory_bank_ssn_weight)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: memory bank unusable ({type(exc).__name__}: {exc})") from None


def knn_from_checkpoint(path: Path, record: CheckpointRecord, weights: str | None = None, map_gate: str | None = None
                        ) -> tuple[KnnDetector, Recipe, CheckpointRecord]:
    """Rebuild a fitted knn model: its bank and standardisation, on the backbone it was fitted with."""
    if map_gate not in (None, "none"):
        raise ValueError(f"{path}: a knn model has no score-gated map (map gate is SuperSimpleNet's); drop --map-gate")
    recipe = _recipe(path, record, weights, None)
    try:
        head = KnnHead.from_state_dict(record.heads, recipe.knn.neighbours)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: knn checkpoint without a usable bank ({type(exc).__name__}: {exc})") from None
    model = KnnDetector(recipe.model, recipe.knn, head)
    _check_backbone(path, model.features.trunk, record.backbone, "the bank was fitted with")
    return model.eval(), recipe, record


def _tiled(path: Path, record: CheckpointRecord, weights: str | None, graph: str | None, map_gate: str | None
           ) -> tuple[TiledSSN, Recipe, CheckpointRecord]:
    recipe = _recipe(path, record, weights, map_gate)
    cfg = TilingConfig.from_dict(record.tiled.tiling)
    if graph is not None:
        cfg = dataclasses.replace(cfg, graph=graph)
    model = TiledSSN(recipe.model, cfg if cfg.graph != "tile" else dataclasses.replace(cfg, graph="tiles"))
    if len(model.heads) != len(record.tiled.heads):
        raise CheckpointError(f"{path}: holds {len(record.tiled.heads)} tile locations' heads, its tiling has "
                              f"{len(model.heads)}; the checkpoint was edited or is damaged")
    for heads, state in zip(model.heads, record.tiled.heads):
        _load_heads(path, heads, state)
    _check_backbone(path, model.features.trunk, record.backbone)
    model.tiling = cfg
    return model.eval(), recipe, record
