"""Pseudo-masks for weakly labelled defects: the map's top region, a margin left unknown (spec 5)."""

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


def test_top_region_becomes_defect_with_an_unknown_margin_and_the_rest_normal():
    cfg = PseudoMaskConfig(top=0.01, unsure=0.02, margin=4)
    defect, unknown = pseudo_masks(_peaked()[None], normal_level=0.0, cfg=cfg)
    assert defect[0, 20, 40] and defect[0].sum() <= int(0.01 * 64 * 64) + 2  # the peak, about 1 % of pixels
    assert not (defect & unknown).any()
    ring = unknown[0]
    assert ring[20, 40 + 4] or ring[20 + 4, 40]  # just outside the defect: unknown
    assert not defect[0, 0, 0] and not ring[0, 0]  # far away: normal


def test_a_map_within_the_normal_range_gives_no_pixel_target():
    defect, unknown = pseudo_masks(_peaked(height=0.5)[None], normal_level=1.0, cfg=PseudoMaskConfig())
    assert not defect.any() and unknown.all()


def test_unknown_pixels_get_no_pixel_loss_and_keep_the_crop_defective():
    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train.loop import UNKNOWN, feature_masks

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
    assert out.ignore is not None and not (out.ignore & out.masks).any()
    assert arrays.ignore is None and not arrays.masks.any()  # the caller's arrays are untouched


def test_positives_only_pseudo_masks_leave_every_other_pixel_unknown():
    peak = _peaked()
    defect, unknown = pseudo_masks(peak[None], normal_level=0.0, cfg=PseudoMaskConfig(top=0.25, rest="unknown"))
    assert defect[0, 20, 40] and (defect[0] == (peak > 0.0)).all()  # every pixel above the normal level, no more
    assert (unknown[0] == ~defect[0]).all()  # nothing is taught as normal, not even far away
    # the top fraction still caps what one image can give
    capped, _ = pseudo_masks(peak[None], normal_level=-2.0, cfg=PseudoMaskConfig(top=0.01, rest="unknown"))
    assert 0 < capped.sum() <= int(0.01 * 64 * 64) + 8  # + ties: the peak is rings of up to 8 equal pixels


def test_hysteresis_grows_a_confident_core_into_its_fainter_region_only():
    m = np.zeros((32, 32), dtype=np.float32)
    m[4:12, 4:12] = 1.0  # a faint defect...
    m[7, 7] = 3.0  # ...with a confident core
    m[20:28, 20:28] = 1.0  # as faint, but no core: not grown into
    m[4:12, 12] = 0.2  # touching the first, below the grow level: stays out
    cfg = PseudoMaskConfig(top=0.25, rest="unknown")
    core, _ = pseudo_masks(m[None], normal_level=2.0, cfg=cfg)
    assert core[0].sum() == 1
    defect, unknown = pseudo_masks(m[None], normal_level=2.0, cfg=cfg, grow_level=0.5)
    assert defect[0, 4:12, 4:12].all() and defect[0].sum() == 64
    assert (unknown[0] == ~defect[0]).all()
    # an image with no core above the normal level gets nothing, however much lies above the grow level
    none, _ = pseudo_masks(m[None], normal_level=5.0, cfg=cfg, grow_level=0.5)
    assert not none.any()


def test_top_k_mil_loss_pushes_only_the_highest_pixels_up():
    from ssn_edge.train.losses import top_k_mil_loss

    logits = torch.zeros(2, 1, 10, 10)
    logits[:, 0, 3, 3] = 2.0
    logits.requires_grad_(True)
    loss = top_k_mil_loss(logits, top=0.01)  # k = 1 of 100 pixels
    loss.backward()
    grad = logits.grad[:, 0]
    assert (grad[:, 3, 3] < 0).all()  # descent raises the top pixel
    grad[:, 3, 3] = 0
    assert (grad == 0).all()  # and no other: the rest of a label-only image is unknown, not normal
    higher = logits.detach().clone()
    higher[:, 0, 3, 3] = 4.0
    assert top_k_mil_loss(higher, 0.01) < loss  # a more confident top region costs less


def test_mil_loss_joins_the_step_only_for_defects_without_a_mask():
    from ssn_edge.model.ssn import SuperSimpleNet

    d = tiny_recipe_dict(Path("unused"))
    d["train"].update(setting="weak", mil_top=0.05, mil_items=1)
    recipe = recipe_from_dict(d)
    model = SuperSimpleNet(recipe.model)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
    l2, l3 = model.features.raw(x)
    gt = torch.zeros(2, 1, 16, 16)
    _, parts, _ = loss_inputs(model, recipe, l2, l3, gt, torch.tensor([True, False]))
    assert parts["mil"] > 0
    _, parts, _ = loss_inputs(model, recipe, l2, l3, gt, torch.tensor([True, True]))
    assert "mil" not in parts  # every mask known: nothing to learn by multiple instances


def test_knn_distance_is_the_distance_to_the_nearest_bank_row():
    from ssn_edge.train.pseudo import knn_distance

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 6, generator=g), torch.randn(37, 6, generator=g)
    expected = torch.cdist(queries, bank).amin(1)
    assert torch.allclose(knn_distance(bank, queries, chunk=8), expected, atol=1e-4)
    assert knn_distance(bank, bank[:5]).max() < 0.01  # a banked patch: distance 0 (up to the sqrt of rounding)


def _knn_arrays(n_good: int = 12, size: int = 32) -> ArraySet:
    """Normal images of smooth noise; image n_good (label-only defect) and n_good + 1 (defect with its real mask)
    carry a bright square the normal images never show."""
    rng = np.random.default_rng(0)
    n = n_good + 2
    images = (0.1 * rng.normal(size=(n, 3, size, size))).astype(np.float32)
    images[n_good:, :, 8:16, 20:28] += 4.0
    masks = np.zeros((n, size, size), dtype=bool)
    masks[n_good + 1, 8:16, 20:28] = True
    valid = np.ones(n, dtype=bool)
    valid[n_good] = False
    labels = np.array([0] * n_good + [1, 1])
    return ArraySet(images, masks, labels, valid, [f"img{i}" for i in range(n)])


def test_knn_teacher_marks_a_label_only_defect_where_it_differs_from_every_normal_image():
    from ssn_edge.train.pseudo import KnnPseudoConfig, knn_pseudo_masks

    arrays = _knn_arrays()
    seen: list[np.ndarray] = []

    def features(idx: np.ndarray) -> torch.Tensor:  # the images themselves stand in for backbone features
        seen.append(np.asarray(idx))
        return torch.from_numpy(arrays.images[idx])

    out, stats = knn_pseudo_masks(features, arrays, KnnPseudoConfig(top=0.25, held_out=4, pool=1))
    weak = 12
    assert stats["pseudo_candidates"] == 1 and stats["pseudo_masked"] == 1
    assert out.mask_valid[weak] and out.masks[weak, 10:14, 22:26].all()  # the square's core is defect
    assert out.masks[weak, 8:16, 20:28].sum() >= 0.9 * out.masks[weak].sum()  # and little but the square is
    assert (out.ignore[weak] == ~out.masks[weak]).all()  # positives only: every other pixel unknown
    untouched = np.arange(len(arrays)) != weak
    assert (out.masks[untouched] == arrays.masks[untouched]).all() and not out.ignore[untouched].any()
    asked = np.concatenate(seen)
    assert 13 not in asked  # a defect with a real mask is never relabelled, nor looked at


def test_knn_teacher_leaves_a_defect_that_looks_normal_label_only():
    from ssn_edge.train.pseudo import KnnPseudoConfig, knn_pseudo_masks

    arrays = _knn_arrays()
    arrays.images[12] = arrays.images[0]  # the label-only "defect" is a copy of a normal image
    out, stats = knn_pseudo_masks(lambda idx: torch.from_numpy(arrays.images[idx]), arrays,
                                  KnnPseudoConfig(held_out=4, pool=1, normal_quantile=1.0))
    assert stats["pseudo_masked"] == 0 and not out.mask_valid[12]


def test_knn_teacher_is_not_trusted_along_the_border():
    from ssn_edge.train.pseudo import KnnPseudoConfig, knn_pseudo_masks

    arrays = _knn_arrays()
    arrays.images[12] = arrays.images[0]
    arrays.images[12, :, 0:6, 0:6] += 4.0  # the label-only defect's only odd patch is in a corner
    features = lambda idx: torch.from_numpy(arrays.images[idx])  # noqa: E731
    out, _ = knn_pseudo_masks(features, arrays, KnnPseudoConfig(held_out=4, pool=1))
    assert out.masks[12, 1:5, 1:5].all()
    out, _ = knn_pseudo_masks(features, arrays, KnnPseudoConfig(held_out=4, pool=1, border=6))
    assert not out.masks[12, :6].any() and not out.masks[12, :, :6].any()
