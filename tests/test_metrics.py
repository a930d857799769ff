"""Metrics are what every result is judged by, so AUPRO is checked against an independent brute-force version
and the image metrics against hand-computed values."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from ssn_edge.evaluation.metrics import aupro, evaluate_all, f1_max, image_metrics, pixel_metrics

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ----------------------------------------------------------------------------------------------------------------
# Brute-force reference: one threshold at a time, one region at a time, nothing shared with the implementation.
# ----------------------------------------------------------------------------------------------------------------


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    masks = masks.astype(bool)
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks

    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        hit = maps >= t
        pros.append(float(np.mean([hit[i][region].mean() for i, region in regions])))
        fprs.append(float(hit[normal].mean()))

    area = 0.0
    for k in range(len(fprs) - 1):
        x0, x1, y0, y1 = fprs[k], fprs[k + 1], pros[k], pros[k + 1]
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_at) * (fpr_limit - x0)
            break
    return area / fpr_limit


def random_case(seed: int, n: int = 4, size: int = 16, decimals: int | None = 2) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks (smoothed noise thresholded; some images left empty) and noisy maps, rounded to force ties."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.5, 1.5)) > 0.25
    masks[rng.random(n) < 0.3] = False
    masks[0, 2:5, 3:6] = True  # at least one region
    masks[0, 6, 7] = True  # diagonal neighbour of nothing: a single-pixel region unless a blob is adjacent
    maps = masks * rng.uniform(0.2, 1.0) + rng.normal(0, 0.5, masks.shape)
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# ----------------------------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_bruteforce_reference(seed: int, fpr_limit: float) -> None:
    masks, maps = random_case(seed, decimals=2 if seed % 2 else None)
    assert masks.any() and (~masks).any()
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    masks=arrays(np.bool_, (2, 4, 5)),
    maps=arrays(np.int8, (2, 4, 5), elements=st.integers(0, 3)),
    fpr_limit=st.sampled_from([0.3, 0.1, 0.5, 1.0]),
)
def test_aupro_matches_reference_with_heavy_ties(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> None:
    # Integer maps with four levels: nearly every threshold is a tie between normal and defect pixels.
    assume(masks.any() and not masks.all())
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=1e-9)


def test_perfect_map_scores_one() -> None:
    masks, _ = random_case(1)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # Continuous, but every defect pixel above every normal one.
    rng = np.random.default_rng(0)
    maps = np.where(masks, rng.uniform(2, 3, masks.shape), rng.uniform(0, 1, masks.shape))
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_inverted_map_scores_zero() -> None:
    masks, _ = random_case(2)
    rng = np.random.default_rng(0)
    maps = np.where(masks, rng.uniform(0, 1, masks.shape), rng.uniform(2, 3, masks.shape))
    assert aupro(masks, maps) == 0.0
    assert aupro(masks, -masks.astype(float)) == 0.0


@pytest.mark.parametrize("fpr_limit", [0.3, 0.1, 1.0])
def test_constant_map_is_the_diagonal(fpr_limit: float) -> None:
    # One threshold: the curve goes (0, 0) -> (1, 1) in a single step; integrated to the limit with PRO
    # interpolated on that straight segment, the normalised area is fpr_limit / 2 (not 0).
    masks, _ = random_case(3)
    maps = np.full(masks.shape, 0.7)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(fpr_limit / 2, abs=1e-12)


def test_regions_are_eight_connected_and_weighted_equally() -> None:
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal pair: one region with 8-connectivity
    masks[0, 3, 3] = True  # a second region
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 0.9
    maps[0, 1, 1] = maps[0, 3, 3] = 0.1
    # At t=0.9: FPR 0, PRO = mean(1/2, 0) = 0.25 (4-connectivity would give mean(1, 0, 0) = 1/3);
    # at t=0.5 FPR jumps to 1 with PRO still 0.25, so the normalised area is 0.25.
    assert aupro(masks, maps) == pytest.approx(0.25, abs=1e-12)


def test_images_with_empty_masks_add_normal_pixels() -> None:
    masks = np.zeros((1, 1, 11), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.zeros((1, 1, 11))
    maps[0, 0, 0] = 0.5  # the defect
    maps[0, 0, 1] = 1.0  # one false positive out of 10 normal pixels
    # FPR 0.1 before the defect is found, PRO 1 after: area (0.3 - 0.1) / 0.3.
    assert aupro(masks, maps) == pytest.approx(2 / 3, abs=1e-12)
    # A defect-free image with 11 low-scoring pixels dilutes that false positive to 1/21.
    masks2 = np.concatenate([masks, np.zeros_like(masks)])
    maps2 = np.concatenate([maps, np.zeros_like(maps)])
    assert aupro(masks2, maps2) == pytest.approx((0.3 - 1 / 21) / 0.3, abs=1e-12)


def test_aupro_is_rank_based_and_order_free() -> None:
    masks, maps = random_case(4, decimals=None)
    base = aupro(masks, maps)
    assert aupro(masks, np.exp(3 * maps) + 5) == pytest.approx(base, abs=1e-9)
    perm = np.random.default_rng(0).permutation(len(masks))
    assert aupro(masks[perm], maps[perm]) == pytest.approx(base, abs=1e-9)
    assert 0.0 < base < 1.0


def test_aupro_is_vectorised() -> None:
    # ~650k distinct scores: any per-threshold Python loop takes minutes here; the sort-and-cumsum one < 1 s.
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 128, 128), dtype=bool)
    masks[::2, 30:50, 40:70] = True
    masks[1::4, 90:95, 10:12] = True
    maps = (masks + rng.normal(0, 1, masks.shape)).astype(np.float32)
    start = time.perf_counter()
    value = aupro(masks, maps)
    assert time.perf_counter() - start < 5.0
    assert 0.0 < value < 1.0


@pytest.mark.parametrize(
    ("masks", "maps", "fpr_limit", "match"),
    [
        (np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)), 0.3, "no defect regions"),
        (np.ones((2, 4, 4), bool), np.zeros((2, 4, 4)), 0.3, "no normal pixels"),
        (np.eye(4, dtype=bool)[None], np.zeros((1, 4, 5)), 0.3, "differ in shape"),
        (np.eye(4, dtype=bool), np.zeros((4, 4)), 0.3, r"\(N, H, W\)"),
        (np.eye(4, dtype=bool)[None], np.full((1, 4, 4), np.nan), 0.3, "NaN"),
        (np.eye(4, dtype=np.uint8)[None] * 255, np.zeros((1, 4, 4)), 0.3, "only 0 and 1"),
        (np.eye(4, dtype=bool)[None], np.zeros((1, 4, 4)), 0.0, "fpr_limit"),
        (np.eye(4, dtype=bool)[None], np.zeros((1, 4, 4)), 1.5, "fpr_limit"),
    ],
)
def test_aupro_rejects_bad_input(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aupro(masks, maps, fpr_limit)


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, ssn_edge.evaluation.metrics; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# Image level
# ----------------------------------------------------------------------------------------------------------------


def test_image_metrics_hand_computed() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    out = image_metrics(labels, scores)
    # AUROC: 3 of the 4 (defect, normal) pairs are ordered correctly.
    assert out["image_auroc"] == pytest.approx(75.0)
    # AP: recall 0.5 at precision 1 (t=0.8), recall 1 at precision 2/3 (t=0.35).
    assert out["image_ap"] == pytest.approx(100 * (0.5 * 1 + 0.5 * 2 / 3))
    # F1 per threshold: 0.8 -> 2/3, 0.4 -> 1/2, 0.35 -> 4/5, 0.1 -> 2/3.
    assert out["image_f1_max"] == pytest.approx(80.0)
    assert out["image_threshold"] == pytest.approx(0.35)
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "image_threshold"}


def test_f1_max_prefers_lowest_threshold_on_ties() -> None:
    # F1 is 2/3 both at t=4 and at t=1.
    f1, threshold = f1_max(np.array([1, 0, 0, 1]), np.array([4.0, 3.0, 2.0, 1.0]))
    assert f1 == pytest.approx(2 / 3)
    assert threshold == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_threshold_uses_greater_or_equal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    scores = np.round(labels * 0.5 + rng.normal(0, 0.5, 30), 1)  # ties on purpose

    def f1_at(t: float) -> float:
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        return 0.0 if tp == 0 else 2 * tp / (pred.sum() + labels.sum())

    f1, threshold = f1_max(labels, scores)
    assert f1_at(threshold) == pytest.approx(f1, abs=1e-12)
    assert f1 == pytest.approx(max(f1_at(t) for t in np.unique(scores)), abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        (np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]), "only one class"),
        (np.array([0, 0]), np.array([0.1, 0.2]), "only one class"),
        (np.array([0, 1, 1]), np.array([0.1, 0.2]), "differ in length"),
        (np.array([0, 1]), np.array([0.1, np.nan]), "NaN"),
        (np.array([0, 2]), np.array([0.1, 0.2]), "only 0 and 1"),
    ],
)
def test_image_metrics_rejects_bad_input(labels: np.ndarray, scores: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_metrics(labels, scores)


def test_f1_max_needs_a_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        f1_max(np.array([0, 0]), np.array([0.1, 0.2]))


# ----------------------------------------------------------------------------------------------------------------
# Pixel level and the combined entry point
# ----------------------------------------------------------------------------------------------------------------


def test_pixel_metrics_match_sklearn_and_aupro() -> None:
    masks, maps = random_case(5)
    out = pixel_metrics(masks, maps, fpr_limit=0.2)
    assert out["pixel_aupro"] == pytest.approx(100 * reference_aupro(masks, maps, 0.2), abs=1e-6)
    assert out["pixel_auroc"] == pytest.approx(100 * roc_auc_score(masks.ravel(), maps.ravel()))
    assert out["pixel_ap"] == pytest.approx(100 * average_precision_score(masks.ravel(), maps.ravel()))


def test_pixel_metrics_excludes_invalid_images() -> None:
    masks, maps = random_case(6, n=3)
    masks[1] = False  # mask unknown, stored as empty...
    maps[1] = 5.0  # ...while the model rightly fires everywhere: counted, these would all be false positives
    valid = np.array([True, False, True])
    kept = pixel_metrics(masks[[0, 2]], maps[[0, 2]])
    assert pixel_metrics(masks, maps, valid=valid) == pytest.approx(kept)
    assert pixel_metrics(masks, maps)["pixel_auroc"] < kept["pixel_auroc"] - 1.0


@pytest.mark.parametrize(
    ("valid", "match"),
    [(np.array([False, False, False]), "excludes every image"), (np.array([True, False]), "shape")],
)
def test_pixel_metrics_rejects_bad_valid(valid: np.ndarray, match: str) -> None:
    masks, maps = random_case(6, n=3)
    with pytest.raises(ValueError, match=match):
        pixel_metrics(masks, maps, valid=valid)


def test_evaluate_all_combines_and_forwards_valid() -> None:
    masks, maps = random_case(7, n=4)
    masks[1] = masks[3] = False
    labels = masks.reshape(4, -1).any(axis=1).astype(int)
    labels[1] = 1  # defective image whose mask is unknown
    scores = maps.reshape(4, -1).max(axis=1)
    valid = np.array([True, False, True, True])

    image_only = evaluate_all(labels, scores)
    assert image_only == pytest.approx(image_metrics(labels, scores))

    full = evaluate_all(labels, scores, masks, maps, valid=valid)
    assert set(full) == set(image_only) | {"pixel_aupro", "pixel_ap", "pixel_auroc"}
    assert {k: full[k] for k in image_only} == pytest.approx(image_only)
    assert {k: v for k, v in full.items() if k.startswith("pixel_")} == pytest.approx(
        pixel_metrics(masks, maps, valid=valid)
    )

    with pytest.raises(ValueError, match="both masks and maps"):
        evaluate_all(labels, scores, masks=masks)
    with pytest.raises(ValueError, match="valid"):
        evaluate_all(labels, scores, valid=valid)


def test_gap_threshold_keeps_decisions_and_leaves_the_data_point():
    from ssn_edge.evaluation.metrics import f1_max, gap_threshold

    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
    _, t = f1_max(labels, scores)
    assert t == 0.35  # on a data point: a 1e-6 lower score would flip that image
    g = gap_threshold(scores, t)
    assert g == pytest.approx(0.325)
    assert np.array_equal(scores >= g, scores >= t)
    low = gap_threshold(scores, 0.1)  # nothing below: as far below as the gap above, off the data point
    assert low == pytest.approx(0.05) and np.array_equal(scores >= low, scores >= 0.1)
