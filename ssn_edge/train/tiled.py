"""Tiled training and evaluation (spec 6): one model on every tile, or a tiled ensemble (one per location).

Each model is an ordinary SSN trained by `ssn_edge.train.train` on tiles cut from the images at
data.image_size; an ensemble trains one per tile location, in turn, each in its own folder (`loc_00`, ...), so an
interrupted run picks up where it stopped. The heads learn on the features of the graph they will run in: a
shared-backbone recipe cuts each tile's maps from the whole image's (`SharedFeatures`), otherwise every tile goes
through the backbone alone (the paper's). The two graphs' maps differ within ~100 px of a tile edge
(benchmarks/tiling_bench.py edge-profile), and each ensemble measured did better in the graph it learned on
(graph-match, bottle 512, image AUROC / AUPRO): 4 tiles learned on lone tiles 91.3 / 53.6 run on lone tiles vs
82.9 / 53.7 on shared features; 4 tiles learned on shared features 81.0 / 59.7 vs 78.7 / 55.0; 9 tiles learned
on shared features 98.5 / 67.9 vs 98.1 / 64.2. The result is one tiled
checkpoint holding every location's adaptor + heads, the tiling, the recipe, the backbone identity and the
supervision summary of the whole images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from ssn_edge.config import Recipe
from ssn_edge.data import ArraySet
from ssn_edge.evaluation.evaluate import evaluate_tiled
from ssn_edge.model.checkpoint import (KIND_TILED, CheckpointError, CheckpointRecord, TiledHeads, load_checkpoint,
                                       save_checkpoint)
from ssn_edge.model.load import tiled_from_checkpoint
from ssn_edge.model.tiled import padded_images, runtime_tiling
from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.tiling import TileGrid, tile
from ssn_edge.train.features import SharedFeatures
from ssn_edge.train.loop import TrainResult, resolve_supervision, train
from ssn_edge.train.schedule import resolve_precision

log = logging.getLogger("ssn_edge")


def tile_arrays(arrays: ArraySet, grid: TileGrid, locations: list[int], fill: str = "zero") -> ArraySet:
    """The tiles at `locations` of every image (image-major), with their masks, filled beyond the image as the
    tiling fills them (TilingConfig.fill; a mirrored defect is a defect); a tile's label is 1 when its mask has a
    defect pixel (or, for a defective image without pixel truth, stays 1: unknown where it is)."""
    n, t = len(arrays), len(locations)
    th, tw = grid.tile
    images = np.empty((n * t, 3, th, tw), dtype=np.float32)
    masks = np.zeros((n * t, th, tw), dtype=bool)
    labels = np.zeros(n * t, dtype=np.int64)
    valid = np.ones(n * t, dtype=bool)
    paths: list[str] = []
    for i in range(n):
        tiles = tile(arrays.images[i].transpose(1, 2, 0), grid, fill)  # of the normalised image
        mtiles = tile(arrays.masks[i], grid, fill)
        for j, k in enumerate(locations):
            r = i * t + j
            images[r] = tiles[k].transpose(2, 0, 1)
            masks[r] = mtiles[k]
            if arrays.labels[i]:
                if arrays.mask_valid[i]:
                    labels[r] = int(mtiles[k].any())
                else:
                    labels[r], valid[r] = 1, False
            paths.append(f"{arrays.paths[i]}#tile{k}")
    return ArraySet(images=images, masks=masks, labels=labels, mask_valid=valid, paths=paths)


def _tile_recipe(recipe: Recipe) -> Recipe:
    """The recipe each location's model trains with: an ordinary SSN recipe at the tile size."""
    data = dataclasses.replace(recipe.data, image_size=tuple(recipe.tiling.tile))
    return dataclasses.replace(recipe, data=data, tiling=None)


def _claim_folder(out_dir: Path, trained_on: str) -> None:
    """Mark out_dir as holding locations trained on `trained_on` features; refuse one trained on the others."""
    marker = out_dir / "trained_on.txt"
    # Folders from before the marker existed hold locations trained on lone tiles.
    before = marker.read_text().strip() if marker.is_file() else (
        "independent_tiles" if any(out_dir.glob("*/checkpoint.pt")) else None)
    if before is not None and before != trained_on:
        raise ValueError(f"{out_dir} holds locations trained on {before} features; this recipe "
                         f"trains on {trained_on}: train into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, trained_on + "\n")


def _finished(path: Path, epochs: int) -> bool:
    if not path.is_file():
        return False
    try:
        return load_checkpoint(path).epoch >= epochs
    except CheckpointError:
        return False


def _train_location(sub: Recipe, train_arrays: ArraySet, grid: TileGrid, fill: str, locations: list[int],
                    folder: Path, shared: SharedFeatures | None, progress: bool) -> CheckpointRecord:
    """The model of these tile locations, trained into folder (kept if finished, resumed if interrupted)."""
    ckpt = folder / "checkpoint.pt"
    if _finished(ckpt, sub.train.epochs):
        log.info("%s: already trained (%s), kept", folder.name, ckpt)
    else:
        arrays = tile_arrays(train_arrays, grid, locations, fill)
        log.info("%s: training on %d tiles (%s)", folder.name, len(arrays),
                 "all locations" if len(locations) > 1 else f"location {locations[0]}")
        folder.mkdir(parents=True, exist_ok=True)
        train(sub, arrays, folder, resume=ckpt if ckpt.is_file() else None, progress=progress, shared=shared)
    return load_checkpoint(ckpt)


def location_groups(recipe: Recipe) -> dict[str, list[int]]:
    """The models a tiled recipe trains, by folder name: 'single' (every tile location), or one per location
    ('loc_00', ...) for an ensemble."""
    cfg = runtime_tiling(recipe)
    count = cfg.grid(cfg.image_size).count
    return {"single": list(range(count))} if cfg.mode == "single" else {f"loc_{k:02d}": [k] for k in range(count)}


def train_tiled(
    recipe: Recipe,
    train_arrays: ArraySet,
    out_dir: Path,
    test_arrays: ArraySet | None = None,
    progress: bool = True,
    only: list[str] | None = None,
) -> TrainResult | None:
    """Train the recipe's tiled model; writes out_dir/checkpoint.pt (kind 'tiled') and metrics.json.

    only: train just these location folders (names of `location_groups`) and return None, so a scheduler can
    train an ensemble's locations side by side; a later call without it keeps them and assembles the model."""
    cfg = runtime_tiling(recipe)
    grid = cfg.grid(cfg.image_size)
    if tuple(train_arrays.images.shape[-2:]) != cfg.image_size:
        raise ValueError(f"training images are {train_arrays.images.shape[-2:]}, the tiling expects {cfg.image_size}")
    # Once for every location, so the record says it and the warning is said once.
    recipe = dataclasses.replace(recipe, train=resolve_precision(recipe.train))
    # What the whole images give, for the record; each location resolves the recipe's setting on its own tiles.
    resolved, _, supervision = resolve_supervision(recipe, train_arrays)
    sub = _tile_recipe(recipe)
    out_dir = Path(out_dir)
    padded = padded_images(train_arrays.images, grid) if cfg.graph == "image" else None
    trained_on = "shared_backbone" if padded is not None else "independent_tiles"
    _claim_folder(out_dir, trained_on)
    groups = location_groups(recipe)
    unknown = sorted(set(only or ()) - set(groups))
    if unknown:
        raise ValueError(f"no tile location(s) {', '.join(unknown)} in this recipe (has: {', '.join(groups)})")
    locations: dict[str, CheckpointRecord] = {}
    for name, group in groups.items():
        if only is not None and name not in only:
            continue
        shared = None if padded is None else SharedFeatures(padded, [grid.boxes[k] for k in group])
        locations[name] = _train_location(sub, train_arrays, grid, cfg.fill, group, out_dir / name, shared, progress)
    if only is not None:
        return None
    first = next(iter(locations.values()))
    record = CheckpointRecord(
        kind=KIND_TILED, recipe=resolved.to_dict(), backbone=first.backbone, epoch=sub.train.epochs,
        supervision=supervision, history={name: r.history for name, r in locations.items()},
        tiled=TiledHeads([r.heads for r in locations.values()], cfg.to_dict(), trained_on))
    path = save_checkpoint(out_dir / "checkpoint.pt", record)
    metrics: dict[str, float] = {}
    if test_arrays is not None:
        model, _, _ = tiled_from_checkpoint(path)
        metrics = evaluate_tiled(model, test_arrays)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(path, [r for h in record.history.values() for r in h], metrics)
