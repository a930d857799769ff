"""The memory-bank reference row of a report (`ssn-edge report BUNDLE --reference knn`).

A user who trains SSN on their own parts needs to see when it is below what a one-minute baseline reaches on the
same data. The baseline is the project's nearest-neighbour model (model.kind knn, ssn_edge/model/knn) with its
default settings, fitted on the normal images of the bundle's own training split, at the bundle's input size, on
the same backbone and weights. It goes through the same pipeline as any model (train_knn, export_bundle FP32,
the runtime) and is scored and timed exactly as the bundle's OpenVINO FP32 row, so the two rows compare like with
like. The fitted checkpoint and bundle stay in the report folder (`reference_knn/`) for reuse.

Needs PyTorch (the fit); the report without --reference stays torch-free.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ssn_edge.data import ArraySet
from ssn_edge.runtime.bundle import Bundle

log = logging.getLogger("ssn_edge")

REFERENCES = ("none", "knn")
REFERENCE_DIR = "reference_knn"
# The comparison the page states: below the baseline by more than this on a metric is called out.
BELOW_BY = 0.5


@dataclass
class ReferenceResult:
    """The fitted reference: its bundle, fit time and bank size; the report adds its scores and timing."""

    bundle: Bundle
    fit_s: float
    bank: int


def reference_recipe(bundle: Bundle, data_path: str):
    """The knn defaults on the bundle's backbone, weights, input size and data (train split)."""
    from ssn_edge.config import RecipeError, recipe_from_dict

    prov = bundle.metadata.provenance
    values = dict(prov.recipe)
    trained = values.get("model") or {}
    model = {"kind": "knn", **{k: trained[k] for k in ("backbone", "weights", "pretrained") if k in trained}}
    size = list(prov.training_size or bundle.input_size)
    train = {"seed": int((values.get("train") or {}).get("seed", 0)), "setting": "unsupervised"}
    try:
        return recipe_from_dict({"name": "reference_knn", "model": model, "train": train,
                                 "data": {"path": data_path, "image_size": size}})
    except RecipeError as exc:
        raise ValueError(f"{bundle.path}: cannot build the knn reference from the bundle's recipe ({exc})") from None


def fit_reference(bundle: Bundle, data_path: str, out_dir: Path, weights: str | None = None) -> ReferenceResult:
    """Fit the knn reference on the bundle's training images and export it (FP32) under out_dir/reference_knn."""
    from ssn_edge.config import apply_overrides
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.runtime.bundle import load_bundle
    from ssn_edge.train.job import train_job

    recipe = reference_recipe(bundle, data_path)
    if weights:
        recipe = apply_overrides(recipe, {"model.weights": weights})
    where = Path(out_dir) / REFERENCE_DIR
    where.mkdir(parents=True, exist_ok=True)
    log.info("report: fitting the knn reference on the 'train' split of %s", data_path)
    t0 = time.perf_counter()
    result = train_job(recipe, where, progress=True, evaluate=False)
    fit_s = time.perf_counter() - t0
    ref = export_bundle(result.checkpoint, where / "bundle",
                        ExportOptions(threshold_data=data_path, weights=weights, overwrite=True))
    return ReferenceResult(load_bundle(ref.path), fit_s, int(result.history[0]["bank"]))


def compared_row(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The bundle's row set against the knn reference: OpenVINO FP32 (what the reference's row is), else the first."""
    return next((r for r in records if (r.get("runtime"), r.get("precision")) == ("openvino", "fp32")), records[0])


def below_reference(records: list[dict[str, Any]], reference: dict[str, Any]) -> list[str]:
    """The metrics on which the bundle's compared_row is below the knn reference by more than BELOW_BY points, as
    'metric X vs Y'."""
    own = compared_row(records)
    out = []
    for key in ("image_auroc", "pixel_aupro"):
        mine, theirs = own.get(key), reference.get(key)
        if mine is not None and theirs is not None and mine < theirs - BELOW_BY:
            out.append(f"{key.replace('_', ' ')} {mine:.2f} vs {theirs:.2f}")
    return out


def reference_record(result: ReferenceResult, arrays: ArraySet, device: str, runs: int,
                     throughput_seconds: float) -> dict[str, Any]:
    """The reference's flat record: metrics on the report's arrays, batch-1 latency and size like every row."""
    from ssn_edge.report.build import variant_metrics
    from ssn_edge.report.variants import openvino_variant
    from ssn_edge.runtime.bench import bench_bundle

    v = openvino_variant(result.bundle, "fp32", arrays, device)
    timing = bench_bundle(result.bundle, precisions=["fp32"], warmup=3, runs=runs,
                          throughput_seconds=throughput_seconds, device=device)[0]
    return {
        "model": "knn", "runtime": "openvino", "precision": "fp32", "inference_precision_hint": v.hint,
        **variant_metrics(arrays, v.scores, v.maps),
        "latency_ms": timing.get("latency_ms"), "throughput_ips": timing.get("throughput_ips"),
        "file_mb": timing.get("file_mb"), "fit_s": round(result.fit_s, 1), "bank": result.bank,
        "is_reference": False, "is_baseline": True, "images": len(arrays), "bundle": str(result.bundle.path),
    }
