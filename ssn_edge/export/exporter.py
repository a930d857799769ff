"""Export a trained SSN checkpoint to a deployment bundle: OpenVINO IR in FP32 (always), FP16, INT8 and
accuracy-controlled INT8, with the thresholds, normalisation and pre/post-processing the runtime needs.

The graph goes straight from the PyTorch module to OpenVINO with ``openvino.convert_model`` (no ONNX round
trip): one conversion instead of two means one set of operator-mapping quirks instead of two, NNCF then
quantizes the OpenVINO model itself (``nncf.quantize`` on ``ov.Model``, the backend NNCF supports best),
and there is no intermediate file to version or lose. Input height and width are fixed (those the model
was trained at: SSN's feature resize is tied to them), the batch dimension is dynamic; the outputs are
named ``map`` (segmentation logits at 1/4 input resolution) and ``score`` (image logit).

Everything is built in a temporary directory and handed to :func:`ssn_edge.runtime.bundle.write_bundle`,
which renames it into place: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ssn_edge import __version__
from ssn_edge.export.calibration import CALIBRATION_FILE, CalibrationSpec, calibration_record, select_calibration
from ssn_edge.data import ArraySet, DatasetError, load_arrays, load_dataset, select
from ssn_edge.evaluation.metrics import evaluate_all, f1_max, gap_threshold
from ssn_edge.export.quantize import QuantizeOptions, advanced_parameters, calibration_inputs, quantize, subtract_from_score
from ssn_edge.runtime.bundle import Bundle, BundleError, sha256_file, write_bundle
from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA, anomaly_map, sigmoid
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("ssn_edge")

ACC_METRICS = ("image_auroc", "image_ap", "pixel_ap", "pixel_aupro", "decision_agreement")
# decision_agreement: percent of validation images whose INT8 decision equals FP32's at the bundle's image
# threshold, so --max-drop 1 means "at most 1 image in 100 flips" (what a line's quality record sees).
MAP_STRIDE = 4
INPUT_NAME = "image"
OUTPUT_NAMES = ("map", "score")
MAX_THRESHOLD_PIXELS = 2_000_000  # pixel F1-max on more than this is subsampled (deterministically)
WEIGHTS_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int8_acc": "int8"}
F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # never let the CPU plugin pick bf16 for reference numbers


# --------------------------------------------------------------------------------------------------------------
# Conversion and inference
# --------------------------------------------------------------------------------------------------------------


# OpenVINO's CPU plugin (2026.4) miscomputes a quantized model in which a convolution *without bias* feeds both
# a model output and ReduceMax/ReduceMean: the INT8 image score of SSN shifted by +0.4 (AUROC 96.6 -> 67.6 on
# MVTec bottle) while the map stayed right. SSN's last segmentation conv is bias-free (spec), and feeds the map
# output and the classification head's pooling. A zero bias is folded away by the converter, so the exported
# graph carries a bias this small instead: it moves the map logits by 1e-6, far below any threshold's resolution.
SEG_BIAS_WORKAROUND = 1e-6


def _with_seg_bias(model):
    """A copy of the model whose final segmentation conv(s) have a (negligible) bias; see SEG_BIAS_WORKAROUND.
    Every segmentation head is patched: one in SuperSimpleNet, one per location in a tiled ensemble."""
    import copy

    import torch

    model = copy.deepcopy(model)
    for owner in [m for m in model.modules() if getattr(m, "segmentation", None) is not None]:  # SSNHeads
        net = owner.segmentation.net  # (the CAM baseline has none: its map conv has a bias)
        last = net[-1]
        if isinstance(last, torch.nn.Conv2d) and last.bias is None:
            biased = torch.nn.Conv2d(last.in_channels, last.out_channels, last.kernel_size, bias=True)
            with torch.no_grad():
                biased.weight.copy_(last.weight)
                biased.bias.fill_(SEG_BIAS_WORKAROUND)
            net[-1] = biased
    return model


def map_output(map_gate: str, **extra: Any) -> dict[str, Any]:
    """The bundle's description of the map output: segmentation logits, or with model.map_gate "score" the
    log-probability log sigmoid(map) + log sigmoid(score) (ssn_edge.model.ssn.score_gated_map)."""
    kind = "logits" if map_gate == "none" else "log_probability"
    return {"name": "map", "stride": MAP_STRIDE, "kind": kind, "gate": map_gate, **extra}


def _graph(model):
    """The exported graph as a module: image -> (map logits (B,1,h,w), score logits (B,)), in eval mode."""
    import torch

    model = _with_seg_bias(model)

    class ExportGraph(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor):
            map_logits, score = self.inner(image)
            return map_logits.float(), score.float()

    return ExportGraph(model).eval()


def convert(model, size: tuple[int, int]):
    """PyTorch SSN -> ov.Model with input 'image' [-1, 3, H, W] and outputs 'map', 'score'."""
    import openvino as ov
    import torch

    h, w = size
    with torch.no_grad():
        ov_model = ov.convert_model(_graph(model), example_input=torch.zeros(1, 3, h, w), input=[[-1, 3, h, w]])
    if len(ov_model.outputs) != 2:
        raise RuntimeError(f"converted SSN has {len(ov_model.outputs)} outputs, expected 2 (map, score)")
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for output, name in zip(ov_model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    return ov_model


def compile_f32(model: Any):
    """Compile an ov.Model or IR path on CPU with FP32 inference precision."""
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", F32_CONFIG)


def _output(compiled, index: int):
    try:
        return compiled.output(OUTPUT_NAMES[index])
    except RuntimeError:
        return compiled.outputs[index]


def infer(compiled, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Raw map logits (N, h, w) and score logits (N,) from a compiled model."""
    out_map, out_score = _output(compiled, 0), _output(compiled, 1)
    request = compiled.create_infer_request()
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        result = request.infer({0: np.ascontiguousarray(images[start : start + batch_size])})
        maps.append(np.asarray(result[out_map], dtype=np.float32)[:, 0])
        scores.append(np.asarray(result[out_score], dtype=np.float32).reshape(-1))
    return np.concatenate(maps), np.concatenate(scores)


# --------------------------------------------------------------------------------------------------------------
# Thresholds, normalisation and metrics on the validation data
# --------------------------------------------------------------------------------------------------------------


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


def _pixel_truth(arrays: ArraySet) -> tuple[np.ndarray, np.ndarray] | None:  # (indices, their masks)
    """Images with pixel truth (indices and masks) when at least one has a defect pixel, else None."""
    idx = np.flatnonzero(arrays.mask_valid)
    if not len(idx) or not arrays.masks[idx].any():
        return None
    return idx, arrays.masks[idx]


def thresholds_and_normalization(
    arrays: ArraySet, raw_maps: np.ndarray, logits: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """F1-max image threshold (sigmoid scores) and pixel threshold (map values at input size), min/max of both."""
    size = arrays.images.shape[-2:]
    return thresholds_from_predictions(arrays, sigmoid(logits), anomaly_map(raw_maps, size))


def thresholds_from_predictions(
    arrays: ArraySet, scores: np.ndarray, maps: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same from post-processed image scores (N,) in [0, 1] and maps (N, H, W) at the arrays' size."""
    _, image_threshold = f1_max(arrays.labels, scores)
    thresholds: dict[str, Any] = {"image": gap_threshold(scores, image_threshold)}
    truth = _pixel_truth(arrays)
    if truth is not None:
        idx, masks = truth
        values = maps[idx].ravel()
        target = masks.ravel()
        if values.size > MAX_THRESHOLD_PIXELS:
            keep = np.sort(np.random.default_rng(0).choice(values.size, MAX_THRESHOLD_PIXELS, replace=False))
            values, target = values[keep], target[keep]
        _, pixel_threshold = f1_max(target, values)
        thresholds["pixel"] = gap_threshold(values, pixel_threshold)
        thresholds["pixel_method"] = "f1_max"
    else:
        # No pixel truth (image labels only): the lowest threshold that flags no pixel of a normal image.
        log.warning("threshold data has no defect masks: pixel threshold = max map value over normal images")
        normal = maps[arrays.labels == 0]
        thresholds["pixel"] = float(np.nextafter(normal.max(), np.float32(np.inf)))
        thresholds["pixel_method"] = "normal_max"
    normalization = {
        "image": {"min": float(scores.min()), "max": float(scores.max())},
        "map": {"min": float(maps.min()), "max": float(maps.max())},
    }
    return thresholds, normalization


def metrics_for(arrays: ArraySet, raw_maps: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Image (and, with pixel truth, pixel) metrics of raw outputs, through the shared post-processing."""
    size = arrays.images.shape[-2:]
    return metrics_from_maps(arrays, sigmoid(logits), anomaly_map(raw_maps, size))


def metrics_from_maps(arrays: ArraySet, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    truth = _pixel_truth(arrays)
    if truth is None:
        return evaluate_all(arrays.labels, scores)
    return evaluate_all(arrays.labels, scores, arrays.masks, maps, valid=arrays.mask_valid)


Agreement = tuple[np.ndarray, float]  # (FP32 decisions over the whole validation set, image threshold)


def metric_value(
    name: str, arrays: ArraySet, idx: np.ndarray, raw_maps: np.ndarray, logits: np.ndarray, agreement: Agreement | None = None
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
    from ssn_edge.evaluation.metrics import pixel_metrics

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
        out_map, out_score = _output(compiled, 0), _output(compiled, 1)
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


# --------------------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What every INT8 path of one export quantizes with, prepared once: the inputs NNCF sees (defects painted in
    as the spec says) and, for the score-offset correction, the unpainted batch with the FP32 model's scores."""

    inputs: list[np.ndarray]
    plain: np.ndarray | None = None
    fp32_scores: np.ndarray | None = None


def prepare_calibration(fp32_model, images: list[Path], size: tuple[int, int], spec: CalibrationSpec,
                        options: QuantizeOptions) -> Calibration:
    inputs = calibration_inputs(images, size, spec.defects, spec.seed)
    if not options.score_offset:
        return Calibration(inputs)
    plain = np.concatenate(inputs if spec.defects == 0 else calibration_inputs(images, size))
    return Calibration(inputs, plain, infer(compile_f32(fp32_model), plain)[1])


def _offset_corrected(quantized, calib: Calibration):
    """The quantized model, its score shifted back by its mean shift on the (unpainted) calibration images."""
    if calib.plain is None:
        return quantized, None
    shift = float(np.mean(infer(compile_f32(quantized), calib.plain)[1].astype(np.float64) - calib.fp32_scores))
    log.info("INT8 score-offset correction: %+.4f logits (mean over %d calibration images)", shift, len(calib.plain))
    return subtract_from_score(quantized, shift), shift


def quantize_int8(ov_model, calib: Calibration, options: QuantizeOptions):
    """INT8 by NNCF post-training quantization (ssn_edge.export.quantize); returns (model, score offset or None)."""
    return _offset_corrected(quantize(ov_model.clone(), calib.inputs, options), calib)


def quantize_int8_acc(
    ov_model, calib: Calibration, options: QuantizeOptions, arrays: ArraySet, metric: str, max_drop: float,
    agreement: Agreement | None = None,
):
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
        **({"advanced_quantization_parameters": params} if params is not None else {}),
    )
    return _offset_corrected(quantized, calib)


def count_quantized_ops(xml: Path) -> int:
    """FakeQuantize nodes in an IR (what NNCF inserts; the CPU plugin runs them as INT8 kernels)."""
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(xml).get_ops())


# --------------------------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------------------------


def _input_metadata(size: tuple[int, int]) -> dict[str, Any]:
    return {
        "name": INPUT_NAME,
        "height": int(size[0]),
        "width": int(size[1]),
        "channels": 3,
        "layout": "NCHW",
        "color": "rgb",
        "grayscale": "replicate",
        "scale": "uint8/255, uint16/65535",
        "resize": "area when shrinking, bilinear when enlarging",
        "normalize": {"mean": [float(f"{v:.6g}") for v in IMAGENET_MEAN], "std": [float(f"{v:.6g}") for v in IMAGENET_STD]},
    }


def _check_options(max_drop: float, acc_metric: str) -> None:
    if acc_metric not in ACC_METRICS:
        raise ValueError(f"accuracy metric {acc_metric!r} is not one of {', '.join(ACC_METRICS)}")
    if not (0.0 <= max_drop <= 100.0):
        raise ValueError(f"max_drop is an absolute drop in percentage points, 0..100; got {max_drop}")


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    fp16: bool,
    int8: bool,
    int8_acc: bool = False,
    calibration: CalibrationSpec | None = None,
    max_drop: float = 0.5,
    acc_metric: str = "image_auroc",
    weights: str | None = None,
    overwrite: bool = False,
    threshold_data: str | None = None,
    graph: str | None = None,
    quantize_options: QuantizeOptions | None = None,
    map_gate: str | None = None,
) -> Bundle:
    """Export ``checkpoint`` to a bundle at ``out_dir``: FP32 always, FP16/INT8/accuracy-controlled INT8 on request.

    Thresholds and normalisation come from the FP32 model on the threshold data (``threshold_data``, default
    the recipe's data.path; its 'val' split, else 'test'). INT8 models are calibrated on ``calibration``
    (default: 128 normal training images of the recipe's data). ``max_drop`` is in percentage points of
    ``acc_metric``. ``map_gate`` sets model.map_gate in the exported graph (None: as trained). Nothing is written
    unless everything succeeds. A tiled checkpoint goes to :func:`ssn_edge.export.tiled.export_tiled_bundle`
    (``graph`` picks its graph; default from the recipe).
    """
    from ssn_edge.model.checkpoint import load_checkpoint
    from ssn_edge.model.load import model_from_checkpoint
    from ssn_edge.model.load import is_tiled_checkpoint

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not overwrite:  # before minutes of work, and before reading the checkpoint
        raise BundleError(f"{out_dir}: already exists (choose another --out or pass --overwrite)")
    _check_options(max_drop, acc_metric)
    if is_tiled_checkpoint(load_checkpoint(checkpoint)):
        from ssn_edge.export.tiled import export_tiled_bundle

        if int8_acc:
            raise ValueError(f"{checkpoint}: accuracy-controlled INT8 is not offered for tiled models yet; use --int8")
        return export_tiled_bundle(
            checkpoint, out_dir, fp16=fp16, int8=int8, calibration=calibration, weights=weights,
            overwrite=overwrite, threshold_data=threshold_data, graph=graph, map_gate=map_gate,
        )
    _check_options(max_drop, acc_metric)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (choose another --out or pass --overwrite)")
    quantizing = int8 or int8_acc
    if calibration is not None and not quantizing:
        log.warning("a calibration set was given but no INT8 model was asked for; it is not used")
    if quantizing and calibration is None:
        calibration = CalibrationSpec()
    quantize_options = quantize_options or QuantizeOptions()

    model, recipe, state = model_from_checkpoint(checkpoint, weights, map_gate)
    size = (int(recipe.data.image_size[0]), int(recipe.data.image_size[1]))
    calib_images = select_calibration(calibration, recipe) if quantizing else []
    data_path = threshold_data or recipe.data.path
    if not data_path:
        raise ValueError(f"{checkpoint}: the recipe has no data.path; pass the threshold/validation data with --data")
    split, samples = threshold_split(data_path)
    arrays = load_arrays(samples, size)
    if acc_metric.startswith("pixel_") and int8_acc and _pixel_truth(arrays) is None:
        raise DatasetError(f"{data_path}: '{split}' split has no defect masks; use an image_* accuracy metric")

    import openvino as ov

    with tempfile.TemporaryDirectory(prefix="ssn-edge-export-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, Path] = {}
        models: dict[str, dict[str, Any]] = {}
        outputs_by_precision: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def save(precision: str, ov_model, compress: bool) -> None:
            xml, bin_ = f"model_{precision}.xml", f"model_{precision}.bin"
            ov.save_model(ov_model, tmp / xml, compress_to_fp16=compress)
            files[xml], files[bin_] = tmp / xml, tmp / bin_
            models[precision] = {"xml": xml, "bin": bin_, "weights_precision": WEIGHTS_PRECISION[precision]}
            outputs_by_precision[precision] = infer(compile_f32(tmp / xml), arrays.images)

        log.info("converting to OpenVINO (input %dx%d, dynamic batch)", *size)
        save("fp32", convert(model, size), compress=False)
        fp32_xml = tmp / "model_fp32.xml"
        if fp16:
            save("fp16", ov.Core().read_model(fp32_xml), compress=True)

        calib_meta: dict[str, Any] | None = None
        if quantizing:
            calib_meta = calibration_record(calibration, calib_images, recipe)
            (tmp / CALIBRATION_FILE).write_text(json.dumps(calib_meta, indent=2))
            files[CALIBRATION_FILE] = tmp / CALIBRATION_FILE
            calib = prepare_calibration(ov.Core().read_model(fp32_xml), calib_images, size, calibration, quantize_options)
        if int8:
            log.info("quantizing to INT8 on %d calibration images", len(calib_images))
            quantized, offset = quantize_int8(ov.Core().read_model(fp32_xml), calib, quantize_options)
            save("int8", quantized, compress=False)
            models["int8"].update(calibration={"file": CALIBRATION_FILE, "size": len(calib_images)},
                                  quantization={**quantize_options.to_dict(), "score_offset_value": offset})
        if int8_acc:
            log.info(
                "quantizing to INT8 with accuracy control (%s, max drop %.2f points, %d validation images)",
                acc_metric,
                max_drop,
                len(arrays),
            )
            agreement = None
            if acc_metric == "decision_agreement":
                fp32_thresholds, _ = thresholds_and_normalization(arrays, *outputs_by_precision["fp32"])
                threshold = fp32_thresholds["image"]
                agreement = (sigmoid(outputs_by_precision["fp32"][1]) >= threshold, threshold)
            quantized, acc_offset = quantize_int8_acc(
                ov.Core().read_model(fp32_xml), calib, quantize_options, arrays, acc_metric, max_drop, agreement
            )
            save("int8_acc", quantized, compress=False)
            idx = np.arange(len(arrays))
            reference = metric_value(acc_metric, arrays, idx, *outputs_by_precision["fp32"], agreement)
            achieved = metric_value(acc_metric, arrays, idx, *outputs_by_precision["int8_acc"], agreement)
            drop = reference - achieved
            report = {
                "metric": acc_metric,
                "data": split,
                "fp32": reference,
                "int8_acc": achieved,
                "drop": drop,
                "met": bool(drop <= max_drop),
                "fake_quantize_ops": count_quantized_ops(tmp / "model_int8_acc.xml"),
            }
            if not report["met"]:
                log.warning("accuracy-controlled INT8: %s drop %.2f > max %.2f points", acc_metric, drop, max_drop)
            models["int8_acc"].update(
                calibration={"file": CALIBRATION_FILE, "size": len(calib_images)},
                quantization={**quantize_options.to_dict(), "score_offset_value": acc_offset},
                max_drop=max_drop,
                drop_type="absolute",
                metric=acc_metric,
                report=report,
            )

        thresholds, normalization = thresholds_and_normalization(arrays, *outputs_by_precision["fp32"])
        thresholds.update(source=split, method="f1_max", placement="middle of the gap below the f1_max score", data=str(data_path), images=len(arrays))
        for precision, (raw_maps, logits) in outputs_by_precision.items():
            models[precision]["metrics"] = metrics_for(arrays, raw_maps, logits)

        metadata = {
            "input": _input_metadata(size),
            "outputs": {
                "map": map_output(recipe.model.map_gate),
                "score": {"name": "score", "kind": "logit"},
            },
            "postprocess": {
                "map_upsample": "bilinear",
                "blur_sigma": BLUR_SIGMA,
                "blur_kernel": BLUR_KERNEL,
                "score": "sigmoid",
            },
            "thresholds": thresholds,
            "normalization": normalization,
            "models": models,
            "calibration": (
                {"file": CALIBRATION_FILE, "count": calib_meta["count"], "spec": calib_meta["spec"]}
                if calib_meta
                else None
            ),
            "tiling": None,
            "backbone": state["backbone"],
            "recipe": state["recipe"],
            "setting": recipe.train.setting,
            "supervision": state.get("supervision"),  # image counts behind the setting (None: older checkpoint)
            "ssn_edge_version": __version__,
            "source_checkpoint": {
                "name": checkpoint.name,
                "sha256": sha256_file(checkpoint),
                "epoch": state.get("epoch"),
            },
        }
        return write_bundle(out_dir, metadata, files, overwrite=overwrite)
