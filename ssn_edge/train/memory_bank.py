"""Fitting model.memory_bank once SSN is trained: PatchCore's coreset of the normal training images' patches (the
knn section's settings, the same code as the knn family: ssn_edge/train/knn.py), then SSN's map and the bank's
distances standardised on the held-out normal images, which neither the heads nor the bank have seen."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ssn_edge.config import Recipe
from ssn_edge.data import ArraySet
from ssn_edge.model.knn.graph import Standardizer
from ssn_edge.model.memory_bank import UNIT, MemoryBank
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.train.knn import bank_size, candidate_patches, select_bank

log = logging.getLogger("ssn_edge")


def held_out_normals(check: ArraySet | None) -> np.ndarray:
    """The normal images of the held-out check set: what the bank's and the map's scales are set on."""
    images = check.images[check.labels == 0] if check is not None else np.empty((0,))
    if not len(images):
        raise ValueError("model.memory_bank: no normal training image is held out to set its scale on "
                         "(data.val_fraction, data.val_min)")
    return images


@torch.no_grad()
def _standardisers(model: SuperSimpleNet, bank: MemoryBank, normals: np.ndarray, batch: int) -> tuple[Standardizer, Standardizer]:
    maps, distances = [], []
    for start in range(0, len(normals), batch):
        features = model.features(torch.from_numpy(normals[start : start + batch]))
        maps.append(model.heads(features, gated=False)[0].float())  # SSN's own map: no bank is attached yet
        distances.append(bank.distances(features.float()))
    return Standardizer.fit(torch.cat(maps)), Standardizer.fit(torch.cat(distances))


def fit_memory_bank(model: SuperSimpleNet, recipe: Recipe, arrays: ArraySet, normals: np.ndarray,
                    progress: bool = True) -> None:
    """Attach a fitted MemoryBank to model.heads: the bank from the normal images of arrays, its scale and the map's
    from normals (held out of both)."""
    cfg, seed = recipe.knn, recipe.train.seed
    was_training = model.training
    model.eval()
    model.heads.memory_bank = None
    t0 = time.perf_counter()

    @torch.no_grad()
    def patches(idx: np.ndarray) -> torch.Tensor:
        return MemoryBank.patches(model.features(torch.from_numpy(arrays.images[idx])).float())

    candidates, total = candidate_patches(patches, np.flatnonzero(arrays.labels == 0), cfg, seed, progress)
    pool, k = len(candidates), bank_size(cfg, total, len(candidates))
    raw = MemoryBank(select_bank(candidates, k, cfg, seed, progress).clone(), UNIT, UNIT, cfg.neighbours)
    del candidates
    map_std, bank_std = _standardisers(model, raw, normals, cfg.batch)
    model.heads.memory_bank = MemoryBank(raw.head.bank, map_std, bank_std, cfg.neighbours,
                                         recipe.model.memory_bank_ssn_weight)
    model.train(was_training)
    log.info("model.memory_bank: %d of %d patches (%s, pool %d), scaled on %d held-out normal images, %.1f s",
             k, total, cfg.sampler, pool, len(normals), time.perf_counter() - t0)
