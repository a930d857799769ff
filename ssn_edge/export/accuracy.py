"""Accuracy-controlled INT8 (NNCF quantize_with_accuracy_control): quantize, then revert layers to FP32 until the
chosen metric on the threshold data drops by at most max_drop points. Plain (whole-image) graphs only: NNCF's
restorer ranks per-item raw outputs, which a tiled graph's merge does not give it."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.evaluation.metrics import evaluate_all, pixel_metrics
from ssn_edge.export.inference import count_quantized_ops, output
from ssn_edge.export.quantize import Calibration, QuantizeOptions, advanced_parameters, correct_score_offset, float_scope
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid
from ssn_edge.runtime.schema import AccuracyControl

log = logging.getLogger("ssn_edge")

ACC_METRICS = ("image_auroc", "image_ap", "pixel_ap", "pixel_aupro", "decision_agreement")
# decision_agreement: percent of validation images whose INT8 decision equals FP32's at the bundle's image
# threshold, so --max-drop 1 means "at most 1 image in 100 flips" (what a line's quality record sees).

Agreement = tuple[np.ndarray, float]  # (FP32 decisions over the whole validation set, image threshold)


def metric_value(
    name: str, arrays: ArraySet, idx: np.ndarray, raw_maps: np.ndarray, logits: np.ndarray,
    agreement: Agreement | None = None,
) -> float:
    """One accuracy-control metric (percent) of the items ``idx`` of ``arrays``, given their raw outputs."""
    labels = arrays.labels[idx]
    scores = sigmoid(logits)
    if name == "decision_agreement":
        if agreement is None:
            raise ValueError("decision_agreement needs the FP32 decisions and the threshold")
        reference, threshold = agreement
        return 100.0 * float(np.mean((scores >= threshold) == reference[idx]))
    if name.startswith("image_"):
        return evaluate_all(labels, scores)[name]
    maps = anomaly_map(raw_maps, arrays.images.shape[-2:])
    return pixel_metrics(arrays.masks[idx], maps, valid=arrays.mask_valid[idx])[name]


def make_validation_fn(
    arrays: ArraySet, metric: str, agreement: Agreement | None = None
) -> Callable[[Any, Iterable[Any]], tuple[float, list]]:
    """NNCF validation function: (compiled model, item indices) -> (metric, raw outputs per item).

    Returning the raw outputs per item puts NNCF's accuracy restorer in output-ranking mode, which is what a
    set-level metric (AUROC cannot be computed on one image) needs.
    """

    def validate(compiled, items: Iterable[Any]) -> tuple[float, list]:
        idx = np.array([int(i) for i in items], dtype=np.int64)
        out_map, out_score = output(compiled, 0), output(compiled, 1)
        per_item, maps, logits = [], [], []
        for i in idx:
            result = compiled(arrays.images[i : i + 1])
            m = np.asarray(result[out_map], dtype=np.float32)
            s = np.asarray(result[out_score], dtype=np.float32)
            per_item.append([m, s])
            maps.append(m[0, 0])
            logits.append(s.reshape(-1)[0])
        if metric != "decision_agreement" and len(set(arrays.labels[idx].tolist())) < 2:
            return float("nan"), per_item  # a subset with one class (NNCF probes with one item): undefined
        return metric_value(metric, arrays, idx, np.stack(maps), np.array(logits), agreement), per_item

    return validate


def quantize_int8_acc(
    ov_model, calib: Calibration, options: QuantizeOptions, arrays: ArraySet, metric: str, max_drop: float,
    agreement: Agreement | None = None, model_kind: str = "ssn",
):
    """(model, score offset or None) by NNCF accuracy control on ``arrays``, score offset corrected."""
    import nncf

    validation = nncf.Dataset(list(range(len(arrays))), lambda i: arrays.images[i : i + 1])
    params = advanced_parameters(options)
    quantized = nncf.quantize_with_accuracy_control(
        ov_model.clone(),
        nncf.Dataset(calib.inputs),
        validation,
        make_validation_fn(arrays, metric, agreement),
        max_drop=max_drop,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib.inputs),
        fast_bias_correction=options.bias_correction == "fast",
        **({"advanced_quantization_parameters": params} if params is not None else {}),
        **({"ignored_scope": scope}
           if (scope := float_scope(model_kind, ov_model, options.float_map)) is not None else {}),
    )
    return correct_score_offset(quantized, calib)


def accuracy_record(metric: str, max_drop: float, split: str, arrays: ArraySet, fp32: tuple[np.ndarray, np.ndarray],
                    int8_acc: tuple[np.ndarray, np.ndarray], xml, agreement: Agreement | None) -> AccuracyControl:
    """What accuracy control reached: the metric of FP32 and of the result (raw outputs given), and the drop."""
    idx = np.arange(len(arrays))
    reference = metric_value(metric, arrays, idx, *fp32, agreement)
    achieved = metric_value(metric, arrays, idx, *int8_acc, agreement)
    drop = reference - achieved
    if drop > max_drop:
        log.warning("accuracy-controlled INT8: %s drop %.2f > max %.2f points", metric, drop, max_drop)
    return AccuracyControl(metric=metric, max_drop=max_drop, drop_type="absolute", data=split, fp32=reference,
                           int8_acc=achieved, drop=drop, met=bool(drop <= max_drop),
                           fake_quantize_ops=count_quantized_ops(xml))
