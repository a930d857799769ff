"""The train job behind `ssn-edge train`: resolve the data, load arrays, train (plain or tiled), write results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ssn_edge.config import Recipe
from ssn_edge.data import (ArraySet, ValidationSplit, load_arrays, load_dataset, require_nonempty, select,
                           split_validation, summary)

log = logging.getLogger("ssn_edge")


def train_job(recipe: Recipe, out_dir: Path, resume: Path | None = None, progress: bool = True, evaluate: bool = True,
              locations: list[str] | None = None):
    """Train from a recipe into out_dir; evaluate on the test split at the end unless evaluate is False (a caller
    that exports next gets the same metrics from the bundle, without a second pass over the test images).
    locations: a tiled recipe's location folders to train, and no more (None returned; `train.tiled`)."""
    if not recipe.data.path:
        raise ValueError("no data: set data.path in the recipe or pass --data")
    samples = load_dataset(recipe.data.path)
    log.info("data %s\n%s", recipe.data.path, summary(samples))
    if recipe.data.mask_fraction < 1.0:
        from ssn_edge.data.supervision import hide_masks

        samples = hide_masks(samples, recipe.data.mask_fraction, recipe.data.mask_seed)
        log.info("data.mask_fraction %g: masks kept on %d defective training images\n%s", recipe.data.mask_fraction,
                 sum(s.split == "train" and s.label == 1 and s.has_mask for s in samples), summary(samples))
    split = split_validation(samples, recipe.data.val_fraction, recipe.data.val_min, recipe.data.val_seed)
    if split.held_out:
        log.info("%d normal training images held out for thresholds (data.val_fraction %g, val_min %d, val_seed %d)",
                 len(split.held_out), recipe.data.val_fraction, recipe.data.val_min, recipe.data.val_seed)
    train_samples = require_nonempty(split.train, "train", recipe.data.path)
    test_samples = select(samples, "test") if evaluate else []
    size = tuple(recipe.data.image_size)
    train_arrays = load_arrays(train_samples, size, progress=progress)
    test_arrays = load_arrays(test_samples, size, progress=progress) if test_samples else None
    if resume is not None and recipe.model.kind != "knn" and recipe.tiling is None:
        from ssn_edge.train.loop import resumable

        resumable(Path(resume), recipe.train.epochs)  # refused before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    if recipe.model.kind == "knn":
        from ssn_edge.train.knn import train_knn

        if resume is not None:
            raise ValueError(f"{resume}: a knn fit has no epochs to resume; fit again without --resume")
        return train_knn(recipe, train_arrays, out_dir, test_arrays=test_arrays, progress=progress)
    if recipe.tiling is not None:
        from ssn_edge.train.tiled import train_tiled

        if resume is not None:
            log.info("tiled training resumes by itself: finished locations in %s are kept", out_dir)
        return train_tiled(recipe, train_arrays, out_dir, test_arrays=test_arrays, progress=progress, only=locations)
    if locations is not None:
        raise ValueError(f"recipe {recipe.name!r} is not tiled: it has no tile locations to train apart")
    from ssn_edge.train.loop import train  # here: a knn fit never loads SSN's training loop

    return train(recipe, train_arrays, out_dir, test_arrays=test_arrays, resume=resume, progress=progress,
                 check_arrays=collapse_check_set(split, size, recipe.train.setting))


def collapse_check_set(split: ValidationSplit, size: tuple[int, int], setting: str) -> ArraySet | None:
    """What the collapse check and model.score_anchor auto score (ssn_edge.data.heldout): the held-out normals,
    their painted copies and, in the unsupervised setting, the training split's defective images, which it does not
    train on but which are real defects of this data. None, said in one line, when no normal image was held out."""
    if not split.held_out:
        log.info("collapse check: not run, no normal training image is held out (data.val_fraction)")
        return None
    from ssn_edge.data.heldout import check_set, unseen_defects

    defective = unseen_defects(split.train, setting)
    if defective:
        log.info("check set: the %d held-out normal images, their painted copies and the %d defective training "
                 "images (the unsupervised setting does not train on them)", len(split.held_out), len(defective))
    return check_set(split.held_out, size, defective=defective)


