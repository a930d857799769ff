"""The eval job behind `ssn-edge eval`: a checkpoint's metrics on a split of its data."""

from __future__ import annotations

from pathlib import Path

from ssn_edge.data import ArraySet, load_arrays, load_dataset, require_nonempty, select


def split_arrays(data_path: str | Path, split: str, size: tuple[int, int], progress: bool = True) -> ArraySet:
    samples = load_dataset(data_path)
    chosen = require_nonempty(select(samples, split), split, data_path)
    return load_arrays(chosen, size, progress=progress)


def eval_job(checkpoint: Path, data_path: str | None, split: str = "test", weights: str | None = None,
             map_gate: str | None = None) -> dict[str, float]:
    """Metrics of a checkpoint (plain or tiled) on a split of its data (default: the recipe's data.path)."""
    from ssn_edge.evaluation.evaluate import evaluate_loaded
    from ssn_edge.model.load import load_model

    loaded = load_model(checkpoint, weights, map_gate)
    path = data_path or loaded.recipe.data.path
    return evaluate_loaded(loaded, split_arrays(path, split, tuple(loaded.recipe.data.image_size)))
