"""Thresholds, value ranges and metrics of a bundle, from its FP32 predictions.

Where a threshold comes from (`ThresholdChoice.source`):

* "normal" (the default): a target false-alarm rate on normal images the model never trained on: the normal
  training images `train` held out (data.val_fraction, ssn_edge.data.samples.split_validation), or the normal
  images of a given dataset's 'val' split. No defective image is needed, which is what the unsupervised setting
  has. The image threshold lets at most ``max_false_alarm`` of those images score at or above it, the pixel
  threshold at most ``max_false_alarm_pixel`` of their pixels (see `false_alarm_threshold` for what that means
  with few images).
* "f1": F1-max on the 'val' split (normal and defective images), chosen explicitly.
* "test-f1": F1-max on the 'test' split, only when asked for by name: the test metrics measured on it afterwards
  are optimistic, and the bundle and report say so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssn_edge.data import ArraySet, DatasetError, load_dataset, select
from ssn_edge.evaluation.metrics import evaluate_all, f1_max, gap_threshold
from ssn_edge.export.inference import Predictions
from ssn_edge.runtime.schema import Thresholds, ValueRange

log = logging.getLogger("ssn_edge")

MAX_THRESHOLD_PIXELS = 2_000_000  # pixel F1-max on more than this is subsampled (deterministically)
SOURCES = ("normal", "f1", "test-f1")
# 1 % of good parts sent to a re-check: what a line tolerates for an automatic first pass (a few per hundred is
# where operators start to ignore the alarm); below that, the quantile needs more held-out images than a user
# typically has (100 for one false alarm allowed).
DEFAULT_MAX_FALSE_ALARM = 0.01
# Pixels: 0.1 % of a normal image's pixels (65 of 256 x 256, less than one blurred 25 x 25 spot) may be marked.
DEFAULT_MAX_FALSE_ALARM_PIXEL = 0.001
SPLIT_OF = {"f1": "val", "test-f1": "test"}


@dataclass(frozen=True)
class ThresholdChoice:
    """How export sets the thresholds: source (SOURCES), the target false-alarm rates (fractions of held-out
    normal images, and of their pixels) and an optional review band (a lower image threshold at a higher rate)."""

    source: str = "normal"
    max_false_alarm: float = DEFAULT_MAX_FALSE_ALARM
    max_false_alarm_pixel: float = DEFAULT_MAX_FALSE_ALARM_PIXEL
    review_false_alarm: float | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"threshold source {self.source!r} is not one of {', '.join(SOURCES)}")
        for name in ("max_false_alarm", "max_false_alarm_pixel"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name.replace('_', '-')} is a fraction in [0, 1), got {getattr(self, name)}")
        if self.review_false_alarm is not None and not self.max_false_alarm < self.review_false_alarm < 1.0:
            raise ValueError(f"review-false-alarm {self.review_false_alarm} must lie between max-false-alarm "
                             f"{self.max_false_alarm} and 1 (the review band sits below the defect threshold)")


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def evaluation_split(data_path: str | Path) -> tuple[str, list] | None:
    """The samples bundle metrics and accuracy control use: 'val' if it has normal and defective images, else
    'test'; None when neither has both (thresholds can still come from held-out normals)."""
    samples = load_dataset(data_path)
    for split in ("val", "test"):
        chosen = select(samples, split)
        if {s.label for s in chosen} == {0, 1}:
            return split, chosen
    log.warning("%s: no 'val' or 'test' split with both normal and defective images: the bundle carries no "
                "accuracy metrics", data_path)
    return None


def labelled_split(data_path: str | Path, split: str) -> list:
    """The samples of a split that F1-max thresholds need: normal and defective images."""
    chosen = select(load_dataset(data_path), split)
    labels = {s.label for s in chosen}
    if labels != {0, 1}:
        missing = "images" if not chosen else ("defective" if 1 not in labels else "normal") + " images"
        raise DatasetError(f"{data_path}: the '{split}' split has no {missing}; F1-max thresholds need both "
                           "normal and defective ones")
    return chosen


def pixel_truth(arrays: ArraySet) -> tuple[np.ndarray, np.ndarray] | None:
    """Images with pixel truth (indices and masks) when at least one has a defect pixel, else None."""
    idx = np.flatnonzero(arrays.mask_valid)
    if not len(idx) or not arrays.masks[idx].any():
        return None
    return idx, arrays.masks[idx]


def from_raw(arrays: ArraySet, raw_maps: np.ndarray, logits: np.ndarray) -> Predictions:
    """A raw graph's outputs post-processed as the runtime does, at the arrays' size."""
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    return Predictions(sigmoid(logits), anomaly_map(raw_maps, arrays.images.shape[-2:]))


# --------------------------------------------------------------------------------------------------------------
# False-alarm thresholds (normal images only)
# --------------------------------------------------------------------------------------------------------------


def false_alarm_threshold(values: np.ndarray, rate: float) -> float:
    """The threshold (decision: value >= threshold) at which at most ``rate`` of these normal values raise an
    alarm: k = floor(n x rate) of them may lie at or above it, and it sits in the middle of the gap between the
    k-th and (k+1)-th highest. With n x rate < 1 (21 held-out images at 1 %) no value may: the threshold is
    just above the highest, and the rate actually reached on new parts is only known to be about 1/(n+1) or
    less: hold out more normal images to resolve a lower rate."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    n = flat.size
    if n == 0:
        raise ValueError("no normal values to set a false-alarm threshold on")
    k = int(np.floor(n * rate + 1e-9))
    top = np.sort(np.partition(flat, n - min(k + 1, n))[n - min(k + 1, n):])[::-1]  # the k+1 highest, descending
    if k == 0:
        return float(np.nextafter(top[0], np.float32(np.inf)))
    if k >= n:
        return float(top[-1])
    high, low = top[k - 1], top[k]
    t = np.float32((np.float64(high) + np.float64(low)) / 2)
    return float(t if t > low else np.nextafter(low, np.float32(np.inf)))


def false_alarm_rate(values: np.ndarray, threshold: float) -> float:
    """Fraction of the (normal) values at or above the threshold."""
    values = np.asarray(values, dtype=np.float32)
    return float(np.mean(values >= np.float32(threshold))) if values.size else float("nan")


# --------------------------------------------------------------------------------------------------------------
# F1-max thresholds (normal and defective images)
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# The bundle's thresholds
# --------------------------------------------------------------------------------------------------------------


def set_thresholds(choice: ThresholdChoice, normal: Predictions | None, normal_from: str | None,
                   labelled: tuple[ArraySet, Predictions, str, str] | None) -> Thresholds:
    """The bundle's thresholds. normal: FP32 predictions on the held-out normal images (normal_from: where they
    came from); labelled: (arrays, predictions, split, data path) for the F1-max sources. The false-alarm rate
    reached on the held-out normals is recorded whatever the source (the report shows it)."""
    if choice.source == "normal":
        if normal is None:
            raise ValueError("no held-out normal images to set thresholds on")
        image = false_alarm_threshold(normal.scores, choice.max_false_alarm)
        pixel = false_alarm_threshold(normal.maps, choice.max_false_alarm_pixel)
        base = Thresholds(image=image, pixel=pixel, pixel_method="false_alarm", method="false_alarm",
                          placement="middle of the gap above the highest normal values allowed to alarm",
                          source="held_out_normal", data=normal_from, count=len(normal.scores),
                          max_false_alarm=choice.max_false_alarm, max_false_alarm_pixel=choice.max_false_alarm_pixel)
    else:
        arrays, pred, split, data = labelled
        if split == "test":
            log.warning("thresholds set by F1-max on the 'test' split, as asked (--threshold-from test-f1): test "
                        "metrics measured on it afterwards are optimistic")
        base = thresholds_from_predictions(arrays, pred, split, data)
    return with_held_out_rates(base, normal, choice.review_false_alarm)


def with_held_out_rates(t: Thresholds, normal: Predictions | None, review_rate: float | None) -> Thresholds:
    """The thresholds with the false-alarm rates they reach on the held-out normals, and the review threshold."""
    import dataclasses

    if normal is None:
        if review_rate is not None:
            raise ValueError("a review band is set on held-out normal images, and there are none")
        return t
    review = None
    if review_rate is not None:
        review = min(false_alarm_threshold(normal.scores, review_rate), t.image)
    return dataclasses.replace(
        t, held_out=len(normal.scores), false_alarm=false_alarm_rate(normal.scores, t.image),
        pixel_false_alarm=false_alarm_rate(normal.maps, t.pixel), review=review, review_false_alarm=review_rate)


def value_ranges(pred: Predictions) -> tuple[ValueRange, ValueRange]:
    """(score range, map range): min and max of the scores and maps, the runtime's colour scale."""
    return (ValueRange(float(pred.scores.min()), float(pred.scores.max())),
            ValueRange(float(pred.maps.min()), float(pred.maps.max())))


def metrics_from_predictions(arrays: ArraySet, pred: Predictions) -> dict[str, float]:
    """Image (and, with pixel truth, pixel) metrics, percent."""
    if pixel_truth(arrays) is None:
        return evaluate_all(arrays.labels, pred.scores)
    return evaluate_all(arrays.labels, pred.scores, arrays.masks, pred.maps, valid=arrays.mask_valid)
