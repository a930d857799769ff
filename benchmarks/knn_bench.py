"""The nearest-neighbour model family (model.kind knn): its defaults, accuracy, fit time, latency and bank size.

  python benchmarks/knn_bench.py tune --recipe recipes/knn_magnetic_tile.yaml --dataset magnetic_tile
  python benchmarks/knn_bench.py tune --grid map --recipe recipes/knn_resnet18.yaml --dataset mvtec_bottle
  python benchmarks/knn_bench.py tune --grid map --recipe recipes/knn_magnetic_tile.yaml --dataset magnetic_tile \
      --set knn.coreset=10000 --set knn.pool=200000
  python benchmarks/knn_bench.py accuracy --recipe recipes/knn_resnet18.yaml --dataset mvtec_bottle
  python benchmarks/knn_bench.py accuracy --recipe recipes/knn_magnetic_tile.yaml --dataset magnetic_tile
  python benchmarks/knn_bench.py neighbours --dataset mvtec_bottle --values 1
  python benchmarks/knn_bench.py bank --recipe recipes/knn_resnet18.yaml --dataset mvtec_bottle --sizes 1000 4000 16000
  python benchmarks/knn_bench.py latency
  python benchmarks/knn_bench.py int8 --dataset mvtec_bottle
  python benchmarks/knn_bench.py int8 --dataset magnetic_tile
  python benchmarks/knn_bench.py float_head --dataset mvtec_bottle
  python benchmarks/knn_bench.py vs_ssn --ssn-full BUNDLE --ssn-light BUNDLE
  python benchmarks/knn_bench.py table

tune: the knn defaults, chosen on the TRAINING split only: a seeded fifth of its normal images and its defective
ones (Magnetic tile's training split has them) are kept out of the fit and scored (records with split
train_heldout); a training split of normal images only (MVTec bottle) is scored on the held-out fifth and a copy of
each with a painted defect (ssn_edge.data.heldout.check_set; val_kind painted). --grid map: the map's settings
(knn.neighbours, the blur) on one bank; the Magnetic tile run fits a cheaper bank than the default's (10 000 of
200 000 candidates: 1 min of greedy steps instead of 6) for it. accuracy: `ssn-edge train` (the fit and the test
split, PyTorch FP32), then `ssn-edge export` (FP32 IR) run through the runtime (OpenVINO, INFERENCE_PRECISION_HINT
f32, the graph's own post-processing) on the test split, its largest difference from PyTorch, and batch-1 latency
of both. neighbours: the default run's bank with other knn.neighbours on the test split (PyTorch), what the map's
averaging alone changes. bank: accuracy and latency at several bank sizes (knn.coreset counts). latency:
every finished run's latency again, in one process (after the fits, on a quiet machine). int8: the default run's
checkpoint (or --variant's) exported with `--int8` (the distances kept float, ssn_edge/export/quantize.py) and,
for the default's, with everything quantized too; FP32 and INT8 of each on the test split through the runtime (f32
hint), decision flips at the bundle's image threshold, and the same checkpoint's PyTorch FP32 (torch_fp32_*).
vs_ssn: batch-1 latency at 256x256 of the knn INT8 bundle beside SSN bundles' INT8 (full and light head), rounds
alternating in one process, and ratio records. table:
benchmarks/results/knn.md and knn_bank.png from knn.json. Records go to benchmarks/results/knn.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import RESULTS, command_line, mean_sd, peak_rss_mb, record_results  # noqa: E402
from benchmarks.runs import bench_recipe, bundle_rows  # noqa: E402
from ssn_edge.config import parse_override  # noqa: E402
from ssn_edge.runtime.schema import BIAS_CORRECTIONS  # noqa: E402

METRICS = ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap")
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
VAL_FRACTION = 0.2  # tune: the share of the training split's normal images scored instead of fitted
# tune: (variant, knn overrides). The issue's reference first (a random 10 % bank), then the greedy coreset's size,
# its candidate pool, its projection, the channel reduction, and random at the greedy default's size.
TUNE_GRID = (
    ("random_10pct", {"sampler": "random", "coreset": 0.1}),
    ("greedy_2500", {"coreset": 2500}),
    ("greedy_5000", {"coreset": 5000}),
    ("greedy_10000", {"coreset": 10000}),
    ("greedy_20000", {"coreset": 20000}),
    ("greedy_10000_pool50k", {"coreset": 10000, "pool": 50_000}),
    ("greedy_10000_pool100k", {"coreset": 10000, "pool": 100_000}),
    ("greedy_10000_pool400k", {"coreset": 10000, "pool": 400_000}),
    ("greedy_10000_pool_all", {"coreset": 10000, "pool": 10_000_000}),
    ("greedy_10000_proj64", {"coreset": 10000, "projection": 64}),
    ("greedy_10000_ch192", {"coreset": 10000, "channels": 192}),
    ("random_10000", {"sampler": "random", "coreset": 10000}),
    # the default bank (2 % of the patches) with greedy distances on the projection or on the features themselves
    ("greedy_2pct", {"coreset": 0.02}),
    ("greedy_2pct_exact", {"coreset": 0.02, "projection": None}),
    # larger coresets of bottle's patches (the same totals as the coreset + uniform draw variants measured at dca6874)
    ("greedy_4pct", {"coreset": 0.04}),
    ("greedy_10pct", {"coreset": 0.10}),
)
# tune --grid map: (variant, knn overrides, the map's blur sigma; None: runtime.postprocess's, 4). How many nearest
# bank patches the map averages (knn.neighbours), and the blur after it. They leave the bank as it is: it is fitted
# once for them all (the bank's own settings come from the recipe and --set, e.g. a cheaper pool for Magnetic tile).
MAP_GRID = (
    ("k1", {"neighbours": 1}, None),
    ("k3", {"neighbours": 3}, None),
    ("k5", {"neighbours": 5}, None),
    ("k9", {"neighbours": 9}, None),
    ("k1_sigma2", {"neighbours": 1}, 2.0),
    ("k1_sigma6", {"neighbours": 1}, 6.0),
    ("k5_sigma0", {"neighbours": 5}, 0.0),
    ("k5_sigma2", {"neighbours": 5}, 2.0),
    ("k5_sigma6", {"neighbours": 5}, 6.0),
)
# tune --grid map, score variants on the same bank: PatchCore's re-weighted image score (paper eq. 7, anomalib's
# compute_anomaly_score) with this many bank neighbours of the nearest bank patch (the paper's b; anomalib's 9).
REWEIGHT_GRID = (("k1_reweight3", 3), ("k1_reweight9", 9))


def knn_run(dataset: str, variant: str, seed: int) -> Path:
    """Where `accuracy` (and `bank`) leave a fit: its checkpoint, bundles and records' runs."""
    return ROOT / "runs" / "bench" / f"knn_{dataset}_{variant}_s{seed}"


def _recipe(args, extra: dict | None = None):
    overrides = dict(parse_override(s) for s in args.set)
    overrides["train.seed"] = args.seed
    overrides.update(extra or {})
    return bench_recipe(args.recipe, overrides)


def _base(recipe, args, variant: str) -> dict:
    return {"model": "knn", "dataset": args.dataset, "backbone": recipe.model.backbone, "setting": "unsupervised",
            "variant": variant, "seed": recipe.train.seed, "command": command_line()}


def _rounded(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 3) for k in METRICS if k in metrics}


# ---------------------------------------------------------------------------------------------------------------
# tune: defaults from the training split
# ---------------------------------------------------------------------------------------------------------------


def _cached_features(recipe, images: np.ndarray):
    import torch

    from ssn_edge.model.knn.features import PatchFeatures

    extractor = PatchFeatures(recipe.model).eval()
    with torch.no_grad():
        return torch.cat([extractor(torch.from_numpy(images[s : s + 16])) for s in range(0, len(images), 16)])


@dataclass
class TuneSplit:
    """What tune fits on and what it scores. fit_features: (n, C, h, w) of the fit's images, fit_labels theirs (1:
    hidden from the fit, which banks normal images only); val: the scored images, val_features theirs. val_kind:
    "real" (held-out normals + the training split's defective images) or "painted" (held-out normals + copies of
    them with painted defects, ssn_edge.data.heldout.check_set: a training split of normal images only)."""

    fit_features: Any
    fit_labels: np.ndarray
    val: Any
    val_features: Any
    val_kind: str


def _subset(arrays, idx: np.ndarray):
    import dataclasses

    return dataclasses.replace(arrays, images=arrays.images[idx], masks=arrays.masks[idx], labels=arrays.labels[idx],
                               mask_valid=arrays.mask_valid[idx], paths=[arrays.paths[i] for i in idx])


def tune_split(recipe, progress: bool) -> TuneSplit:
    """VAL_FRACTION of the training split's normal images held out of the fit, scored with the split's defective
    images where it has some, else with painted copies of themselves (the test split is never read)."""
    import torch

    from ssn_edge.data import load_arrays, load_dataset, select, split_validation
    from ssn_edge.data.heldout import check_set

    size = tuple(recipe.data.image_size)
    samples = load_dataset(recipe.data.path)
    train = select(samples, "train")
    if any(s.label == 1 for s in train):
        arrays = load_arrays(train, size, progress=progress)
        normal = np.random.default_rng(1234).permutation(np.flatnonzero(arrays.labels == 0))
        val_normal = np.sort(normal[: int(round(VAL_FRACTION * len(normal)))])
        val = np.sort(np.concatenate([val_normal, np.flatnonzero(arrays.labels == 1)]))
        fit_labels = arrays.labels.copy()
        fit_labels[val] = 1  # the fit banks normal images only: the scored ones are hidden from it
        feats = _cached_features(recipe, arrays.images)
        return TuneSplit(feats, fit_labels, _subset(arrays, val), feats[torch.from_numpy(val)], "real")
    # the project's one held-out split (the images an export would set thresholds on), at VAL_FRACTION
    d = recipe.data
    split = split_validation(samples, VAL_FRACTION, d.val_min, d.val_seed)
    fit_arrays = load_arrays(split.train, size, progress=progress)
    val = check_set(split.held_out, size)
    return TuneSplit(_cached_features(recipe, fit_arrays.images), fit_arrays.labels,
                     val, _cached_features(recipe, val.images), "painted")


def _val_metrics(head, feats, arrays, blur_sigma: float | None = None) -> dict:
    """The scored images' metrics through the shared post-processing, as evaluate_model computes them; blur_sigma:
    another blur than runtime.postprocess's (its kernel 2 x round(3 sigma) + 1, as the default's 25 at sigma 4)."""
    import torch

    from ssn_edge.evaluation.evaluate import metrics_from_predictions, outputs_to_predictions
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    maps, scores = [], []
    with torch.no_grad():
        for s in range(0, len(feats), 16):
            m, sc = head(feats[s : s + 16])
            maps.append(m[:, 0].numpy())
            scores.append(sc.numpy())
    maps, scores, size = np.concatenate(maps), np.concatenate(scores), tuple(arrays.images.shape[-2:])
    if blur_sigma is None:
        return metrics_from_predictions(arrays, *outputs_to_predictions(maps, scores, size))
    kernel = 2 * int(round(3 * blur_sigma)) + 1
    return metrics_from_predictions(arrays, sigmoid(scores), anomaly_map(maps, size, blur_sigma, kernel))


def reweighted_scores(head, feats, support: int) -> np.ndarray:
    """PatchCore's image score (Roth et al. 2022, eq. 7): the largest nearest distance s* of the image's patch p*,
    times 1 - softmax over p*'s distances to the `support` bank patches nearest to its own nearest bank patch m*
    (m* first, so the weight is 1 - the softmax's first entry): a p* whose m* sits in a dense part of the bank
    scores lower than one whose m* is a lone member. Eager, one image at a time (a (patches, bank) block)."""
    import torch

    bank = head.bank - head.bank_mean  # the centred bank, as the head's queries are
    out = []
    with torch.no_grad():
        for f in feats:
            q = f.flatten(1).T - head.bank_mean  # (hw, C)
            d2 = torch.addmm(head.bank_sq, q, head.bank_t_neg2)  # |b|^2 - 2 q.b: the nearest row per patch
            nearest = d2.argmin(1)
            d = (q - bank[nearest]).norm(dim=1)  # exact distances to those rows
            p = int(d.argmax())
            m = bank[nearest[p]]
            rows = torch.topk(((bank - m) ** 2).sum(1), min(support, len(bank)), largest=False).indices  # m* first
            weight = 1.0 - torch.softmax((q[p] - bank[rows]).norm(dim=1), 0)[0]
            out.append(float(weight * d[p]))
    return np.asarray(out)


def _pooled(feats, channels: int | None):
    """Features with their channels averaged down to knn.channels, as PatchFeatures does (None: as they are)."""
    import torch

    from ssn_edge.model.knn.features import channel_pool_matrix

    if channels is None:
        return feats
    return torch.nn.functional.conv2d(feats, channel_pool_matrix(feats.shape[1], channels)[:, :, None, None])


def _grid_name(args) -> str:
    """The map grid's variants are named after the bank they share: the knn keys (and image size) given with --set,
    else default."""
    sets = [parse_override(s) for s in args.set]
    knn = [f"{k[4:]}{v}" for k, v in sets if k.startswith("knn.")]
    size = [f"size{v[0]}" if isinstance(v, list) else f"size{v}" for k, v in sets if k == "data.image_size"]
    return "_".join(size + knn) or "default"


def tune(args) -> None:
    import dataclasses

    import torch

    from ssn_edge.train.knn import fit_bank, standardised_head

    recipe = _recipe(args)
    t0 = time.perf_counter()
    split = tune_split(recipe, progress=not args.quiet)
    print(f"features of {len(split.fit_labels)} fit and {len(split.val)} scored training images "
          f"({split.val_kind} defects): {time.perf_counter() - t0:.1f} s")
    if not (split.val.labels == 1).any():
        raise SystemExit(f"{recipe.data.path}: nothing defective to tune on")
    grid = MAP_GRID if args.grid == "map" else [(v, knn, None) for v, knn in TUNE_GRID]
    grid = [g for g in grid if not args.only or g[0] in args.only]
    if args.grid == "map":
        grid = [(f"{_grid_name(args)}_{v}", knn, sigma) for v, knn, sigma in grid]
    banks: dict[tuple, tuple] = {}  # the bank's settings (all but the map's) -> (bank, held-out indices, fit)
    for variant, knn, sigma in grid:
        cfg = dataclasses.replace(recipe.knn, **knn)
        fit_f, val_f = _pooled(split.fit_features, cfg.channels), _pooled(split.val_features, cfg.channels)
        features = lambda i, f=fit_f: f[torch.from_numpy(i)]  # noqa: E731
        key = dataclasses.astuple(dataclasses.replace(cfg, neighbours=1))
        if key not in banks:
            banks[key] = fit_bank(features, split.fit_labels, cfg, recipe.train.seed, not args.quiet)
        bank, held, fit = banks[key]
        t1 = time.perf_counter()
        metrics = _val_metrics(standardised_head(features, held, bank, cfg), val_f, split.val, sigma)
        rec = _tune_record(recipe, args, f"val_{variant}", split, metrics, fit, t1, projection=cfg.projection,
                           channels=cfg.channels or int(fit_f.shape[1]), sampler=cfg.sampler,
                           neighbours=cfg.neighbours, blur_sigma=4.0 if sigma is None else sigma)
        record_results("knn", [rec])
        print({k: rec[k] for k in ("variant", *METRICS, "bank", "pool", "neighbours", "blur_sigma", "coreset_s")})
    if args.grid == "map":
        _reweight(args, recipe, split, banks)


def _tune_record(recipe, args, variant: str, split: TuneSplit, metrics: dict, fit, scored_from: float,
                 **settings) -> dict:
    """A tune record: the scored images, their metrics, the bank's fit, the settings measured, and the scoring time
    since scored_from (a perf_counter reading)."""
    return {**_base(recipe, args, variant), "runtime": "torch", "precision": "fp32", "split": "train_heldout",
            "val_kind": split.val_kind, "val_images": int(len(split.val)),
            "val_defective": int((split.val.labels == 1).sum()), **_rounded(metrics), "bank": fit.bank,
            "pool": fit.candidates, **settings, "coreset_s": round(fit.coreset_s, 1),
            "score_s": round(time.perf_counter() - scored_from, 1)}


def _reweight(args, recipe, split, banks: dict) -> None:
    """REWEIGHT_GRID on the grid's (first) bank: the k1 map, the image score re-weighted as PatchCore's."""
    import dataclasses

    import torch

    from ssn_edge.evaluation.evaluate import metrics_from_predictions, outputs_to_predictions
    from ssn_edge.train.knn import standardised_head

    cfg = dataclasses.replace(recipe.knn, neighbours=1)
    fit_f, val_f = _pooled(split.fit_features, cfg.channels), _pooled(split.val_features, cfg.channels)
    bank, held, fit = next(iter(banks.values()))
    head = standardised_head(lambda i: fit_f[torch.from_numpy(i)], held, bank, cfg)
    with torch.no_grad():
        maps = torch.cat([head(val_f[s : s + 16])[0] for s in range(0, len(val_f), 16)])[:, 0].numpy()
    for variant, support in (g for g in REWEIGHT_GRID if not args.only or g[0] in args.only):
        t1 = time.perf_counter()
        scores = reweighted_scores(head, val_f, support)
        size = tuple(split.val.images.shape[-2:])
        metrics = metrics_from_predictions(split.val, *outputs_to_predictions(maps, scores, size))
        rec = _tune_record(recipe, args, f"val_{_grid_name(args)}_{variant}", split, metrics, fit, t1, neighbours=1,
                           reweight_support=support, blur_sigma=4.0)
        record_results("knn", [rec])
        print({k: rec[k] for k in ("variant", *METRICS, "bank", "reweight_support")})


# ---------------------------------------------------------------------------------------------------------------
# accuracy: fit + test (torch), export, OpenVINO FP32, latency
# ---------------------------------------------------------------------------------------------------------------


def _ov_latency_ms(compiled, x: np.ndarray, warmup: int, runs: int) -> float:
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer({0: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        request.infer({0: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _export_fp32(checkpoint: Path, out: Path) -> Path:
    """`ssn-edge export` (FP32 only), as a user runs it; returns the bundle's FP32 IR."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "export", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "model_fp32.xml"


def measure(recipe, args, variant: str, out: Path) -> list[dict]:
    """Fit + test (torch) and, unless --no-export, the exported FP32 IR on OpenVINO; both with batch-1 latency."""
    import openvino as ov
    import torch

    from ssn_edge.evaluation.evaluate import outputs_to_predictions, predict_raw, torch_latency_ms
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.model.load import load_model
    from ssn_edge.report.build import variant_metrics
    from ssn_edge.report.variants import openvino_variant
    from ssn_edge.runtime.bundle import load_bundle
    from ssn_edge.train.job import train_job

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    result = train_job(recipe, out, progress=not args.quiet)
    job_s = time.perf_counter() - t0
    fit = result.history[0]
    size = tuple(recipe.data.image_size)
    model = load_model(result.checkpoint).model
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    base = {**_base(recipe, args, variant), "precision": "fp32", "train_s": round(fit["fit_s"], 1),
            "fit_and_test_s": round(job_s, 1), "coreset_s": round(fit["coreset_s"], 1), "bank": fit["bank"],
            "patches": fit["patches"], "pool": fit["candidates"], "sampler": fit["sampler"],
            "coreset": recipe.knn.coreset, "neighbours": recipe.knn.neighbours, "peak_rss_mb": round(peak_rss_mb(), 1)}
    records = [{**base, "runtime": "torch", **_rounded(result.metrics),
                "latency_ms": round(torch_latency_ms(model, torch.from_numpy(x), warmup=5, runs=args.runs), 2)}]
    print({k: records[0][k] for k in ("variant", *METRICS, "bank", "train_s", "latency_ms")})
    if args.no_export:
        return records
    xml = _export_fp32(result.checkpoint, out / "bundle")
    test = split_arrays(recipe.data.path, "test", size, progress=False)
    # The runtime's own path (the bundle's graph ends in the post-processing, batch 1: as the report and `int8`
    # run it), compared on the final map and score with the training-time evaluation's.
    runtime = openvino_variant(load_bundle(out / "bundle"), "fp32", test)
    pt_scores, pt_maps = outputs_to_predictions(*predict_raw(model, test.images), size)
    compiled = ov.Core().compile_model(str(xml), "CPU", F32)
    records.append({**base, "runtime": "openvino", "inference_precision_hint": "f32",
                    **_rounded(variant_metrics(test, runtime.scores, runtime.maps)),
                    "latency_ms": round(_ov_latency_ms(compiled, x, 5, args.runs), 2),
                    "map_max_abs_diff": float(np.abs(runtime.maps - pt_maps).max()),
                    "score_max_abs_diff": float(np.abs(runtime.scores - pt_scores).max()),
                    "ir_mb": round(xml.with_suffix(".bin").stat().st_size / 1e6, 1)})
    print({k: records[1][k] for k in ("variant", *METRICS, "latency_ms", "map_max_abs_diff", "score_max_abs_diff")})
    return records


def accuracy(args) -> None:
    recipe = _recipe(args)
    out = knn_run(args.dataset, args.variant, args.seed)
    record_results("knn", measure(recipe, args, args.variant, out))


def neighbours(args) -> None:
    """The default run's bank with another knn.neighbours, on the test split (PyTorch FP32): the map's share of a
    change of the default, apart from the fit's. The head keeps its standardisation, which moves every map value
    alike (pixel metrics unchanged), and its score is the nearest distance whatever the map averages."""
    from ssn_edge.evaluation.evaluate import evaluate_model
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.model.load import load_model

    run = knn_run(args.dataset, "default", args.seed)
    loaded = load_model(run / "checkpoint.pt")
    model, recipe = loaded.model, loaded.recipe
    test = split_arrays(recipe.data.path, "test", tuple(recipe.data.image_size), progress=False)
    records = []
    for k in args.values:
        model.head.neighbours = max(1, min(k, len(model.head.bank)))
        metrics = evaluate_model(model, test)
        records.append({"model": "knn", "dataset": args.dataset, "backbone": recipe.model.backbone,
                        "setting": "unsupervised", "variant": f"default_bank_k{k}", "seed": args.seed,
                        "runtime": "torch", "precision": "fp32", "bank": len(model.head.bank), "neighbours": k,
                        "bank_of": run.name, "default_neighbours": recipe.knn.neighbours, **_rounded(metrics),
                        "command": command_line()})
        print({k: records[-1][k] for k in ("variant", *METRICS)})
    record_results("knn", records)


def bank(args) -> None:
    for size in args.sizes:
        recipe = _recipe(args, {"knn.coreset": size})
        variant = f"bank_{size}"
        out = knn_run(args.dataset, variant, args.seed)
        record_results("knn", measure(recipe, args, variant, out))


def latency(args) -> None:
    """Batch-1 latency of every finished knn run again, PyTorch and OpenVINO f32 alternating in one process, so a
    busy machine during a long fit does not skew one run's number against another's. Updates their records."""
    import openvino as ov
    import torch

    from ssn_edge.evaluation.evaluate import torch_latency_ms
    from ssn_edge.model.load import load_model

    torch.set_num_threads(2)
    records = [r for r in json.loads((RESULTS / "knn.json").read_text()) if r.get("split") != "train_heldout"]
    updated = []
    for r in records:
        run = knn_run(r["dataset"], r["variant"], r["seed"])
        if not (run / "checkpoint.pt").is_file() or (r["runtime"] == "openvino" and not (run / "bundle").is_dir()):
            print(f"skipped {run.name} {r['runtime']}: no checkpoint or bundle")
            continue
        loaded = load_model(run / "checkpoint.pt")
        x = np.random.default_rng(0).standard_normal((1, 3, *loaded.recipe.data.image_size)).astype(np.float32)
        if r["runtime"] == "torch":
            ms = torch_latency_ms(loaded.model, torch.from_numpy(x), warmup=5, runs=args.runs)
        else:
            ms = _ov_latency_ms(ov.Core().compile_model(str(run / "bundle" / "model_fp32.xml"), "CPU", F32), x, 5, args.runs)
        updated.append({**r, "latency_ms": round(ms, 2), "latency_command": command_line()})
        print(run.name, r["runtime"], updated[-1]["latency_ms"])
    record_results("knn", updated)


# ---------------------------------------------------------------------------------------------------------------
# int8: accuracy of the INT8 bundle; vs_ssn: its latency beside SSN's
# ---------------------------------------------------------------------------------------------------------------


def int8(args) -> None:
    from ssn_edge.evaluation.evaluate import evaluate_model
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.export import quantize
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.export.thresholds import ThresholdChoice
    from ssn_edge.model.load import load_model
    from ssn_edge.runtime.bundle import sha256_file

    run = knn_run(args.dataset, args.variant, args.seed)  # the accuracy run of --variant
    loaded = load_model(run / "checkpoint.pt")
    recipe = loaded.recipe
    test = split_arrays(recipe.data.path, "test", tuple(recipe.data.image_size), progress=False)
    # The same checkpoint's training-time evaluation (PyTorch + runtime.postprocess) beside the runtime's FP32, in
    # the same records: an FP32 gap between the two paths shows here, not in a comparison across runs.
    torch_fp32 = {f"torch_fp32_{k}": v for k, v in _rounded(evaluate_model(loaded.model, test)).items()}
    base = {"model": "knn", "dataset": args.dataset, "backbone": recipe.model.backbone, "setting": "unsupervised",
            "seed": args.seed, "neighbours": recipe.knn.neighbours, "command": command_line(),
            "checkpoint_sha256": sha256_file(run / "checkpoint.pt"), **torch_fp32}
    if args.bias_correction:  # the same export with this bias correction, its records beside the others
        base["int8_variant"] = f"{args.bias_correction}_bias"
    options = quantize.QuantizeOptions(**({"bias_correction": args.bias_correction} if args.bias_correction else {}))
    # the run's own variant (the head kept float), and for the default run everything quantized too, for the record
    variants = ((args.variant, quantize.FLOAT_SCOPES),) + (
        () if args.bias_correction or args.variant != "default" else (("int8_all_quantized", {}),))
    records = []
    for variant, scopes in variants:
        saved, quantize.FLOAT_SCOPES = quantize.FLOAT_SCOPES, scopes
        try:
            out = run / f"bundle_{variant}_int8{'_' + base['int8_variant'] if args.bias_correction else ''}"
            # thresholds (only the flips count uses them) from test F1, as for the fits that predate the held-out split
            export_bundle(run / "checkpoint.pt", out, ExportOptions(int8=True, overwrite=True, quantize=options,
                                                                    thresholds=ThresholdChoice(source="test-f1")))
        finally:
            quantize.FLOAT_SCOPES = saved
        rows = bundle_rows(out, test, METRICS)
        fp32 = {f"fp32_{k}": rows["fp32"][k] for k in METRICS if k in rows["fp32"]}
        drops = {f"drop_{k}": round(rows["fp32"][k] - rows["int8"][k], 3) for k in METRICS if k in rows["int8"]}
        records.append({**base, "variant": variant, **rows["int8"], **fp32, **drops,
                        "fp32_latency_ms": rows["fp32"]["latency_ms"]})
        print({k: records[-1].get(k) for k in ("variant", *METRICS, *drops, "flips", "latency_ms", "fp32_latency_ms",
                                               *fp32, *torch_fp32)})
    record_results("knn", records)


def float_head(args) -> None:
    """INT8 batch-1 latency with the head kept float (the default) vs all quantized (from `int8`), one run."""
    from ssn_edge.runtime.bench import bench_bundle
    from ssn_edge.runtime.bundle import load_bundle

    run = knn_run(args.dataset, "default", args.seed)  # both INT8 bundles of the default run
    loaded = {v: load_bundle(run / f"bundle_{v}_int8") for v in ("default", "int8_all_quantized")}
    times: dict[str, list[float]] = {v: [] for v in loaded}
    for _ in range(args.rounds):
        for v, b in loaded.items():
            times[v].append(bench_bundle(b, precisions=["int8"], warmup=3, runs=args.runs, throughput_seconds=0)[0]["latency_ms"])
    ms = {v: float(np.median(t)) for v, t in times.items()}
    record = {"model": "knn", "dataset": args.dataset, "backbone": "resnet18", "setting": "unsupervised",
              "runtime": "openvino", "precision": "int8", "seed": args.seed, "variant": "float_head_latency",
              "ratio": round(ms["default"] / ms["int8_all_quantized"], 3),
              "ratio_of": "knn_int8_float_head_vs_all_quantized_latency", "latency_ms": round(ms["default"], 2),
              "all_quantized_latency_ms": round(ms["int8_all_quantized"], 2), "command": command_line()}
    print(record)
    record_results("knn", [record])


def vs_ssn(args) -> None:
    """Batch-1 latency at 256x256 of INT8 bundles, rounds alternating so machine noise falls on all alike."""
    from ssn_edge.runtime.bench import bench_bundle
    from ssn_edge.runtime.bundle import load_bundle

    bundles = {"knn": knn_run(args.dataset, "default", args.seed) / "bundle_default_int8",
               "ssn_full": Path(args.ssn_full), "ssn_light": Path(args.ssn_light)}
    loaded = {k: load_bundle(p) for k, p in bundles.items()}
    times: dict[str, list[float]] = {k: [] for k in bundles}
    for _ in range(args.rounds):
        for k, b in loaded.items():
            times[k].append(bench_bundle(b, precisions=["int8"], warmup=3, runs=args.runs, throughput_seconds=0)[0]["latency_ms"])
    ms = {k: float(np.median(v)) for k, v in times.items()}
    base = {"dataset": args.dataset, "backbone": "resnet18", "setting": "unsupervised", "runtime": "openvino",
            "precision": "int8", "seed": args.seed, "command": command_line()}
    records = [{**base, "model": "knn" if k == "knn" else "ssn", "variant": f"latency_{k}", "latency_ms": round(v, 2),
                "bundle": str(bundles[k])} for k, v in ms.items()]
    for k in ("ssn_full", "ssn_light"):
        records.append({**base, "model": "knn", "variant": f"knn_vs_{k}", "ratio": round(ms["knn"] / ms[k], 3),
                        "ratio_of": f"knn_vs_ssn_int8_latency_{k.split('_')[1]}_head"})
    for r in records:
        print({k: r.get(k) for k in ("variant", "latency_ms", "ratio", "ratio_of")})
    record_results("knn", records)


# ---------------------------------------------------------------------------------------------------------------
# table: knn.md and knn_bank.png
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _k(record: dict) -> int:
    """knn.neighbours of a record; records from before the key existed mapped the nearest distance alone."""
    return record.get("neighbours", 1)


def _over_seeds(tested: list[dict]) -> list[str]:
    """Mean ± sd over train.seed (the pool's draw, the coreset's first patch, the normals that set the scale) of the
    PyTorch rows of each variant fitted with more than one seed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in tested:
        if r["runtime"] == "torch":
            groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    lines = ["", "### Over fit seeds (PyTorch, mean ± sd)", "",
             "| dataset | variant | seeds | bank | image AUROC | image AP | pixel AUPRO | pixel AP | fit s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (dataset, variant), rows in sorted(groups.items()):
        if len(rows) < 2:
            continue
        cells = [mean_sd(r.get(k) for r in rows) for k in (*METRICS, "train_s")]
        lines.append(f"| {dataset} | {variant} | {len(rows)} | {int(np.mean([r.get('bank', 0) for r in rows]))} | "
                     + " | ".join(cells) + " |")
    return lines


def table(args) -> None:  # noqa: ARG001
    from ssn_edge.runtime.atomic import atomic_write

    records = json.loads((RESULTS / "knn.json").read_text())
    lines = ["# knn (PatchCore-style) reference: measured on this machine", "",
             "Written by `python benchmarks/knn_bench.py table` from `knn.json` (each record has its command).", ""]
    lines += ["## Test split, FP32 (PyTorch and OpenVINO f32)", "",
              "| dataset | variant | seed | runtime | bank | k | image AUROC | image AP | pixel AUPRO | pixel AP | "
              "fit s | latency ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    tested = sorted((r for r in records if r.get("split") != "train_heldout" and r.get("precision", "fp32") == "fp32"
                     and "ratio" not in r and not r["variant"].startswith("latency_")),
                    key=lambda r: (r["dataset"], r.get("bank", 0), r["variant"], r.get("seed", 0), r["runtime"]))
    for r in tested:
        lines.append(f"| {r['dataset']} | {r['variant']} | {r.get('seed', 0)} | {r['runtime']} | {r.get('bank', '-')} | "
                     f"{_k(r)} | " + " | ".join(_fmt(r.get(k)) for k in METRICS) + f" | {_fmt(r.get('train_s'), '.1f')} | "
                     f"{_fmt(r.get('latency_ms'))} |")
    lines += _over_seeds(tested)
    lines += ["", "## Defaults: the training split's held-out part (a fifth of its normal images + its defective ones, "
              "or painted copies of them: defects real / painted)", "",
              "| dataset | variant | defects | bank | pool | k | blur sigma | image score | image AUROC | image AP | "
              "pixel AUPRO | pixel AP | coreset s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in records if r.get("split") == "train_heldout"):
        score = f"re-weighted, b {r['reweight_support']}" if "reweight_support" in r else "max"
        lines.append(f"| {r['dataset']} | {r['variant']} | {r.get('val_kind', 'real')} | {r['bank']} | {r['pool']} | "
                     f"{_k(r)} | {_fmt(r.get('blur_sigma', 4.0), '.0f')} | {score} | "
                     + " | ".join(_fmt(r.get(k)) for k in METRICS) + f" | {_fmt(r.get('coreset_s'), '.1f')} |")
    lines += ["", "## INT8 (OpenVINO, f32 hint for both; drop = FP32 - INT8, same run)", "",
              "Variant `default (full_bias)`: NNCF's full bias correction (the export default now, `int8 "
              "--bias-correction full`); rows without it were exported with the fast one, the default before, and "
              "Magnetic tile's on a bank fitted before the held-out split (FP32 79.50).", "",
              "| dataset | variant | k | image AUROC | pixel AUPRO | drop image AUROC | drop pixel AUPRO | "
              "FP32 pixel AUPRO (runtime / PyTorch) | flips | latency ms | FP32 ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (r for r in records if r.get("precision") == "int8" and "drop_image_auroc" in r):
        variant = r["variant"] + (f" ({r['int8_variant']})" if r.get("int8_variant") else "")
        lines.append(f"| {r['dataset']} | {variant} | {_k(r)} | {_fmt(r.get('image_auroc'))} | "
                     f"{_fmt(r.get('pixel_aupro'))} | {_fmt(r.get('drop_image_auroc'))} | "
                     f"{_fmt(r.get('drop_pixel_aupro'))} | {_fmt(r.get('fp32_pixel_aupro'))} / "
                     f"{_fmt(r.get('torch_fp32_pixel_aupro'))} | {r.get('flips')} | "
                     f"{_fmt(r.get('latency_ms'))} | {_fmt(r.get('fp32_latency_ms'))} |")
    lines += ["", "## INT8 batch-1 latency at 256x256 beside SSN (one run, rounds alternating)", "",
              "| bundle | latency ms | | ratio | of |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        if r["variant"].startswith("latency_"):
            lines.append(f"| {r['variant'][8:]} | {_fmt(r.get('latency_ms'))} | | | |")
        elif r.get("ratio_of", "").startswith("knn_"):
            lines.append(f"| | | | {_fmt(r.get('ratio'), '.3f')} | {r['ratio_of']} |")
    atomic_write(RESULTS / "knn.md", "\n".join(lines) + "\n")
    _plot([r for r in tested if r["variant"].startswith("bank_")])
    print(RESULTS / "knn.md")


def _plot(records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for dataset in sorted({r["dataset"] for r in records}):
        rows = sorted((r for r in records if r["dataset"] == dataset and r["runtime"] == "openvino"), key=lambda r: r["bank"])
        rows = rows or sorted((r for r in records if r["dataset"] == dataset), key=lambda r: r["bank"])
        banks = [r["bank"] for r in rows]
        axes[0].plot(banks, [r["image_auroc"] for r in rows], "o-", label=f"{dataset} image AUROC")
        axes[0].plot(banks, [r["pixel_aupro"] for r in rows], "s--", label=f"{dataset} pixel AUPRO")
        axes[1].plot(banks, [r["latency_ms"] for r in rows], "o-", label=f"{dataset} ({rows[0]['runtime']})")
    for ax, ylabel in zip(axes, ("percent (test split)", "latency ms (batch 1, 256x256)")):
        ax.set_xscale("log")
        ax.set_xlabel("bank size (patches, greedy coreset)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("knn (ResNet18): bank size vs accuracy vs latency, FP32")
    fig.tight_layout()
    fig.savefig(RESULTS / "knn_bank.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tune", "accuracy", "neighbours", "bank", "latency", "int8", "float_head", "vs_ssn",
                                    "table"])
    p.add_argument("--recipe")
    p.add_argument("--dataset", help="name for the records: mvtec_bottle, magnetic_tile")
    p.add_argument("--variant", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="bank: knn.coreset counts")
    p.add_argument("--values", type=int, nargs="+", default=[1], help="neighbours: knn.neighbours values")
    p.add_argument("--only", nargs="+", help="tune: only these variants of the grid")
    p.add_argument("--grid", choices=["bank", "map"], default="bank",
                   help="tune: the bank's settings (TUNE_GRID) or the map's on one bank (MAP_GRID)")
    p.add_argument("--runs", type=int, default=30, help="timed batch-1 runs")
    p.add_argument("--no-export", action="store_true", help="accuracy/bank: PyTorch only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--bias-correction", choices=BIAS_CORRECTIONS,
                   help="int8: export with this NNCF bias correction only (records int8_variant <it>_bias)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--ssn-full", help="vs_ssn: an SSN bundle (full classification head) with an INT8 model")
    p.add_argument("--ssn-light", help="vs_ssn: an SSN bundle (light classification head) with an INT8 model")
    p.add_argument("--rounds", type=int, default=5, help="vs_ssn: alternating rounds")
    args = p.parse_args()
    on_a_run = ("int8", "float_head", "vs_ssn", "neighbours")  # commands on a finished run of --dataset
    if args.what in on_a_run and not args.dataset:
        p.error(f"{args.what} needs --dataset")
    if args.what not in ("latency", "table", *on_a_run) and not (args.recipe and args.dataset):
        p.error(f"{args.what} needs --recipe and --dataset")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    {"tune": tune, "accuracy": accuracy, "neighbours": neighbours, "bank": bank, "latency": latency, "int8": int8,
     "float_head": float_head, "vs_ssn": vs_ssn, "table": table}[args.what](args)


if __name__ == "__main__":
    main()
