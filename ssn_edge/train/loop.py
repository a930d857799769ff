"""SSN training (spec 2): the epoch loop over the adaptor and heads, with resume, pseudo-masks and checkpoints.

The frozen backbone's maps come from `features` (cached), the batches and their pixel truth from `batches`, each
step from `step`, the optimiser and schedule from `schedule`; learned noise adds the generator's steps
(`learned`). The supervision (spec 5, `ssn_edge.data.supervision`) is resolved first, and in weak and mixed
training the label-only defects switch to pseudo-masks at weak.pseudo_mask_epoch (`pseudo`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ssn_edge.config import Recipe
from ssn_edge.data import ArraySet
from ssn_edge.data.supervision import Supervision, apply_setting
from ssn_edge.evaluation.evaluate import evaluate_model, predict_raw
from ssn_edge.model.checkpoint import (KIND_SSN, BackboneIdentity, CheckpointError, CheckpointRecord, ResumeState,
                                       load_checkpoint, save_checkpoint)
from ssn_edge.model.ssn import SuperSimpleNet, anchor_score
from ssn_edge.train.batches import TrainItems, epoch_batches, feature_masks, make_items
from ssn_edge.train.collapse import (CollapseCheck, CollapseError, check_model, decide, judge_outputs,
                                     score_candidates)
from ssn_edge.train.features import FeatureSource, SharedFeatures
from ssn_edge.train.learned import LearnedNoise
from ssn_edge.train.pseudo import PseudoMaskConfig, with_pseudo_masks
from ssn_edge.train.schedule import (Optimizer, Scheduler, autocast, batches_per_epoch, build_optimizer, epochs_for_steps,
                                     resolve_precision, restart_schedule, seed_everything)
from ssn_edge.train.step import check_finite, train_step

log = logging.getLogger("ssn_edge")


@dataclass
class TrainResult:
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    collapse: CollapseCheck | None = None  # the collapse check on the held-out images (None: not run)


@dataclass
class RunState:
    """What a run changes as it trains: the heads, their optimiser and schedule, the random state, the history."""

    model: SuperSimpleNet
    optimizer: Optimizer
    scheduler: Scheduler
    rng: np.random.Generator
    learned: LearnedNoise | None  # noise.kind learned: the generator's side of the game
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0


def resolve_supervision(recipe: Recipe, arrays: ArraySet) -> tuple[Recipe, ArraySet, Supervision]:
    """The setting that actually trains: "auto" becomes what the data allows and weak drops every mask. The
    returned recipe says that setting, so the checkpoint (and so the bundle) records it."""
    arrays, supervision = apply_setting(arrays, recipe.train.setting, recipe.data.mask_fraction)
    log.info("training data: %s", supervision.describe())
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, setting=supervision.setting))
    return recipe, arrays, supervision


def resolve_epochs(recipe: Recipe, items: TrainItems) -> Recipe:
    """The recipe with train.steps (if set) turned into epochs of this data (what the checkpoint records)."""
    t = recipe.train
    batches = batches_per_epoch(t, len(items.normal), bool(len(items.defective)))
    resolved = epochs_for_steps(t, batches)
    if resolved is not t:
        cap = "" if t.whole_map_steps is None else f", at most {t.whole_map_steps} in each whole-map epoch"
        log.info("train.steps %d: %d epochs of %d batches (%d on crops)%s", t.steps, resolved.epochs, batches,
                 resolved.crop_epochs or 0, cap)
    return dataclasses.replace(recipe, train=resolved)


def new_run(recipe: Recipe) -> RunState:
    rng = seed_everything(recipe.train.seed)
    model = SuperSimpleNet(recipe.model)
    optimizer, scheduler = build_optimizer(model, recipe.train)
    # noise.kind "learned": a generator trained against the heads (spec 4); it exists in training only.
    learned = LearnedNoise.build(model, recipe) if recipe.noise.kind == "learned" else None
    return RunState(model, optimizer, scheduler, rng, learned)


def resumable(path: Path, epochs: int) -> CheckpointRecord:
    """The record of a plain SSN checkpoint that a run of `epochs` epochs can go on from; else a one-line error."""
    record = load_checkpoint(path)
    if record.kind != KIND_SSN or record.resume is None:
        raise CheckpointError(f"{path}: a {record.kind} checkpoint without training state; it cannot be resumed")
    if record.epoch >= epochs:
        raise ValueError(f"{path}: already trained {record.epoch} epochs; train.epochs {epochs} leaves none to run")
    return record


def restore(run: RunState, path: Path, epochs: int) -> None:
    """Continue `run` from the checkpoint at path: heads, optimiser, generator, random state and history. The
    schedule is this recipe's (a resumed run may have been given more epochs), set at the epoch reached."""
    record = resumable(path, epochs)
    run.model.heads.load_state_dict(record.heads)
    run.optimizer.load_state_dict(record.resume.optimizer)
    if run.learned is not None and record.resume.generator is not None:
        run.learned.restore(record.resume.generator)
    elif run.learned is not None:
        log.warning("%s has no noise generator (not a learned-noise run): starting a fresh one", path)
    run.start_epoch = record.epoch
    restart_schedule(run.optimizer, run.scheduler, run.start_epoch)
    run.history = list(record.history)
    torch.set_rng_state(record.resume.rng["torch"])
    run.rng.bit_generator.state = record.resume.rng["numpy"]
    log.info("resumed from %s at epoch %d", path, run.start_epoch)


def pseudo_mask_epoch(recipe: Recipe, supervision: Supervision, start_epoch: int) -> int | None:
    """The epoch at which label-only defects get pseudo-masks: weak.pseudo_mask_epoch, or a resumed run's first
    epoch past it (made again from the resumed model). None: never (off, no label-only defect, or the CAM head,
    which has no segmentation map to teach)."""
    epoch = recipe.weak.pseudo_mask_epoch
    if epoch is None or not supervision.label_only or recipe.model.cls_head == "cam":
        return None
    return max(epoch, start_epoch)


def make_pseudo_masks(model: SuperSimpleNet, recipe: Recipe, as_given: ArraySet) -> tuple[ArraySet, dict[str, float]]:
    """as_given with pseudo-masks on its label-only defects, from the map the model has learned so far."""
    w = recipe.weak
    arrays, stats = with_pseudo_masks(model, as_given, PseudoMaskConfig(top=w.pseudo_top, grow_quantile=w.pseudo_grow),
                                      seed=recipe.train.seed)
    log.info("pseudo-masks: %d of %d label-only defective images (%.2f %% of their pixels marked defect)",
             stats["pseudo_masked"], stats["pseudo_candidates"], 100 * stats.get("pseudo_defect_fraction", 0))
    return arrays, stats


def heads_step(run: RunState, recipe: Recipe, batch: tuple, crop: int | None, where: tuple[int, int, int]
               ) -> tuple[float, dict[str, float]]:
    """One optimiser step of the adaptor and heads on batch (l2, l3, gt, mask_valid); returns its loss and parts."""
    with autocast(recipe.train):
        loss, parts = train_step(run.model, recipe, *batch, run.rng, crop,
                                 generator=run.learned.generator if run.learned is not None else None)
    if run.learned is not None:
        check_finite(loss, "heads", *where)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if recipe.train.setting != "unsupervised":  # spec 2: with real defects, gradient norm clipped to 1
        torch.nn.utils.clip_grad_norm_(run.model.heads.parameters(), 1.0)
    run.optimizer.step()
    return float(loss.detach()), parts


def run_epoch(run: RunState, recipe: Recipe, source: FeatureSource, batches: list[np.ndarray], arrays: ArraySet,
              epoch: int, bar: tqdm) -> dict[str, float]:
    """Every batch once, then the schedule's step; returns the epoch's record (loss, learned-noise statistics)."""
    t = recipe.train
    # Crops make early epochs 4x cheaper; the last ones see whole maps, so the classification head's global
    # max/avg pooling is tuned on the statistics it meets at inference.
    crop = t.feature_crop if (t.crop_epochs is None or epoch < t.crop_epochs) else None
    if crop is None and t.whole_map_steps is not None:
        batches = batches[: t.whole_map_steps]
    losses, eps_parts, gen_losses = [], [], []
    for step, chunk in enumerate(batches):
        l2, l3 = source.get(chunk)
        gt, valid = feature_masks(arrays, chunk, (l2.shape[-2] * 2, l2.shape[-1] * 2))
        where = (epoch, step, len(batches))
        loss, parts = heads_step(run, recipe, (l2, l3, gt, valid), crop, where)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if run.learned is not None:
            eps_parts.append(parts)
            value = run.learned.after_heads_step(run.model, recipe, (l2, l3, gt, valid), run.rng, crop, where)
            if value is not None:
                gen_losses.append(value)
    run.scheduler.step()
    record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
    if run.learned is not None:
        # What the heads were trained on this epoch: mean |eps| / feature std (<= beta), fraction saturated.
        record["eps_rel_mean"] = float(np.mean([p["eps_rel_mean"] for p in eps_parts]))
        record["eps_saturated"] = float(np.mean([p["eps_saturated"] for p in eps_parts]))
        record["gen_steps"] = len(gen_losses)
        if gen_losses:
            record["gen_loss"] = float(np.mean(gen_losses))
    return record


def checkpoint_record(run: RunState, recipe: Recipe, backbone: BackboneIdentity, supervision: Supervision,
                      epochs_done: int, collapse: CollapseCheck | None = None) -> CheckpointRecord:
    resume = ResumeState(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                         rng={"torch": torch.get_rng_state(), "numpy": run.rng.bit_generator.state},
                         generator=run.learned.state() if run.learned is not None else None)
    return CheckpointRecord(kind=KIND_SSN, recipe=recipe.to_dict(), backbone=backbone, heads=run.model.heads.state_dict(),
                            epoch=epochs_done, supervision=supervision, history=run.history, resume=resume,
                            collapse=collapse)


def with_score_anchor(recipe: Recipe, anchor: str) -> Recipe:
    """The recipe the checkpoint records once the score is settled (model.score_anchor none, map_max or map_top), so
    export and eval rebuild the graph that was chosen."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, score_anchor=anchor))


def anchored(model: SuperSimpleNet, recipe: Recipe, anchor: str = "map_max") -> Recipe:
    """The model's score made the map's maximum logit (or its top cells' mean), and the recipe saying so."""
    model.heads.anchor_to_map(anchor)
    return with_score_anchor(recipe, anchor)


SCORE_NAMES = {"none": "the head's score", "map_max": "the map's maximum", "map_top": "the map's top cells' mean"}


def choose_score(model: SuperSimpleNet, recipe: Recipe, check_arrays: ArraySet) -> tuple[Recipe, CollapseCheck]:
    """The collapse check's record, after model.score_anchor auto's choice: the head's score, the map's maximum or
    its top cells' mean, whichever ranks the held-out check set best (on Magnetic tile the head's score trailed the
    map's maximum on held-out real and painted defects alike, and the top cells' mean led on its real defects;
    benchmarks/results/recipe.md). The recipe records what was chosen."""
    raw_maps, logits = predict_raw(model, check_arrays.images)
    check = judge_outputs(model, raw_maps, logits, check_arrays.labels)
    if recipe.model.score_anchor != "auto":
        return recipe, check
    heads = model.heads
    aurocs = score_candidates(raw_maps, logits, check_arrays.labels, heads.anchor_blur, heads.anchor_top)
    best = max(aurocs, key=aurocs.__getitem__)  # the first of equals: ties keep the simpler score
    log.info("model.score_anchor auto: check-set AUROC %s: the score is %s",
             ", ".join(f"{SCORE_NAMES[k]} {v:.3f}" for k, v in aurocs.items()), SCORE_NAMES[best])
    if best == "none":
        return with_score_anchor(recipe, "none"), check
    recipe = anchored(model, recipe, best)
    if heads.map_gate != "none":  # the gate mixes the new score into the map: score the check set again
        return recipe, check_model(model, check_arrays)
    # Anchored, the head's logit is 0, so the score is the anchor of the maps already scored: no second pass over
    # the check set (Magnetic tile's 324 images, the bank's distances for each: minutes on 2 cores).
    maps = torch.from_numpy(raw_maps)[:, None]
    scores = anchor_score(maps, best, heads.anchor_blur, heads.anchor_top).numpy()
    return recipe, judge_outputs(model, raw_maps, scores, check_arrays.labels)


def collapse_check(run: RunState, recipe: Recipe, check_arrays: ArraySet, ckpt: Path) -> tuple[Recipe, CollapseCheck]:
    """The collapse check on the held-out check set (after model.score_anchor auto's choice) and what
    train.on_collapse does, in one logged line. anchor changes the model and the recipe the checkpoint records
    (model.score_anchor map_max), so export rebuilds it."""
    recipe, check = choose_score(run.model, recipe, check_arrays)
    check = decide(check, recipe.train.on_collapse, not run.model.heads.cam, ckpt)
    (log.warning if check.collapsed else log.info)("%s", check.message)
    if check.action == "anchored":
        recipe = anchored(run.model, recipe)
    return recipe, check


def train(
    recipe: Recipe,
    train_arrays: ArraySet,
    out_dir: Path,
    test_arrays: ArraySet | None = None,
    resume: Path | None = None,
    progress: bool = True,
    shared: SharedFeatures | None = None,
    check_arrays: ArraySet | None = None,
) -> TrainResult:
    """Train SSN on train_arrays into out_dir/checkpoint.pt (written after every epoch); with test_arrays,
    evaluate once at the end (metrics.json). shared: tiled training's whole-image features (ssn_edge.train.tiled).
    check_arrays: the held-out check set (ssn_edge.data.heldout.check_set) for the collapse check at the end; a
    collapse with train.on_collapse error raises CollapseError after the checkpoint is written."""
    recipe, as_given, supervision = resolve_supervision(recipe, train_arrays)
    items = make_items(as_given, recipe.train.setting)
    recipe = resolve_epochs(recipe, items)
    recipe = dataclasses.replace(recipe, train=resolve_precision(recipe.train))
    run = new_run(recipe)
    if resume is not None:
        restore(run, Path(resume), recipe.train.epochs)
    source = FeatureSource(run.model, as_given, items.all, cache=recipe.train.cache_features, shared=shared)
    backbone = BackboneIdentity.of(recipe.model.backbone, run.model.features.trunk)
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint.pt"
    run.model.heads.train()
    pseudo_from = pseudo_mask_epoch(recipe, supervision, run.start_epoch)
    # Pseudo-masks are made from the data as given, and the batch balance counts annotated masks only
    # (as_given.mask_valid), so pseudo-masks never pass for annotation.
    arrays = as_given
    t = recipe.train
    bar = tqdm(range(run.start_epoch, t.epochs), desc="train", disable=not progress, initial=run.start_epoch, total=t.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        pseudo: dict[str, float] = {}
        if epoch == pseudo_from:
            arrays, pseudo = make_pseudo_masks(run.model, recipe, as_given)
        batches = epoch_batches(items, as_given.mask_valid, t.batch_size, recipe.weak.masked_share, run.rng)
        record = run_epoch(run, recipe, source, batches, arrays, epoch, bar)
        run.history.append({**record, "epoch_s": time.perf_counter() - t0, **pseudo})
        save_checkpoint(ckpt, checkpoint_record(run, recipe, backbone, supervision, epoch + 1))
    if recipe.model.memory_bank:
        from ssn_edge.train.memory_bank import fit_memory_bank, held_out_normals

        fit_memory_bank(run.model, recipe, as_given, held_out_normals(check_arrays), progress)
    collapse = None
    if check_arrays is None and recipe.model.score_anchor == "auto":
        log.info("model.score_anchor auto: no held-out images to choose on; the head's score is kept")
        recipe = with_score_anchor(recipe, "none")
        save_checkpoint(ckpt, checkpoint_record(run, recipe, backbone, supervision, t.epochs))
    if check_arrays is not None:
        recipe, collapse = collapse_check(run, recipe, check_arrays, ckpt)
        save_checkpoint(ckpt, checkpoint_record(run, recipe, backbone, supervision, t.epochs, collapse))
    (out_dir / "history.json").write_text(json.dumps(run.history, indent=2))
    if collapse is not None and collapse.action == "stopped":
        raise CollapseError(collapse.message)
    metrics: dict[str, float] = {}
    if test_arrays is not None:
        metrics = evaluate_model(run.model, test_arrays)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return TrainResult(ckpt, run.history, metrics, collapse)
