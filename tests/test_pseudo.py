"""Pseudo-masks for weakly labelled defects: the map's confident pixels, grown by hysteresis, the rest unknown
(spec 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import loss_inputs, tiny_recipe_dict
from ssn_edge.config import recipe_from_dict
from ssn_edge.data import ArraySet
from ssn_edge.train.pseudo import PseudoMaskConfig, pseudo_masks


def _peaked(size: int = 64, at: tuple[int, int] = (20, 40), height: float = 5.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (height * np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / 8.0) - 1.0).astype(np.float32)


def test_a_map_within_the_normal_range_gives_no_pixel_target():
    assert not pseudo_masks(_peaked(height=0.5)[None], normal_level=1.0, cfg=PseudoMaskConfig()).any()


def test_unknown_pixels_get_no_pixel_loss_and_keep_the_crop_defective():
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.batches import UNKNOWN, feature_masks

    d = tiny_recipe_dict(Path("unused"))
    d["train"]["setting"] = "weak"
    recipe = recipe_from_dict(d)
    n, size = 2, 64
    masks = np.zeros((n, size, size), dtype=bool)
    ignore = np.zeros((n, size, size), dtype=bool)
    masks[1, 8:16, 8:16] = True
    ignore[1, 4:20, 4:20] = True
    ignore[1, 8:16, 8:16] = False
    arrays = ArraySet(np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32), masks,
                      np.array([0, 1]), np.ones(n, dtype=bool), ["a", "b"], ignore=ignore)
    gt, valid = feature_masks(arrays, np.array([[0, 0], [1, 0]]), (16, 16))
    assert (gt[0] == 0).all() and (gt[1] == 1).any() and (gt[1] == UNKNOWN).any()
    assert not ((gt[1] == UNKNOWN) & (gt[1] == 1)).any()

    model = SuperSimpleNet(recipe.model)
    l2, l3 = model.features.raw(torch.from_numpy(arrays.images))
    loss, _, seen = loss_inputs(model, recipe, l2, l3, gt, valid)
    assert torch.isfinite(loss)
    unknown = torch.cat([gt, gt]) == UNKNOWN
    assert not (seen["pixel_valid"] & unknown & (seen["target"] == 0)).any()  # unknown pixels: no "normal" loss
    assert seen["target"].min() >= 0
    assert seen["label"][1] == 1 and seen["label"][3] == 1


def test_weak_run_with_pseudo_masks_records_how_many_it_made(tmp_path):
    from ssn_edge.train.pseudo import with_pseudo_masks
    from ssn_edge.model.ssn import SuperSimpleNet

    recipe = recipe_from_dict(tiny_recipe_dict(Path("unused")))
    model = SuperSimpleNet(recipe.model)
    rng = np.random.default_rng(1)
    n, size = 6, 64
    labels = np.array([0, 0, 0, 1, 1, 1])
    arrays = ArraySet(rng.normal(size=(n, 3, size, size)).astype(np.float32), np.zeros((n, size, size), dtype=bool),
                      labels, labels == 0, [str(i) for i in range(n)])
    out, stats = with_pseudo_masks(model, arrays, PseudoMaskConfig(top=0.02, normal_quantile=0.0))
    assert stats["pseudo_candidates"] == 3 and stats["pseudo_masked"] == 3  # every map exceeds the lowest level
    assert out.mask_valid.all() and out.masks[3:].any() and not out.masks[:3].any()
    assert out.ignore is not None and (out.ignore[3:] == ~out.masks[3:]).all()  # the rest of a pseudo-masked image: unknown
    assert arrays.ignore is None and not arrays.masks.any()  # the caller's arrays are untouched


def test_pseudo_masks_are_the_pixels_above_the_normal_level_capped_by_the_top_fraction():
    peak = _peaked()
    defect = pseudo_masks(peak[None], normal_level=0.0, cfg=PseudoMaskConfig(top=0.25))
    assert defect[0, 20, 40] and (defect[0] == (peak > 0.0)).all()  # every pixel above the normal level, no more
    # the top fraction still caps what one image can give
    capped = pseudo_masks(peak[None], normal_level=-2.0, cfg=PseudoMaskConfig(top=0.01))
    assert 0 < capped.sum() <= int(0.01 * 64 * 64) + 8  # + ties: the peak is rings of up to 8 equal pixels


def test_hysteresis_grows_a_confident_core_into_its_fainter_region_only():
    m = np.zeros((32, 32), dtype=np.float32)
    m[4:12, 4:12] = 1.0  # a faint defect...
    m[7, 7] = 3.0  # ...with a confident core
    m[20:28, 20:28] = 1.0  # as faint, but no core: not grown into
    m[4:12, 12] = 0.2  # touching the first, below the grow level: stays out
    cfg = PseudoMaskConfig(top=0.25)
    core = pseudo_masks(m[None], normal_level=2.0, cfg=cfg)
    assert core[0].sum() == 1
    defect = pseudo_masks(m[None], normal_level=2.0, cfg=cfg, grow_level=0.5)
    assert defect[0, 4:12, 4:12].all() and defect[0].sum() == 64
    # an image with no core above the normal level gets nothing, however much lies above the grow level
    none = pseudo_masks(m[None], normal_level=5.0, cfg=cfg, grow_level=0.5)
    assert not none.any()
