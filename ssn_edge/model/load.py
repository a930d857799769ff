"""Rebuild a trained model from its checkpoint, plain or tiled: what export, evaluation and the report use.
Nothing here trains; the backbone is reloaded and must be the one the heads were trained on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ssn_edge.config import Recipe, recipe_from_dict, with_map_gate
from ssn_edge.model.backbones import weights_fingerprint
from ssn_edge.model.checkpoint import CheckpointError, load_checkpoint
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.model.tiled import TiledSSN
from ssn_edge.runtime.tiling import TilingConfig

KIND_TILED = "tiled"


@dataclass
class LoadedModel:
    """A trained model in eval mode and the record of how it was trained: what export, evaluation and the report
    read of a checkpoint (read these properties, not the raw state, which is the checkpoint format's business)."""

    model: SuperSimpleNet | TiledSSN
    recipe: Recipe  # as trained, with any load-time override (map gate, weights path)
    state: dict  # the checkpoint's contents

    @property
    def tiled(self) -> bool:
        return isinstance(self.model, TiledSSN)

    @property
    def kind(self) -> str:
        """The model family and shape: "ssn" or "tiled"."""
        return KIND_TILED if self.tiled else "ssn"

    @property
    def recipe_dict(self) -> dict:
        """The recipe exactly as the checkpoint recorded it (provenance)."""
        return self.state["recipe"]

    @property
    def backbone(self) -> dict:
        """{name, weights_source, fingerprint} of the frozen backbone the heads were trained on."""
        return self.state["backbone"]

    @property
    def epoch(self) -> int | None:
        return self.state.get("epoch")

    @property
    def supervision(self) -> dict | None:
        """The supervision summary training recorded (setting and image counts); None: not recorded."""
        return self.state.get("supervision")

    @property
    def trained_on(self) -> str | None:
        """Tiled models: the features the heads learned on ("shared_backbone" | "independent_tiles")."""
        return heads_trained_on(self.state) if self.tiled else None


def load_model(path: str | Path, weights: str | None = None, map_gate: str | None = None,
               graph: str | None = None) -> LoadedModel:
    """The model of any ssn-edge checkpoint. graph: for a tiled one, which way it runs (None: as recorded)."""
    path = Path(path)
    if is_tiled_checkpoint(load_checkpoint(path)):
        return LoadedModel(*tiled_from_checkpoint(path, weights, graph=graph, map_gate=map_gate))
    return LoadedModel(*model_from_checkpoint(path, weights, map_gate))


def model_from_checkpoint(path: Path, weights: str | None = None, map_gate: str | None = None
                          ) -> tuple[SuperSimpleNet, Recipe, dict]:
    """Rebuild the trained model; the backbone is reloaded and must match the one it was trained with.
    map_gate: model.map_gate for this model instead of the recipe's (it has no parameters; None: the recipe's)."""
    state = load_checkpoint(path)
    recipe = with_map_gate(recipe_from_dict(state["recipe"]), map_gate, path)
    if weights is not None:
        recipe.model.weights = weights
    model = SuperSimpleNet(recipe.model)
    model.heads.load_state_dict(state["heads"])
    found = weights_fingerprint(model.features.trunk)
    expected = state["backbone"].get("fingerprint")
    if expected and found != expected:
        raise ValueError(
            f"{path}: backbone weights differ from the ones it was trained with "
            f"(fingerprint {found}, expected {expected}, trained with {state['backbone'].get('weights_source')}); "
            "pass the same weights file with --weights"
        )
    model.eval()
    return model, recipe, state



def heads_trained_on(state: dict) -> str:
    """Which features a tiled checkpoint's heads learned on; checkpoints from before the record: lone tiles."""
    return state.get("trained_on", "independent_tiles")


def is_tiled_checkpoint(state: dict) -> bool:
    return state.get("kind") == KIND_TILED


def tiled_from_checkpoint(path: Path, weights: str | None = None, graph: str | None = None,
                          map_gate: str | None = None) -> tuple[TiledSSN, Recipe, dict]:
    """Rebuild a tiled model. graph: which way it runs ("image": shared backbone, "tiles": independent);
    map_gate: as in model_from_checkpoint."""
    state = load_checkpoint(path)
    if not is_tiled_checkpoint(state):
        raise CheckpointError(f"{path}: not a tiled checkpoint")
    recipe = with_map_gate(recipe_from_dict(state["recipe"]), map_gate, path)
    if weights is not None:
        recipe.model.weights = weights
    cfg = TilingConfig.from_dict(state["tiling"])
    if graph is not None:
        cfg = dataclasses.replace(cfg, graph=graph)
    model = TiledSSN(recipe.model, cfg if cfg.graph != "tile" else dataclasses.replace(cfg, graph="tiles"))
    for k, heads in enumerate(model.heads):
        heads.load_state_dict(state["heads"][k])
    found = weights_fingerprint(model.features.trunk)
    expected = state["backbone"].get("fingerprint")
    if expected and found != expected:
        raise ValueError(f"{path}: backbone weights differ from the ones it was trained with; pass them with --weights")
    model.tiling = cfg
    model.eval()
    return model, recipe, state

