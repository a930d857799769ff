"""What the training benchmarks share: a recipe resolved against this checkout, and a training that is run once.

A finished training leaves `trained.json` (time, history, test metrics) beside its checkpoint, so a rerun (say,
after a failed export) evaluates it again instead of retraining; `--reuse-from` adopts an earlier run of the very
same recipe and seed (train_bench's), checked field by field.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.results import RESULTS
from ssn_edge.runtime.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
TRAINED = "trained.json"


def bench_recipe(path: str | Path, overrides: dict[str, Any]):
    """The recipe at ROOT/path with overrides, its data and weights paths made absolute and its training precision
    the one this CPU trains in (bf16 becomes fp32 without native bf16, as training itself resolves it), so records
    and run comparisons say what ran; exits (skipped) when the shared data folder is not beside this checkout."""
    import dataclasses

    from ssn_edge.config import load_recipe
    from ssn_edge.train.schedule import resolve_precision

    recipe = load_recipe(ROOT / path, overrides)
    data = (ROOT / recipe.data.path).resolve()
    if not data.exists():
        print(f"skipped: {data} is absent (the shared data folder is not beside this checkout)")
        sys.exit(0)
    recipe.data.path = str(data)
    if recipe.model.weights:  # None: the torch hub cache or a download (ssn_edge.model.backbones)
        recipe.model.weights = str((ROOT / recipe.model.weights).resolve())
    if recipe.model.kind == "knn":  # nothing trains
        return recipe
    return dataclasses.replace(recipe, train=resolve_precision(recipe.train))


def adopt(src: Path, out: Path, recipe) -> None:
    """Take over a finished training of the very same recipe and seed (e.g. train_bench's), instead of repeating it."""
    from ssn_edge.config import recipe_from_dict, upgrade_recipe_dict

    src = src if src.is_absolute() else ROOT / src
    # a run of an earlier ssn-edge recorded the earlier recipe layout: compared in the current one
    theirs = recipe_from_dict(upgrade_recipe_dict(json.loads((src / "recipe.json").read_text()))).to_dict()
    ours = recipe.to_dict()
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours.get(k)}
        raise SystemExit(f"--reuse-from {src}: its recipe differs from this variant's: {diff}")
    bench = [r for r in json.loads((RESULTS / "training.json").read_text())
             if src.name == f"{r.get('dataset')}_{r.get('setting')}_{r.get('variant')}_s{r.get('seed', 0)}"]
    if not bench:
        raise SystemExit(f"--reuse-from {src}: no record of its training time in benchmarks/results/training.json")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "checkpoint.pt", out / "checkpoint.pt")
    shutil.copy2(src / "recipe.json", out / "recipe.json")
    atomic_write(out / TRAINED, json.dumps({
        "train_s": bench[-1]["train_s"], "reused_from": f"{os.path.relpath(src, ROOT)} ({bench[-1]['command']})",
        "history": json.loads((src / "history.json").read_text()), "metrics": json.loads((src / "metrics.json").read_text())},
        indent=2))


def train_once(recipe, out: Path, reuse_from: str | None, quiet: bool, evaluate: bool = True,
               resume: Path | None = None) -> dict[str, Any]:
    """Train recipe into out unless a finished (or adopted) training is there; returns its `trained.json` record.
    resume: a checkpoint to go on from (its epochs count in the history, not in train_s)."""
    from ssn_edge.train.job import train_job

    done = out / TRAINED
    if reuse_from is not None and not done.exists():
        adopt(Path(reuse_from), out, recipe)
    if done.exists() and (out / "checkpoint.pt").exists():
        trained = json.loads(done.read_text())
        print(f"reusing the finished training in {out} ({trained['train_s']} s)")
        return trained
    t0 = time.perf_counter()
    result = train_job(recipe, out, resume=resume, progress=not quiet, evaluate=evaluate)
    trained = {"train_s": round(time.perf_counter() - t0, 1), "history": result.history, "metrics": result.metrics}
    atomic_write(done, json.dumps(trained, indent=2))
    return trained


def bundle_rows(bundle_path: Path, arrays, keys: tuple[str, ...]) -> dict[str, dict]:
    """FP32 (f32 hint) and the INT8 models (int8, int8_acc: those the bundle has) of a bundle on the arrays through the
    runtime, as the report scores them: the metrics named in keys (3 decimals), decision flips and the largest
    score difference against FP32, latency."""
    from ssn_edge.report.build import compare_scores, variant_metrics
    from ssn_edge.report.variants import openvino_variant
    from ssn_edge.runtime.bench import bench_bundle
    from ssn_edge.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    precisions = ["fp32", *(p for p in ("int8", "int8_acc") if p in bundle.precisions)]
    rows = {p: openvino_variant(bundle, p, arrays) for p in precisions}
    timing = {r["precision"]: r for r in bench_bundle(bundle, precisions=precisions, warmup=5, runs=30,
                                                       throughput_seconds=0)}
    out = {}
    for p, v in rows.items():
        cmp = compare_scores(v.scores, rows["fp32"].scores, bundle.image_threshold)
        metrics = variant_metrics(arrays, v.scores, v.maps)
        out[p] = {"precision": p, "runtime": "openvino", "inference_precision_hint": v.hint,
                  **{k: round(float(metrics[k]), 3) for k in keys if metrics.get(k) is not None},
                  "flips": cmp["flips"], "score_max_abs_diff": round(cmp["score_max_abs_diff"], 5),
                  "latency_ms": round(timing[p]["latency_ms"], 2), "file_mb": timing[p].get("file_mb")}
    return out
