"""Defect copy-paste: annotated defects transplanted onto normal training images (mixed supervision)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import tiny_recipe_dict
from ssn_edge.data import ArraySet
from ssn_edge.train.paste import PasteConfig, paste_defect, with_pasted_defects


def _square(size: int = 64, box: tuple[int, int, int, int] = (20, 20, 30, 30)) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def test_pasted_defect_is_the_source_inside_the_mask_shifted_to_the_new_background_and_target_far_away():
    mask = _square()
    source = np.full((3, 64, 64), 5.0, np.float32)
    source[:, mask] = 9.0  # a defect 4 above its own background
    target = np.full((3, 64, 64), 1.0, np.float32)
    target[1] = 2.0  # channels matched each on its own
    out = paste_defect(source, mask, target, PasteConfig(copies=1, margin=2, feather=1.0, ring=6))
    np.testing.assert_allclose(out[:, mask], np.broadcast_to(np.array([[5.0], [6.0], [5.0]]), (3, int(mask.sum()))))  # still 4 above the background
    np.testing.assert_array_equal(out[:, :5, :5], target[:, :5, :5])  # far from the defect: untouched
    assert out.dtype == target.dtype and out.shape == target.shape
    # within the margin the blend goes from pasted to target, never outside either
    edge = out[0, 25, 30:36]
    assert np.all(np.diff(edge) <= 1e-6) and edge.min() >= 1.0 - 1e-6


def test_a_mask_with_no_background_around_it_is_pasted_without_a_level_shift():
    mask = np.ones((16, 16), dtype=bool)
    out = paste_defect(np.full((3, 16, 16), 7.0, np.float32), mask, np.zeros((3, 16, 16), np.float32), PasteConfig(copies=1))
    np.testing.assert_array_equal(out, 7.0)


def test_paste_refuses_images_of_different_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        paste_defect(np.zeros((3, 8, 8), np.float32), np.zeros((8, 8), bool), np.zeros((3, 9, 9), np.float32), PasteConfig(1))


def _arrays() -> ArraySet:
    rng = np.random.default_rng(0)
    n, size = 6, 64
    images = rng.normal(size=(n, 3, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    masks[3] = _square(box=(5, 40, 15, 60))  # annotated defect
    masks[4] = _square(box=(40, 5, 60, 12))  # annotated defect
    labels = np.array([0, 0, 0, 1, 1, 1])
    mask_valid = np.array([True, True, True, True, True, False])  # image 5: label only
    return ArraySet(images, masks, labels, mask_valid, [f"img{i}" for i in range(n)])


def test_each_annotated_defect_is_pasted_copies_times_onto_normal_images_with_its_mask():
    arrays = _arrays()
    out, info = with_pasted_defects(arrays, PasteConfig(copies=3), np.random.default_rng(1))
    assert info == {"pasted": 6, "paste_sources": 2}  # the label-only defect has no mask to paste
    assert len(out) == 12 and (out.labels[6:] == 1).all() and out.mask_valid[6:].all()
    np.testing.assert_array_equal(out.images[:6], arrays.images)  # the originals stay first, unchanged
    views = [m for k in (3, 4) for m in (arrays.masks[k], arrays.masks[k][:, ::-1], arrays.masks[k][::-1], arrays.masks[k][::-1, ::-1])]
    for k in range(6, 12):
        assert any(np.array_equal(out.masks[k], v) for v in views)  # a source's mask, flipped as its image was
        source, _, target = out.paths[k].partition(" on ")
        assert source in ("img3", "img4") and target in ("img0", "img1", "img2")
        far = ~np.asarray(cv2.dilate(out.masks[k].astype(np.uint8), np.ones((25, 25), np.uint8)), bool)
        np.testing.assert_array_equal(out.images[k][:, far], arrays.images[int(target[3:])][:, far])
    again, _ = with_pasted_defects(arrays, PasteConfig(copies=3), np.random.default_rng(1))
    np.testing.assert_array_equal(again.images, out.images)  # same seed, same pasted set (resume relies on it)


def test_no_copies_or_no_annotated_defect_leaves_the_arrays_as_they_are():
    arrays = _arrays()
    assert with_pasted_defects(arrays, PasteConfig(copies=0), np.random.default_rng(0))[0] is arrays
    unannotated = ArraySet(arrays.images, arrays.masks, arrays.labels, arrays.labels == 0, arrays.paths)
    out, info = with_pasted_defects(unannotated, PasteConfig(copies=2), np.random.default_rng(0))
    assert out is unannotated and info["pasted"] == 0


def test_paste_copies_is_validated():
    from ssn_edge.config import RecipeError, recipe_from_dict

    with pytest.raises(RecipeError, match="paste_copies must be >= 0"):
        recipe_from_dict({"train": {"paste_copies": -1}})
    with pytest.raises(RecipeError, match="the weak setting trains with none"):
        recipe_from_dict({"train": {"paste_copies": 2, "setting": "weak"}})
    assert recipe_from_dict({"train": {"paste_copies": 2, "setting": "mixed"}}).train.paste_copies == 2


def test_tiled_training_on_shared_backbone_features_refuses_pasting(tmp_path):
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.loop import SharedFeatures, train

    d = tiny_recipe_dict(Path("unused"))
    d["train"].update(setting="mixed", paste_copies=2)
    arrays = _arrays()
    shared = SharedFeatures(arrays.images, [(0, 0, 64, 64)])
    with pytest.raises(ValueError, match="tiling.shared_backbone: false"):
        train(recipe_from_dict(d), arrays, tmp_path / "run", shared=shared, progress=False)
    assert not (tmp_path / "run").exists()
