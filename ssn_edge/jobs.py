"""The train and eval jobs behind the CLI: resolve data, load arrays, train or evaluate, write results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ssn_edge.config import Recipe
from ssn_edge.data import ArraySet, load_arrays, load_dataset, require_nonempty, select, summary

log = logging.getLogger("ssn_edge")


def split_arrays(data_path: str | Path, split: str, size: tuple[int, int], progress: bool = True) -> ArraySet:
    samples = load_dataset(data_path)
    chosen = require_nonempty(select(samples, split), split, data_path)
    return load_arrays(chosen, size, progress=progress)


def train_job(recipe: Recipe, out_dir: Path, resume: Path | None = None, progress: bool = True, evaluate: bool = True):
    """Train from a recipe into out_dir; evaluate on the test split at the end unless evaluate is False (a caller
    that exports next gets the same metrics from the bundle, without a second pass over the test images)."""
    from ssn_edge.train import train

    if not recipe.data.path:
        raise ValueError("no data: set data.path in the recipe or pass --data")
    samples = load_dataset(recipe.data.path)
    log.info("data %s\n%s", recipe.data.path, summary(samples))
    if recipe.data.mask_fraction < 1.0:
        from ssn_edge.supervision import hide_masks

        samples = hide_masks(samples, recipe.data.mask_fraction, recipe.data.mask_seed)
        log.info("data.mask_fraction %g: masks kept on %d defective training images\n%s", recipe.data.mask_fraction,
                 sum(s.split == "train" and s.label == 1 and s.has_mask for s in samples), summary(samples))
    train_samples = require_nonempty(select(samples, "train"), "train", recipe.data.path)
    test_samples = select(samples, "test") if evaluate else []
    size = tuple(recipe.data.image_size)
    train_arrays = load_arrays(train_samples, size, progress=progress)
    test_arrays = load_arrays(test_samples, size, progress=progress) if test_samples else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    if recipe.tiling is not None:
        from ssn_edge.train_tiled import train_tiled

        if resume is not None:
            log.info("tiled training resumes by itself: finished locations in %s are kept", out_dir)
        return train_tiled(recipe, train_arrays, out_dir, test_arrays=test_arrays, progress=progress)
    return train(recipe, train_arrays, out_dir, test_arrays=test_arrays, resume=resume, progress=progress)


def eval_job(checkpoint: Path, data_path: str | None, split: str = "test", weights: str | None = None,
             map_gate: str | None = None) -> dict[str, float]:
    from ssn_edge.checkpoint import load_checkpoint
    from ssn_edge.evaluate import evaluate_model
    from ssn_edge.train import model_from_checkpoint
    from ssn_edge.train_tiled import evaluate_tiled, is_tiled_checkpoint, tiled_from_checkpoint

    if is_tiled_checkpoint(load_checkpoint(checkpoint)):
        model, recipe, _ = tiled_from_checkpoint(checkpoint, weights, map_gate=map_gate)
        path = data_path or recipe.data.path
        return evaluate_tiled(model, split_arrays(path, split, tuple(recipe.data.image_size)))
    model, recipe, _ = model_from_checkpoint(checkpoint, weights, map_gate)
    path = data_path or recipe.data.path
    arrays = split_arrays(path, split, tuple(recipe.data.image_size))
    return evaluate_model(model, arrays)
