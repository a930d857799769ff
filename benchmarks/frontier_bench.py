"""Edge-backbone frontier (issue 5): noise variants and the light head, accuracy vs INT8 latency.

  python benchmarks/frontier_bench.py train --dataset mvtec_bottle --variant light_head --seed 0
  python benchmarks/frontier_bench.py latency --dataset mvtec_bottle          # light vs full head INT8, one run
  python benchmarks/frontier_bench.py epoch-ratio --dataset mvtec_bottle      # learned vs fixed noise epoch time
  python benchmarks/frontier_bench.py table                                   # mean/spread table + plot

Every variant is the dataset's CPU recipe with one change (VARIANTS); `train` evaluates the PyTorch FP32 model
on the test split and the exported INT8 model through the runtime, and records both in
benchmarks/results/frontier.json. Checkpoints: runs/bench/frontier/<dataset>_<variant>_s<seed>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS, command_line, record_results  # noqa: E402

RUNS = ROOT / "runs" / "bench" / "frontier"
RECIPES = {"mvtec_bottle": "recipes/mvtec_resnet18_cpu.yaml", "magnetic_tile": "recipes/magnetic_tile_unsupervised.yaml"}
# Each variant: overrides of the dataset's CPU recipe.
VARIANTS: dict[str, dict] = {
    "fixed_noise": {"noise.kind": "fixed", "noise.sigma": 0.015, "noise.smooth": None},  # the paper's noise
    "adaptive_noise": {},  # the CPU recipes' noise: sigma x per-channel std
    "learned_noise": {"noise.kind": "learned", "noise.beta": 0.5},
    "light_head": {"model.cls_head": "light"},
    "light_head_learned_noise": {"model.cls_head": "light", "noise.kind": "learned", "noise.beta": 0.5},
}


def _recipe(dataset: str, variant: str, seed: int, epochs: int | None = None):
    from ssn_edge.config import load_recipe

    overrides = {**VARIANTS[variant], "train.seed": seed}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    recipe = load_recipe(ROOT / RECIPES[dataset], overrides)
    data = (ROOT / recipe.data.path).resolve()
    if not data.exists():
        print(f"skipped: {data} is absent (the shared data folder is not beside this checkout)")
        sys.exit(0)
    recipe.data.path = str(data)
    recipe.model.weights = str((ROOT / recipe.model.weights).resolve())
    return recipe


def _base(dataset: str, variant: str, seed: int) -> dict:
    return {"dataset": dataset, "backbone": "resnet18", "setting": "unsupervised", "variant": variant, "seed": seed}


def train(args) -> None:
    from ssn_edge.calibration import CalibrationSpec
    from ssn_edge.export import export_bundle
    from ssn_edge.jobs import train_job

    recipe = _recipe(args.dataset, args.variant, args.seed)
    out = RUNS / f"{args.dataset}_{args.variant}_s{args.seed}"
    t0 = time.perf_counter()
    result = train_job(recipe, out, progress=not args.quiet)
    train_s = time.perf_counter() - t0
    epochs = [r["epoch_s"] for r in result.history]
    diverged = any(not np.isfinite(r["loss"]) for r in result.history)
    common = {**_base(args.dataset, args.variant, args.seed), "epochs": recipe.train.epochs, "train_s": round(train_s, 1),
              "epoch_s_median": round(float(np.median(epochs)), 2), "diverged": diverged, "command": command_line()}
    keys = ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap", "pixel_auroc")
    records = [{**common, "runtime": "torch", "precision": "fp32", **{k: round(result.metrics[k], 3) for k in keys if k in result.metrics}}]
    bundle = export_bundle(result.checkpoint, out / "bundle", fp16=False, int8=True,
                           calibration=CalibrationSpec(source="recipe", size=128), overwrite=True)
    m = bundle.metadata["models"]["int8"]["metrics"]  # INT8 through OpenVINO on the threshold split (test here)
    records.append({**common, "runtime": "openvino", "precision": "int8", **{k: round(m[k], 3) for k in keys if k in m}})
    if "eps_rel_mean" in result.history[-1]:
        records[0]["eps_rel_mean_last"] = round(result.history[-1]["eps_rel_mean"], 4)
    record_results("frontier", records)
    print(json.dumps(records, indent=2))


def latency(args) -> None:
    """INT8 batch-1 latency of the light and the full head at 256x256, interleaved in one process."""
    from ssn_edge.runtime.bench import time_latency, _random_input
    from ssn_edge.runtime.engine import Engine

    bundles = {v: RUNS / f"{args.dataset}_{v}_s{args.seed}" / "bundle" for v in ("adaptive_noise", "light_head")}
    if not bundles["adaptive_noise"].exists() and args.dataset == "mvtec_bottle":
        # the full head with the CPU recipe's (adaptive) noise is the issue-2 model: benchmarks/quant_bench.py's bundle
        bundles["adaptive_noise"] = ROOT / "runs" / "bench" / "bottle_bundle"
    missing = [str(b) for b in bundles.values() if not b.exists()]
    if missing:
        print(f"skipped: train these first: {', '.join(missing)}")
        return
    engines = {v: Engine(b, precision="int8", mode="latency") for v, b in bundles.items()}
    x = _random_input(engines["adaptive_noise"].compiled)
    times = {v: [] for v in engines}
    for _ in range(args.rounds):  # interleaved: machine load hits both alike
        for v, e in engines.items():
            times[v].append(time_latency(e.compiled, x, warmup=5, runs=20)["latency_ms"])
    full, light = float(np.median(times["adaptive_noise"])), float(np.median(times["light_head"]))
    record_results("frontier", [{
        **_base(args.dataset, "light_head", args.seed), "runtime": "openvino", "precision": "int8",
        "ratio": round(light / full, 3), "ratio_of": "light_head_vs_full_head_int8_latency",
        "latency_light_ms": round(light, 2), "latency_full_ms": round(full, 2), "rounds": args.rounds,
        "command": command_line()}])
    print(f"INT8 latency: light {light:.2f} ms, full {full:.2f} ms, ratio {light / full:.3f}")


def epoch_ratio(args) -> None:
    """Median epoch time of learned vs fixed noise, same data, same process, a few epochs each."""
    from ssn_edge.jobs import train_job

    medians = {}
    for variant in ("fixed_noise", "learned_noise"):
        recipe = _recipe(args.dataset, variant, 0, epochs=args.epochs)
        recipe.train.crop_epochs = None  # same (crop) cost in every timed epoch
        out = RUNS / f"epoch_ratio_{variant}"
        shutil.rmtree(out, ignore_errors=True)
        result = train_job(recipe, out, progress=False)
        medians[variant] = float(np.median([r["epoch_s"] for r in result.history]))
    ratio = medians["learned_noise"] / medians["fixed_noise"]
    record_results("frontier", [{
        **_base(args.dataset, "learned_noise", 0), "runtime": "torch", "precision": "bf16", "ratio": round(ratio, 3),
        "ratio_of": "learned_vs_fixed_noise_epoch_time", "epoch_s_learned": round(medians["learned_noise"], 2),
        "epoch_s_fixed": round(medians["fixed_noise"], 2), "epochs": args.epochs, "command": command_line()}])
    print(f"epoch time learned {medians['learned_noise']:.1f} s / fixed {medians['fixed_noise']:.1f} s = {ratio:.3f}")


def table(args) -> None:
    """Mean and spread over seeds per (dataset, variant, runtime/precision), and image AUROC vs INT8 latency."""
    path = RESULTS / "frontier.json"
    if not path.exists():
        print("no frontier results yet")
        return
    records = [r for r in json.loads(path.read_text()) if "ratio_of" not in r]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["variant"], r["runtime"], r["precision"]), []).append(r)
    print(f"{'dataset':<14} {'variant':<26} {'run':<14} {'seeds':>5} {'I-AUROC':>15} {'AUPRO':>15} {'train s':>8}")
    for key, rs in sorted(groups.items()):
        def ms(k):
            v = [r[k] for r in rs if r.get(k) is not None]
            return f"{np.mean(v):6.2f} ± {np.std(v):5.2f}" if v else "-"
        print(f"{key[0]:<14} {key[1]:<26} {key[2] + '/' + key[3]:<14} {len(rs):>5} {ms('image_auroc'):>15} "
              f"{ms('pixel_aupro'):>15} {np.mean([r.get('train_s', 0) for r in rs]):8.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--dataset", required=True, choices=list(RECIPES))
    t.add_argument("--variant", required=True, choices=list(VARIANTS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true")
    la = sub.add_parser("latency")
    la.add_argument("--dataset", default="mvtec_bottle", choices=list(RECIPES))
    la.add_argument("--seed", type=int, default=0)
    la.add_argument("--rounds", type=int, default=5)
    e = sub.add_parser("epoch-ratio")
    e.add_argument("--dataset", default="mvtec_bottle", choices=list(RECIPES))
    e.add_argument("--epochs", type=int, default=3)
    sub.add_parser("table")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    {"train": train, "latency": latency, "epoch-ratio": epoch_ratio, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
