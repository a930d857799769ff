"""Image- and pixel-level anomaly-detection metrics, torch-free.

These numbers are what SuperSimpleNet results are compared on (MVTec AD / VisA / KSDD2 style reports), so the
definitions follow the published evaluation code rather than anything convenient: AUROC and AP come straight
from scikit-learn, and AUPRO reproduces the MVTec AD evaluation (per-region overlap against the false-positive
rate of normal pixels, integrated to an FPR limit and normalised by it). Everything here is NumPy / OpenCV /
scikit-learn so the same evaluation runs on a factory PC with no PyTorch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

if TYPE_CHECKING:
    from ssn_edge.data import ArraySet

__all__ = ["aupro", "evaluate_all", "evaluate_arrays", "f1_max", "image_metrics", "pixel_metrics"]


# --------------------------------------------------------------------------------------------------------------
# Input validation: every public function fails loudly, because a silently wrong metric is worse than none.
# --------------------------------------------------------------------------------------------------------------


def _as_binary(a: np.ndarray, what: str) -> np.ndarray:
    """Bool view of a 0/1 array; other values (e.g. 0/255 masks) are refused rather than guessed at."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{what} must be boolean or contain only 0 and 1 (binarise it first, e.g. mask > 127)")
    return a.astype(bool)


def _finite_scores(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.bool_ and (not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating)):
        raise ValueError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return a


def _check_image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}")
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}")
    if labels.shape[0] == 0:
        raise ValueError("labels and scores are empty")
    return _as_binary(labels, "labels"), _finite_scores(scores, "scores")


def _check_pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    if masks.shape != maps.shape:
        raise ValueError(f"masks and maps differ in shape: {masks.shape} vs {maps.shape}")
    if masks.size == 0:
        raise ValueError("masks and maps are empty")
    return _as_binary(masks, "masks"), _finite_scores(maps, "maps")


# --------------------------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------------------------


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best achievable F1 (0-1) and the score threshold that attains it (defective when score >= threshold).

    This is the operating point a deployment would pick if it knew the test labels, so it is reported next to
    the threshold-free AUROC/AP to show what those translate to on the line. Among thresholds with equal F1
    the lowest one is returned, erring towards catching defects.
    """
    labels, scores = _check_image_inputs(labels, scores)
    if not labels.any():
        raise ValueError("f1_max needs at least one positive (defective) label")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last (precision=1, recall=0) point has no threshold; drop it.
    precision, recall = precision[: len(thresholds)], recall[: len(thresholds)]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def gap_threshold(scores: np.ndarray, threshold: float) -> float:
    """Move a threshold that sits on a score down to the middle of the gap below it (on the lowest score: as far
    below as the gap above it): same decisions on these scores, but an image scored exactly at the threshold no
    longer flips on a 1e-6 difference between two runtimes (what an F1-max threshold, always one of the scores,
    would otherwise do)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    below = scores[scores < threshold]
    if below.size:
        return float((threshold + below.max()) / 2.0)
    # On the lowest score (every image flagged): as far below it as the gap above it, the same decisions.
    above = scores[scores > threshold]
    step = (above.min() - threshold) / 2.0 if above.size else max(abs(threshold), 1.0) * 1e-6
    return float(threshold - step)


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Image-level AUROC, AP, F1-max (percent) and the F1-max threshold, for classification of whole images.

    Percentages match how results tables are written, so numbers can be compared against papers directly.
    """
    labels, scores = _check_image_inputs(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise ValueError(
            "labels contain only one class; image AUROC/AP need both normal (0) and defective (1) images"
        )
    f1, threshold = f1_max(labels, scores)
    return {
        "image_auroc": 100.0 * float(roc_auc_score(labels, scores)),
        "image_ap": 100.0 * float(average_precision_score(labels, scores)),
        "image_f1_max": 100.0 * f1,
        "image_threshold": threshold,
    }


# --------------------------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------------------------


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Global id per pixel of its ground-truth region (8-connected, per image); 0 means normal pixel.

    Regions are per image because PRO weights every defect equally regardless of size: a small scratch counts
    as much as a large stain, which is the point of the metric over pixel AUROC.
    """
    ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        fg = lab > 0
        ids[i][fg] = lab[fg] + n_regions
        n_regions += n - 1
    return ids, n_regions


def _pro_curve(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, thresholds descending from (0, 0), far enough to pass ``fpr_limit``.

    One sort and two cumulative sums instead of a loop over thresholds: each defect pixel carries weight
    1 / |its region|, so the running sum over pixels with score >= t is the sum of per-region overlaps.
    Only pixels at or above the score where FPR first exceeds the limit can shape the integrated part of the
    curve, so only those are sorted (about fpr_limit of the pixels; the sort dominates the run time).
    """
    ids, n_regions = _region_ids(masks)
    if n_regions == 0:
        raise ValueError("masks contain no defect regions; AUPRO is undefined without defects")
    ids = ids.ravel()
    flat = maps.ravel()
    normal = ids == 0
    n_normal = int(np.count_nonzero(normal))
    if n_normal == 0:
        raise ValueError("masks contain no normal pixels; the false-positive rate of AUPRO is undefined")
    # Weight of a pixel in the PRO sum: 1 / |region| for defect pixels (full region sizes), 0 for normal ones.
    weight_of_id = 1.0 / np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    weight_of_id[0] = 0.0

    # Lowest threshold needed: the m-th highest normal score, with m normal pixels > fpr_limit * n_normal
    # (one pixel of margin against round-off in the product). At that threshold FPR > fpr_limit, so the kept
    # curve always reaches past the limit, and every score group above it is complete.
    m = int(np.floor(fpr_limit * n_normal)) + 2
    if m <= n_normal:
        normal_scores = flat[normal]
        cut = np.partition(normal_scores, n_normal - m)[n_normal - m]
        keep = flat >= cut
        flat, ids = flat[keep], ids[keep]

    order = np.argsort(flat)[::-1]  # descending scores
    sorted_scores = flat[order]
    sorted_ids = ids[order]
    fp = np.cumsum(sorted_ids == 0, dtype=np.int64)
    pro = np.cumsum(weight_of_id[sorted_ids])
    # All pixels sharing a score switch on together: evaluate only after the last pixel of each score group.
    last_of_group = np.empty(sorted_scores.shape, dtype=bool)
    np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=last_of_group[:-1])
    last_of_group[-1] = True

    fprs = fp[last_of_group] / n_normal  # integer counts: exact, and exactly 1.0 once all pixels are in
    pros = np.minimum(pro[last_of_group] / n_regions, 1.0)  # clip float round-off above 1
    return np.concatenate(([0.0], fprs)), np.concatenate(([0.0], pros))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x nondecreasing) from x[0] to x_max, y linearly interpolated."""
    stop = int(np.searchsorted(x, x_max, side="right"))  # x[:stop] <= x_max
    xs, ys = x[:stop], y[:stop]
    if xs[-1] < x_max and stop < len(x):
        x0, x1, y0, y1 = x[stop - 1], x[stop], y[stop - 1], y[stop]  # x0 < x_max < x1
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` FPR, normalised to [0, 1] (MVTec AD).

    Pixel AUROC is dominated by large defects and saturates near 100 %; PRO gives every connected defect equal
    weight and only looks at the low-FPR regime a real inspection can afford. The curve runs through (0, 0),
    then (FPR, PRO) at each distinct map value as threshold (pixel flagged when map >= t), and is integrated by
    the trapezoid rule with PRO linearly interpolated at ``fpr_limit``. Consequently an uninformative constant
    map yields ``fpr_limit / 2`` (the diagonal), a perfect map 1 and a perfectly inverted map 0.
    """
    if not (0.0 < fpr_limit <= 1.0):
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _check_pixel_inputs(masks, maps)
    fprs, pros = _pro_curve(masks, maps, fpr_limit)
    return min(max(_trapezoid_to(fprs, pros, fpr_limit) / fpr_limit, 0.0), 1.0)


def pixel_metrics(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """Pixel-level AUPRO, AP and AUROC (percent) for defect localisation.

    ``valid`` (bool per image) drops images whose ground-truth mask is unknown (e.g. weakly labelled defects):
    treating a missing mask as all-normal would count every true detection on them as a false positive.
    """
    masks, maps = _check_pixel_inputs(masks, maps)
    if valid is not None:
        valid = _as_binary(valid, "valid")
        if valid.shape != (masks.shape[0],):
            raise ValueError(f"valid must have shape ({masks.shape[0]},), got {valid.shape}")
        if not valid.any():
            raise ValueError("valid excludes every image; no pixels left to evaluate")
        masks, maps = masks[valid], maps[valid]
    flat_masks = masks.ravel()
    if flat_masks.all() or not flat_masks.any():
        raise ValueError("pixel metrics need both defect and normal pixels among the evaluated masks")
    flat_maps = maps.ravel()
    return {
        "pixel_aupro": 100.0 * aupro(masks, maps, fpr_limit=fpr_limit),
        "pixel_ap": 100.0 * float(average_precision_score(flat_masks, flat_maps)),
        "pixel_auroc": 100.0 * float(roc_auc_score(flat_masks, flat_maps)),
    }


def evaluate_all(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> dict[str, float]:
    """Image metrics, plus pixel metrics when masks and maps are both given: one dict per evaluation run."""
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for pixel metrics, or neither")
    if valid is not None and masks is None:
        raise ValueError("valid only applies to pixel metrics; masks and maps are missing")
    out = image_metrics(labels, scores)
    if masks is not None:
        if np.asarray(masks).shape[0] != np.asarray(labels).shape[0]:
            raise ValueError(
                f"masks cover {np.asarray(masks).shape[0]} images but labels {np.asarray(labels).shape[0]}"
            )
        out.update(pixel_metrics(masks, maps, valid=valid))
    return out


def evaluate_arrays(arrays: "ArraySet", scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """evaluate_all for a data split: pixel metrics only where they are defined (see has_pixel_truth)."""
    from ssn_edge.data import has_pixel_truth

    pixel = has_pixel_truth(arrays)
    return evaluate_all(
        arrays.labels,
        scores,
        masks=arrays.masks if pixel else None,
        maps=maps if pixel else None,
        valid=arrays.mask_valid if pixel else None,
    )
