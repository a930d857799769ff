"""Thresholds, value ranges and metrics of a bundle, from its FP32 predictions on the threshold data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ssn_edge.data import ArraySet, DatasetError, load_dataset, select
from ssn_edge.evaluation.metrics import evaluate_all, f1_max, gap_threshold
from ssn_edge.export.inference import Predictions
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid
from ssn_edge.runtime.schema import Thresholds, ValueRange

log = logging.getLogger("ssn_edge")

MAX_THRESHOLD_PIXELS = 2_000_000  # pixel F1-max on more than this is subsampled (deterministically)


def threshold_split(data_path: str | Path) -> tuple[str, list]:
    """The samples used for thresholds and accuracy control: 'val' if present, else 'test'."""
    samples = load_dataset(data_path)
    for split in ("val", "test"):
        chosen = select(samples, split)
        if chosen:
            break
    else:
        raise DatasetError(f"{data_path}: no 'val' or 'test' split to set thresholds on")
    labels = {s.label for s in chosen}
    if labels != {0, 1}:
        kind = "defective" if 1 not in labels else "normal"
        raise DatasetError(
            f"{data_path}: the '{split}' split has no {kind} images; thresholds need both normal and defective ones"
        )
    if split == "test":
        log.warning(
            "%s has no 'val' split: thresholds (and accuracy control) use the 'test' split, so test metrics "
            "measured on it afterwards are optimistic",
            data_path,
        )
    return split, chosen


def pixel_truth(arrays: ArraySet) -> tuple[np.ndarray, np.ndarray] | None:
    """Images with pixel truth (indices and masks) when at least one has a defect pixel, else None."""
    idx = np.flatnonzero(arrays.mask_valid)
    if not len(idx) or not arrays.masks[idx].any():
        return None
    return idx, arrays.masks[idx]


def from_raw(arrays: ArraySet, raw_maps: np.ndarray, logits: np.ndarray) -> Predictions:
    """A plain graph's raw outputs post-processed as the runtime does, at the arrays' size."""
    return Predictions(sigmoid(logits), anomaly_map(raw_maps, arrays.images.shape[-2:]))


def pixel_threshold(arrays: ArraySet, maps: np.ndarray) -> tuple[float, str]:
    """F1-max over the defect masks; without masks, the lowest value that flags no pixel of a normal image."""
    truth = pixel_truth(arrays)
    if truth is None:
        log.warning("threshold data has no defect masks: pixel threshold = max map value over normal images")
        normal = maps[arrays.labels == 0]
        return float(np.nextafter(normal.max(), np.float32(np.inf))), "normal_max"
    idx, masks = truth
    values, target = maps[idx].ravel(), masks.ravel()
    if values.size > MAX_THRESHOLD_PIXELS:
        keep = np.sort(np.random.default_rng(0).choice(values.size, MAX_THRESHOLD_PIXELS, replace=False))
        values, target = values[keep], target[keep]
    _, threshold = f1_max(target, values)
    return gap_threshold(values, threshold), "f1_max"


def thresholds_from_predictions(arrays: ArraySet, pred: Predictions, source: str | None = None,
                                data: str | None = None) -> Thresholds:
    """F1-max image threshold (sigmoid scores) and pixel threshold (map values at the arrays' size), each placed
    in the middle of the gap below the F1-max value; source/data: the split and dataset they were set on."""
    _, image = f1_max(arrays.labels, pred.scores)
    pixel, method = pixel_threshold(arrays, pred.maps)
    return Thresholds(image=gap_threshold(pred.scores, image), pixel=pixel, pixel_method=method, source=source,
                      data=data, count=len(arrays))


def value_ranges(pred: Predictions) -> tuple[ValueRange, ValueRange]:
    """(score range, map range): min and max of the scores and maps, the runtime's colour scale."""
    return (ValueRange(float(pred.scores.min()), float(pred.scores.max())),
            ValueRange(float(pred.maps.min()), float(pred.maps.max())))


def metrics_from_predictions(arrays: ArraySet, pred: Predictions) -> dict[str, float]:
    """Image (and, with pixel truth, pixel) metrics, percent."""
    if pixel_truth(arrays) is None:
        return evaluate_all(arrays.labels, pred.scores)
    return evaluate_all(arrays.labels, pred.scores, arrays.masks, pred.maps, valid=arrays.mask_valid)
