"""Fitting a knn model (model.kind knn): `ssn-edge train` with a knn recipe comes here (ssn_edge/train/job.py).

PatchCore's fit: patch features of the normal training images -> a bounded pool of candidates -> a coreset (the
bank) -> the distances of held-out normal images, which set the outputs' standardisation. Nothing is learned by
gradient; the fit is deterministic for train.seed.

Memory is bounded whatever the training set: features are extracted knn.batch images at a time and each image
keeps only its share of knn.pool random patches, so the candidates take at most pool x C x 4 bytes (400 000 x 384
x 4 = 614 MB for ResNet18), their projection twice pool x projection x 4 (410 MB at 128 dims: the projection and
its transposed copy the greedy steps stream); plus one batch of features.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ssn_edge.config import KnnConfig, Recipe
from ssn_edge.data import ArraySet
from ssn_edge.data.supervision import Supervision
from ssn_edge.model.checkpoint import KIND_KNN, BackboneIdentity, CheckpointRecord, save_checkpoint
from ssn_edge.model.knn import KnnDetector, KnnHead, Standardizer
from ssn_edge.model.knn.bank import greedy_coreset, random_projection, random_subset
from ssn_edge.model.knn.features import PatchFeatures
from ssn_edge.train.loop import TrainResult

log = logging.getLogger("ssn_edge")

Features = Callable[[np.ndarray], torch.Tensor]  # image indices -> their patch features (n, C, h, w)


@dataclass
class KnnFit:
    """What a fit did: the record training writes to history.json and the checkpoint."""

    normal_images: int
    held_out_images: int
    patches: int  # patches of the banked images
    candidates: int  # of them kept in the pool
    bank: int
    sampler: str
    features_s: float = 0.0
    coreset_s: float = 0.0
    fit_s: float = 0.0


def split_normal(labels: np.ndarray, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal images in a seeded random order: (banked, held out). At most a quarter is held out."""
    good = np.random.default_rng(seed).permutation(np.flatnonzero(labels == 0))
    if len(good) < 2:
        raise ValueError(f"model.kind knn needs at least 2 normal training images (a bank and a held-out one), got {len(good)}")
    held = min(held_out, max(1, len(good) // 4))
    return np.sort(good[held:]), np.sort(good[:held])


def _batches(indices: np.ndarray, batch: int, desc: str, progress: bool):
    starts = range(0, len(indices), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for s in starts:
        yield indices[s : s + batch]


def candidate_patches(features: Features, indices: np.ndarray, cfg: KnnConfig, seed: int,
                      progress: bool = False) -> tuple[torch.Tensor, int]:
    """(P, C) candidates, P <= max(knn.pool, images): each image's share of the pool, drawn at random, written into
    one tensor allocated once (no concatenation, so no second copy). Also returns how many patches the images have."""
    rng = np.random.default_rng([seed, 1])
    share = max(1, cfg.pool // len(indices))
    out, row, total = None, 0, 0
    for chunk in _batches(indices, cfg.batch, "knn features", progress):
        patches = features(chunk).float().flatten(2).transpose(1, 2)  # (n, hw, C)
        total += patches.shape[0] * patches.shape[1]
        take = min(share, patches.shape[1])
        if out is None:
            out = torch.empty(len(indices) * take, patches.shape[2])
        for p in patches:
            keep = slice(None) if take == len(p) else torch.from_numpy(np.sort(rng.choice(len(p), take, replace=False)))
            out[row : row + take] = p[keep]
            row += take
    return out, total


def bank_size(cfg: KnnConfig, patches: int, candidates: int) -> int:
    """knn.coreset as a count: a fraction of all the banked images' patches, or the count itself; at most the pool."""
    k = int(round(cfg.coreset * patches)) if cfg.coreset <= 1 else int(cfg.coreset)
    if k > candidates:
        log.warning("knn.coreset asks for %d patches, the pool holds %d (knn.pool): the bank is the whole pool", k, candidates)
    return max(1, min(k, candidates))


def select_bank(candidates: torch.Tensor, k: int, cfg: KnnConfig, seed: int, progress: bool = False) -> torch.Tensor:
    if cfg.sampler == "random":
        return candidates[random_subset(len(candidates), k, seed)]
    points = candidates
    if cfg.projection is not None and cfg.projection < candidates.shape[1]:
        proj = random_projection(candidates.shape[1], cfg.projection, seed)
        points = torch.cat([candidates[s : s + 65536] @ proj for s in range(0, len(candidates), 65536)])
    return candidates[greedy_coreset(points, k, seed, progress)]


def fit_bank(features: Features, labels: np.ndarray, cfg: KnnConfig, seed: int,
             progress: bool = False) -> tuple[torch.Tensor, np.ndarray, KnnFit]:
    """The bank from the normal images among labels, the indices of the normal images held out of it, and the fit's
    record; features as for candidate_patches."""
    t0 = time.perf_counter()
    banked, held = split_normal(labels, cfg.held_out, seed)
    candidates, patches = candidate_patches(features, banked, cfg, seed, progress)
    t1 = time.perf_counter()
    k = bank_size(cfg, patches, len(candidates))
    fit = KnnFit(int((labels == 0).sum()), len(held), patches, len(candidates), k, cfg.sampler, t1 - t0)
    bank = select_bank(candidates, k, cfg, seed, progress).clone()
    del candidates
    fit.coreset_s = time.perf_counter() - t1
    return bank, held, fit


def standardised_head(features: Features, held: np.ndarray, bank: torch.Tensor, cfg: KnnConfig) -> KnnHead:
    """The head of a bank, its map and score standardised on the held-out normal images' own map and score values,
    computed by the head itself (so by the same code as at inference: knn.neighbours included)."""
    unit = Standardizer(0.0, 1.0)
    raw = KnnHead(bank, unit, unit, cfg.neighbours)  # outputs the distances as they are
    maps, scores = [], []
    for chunk in _batches(held, cfg.batch, "held-out", False):
        m, s = raw(features(chunk).float())
        maps.append(m)
        scores.append(s)
    return KnnHead(bank, Standardizer.fit(torch.cat(maps)), Standardizer.fit(torch.cat(scores)), cfg.neighbours)


def fit_head(features: Features, labels: np.ndarray, cfg: KnnConfig, seed: int,
             progress: bool = False) -> tuple[KnnHead, KnnFit]:
    """The bank and the standardisation from the normal images among labels; features as for candidate_patches."""
    t0 = time.perf_counter()
    bank, held, fit = fit_bank(features, labels, cfg, seed, progress)
    head = standardised_head(features, held, bank, cfg)
    fit.fit_s = time.perf_counter() - t0
    return head, fit


def fit_knn(recipe: Recipe, arrays: ArraySet, progress: bool = True) -> tuple[KnnDetector, KnnFit]:
    """A fitted knn model from the normal images of arrays (defective ones are ignored: knn is unsupervised)."""
    extractor = PatchFeatures(recipe.model, recipe.knn.channels).eval()

    @torch.no_grad()
    def features(idx: np.ndarray) -> torch.Tensor:
        return extractor(torch.from_numpy(arrays.images[idx]))

    head, fit = fit_head(features, arrays.labels, recipe.knn, recipe.train.seed, progress)
    return KnnDetector(recipe.model, recipe.knn, head, features=extractor).eval(), fit


def train_knn(recipe: Recipe, train_arrays: ArraySet, out_dir: Path, test_arrays: ArraySet | None = None,
              progress: bool = True) -> TrainResult:
    """Fit, write checkpoint.pt (atomically), history.json and (with test arrays) metrics.json to out_dir."""
    from ssn_edge.evaluation.evaluate import evaluate_model

    normal = int((train_arrays.labels == 0).sum())
    supervision = Supervision(setting="unsupervised", source="recipe", normal=normal, with_mask=0, label_only=0,
                              ignored=len(train_arrays) - normal)
    log.info("knn fit on %d normal training images (%d defective ones ignored)", normal, supervision.ignored)
    model, fit = fit_knn(recipe, train_arrays, progress)
    log.info("knn bank: %d of %d patches (%s, pool %d), fit %.1f s", fit.bank, fit.patches, fit.sampler,
             fit.candidates, fit.fit_s)
    history = [asdict(fit)]
    ckpt = save_checkpoint(Path(out_dir) / "checkpoint.pt", CheckpointRecord(
        kind=KIND_KNN, recipe=recipe.to_dict(), backbone=BackboneIdentity.of(recipe.model.backbone, model.features.trunk),
        heads=model.head.state_dict(), supervision=supervision, history=history))
    metrics: dict[str, float] = {}
    if test_arrays is not None:
        metrics = evaluate_model(model, test_arrays)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(ckpt, history, metrics)  # history: one record, the fit
