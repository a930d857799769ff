"""Accuracy and speed report for a bundle: every precision against the FP32 reference, in one self-contained page.

For the PyTorch FP32 model (when torch and the training checkpoint are at hand) and each OpenVINO variant of the
bundle (fp32 at an f32 hint, bf16 = the fp32 IR at a bf16 hint where the CPU has native BF16, fp16, int8,
int8_acc), on one split of a dataset:

* image AUROC/AP and pixel AUPRO/AP, through the shared post-processing (``anomaly_map``, ``sigmoid``) and
  ``ssn_edge.evaluation.metrics``, i.e. exactly what training-time evaluation and the runtime compute;
* how far each variant's image scores move from the reference (max and mean |difference| of the sigmoid
  scores) and how many images change decision at the bundle's image threshold ("flips");
* how many images score near the image threshold (``score_bunching``): a page warning when they are bunched
  there, and one when training's collapse check (bundle metadata) found the score or map collapsed;
* export's INT8 check (bundle metadata, ``ssn_edge.export.int8_check``): its numbers in each INT8 record and a
  page warning when INT8 was outside its bound of FP32 on the held-out images and their painted copies;
* batch-1 median latency and throughput (``ssn_edge.runtime.bench``), IR size.

The reference is PyTorch FP32 when available, else OpenVINO FP32: the report runs torch-free on a factory PC.
Outputs: ``report.json`` (a list of flat records, one per variant) and ``report.html`` (one file: inline CSS,
figures as base64 PNG, no scripts, no external assets). Both are written to a temporary file and renamed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.evaluation.metrics import evaluate_arrays
from ssn_edge.report.bunching import bunching_warning, score_bunching
from ssn_edge.report.figures import curves_figures, heatmaps_figure, pick_examples, scatter_figure
from ssn_edge.report.html import Figures, ReportInfo, flip_table, render_html
from ssn_edge.report.variants import (
    Timing,
    Variant,
    check_checkpoint_matches,
    openvino_variant,
    openvino_variants,
    torch_available,
    torch_tiled_variant,
    torch_variant,
)
from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import Bundle, load_bundle

log = logging.getLogger("ssn_edge")

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RECORD_KEYS = (
    "dataset",
    "backbone",
    "setting",
    "runtime",
    "precision",
    "inference_precision_hint",
    "image_auroc",
    "image_ap",
    "pixel_aupro",
    "pixel_ap",
    "score_max_abs_diff",
    "score_mean_abs_diff",
    "flips",
    "flip_fraction",
    "latency_ms",
    "throughput_ips",
    "file_mb",
    "near_threshold_fraction",
    "score_logit_spread",
    "scores_bunched",
    "training_collapsed",
    "int8_check_within_bound",
)
INT8_CHECK_KEYS = ("images", "fp32_image_auroc", "int8_image_auroc", "image_auroc_diff", "fp32_pixel_aupro",
                   "int8_pixel_aupro", "pixel_aupro_diff", "flips", "max_score_diff", "bound", "within_bound")
RANDOM_BACKBONE_WARNING = (
    "WARNING: this model was trained on a RANDOM (not ImageNet-pretrained) backbone: "
    "its accuracy is not representative of SuperSimpleNet."
)


@dataclass
class Report:
    """What build_report wrote: one record per variant (reference first), the two files, the notes."""

    records: list[dict[str, Any]]
    report_json: Path
    report_html: Path
    reference: str
    warnings: list[str]
    out_dir: Path
    baseline: dict[str, Any] | None = None  # the knn reference's record (--reference knn)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_out_dir(bundle_path: str | Path) -> Path:
    """Beside the bundle, not inside it: a bundle's directory holds only what its metadata lists."""
    bundle_path = Path(bundle_path)
    return bundle_path.parent / f"{bundle_path.name}_report"


def _dataset_name(data_path: str) -> str:
    p = Path(data_path)
    if p.suffix.lower() == ".csv":
        p = p.parent
    return p.name or str(data_path)


def variant_metrics(arrays: ArraySet, scores: np.ndarray, maps: np.ndarray) -> dict[str, float | None]:
    """Image AUROC/AP (need both classes) and pixel AUPRO/AP (need defect masks); None where undefined."""
    out: dict[str, float | None] = {"image_auroc": None, "image_ap": None, "pixel_aupro": None, "pixel_ap": None}
    if len(set(arrays.labels.tolist())) < 2:
        return out
    result = evaluate_arrays(arrays, scores, maps)
    for key in out:
        if key in result:
            out[key] = float(result[key])
    return out


def compare_scores(scores: np.ndarray, reference: np.ndarray, threshold: float) -> dict[str, Any]:
    """|score - reference| statistics and decision flips at the image threshold (defective: score >= t)."""
    diff = np.abs(scores.astype(np.float64) - reference.astype(np.float64))
    flipped = (scores >= threshold) != (reference >= threshold)
    n = len(scores)
    return {
        "score_max_abs_diff": float(diff.max()) if n else 0.0,
        "score_mean_abs_diff": float(diff.mean()) if n else 0.0,
        "flips": int(flipped.sum()),
        "flip_fraction": float(flipped.sum() / n) if n else 0.0,
        "flipped": flipped,
    }


def collapse_warning(bundle: Bundle) -> str | None:
    """Training's collapse check, when it found one (bundle metadata collapse_check)."""
    check = bundle.metadata.collapse_check
    return None if check is None or not check.collapsed else f"Training's {check.message}."


def int8_check_warnings(bundle: Bundle) -> list[str]:
    """Export's INT8 check, for each INT8 model it found outside the bound (model entries' check)."""
    return [f"Export's INT8 check: {entry.check.message}" for entry in bundle.metadata.models.values()
            if entry.check is not None and not entry.check.within_bound]


def int8_check_fields(bundle: Bundle, runtime: str, precision: str) -> dict[str, Any]:
    """int8_check_<key> of the bundle's check for an OpenVINO INT8 variant; None elsewhere (and when not checked)."""
    entry = bundle.metadata.models.get(precision) if runtime == "openvino" else None
    check = entry.check if entry is not None else None
    return {f"int8_check_{k}": None if check is None else getattr(check, k) for k in INT8_CHECK_KEYS}


# --------------------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------------------


def _report_arrays(bundle: Bundle, data_path: str | Path | None, split: str) -> tuple[str, ArraySet]:
    """The data and its arrays; a tiled bundle is evaluated on whole images at its tiling's (or training) size."""
    from ssn_edge.evaluation.job import split_arrays

    prov = bundle.metadata.provenance
    data_path = str(data_path or prov.training_data or "")
    if not data_path:
        raise ValueError(f"{bundle.path}: the bundle's recipe has no data.path; pass the dataset with --data")
    size = bundle.input_size
    if bundle.tiling is not None:
        size = bundle.tiling.image_size or prov.training_size or size
    return data_path, split_arrays(data_path, split, tuple(size), progress=False)


def _warnings(bundle: Bundle, data_path: str, split: str) -> list[str]:
    warnings = [RANDOM_BACKBONE_WARNING] if bundle.metadata.provenance.backbone.random else []
    collapse = collapse_warning(bundle)
    if collapse:
        warnings.append(collapse)
    warnings += int8_check_warnings(bundle)
    thr = bundle.metadata.thresholds
    if thr.source == split and thr.data and Path(thr.data).resolve() == Path(data_path).resolve():
        warnings.append(
            f"Note: the thresholds were set on this same '{split}' split, so decision-based numbers here are optimistic."
        )
    return warnings


def _torch_reference(bundle: Bundle, checkpoint: Path, arrays: ArraySet, weights: str | None, runs: int,
                     throughput_seconds: float) -> tuple[Variant, Timing]:
    check_checkpoint_matches(checkpoint, bundle)
    log.info("report: PyTorch FP32 reference from %s", checkpoint)
    # the bundle's map gate, which export may have set differently from the training recipe
    if bundle.tiling is not None:
        return torch_tiled_variant(checkpoint, arrays.images, weights, runs, bundle.tiling.graph, bundle.map_gate)
    return torch_variant(checkpoint, arrays.images, weights, runs, throughput_seconds, bundle.map_gate,
                         bundle.metadata.postprocess)


def _run_variants(bundle: Bundle, arrays: ArraySet, checkpoint: Path | None, weights: str | None, runs: int,
                  throughput_seconds: float, device: str, warnings: list[str]) -> tuple[list[Variant], dict[str, Timing]]:
    """Every variant's outputs (the reference first) and the PyTorch timing; OpenVINO is timed by _bench."""
    variants: list[Variant] = []
    timings: dict[str, Timing] = {}
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        if torch_available():
            v, timings["torch/fp32"] = _torch_reference(bundle, checkpoint, arrays, weights, runs, throughput_seconds)
            variants.append(v)
        else:
            warnings.append("Note: PyTorch is not installed here: the checkpoint was not used, OpenVINO FP32 is the reference.")
    for name in openvino_variants(bundle, device):
        log.info("report: OpenVINO %s", name)
        variants.append(openvino_variant(bundle, name, arrays, device))
    return variants, timings


def _bench(bundle: Bundle, names: list[str], runs: int, throughput_seconds: float, device: str
           ) -> tuple[dict[str, Timing], str]:
    """OpenVINO latency / throughput / size per variant, and the CPU's name."""
    from ssn_edge.runtime.bench import bench_bundle

    log.info("report: timing %s (%d runs each)", ", ".join(names), runs)
    results = bench_bundle(bundle, precisions=names, warmup=3, runs=runs, throughput_seconds=throughput_seconds,
                           device=device)
    timings = {f"openvino/{r['precision']}": Timing(r.get("latency_ms"), r.get("throughput_ips"), r.get("file_mb"))
               for r in results}
    return timings, (results[0].get("cpu", "?") if results else "?")


def _records(bundle: Bundle, arrays: ArraySet, data_path: str, variants: Sequence[Variant],
             timings: dict[str, Timing]) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """One flat record per variant (RECORD_KEYS and details) and each variant's decision flips."""
    prov, ref = bundle.metadata.provenance, variants[0]
    check = bundle.metadata.collapse_check
    records, flips = [], []
    for k, v in enumerate(variants):
        cmp = compare_scores(v.scores, ref.scores, bundle.image_threshold)
        flips.append(cmp.pop("flipped"))
        timing = timings.get(f"{v.runtime}/{v.precision}", Timing())
        records.append(_clean({
            "dataset": _dataset_name(data_path), "backbone": prov.backbone.name, "setting": prov.setting,
            "runtime": v.runtime, "precision": v.precision, "inference_precision_hint": v.hint,
            **variant_metrics(arrays, v.scores, v.maps), **cmp, **score_bunching(v.scores, bundle.image_threshold),
            "latency_ms": timing.latency_ms, "throughput_ips": timing.throughput_ips, "file_mb": timing.file_mb,
            "inference_precision": v.inference_precision, "is_reference": k == 0, "images": len(arrays),
            "training_collapsed": None if check is None else check.collapsed,  # None: not checked in training
            **int8_check_fields(bundle, v.runtime, v.precision),
        }))
    return records, flips


def _compared(variants: Sequence[Variant]) -> int | None:
    """The variant the scatter plot and heatmaps set against the reference: the lowest precision there is, or
    OpenVINO FP32 when only FP32 is in the bundle (against PyTorch)."""
    by_name = {(v.runtime, v.precision): i for i, v in enumerate(variants)}
    for precision in ("int8", "int8_acc", "fp16", "bf16"):
        if ("openvino", precision) in by_name:
            return by_name[("openvino", precision)]
    ov_fp32 = by_name.get(("openvino", "fp32"))
    return ov_fp32 if ov_fp32 not in (None, 0) else None


def _heatmaps(bundle: Bundle, arrays: ArraySet, variants: Sequence[Variant], other: Variant | None,
              flipped: np.ndarray | None, examples: int, figures: Figures) -> None:
    """FP32 maps (OpenVINO FP32 where present: the map a deployment compares) next to the compared variant's."""
    from ssn_edge.runtime.predict import map_display_range

    indices = pick_examples(arrays, flipped, variants[0].scores, examples) if examples > 0 else []
    if not indices:
        return
    map_ref = next((v for v in variants if (v.runtime, v.precision) == ("openvino", "fp32")), variants[0])
    map_other = other if other is not None and other is not map_ref else None
    display = map_display_range(bundle)
    if display is None:
        values = np.concatenate([map_ref.maps.ravel()] + ([map_other.maps.ravel()] if map_other is not None else []))
        lo, hi = float(values.min()), float(values.max())
        display = (lo, hi if hi > lo else lo + 1.0)
    figures.heatmaps = heatmaps_figure(arrays, indices, map_ref, map_other, bundle.pixel_threshold, display)
    figures.heatmap_note = (
        f"Rows: decision flips first, then the highest- and lowest-scored defective images and the highest-scored "
        f"normal image. Maps are smoothed logits on one colour scale ({display[0]:.3g} to {display[1]:.3g}); "
        f"the white contour is the bundle's pixel threshold ({bundle.pixel_threshold:.4g})."
    )


def _figures(bundle: Bundle, arrays: ArraySet, variants: Sequence[Variant], flips: Sequence[np.ndarray],
             examples: int) -> Figures:
    figures = Figures(**curves_figures(arrays.labels, variants))
    k = _compared(variants)
    other = variants[k] if k is not None else None
    if other is not None:
        ref, threshold = variants[0], bundle.image_threshold
        figures.scatter = scatter_figure(arrays.labels, ref, other, flips[k], threshold)
        figures.scatter_title = f"{other.label} vs {ref.label} image scores"
        figures.flip_table = flip_table(arrays, ref, other, flips[k], threshold)
    _heatmaps(bundle, arrays, variants, other, flips[k] if k is not None else None, examples, figures)
    return figures


def _baseline(bundle: Bundle, data_path: str, arrays: ArraySet, out_dir: Path, weights: str | None, device: str,
              runs: int, throughput_seconds: float, records: list[dict[str, Any]], warnings: list[str]) -> dict[str, Any]:
    """The knn reference's record (fitted and exported under out_dir); a warning when the bundle is below it."""
    from ssn_edge.report.reference import below_reference, fit_reference, reference_record

    if not torch_available():
        raise ValueError("--reference knn fits the memory-bank model with PyTorch, which is not installed here "
                         "(pip install 'ssn-edge[train]')")
    record = _clean({"dataset": _dataset_name(data_path), "backbone": bundle.metadata.provenance.backbone.name,
                     "setting": "unsupervised",
                     **reference_record(fit_reference(bundle, data_path, out_dir, weights), arrays, device, runs,
                                        throughput_seconds)})
    below = below_reference(records, record)
    if below:
        warnings.append("This model is below the memory-bank baseline fitted on the same training images: "
                        + "; ".join(below) + ".")
    return record


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def build_report(
    bundle_path: str | Path,
    data_path: str | Path | None = None,
    split: str = "test",
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    runs: int = 30,
    weights: str | None = None,
    throughput_seconds: float = 2.0,
    device: str = "CPU",
    examples: int = 4,
    reference_model: str = "none",
) -> Report:
    """Evaluate every variant of a bundle on ``split`` of ``data_path`` and write report.json + report.html.

    data_path: default the data the bundle's model was trained on. checkpoint: the PyTorch checkpoint the bundle
    was exported from (checked by sha256): adds a PyTorch FP32 row, which then is the reference; without it (or
    without torch) OpenVINO FP32 is the reference. weights: backbone weights file for rebuilding the PyTorch
    model. out_dir: default ``<bundle>_report`` beside the bundle. runs: timed batch-1 runs per variant.
    throughput_seconds: per variant (0 skips throughput). examples: heatmap rows. reference_model: "knn" fits
    the memory-bank baseline on the bundle's training images and adds its row (ssn_edge/report/reference.py).
    """
    bundle = load_bundle(bundle_path)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(bundle.path)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if reference_model not in ("none", "knn"):
        raise ValueError(f"reference model {reference_model!r} is not one of none, knn")
    data_path, arrays = _report_arrays(bundle, data_path, split)
    warnings = _warnings(bundle, data_path, split)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    variants, timings = _run_variants(bundle, arrays, checkpoint, weights, runs, throughput_seconds, device, warnings)
    names = [v.precision for v in variants if v.runtime == "openvino"]
    ov_timings, cpu = _bench(bundle, names, runs, throughput_seconds, device)
    records, flips = _records(bundle, arrays, data_path, variants, {**timings, **ov_timings})
    bunched = bunching_warning(records, bundle.image_threshold)
    if bunched:
        warnings.append(bunched)
    baseline = _baseline(bundle, data_path, arrays, out_dir, weights, device, runs, throughput_seconds,
                         records, warnings) if reference_model == "knn" else None
    reference = f"PyTorch FP32 ({checkpoint.name})" if variants[0].runtime == "torch" else "OpenVINO FP32 (f32 hint)"
    info = ReportInfo(
        dataset=_dataset_name(data_path), data_path=data_path, split=split, n_images=len(arrays),
        n_defective=int(arrays.labels.sum()), reference=reference, runs=runs,
        throughput_note=(f"THROUGHPUT hint, requests kept in flight for {throughput_seconds:g} s (PyTorch: batches of 8)"
                         if throughput_seconds > 0 else "not measured"),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"), device=f"{device}: {cpu}", warnings=warnings,
    )
    html = render_html(bundle, records, _figures(bundle, arrays, variants, flips, examples), info, baseline)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = records + ([baseline] if baseline is not None else [])
    json_path = atomic_write(out_dir / REPORT_JSON, json.dumps(rows, indent=2) + "\n")
    html_path = atomic_write(out_dir / REPORT_HTML, html)
    return Report(records, json_path, html_path, reference, warnings, out_dir, baseline)
