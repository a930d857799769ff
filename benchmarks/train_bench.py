"""Training benchmarks (issue 2): accuracy after a CPU-sized schedule, and the feature-cache speed-up.

  python benchmarks/train_bench.py accuracy --recipe recipes/mvtec_resnet18_cpu.yaml --dataset mvtec_bottle
  python benchmarks/train_bench.py cache-ratio --recipe recipes/mvtec_resnet18_cpu.yaml --dataset mvtec_bottle
  python benchmarks/train_bench.py timing --recipe recipes/ssn_cpu_unsupervised.yaml --dataset magnetic_tile \
      --set data.path=../shared/data/magnetic_tile/manifest.csv --variant default_cpu
  python benchmarks/train_bench.py crop-merge-ratio --recipe recipes/ssn_cpu_supervised.yaml --dataset magnetic_tile

timing: what `ssn-edge train` costs a user, nothing else running: the whole job (reading and resizing the images,
the backbone cache, the optimiser steps, the end-of-training decisions and the memory bank's fit, the checkpoint)
without the test split's evaluation, and the machine's 1-minute load average when it started and ended (a job
beside it would show there), so a budget claim can be checked. `images`: the training-split images the job reads
(the held-out tenth of the normals aside; an unsupervised run reads the defective ones too and ignores them).

crop-merge-ratio: one crop step (forward, backward, optimiser) that merges only its crop (FeatureExtractor.merge's
window, what training does) against one that merges the whole map and cuts the crop out, alternating in one
process; the features are random of the recipe's shapes (a step's time does not depend on their values).

Writes records to benchmarks/results/training.json; checkpoints go to runs/bench/<dataset>_<setting>_<seed>/.
Reads data from ../shared and says so (exit 0) when it is absent.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, peak_rss_mb, record_results  # noqa: E402
from benchmarks.runs import bench_recipe  # noqa: E402
from ssn_edge.config import parse_override  # noqa: E402


def _recipe(args):
    overrides = dict(parse_override(s) for s in args.set)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    overrides["train.seed"] = args.seed
    return bench_recipe(args.recipe, overrides)


def _base(recipe, args) -> dict:
    return {
        "dataset": args.dataset,
        "backbone": recipe.model.backbone,
        "setting": recipe.train.setting,
        "seed": recipe.train.seed,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX512 / AVX2: times differ by machine
        "command": command_line(),
    }


def accuracy(args) -> None:
    from ssn_edge.train.job import train_job

    recipe = _recipe(args)
    out = ROOT / "runs" / "bench" / f"{args.dataset}_{recipe.train.setting}_{args.variant}_s{recipe.train.seed}"
    t0 = time.perf_counter()
    result = train_job(recipe, out, progress=not args.quiet)
    train_s = time.perf_counter() - t0
    epoch_s = [h["epoch_s"] for h in result.history]
    rec = {
        **_base(recipe, args),
        "variant": args.variant,
        "runtime": "torch",
        "precision": "fp32",
        "train_precision": recipe.train.precision,
        "epochs": recipe.train.epochs,
        "train_s": round(train_s, 1),
        "epoch_s_median": round(sorted(epoch_s)[len(epoch_s) // 2], 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "checkpoint": str(result.checkpoint.relative_to(ROOT)),
        **{k: round(v, 3) for k, v in result.metrics.items() if k != "image_threshold"},
    }
    print(record_results("training", [rec]))
    print({k: rec[k] for k in ("image_auroc", "pixel_aupro", "train_s", "epochs") if k in rec})


def timing(args) -> None:
    import os

    from ssn_edge.train.job import train_job

    recipe = _recipe(args)
    out = ROOT / "runs" / "bench" / f"timing_{args.dataset}_{recipe.train.setting}_{args.variant}_s{recipe.train.seed}"
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train_job(recipe, out, progress=not args.quiet, evaluate=False)
    train_s = time.perf_counter() - t0
    trained = [h for h in result.history if "epoch_s" in h]
    rec = {**_base(recipe, args), "variant": args.variant, "runtime": "torch", "train_precision": recipe.train.precision,
           "epochs": len(trained), "steps": recipe.train.steps, "train_s": round(train_s, 1),
           "epochs_s": round(sum(h["epoch_s"] for h in trained), 1), "images": int(len(_train_images(recipe))),
           "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    if args.test:  # after the clock: what this machine's run scores, FP32 PyTorch on the test split
        from ssn_edge.evaluation.job import eval_job

        rec["precision"] = "fp32"
        rec.update({k: round(v, 3) for k, v in eval_job(result.checkpoint, None).items() if k != "image_threshold"})
    print(record_results("training", [rec]))
    print({k: rec[k] for k in ("train_s", "epochs_s", "epochs", "images", "load_avg_start", "load_avg_end",
                               "image_auroc", "pixel_aupro") if k in rec})


def _train_images(recipe) -> list:
    from ssn_edge.data import load_dataset, split_validation

    d = recipe.data
    return split_validation(load_dataset(d.path), d.val_fraction, d.val_min, d.val_seed).train


def cache_ratio(args) -> None:
    """One epoch without and one with the cache, same process, same recipe: the ratio is the speed-up."""
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.train.loop import train

    recipe = _recipe(args)
    recipe.train.epochs = 1
    arrays = split_arrays(recipe.data.path, "train", tuple(recipe.data.image_size), progress=False)
    times = {}
    for cached in (False, True, False, True):  # interleaved, second pass kept: warm caches, fair order
        recipe.train.cache_features = cached
        t0 = time.perf_counter()
        res = train(recipe, arrays, ROOT / "runs" / "bench" / "cache_ratio", progress=False)
        total = time.perf_counter() - t0
        times[cached] = (res.history[-1]["epoch_s"], total)
        torch.manual_seed(0)
    uncached, cached_ = times[False][0], times[True][0]
    rec = {
        **_base(recipe, args),
        "variant": "feature_cache",
        "runtime": "torch",
        "train_precision": recipe.train.precision,
        "ratio": round(uncached / cached_, 3),
        "ratio_of": "uncached_vs_cached_epoch",
        "epoch_s_uncached": round(uncached, 2),
        "epoch_s_cached": round(cached_, 2),
        "cache_build_s": round(times[True][1] - cached_, 2),
        "n_images": int(len(arrays.labels)),
    }
    print(record_results("training", [rec]))
    print(rec)


def crop_merge_ratio(args) -> None:
    """Median crop-step time merging the crop alone against merging the whole map, rounds alternating."""
    import dataclasses
    import statistics

    import numpy as np

    from ssn_edge.model.ssn import SuperSimpleNet
    from ssn_edge.train import step as step_module
    from ssn_edge.train.schedule import autocast, build_optimizer

    recipe = _recipe(args)
    model = SuperSimpleNet(dataclasses.replace(recipe.model, pretrained=False, weights=None))
    model.heads.train()
    optimizer, _ = build_optimizer(model, recipe.train)
    batch, crop = recipe.train.batch_size, recipe.train.feature_crop
    l2, l3 = (torch.randn(batch, *m.shape[1:]) for m in model.features.raw(torch.zeros(1, 3, *recipe.data.image_size)))
    gt = torch.zeros(batch, 1, l2.shape[-2] * 2, l2.shape[-1] * 2)
    rng = np.random.default_rng(0)
    windowed = step_module.cropped_features

    def whole_then_cut(model, l2, l3, gt, crop, rng):
        y, x, h, w = step_module.random_window(tuple(gt.shape[-2:]), crop, rng)
        return model.features.merge(l2, l3)[..., y : y + h, x : x + w], gt[..., y : y + h, x : x + w]

    def step_s(cut) -> float:
        step_module.cropped_features = cut
        t0 = time.perf_counter()
        with autocast(recipe.train):
            loss, _ = step_module.train_step(model, recipe, l2, l3, gt, torch.zeros(batch, dtype=torch.bool), rng, crop)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"window": [], "whole": []}
    for i in range(2 * args.rounds + 2):
        name, cut = ("window", windowed) if i % 2 == 0 else ("whole", whole_then_cut)
        t = step_s(cut)
        if i >= 2:  # the first of each: warm-up
            times[name].append(t)
    step_module.cropped_features = windowed
    window_ms, whole_ms = (1000 * statistics.median(times[k]) for k in ("window", "whole"))
    rec = {**_base(recipe, args), "variant": "crop_merge", "runtime": "torch", "train_precision": recipe.train.precision,
           "ratio": round(whole_ms / window_ms, 3), "ratio_of": "whole_merge_vs_window_merge_crop_step",
           "step_ms_window": round(window_ms, 1), "step_ms_whole": round(whole_ms, 1), "batch": batch, "crop": crop,
           "image_size": list(recipe.data.image_size), "rounds": args.rounds, "threads": torch.get_num_threads()}
    print(record_results("training", [rec]))
    print(rec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["accuracy", "cache-ratio", "timing", "crop-merge-ratio"])
    p.add_argument("--recipe", required=True)
    p.add_argument("--dataset", required=True, help="name for the records, e.g. mvtec_bottle, magnetic_tile")
    p.add_argument("--variant", default="paper_heads")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--test", action="store_true", help="timing: then score the test split (outside the time)")
    p.add_argument("--rounds", type=int, default=20, help="crop-merge-ratio: timed steps of each kind")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    {"accuracy": accuracy, "cache-ratio": cache_ratio, "timing": timing, "crop-merge-ratio": crop_merge_ratio}[args.what](args)


if __name__ == "__main__":
    main()
