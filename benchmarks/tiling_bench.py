"""Tiled inference benchmark (issue 4) on MVTec bottle at 512: the variants table, shared-backbone vs
independent tiles, and peak memory of `ssn-edge predict` on an 8192x8192 vs a 2048x2048 image.

  python benchmarks/tiling_bench.py train --variant single_512          # (and tiled_single9, tiled_ens4, tiled_ens9)
  python benchmarks/tiling_bench.py table                                # export + evaluate every trained variant
  python benchmarks/tiling_bench.py shared-vs-independent                # 9-tile ensemble, one run
  python benchmarks/tiling_bench.py edge-profile                         # where the two graphs' maps differ
  python benchmarks/tiling_bench.py graph-match --variant tiled_ens4     # accuracy run in either graph (PyTorch)
  python benchmarks/tiling_bench.py rss                                  # 8192 vs 2048 through ssn-edge predict

Checkpoints and bundles go to runs/bench/tiling/<variant>/; records to benchmarks/results/tiling.json.
single_256 is the issue-2 model (runs/bench/mvtec_bottle_unsupervised_cpu_schedule_s0), run on 512 images
resized to 256. Every variant is evaluated the same way: through the OpenVINO runtime (the path a factory PC
runs), on the 512x512 test images, pixel metrics at 512 against the 512 masks.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, record_results  # noqa: E402

RUNS = ROOT / "runs" / "bench" / "tiling"
DATA = (ROOT / ".." / "shared" / "data" / "mvtec_ad_512" / "bottle").resolve()
RECIPES = {
    "single_512": "recipes/mvtec_resnet18_512.yaml",
    "tiled_single9": "recipes/mvtec_resnet18_tiled9_single.yaml",
    "tiled_ens4": "recipes/mvtec_resnet18_tiled4_ensemble.yaml",
    "tiled_ens9": "recipes/mvtec_resnet18_tiled9_ensemble.yaml",
}
SINGLE_256 = ROOT / "runs" / "bench" / "mvtec_bottle_unsupervised_cpu_schedule_s0" / "checkpoint.pt"
BASE = {"dataset": "mvtec_bottle", "backbone": "resnet18", "setting": "unsupervised"}


def _require_data() -> None:
    if not DATA.exists():
        print(f"skipped: {DATA} is absent (the shared data folder is not beside this checkout)")
        sys.exit(0)


def checkpoint_of(variant: str) -> Path:
    return SINGLE_256 if variant == "single_256" else RUNS / variant / "checkpoint.pt"


def train(args) -> None:
    from benchmarks.runs import bench_recipe
    from ssn_edge.config import parse_override
    from ssn_edge.train.job import train_job

    _require_data()
    recipe = bench_recipe(RECIPES[args.variant], dict(parse_override(s) for s in args.set))
    out = RUNS / (args.run_name or args.variant)
    t0 = time.perf_counter()
    result = train_job(recipe, out, progress=not args.quiet)
    train_s = time.perf_counter() - t0
    history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else result.history
    epochs = [r["epoch_s"] for r in history if "epoch_s" in r]
    record_results("tiling", [{
        **BASE, "variant": args.variant, "runtime": "torch", "precision": "fp32", "seed": recipe.train.seed,
        "run": out.name, "overrides": " ".join(args.set) or None,
        "epochs": recipe.train.epochs, "train_s": round(train_s, 1),
        "epoch_s_median": round(float(np.median(epochs)), 2) if epochs else None,
        **{k: round(v, 3) for k, v in result.metrics.items() if k.startswith(("image_", "pixel_"))},
        "command": command_line(),
    }])
    print(json.dumps(result.metrics, indent=2))


def bundle_of(variant: str, graph: str | None = None) -> Path:
    """Export (FP32 + INT8) once; reuse afterwards."""
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.export.quantize import QuantizeOptions

    name = "bundle" if graph is None else f"bundle_{graph}"
    out = (RUNS / variant / name) if variant != "single_256" else RUNS / "single_256" / name
    if not (out / "metadata.json").exists():  # the graph-specific bundles (shared vs independent) are compared in FP32
        int8 = graph is None
        # INT8 as the recorded tiling results were measured: NNCF's defaults on the images as they are (tiled
        # INT8 ignored the quantize options then; it honours them now)
        export_bundle(checkpoint_of(variant), out, ExportOptions(
            int8=int8, calibration=CalibrationSpec(source="recipe", size=128, defects=0.0) if int8 else None,
            quantize=QuantizeOptions(activation_range="nncf_default", score_offset=False),
            threshold_data=str(DATA), overwrite=True, graph=graph))
    return out


def rss_of_predict(bundle: Path, image: Path, precision: str, out: Path) -> float:
    """Peak RSS (MB) of a separate `ssn-edge predict` process, from /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "cli.py"), "predict", str(bundle), str(image),
           "--precision", precision, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return int(match.group(1)) / 1024.0


def evaluate_variant(variant: str, precision: str, arrays, images: list[np.ndarray]) -> dict:
    from ssn_edge.export.inference import Predictions
    from ssn_edge.export.thresholds import metrics_from_predictions
    from ssn_edge.runtime.engine import Engine

    engine = Engine(bundle_of(variant), precision=precision, mode="latency")
    scores, maps, times = [], [], []
    for image in images:
        t0 = time.perf_counter()
        p = engine.predict_tiled(image) if engine.tiling is not None else engine.predict_images([image])[0]
        times.append((time.perf_counter() - t0) * 1e3)
        scores.append(p.score)
        maps.append(p.anomaly_map)
    metrics = metrics_from_predictions(arrays, Predictions(np.asarray(scores, dtype=np.float32), np.stack(maps)))
    return {**metrics, "latency_ms": float(np.median(times)), "latency_p90_ms": float(np.percentile(times, 90)),
            "inference_precision": engine.inference_precision, "tiling_graph": engine.tiling.graph if engine.tiling else None,
            "heads_trained_on": engine.bundle.metadata.tiling.heads_trained_on if engine.tiling else None}


def table(args) -> None:
    from ssn_edge.data import load_dataset, select
    from ssn_edge.data.arrays import load_arrays
    from ssn_edge.runtime.preprocess import read_image

    _require_data()
    samples = select(load_dataset(DATA), "test")
    arrays = load_arrays(samples, (512, 512))
    images = [read_image(s.image) for s in samples]
    sample_image = Path(samples[0].image)
    records = []
    for variant in args.variants or ["single_256", *RECIPES]:
        if not checkpoint_of(variant).is_file():
            print(f"{variant}: no checkpoint at {checkpoint_of(variant)}; train it first")
            continue
        for precision in ("fp32", "int8"):
            r = evaluate_variant(variant, precision, arrays, images)
            rss = rss_of_predict(bundle_of(variant), sample_image, precision, RUNS / variant / f"predict_{precision}")
            rec = {**BASE, "variant": variant, "runtime": "openvino", "precision": precision,
                   **{k: round(v, 3) for k, v in r.items() if isinstance(v, float)},
                   "inference_precision": r["inference_precision"], "tiling_graph": r["tiling_graph"],
                   "heads_trained_on": r["heads_trained_on"],
                   "peak_rss_mb": round(rss, 1), "images": len(images), "command": command_line()}
            records.append(rec)
            print(f"{variant:<14} {precision:<5} I-AUROC {rec['image_auroc']:6.2f}  AUPRO {rec['pixel_aupro']:6.2f}  "
                  f"P-AP {rec['pixel_ap']:6.2f}  {rec['latency_ms']:8.1f} ms  {rss:7.0f} MB")
    record_results("tiling", records)


def shared_vs_independent(args) -> None:
    """Same 9-tile ensemble weights, exported both ways (FP32), same test images, one process."""
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image
    from ssn_edge.data import load_dataset, select

    _require_data()
    variant = "tiled_ens9"
    if not checkpoint_of(variant).is_file():
        print(f"skipped: {checkpoint_of(variant)} not trained")
        return
    images = [read_image(s.image) for s in select(load_dataset(DATA), "test")]
    engines = {g: Engine(bundle_of(variant, g), precision=args.precision, mode="latency") for g in ("image", "tiles")}
    runners = {g: e.runner() for g, e in engines.items()}
    for r in runners.values():  # warm-up
        r.run(images[0])
    times = {g: [] for g in runners}
    diffs, score_diffs, ranges = [], [], []
    for k in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        for image in images:
            out = {}
            for g, r in runners.items():
                t0 = time.perf_counter()
                out[g] = r.run(image)
                times[g].append((time.perf_counter() - t0) * 1e3)
            if k == 0:
                diffs.append(float(np.abs(out["image"].anomaly_map - out["tiles"].anomaly_map).max()))
                score_diffs.append(abs(out["image"].score - out["tiles"].score))
                ranges.append(float(np.ptp(out["tiles"].anomaly_map)))
    shared_ms, indep_ms = float(np.median(times["image"])), float(np.median(times["tiles"]))
    rec = {**BASE, "variant": variant, "runtime": "openvino", "precision": args.precision,
           "ratio": round(indep_ms / shared_ms, 3), "ratio_of": "shared_backbone_vs_independent_tiles",
           "latency_shared_ms": round(shared_ms, 2), "latency_independent_ms": round(indep_ms, 2),
           "map_max_abs_diff": round(max(diffs), 4), "map_mean_of_max_abs_diff": round(float(np.mean(diffs)), 4),
           "map_value_range_median": round(float(np.median(ranges)), 3),
           "score_max_abs_diff": round(max(score_diffs), 5), "images": len(images), "rounds": args.rounds,
           "heads_trained_on": engines["image"].bundle.metadata.tiling.heads_trained_on,
           "command": command_line()}
    record_results("tiling", [rec])
    print(json.dumps(rec, indent=2))


def edge_profile(args) -> None:
    """Where shared-backbone and independent-tile maps differ: each location's raw map (before merging and seam
    smoothing, PyTorch FP32, same weights) in both graphs, max |difference| by distance from that tile's edge.
    An independent tile's backbone zero-pads at the tile edge where the shared one sees the neighbouring image,
    so the difference should be confined to a band as wide as the padding's reach into the features."""
    import torch

    from ssn_edge.data import load_arrays, load_dataset, select
    from ssn_edge.model.load import heads_trained_on, tiled_from_checkpoint
    from ssn_edge.evaluation.evaluate import predict_tiled_raw

    _require_data()
    variant = "tiled_ens9"
    if not checkpoint_of(variant).is_file():
        print(f"skipped: {checkpoint_of(variant)} not trained")
        return
    torch.set_num_threads(args.threads)
    model, _, state = tiled_from_checkpoint(checkpoint_of(variant))
    trained_on = heads_trained_on(state)
    samples = select(load_dataset(DATA), "test")[:: max(1, args.every)]
    images = load_arrays(samples, model.tiling.image_size).images
    shared, _ = predict_tiled_raw(model, images, "image")
    indep, _ = predict_tiled_raw(model, images, "tiles")
    diff = np.abs(shared - indep)  # (N, T, h, w)
    h, w = diff.shape[-2:]
    scale = model.tiling.tile[0] / h  # image pixels per map pixel
    yy, xx = np.mgrid[:h, :w]
    edge = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx))  # map pixels to the tile's edge
    # Distance to any edge of the tile, the image border too (where both graphs zero-pad alike): conservative.
    records, rng = [], float(np.median(np.ptp(indep.reshape(len(indep), -1), axis=1)))
    for d in range(0, int(edge.max()) + 1, args.step):
        band = edge >= d
        records.append({**BASE, "variant": variant, "runtime": "torch", "precision": "fp32",
                        "measure": "tile_map_max_abs_diff_shared_vs_independent", "heads_trained_on": trained_on,
                        "edge_distance_px": round(d * scale),
                        "value": round(float(diff[..., band].max()), 5),
                        "value_mean": round(float(diff[..., band].mean()), 5),
                        "map_value_range_median": round(rng, 3), "images": len(images), "command": command_line()})
        print(f"pixels >= {d * scale:4.0f} px from their tile's edge: max |diff| {records[-1]['value']:.4f}  "
              f"mean {records[-1]['value_mean']:.5f}")
    record_results("tiling", records)


def graph_match(args) -> None:
    """A tiled checkpoint evaluated in both graphs (PyTorch FP32, same weights, the 512 test images): what running
    heads on features other than the ones they learned on costs."""
    import dataclasses

    from ssn_edge.data import load_arrays, load_dataset, select
    from ssn_edge.evaluation.evaluate import evaluate_tiled
    from ssn_edge.model.load import heads_trained_on, tiled_from_checkpoint

    _require_data()
    path = Path(args.checkpoint) if args.checkpoint else checkpoint_of(args.variant)
    if not path.is_file():
        print(f"skipped: {path} not trained")
        return
    model, _, state = tiled_from_checkpoint(path)
    trained_on = heads_trained_on(state)
    arrays = load_arrays(select(load_dataset(DATA), "test"), model.tiling.image_size)
    records = []
    for graph in ("image", "tiles"):
        model.tiling = dataclasses.replace(model.tiling, graph=graph)
        m = evaluate_tiled(model, arrays)
        records.append({**BASE, "variant": args.variant, "runtime": "torch", "precision": "fp32",
                        "heads_trained_on": trained_on, "tiling_graph": graph,
                        **{k: round(m[k], 3) for k in ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap") if k in m},
                        "checkpoint": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
                        "images": len(arrays), "command": command_line()})
        print(f"{args.variant} trained on {trained_on}, run on the {graph} graph: I-AUROC {m['image_auroc']:.2f}  "
              f"AUPRO {m['pixel_aupro']:.2f}")
    record_results("tiling", records)


def rss(args) -> None:
    """One large image through `ssn-edge predict` (the single-model tile graph, native resolution)."""
    import cv2

    _require_data()
    variant = "tiled_single9"
    bundle = bundle_of(variant)
    src = cv2.imread(str(sorted((DATA / "test" / "broken_large").glob("*.png"))[0]))
    records = []
    # BMP (uncompressed, what line cameras write) is read a row of tiles at a time; PNG has to be decoded whole,
    # so its 8192 frame alone holds 201 MB: both are measured.
    for fmt, suffix in (("bmp", ""), ("png", "_png")):
        peaks = {}
        for side in (2048, 8192):
            image = RUNS / f"bottle_mosaic_{side}.{fmt}"
            if not image.exists():
                reps = side // src.shape[0]
                cv2.imwrite(str(image), np.tile(src, (reps, reps, 1)))  # a real texture at real scale, repeated
            out = RUNS / f"predict_{side}_{fmt}"
            peaks[side] = rss_of_predict(bundle, image, args.precision, out)
            pred = json.loads((out / "predictions.json").read_text())["predictions"][0]
            records.append({**BASE, "variant": f"tiled_{side}{suffix}", "runtime": "openvino", "precision": args.precision,
                            "peak_rss_mb": round(peaks[side], 1), "image_side": side, "image_format": fmt,
                            "latency_ms": round(pred["latency_ms"], 1), "score": round(pred["score"], 5),
                            "command": command_line()})
            print(f"{fmt} {side}x{side}: peak RSS {peaks[side]:.0f} MB, {pred['latency_ms']:.0f} ms")
        ratio = peaks[8192] / peaks[2048]
        records.append({**BASE, "variant": f"tiled_8192{suffix}", "runtime": "openvino", "precision": args.precision,
                        "ratio": round(ratio, 3), "ratio_of": "peak_rss_8192_vs_2048", "image_format": fmt,
                        "command": command_line()})
        print(f"{fmt} ratio 8192/2048: {ratio:.3f}")
    record_results("tiling", records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--variant", required=True, choices=list(RECIPES))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--run-name", help="folder under runs/bench/tiling (default: the variant), to try a recipe change")
    t.add_argument("--quiet", action="store_true")
    tb = sub.add_parser("table")
    tb.add_argument("--variants", nargs="*", choices=["single_256", *RECIPES], help="default: all")
    s = sub.add_parser("shared-vs-independent")
    s.add_argument("--precision", default="fp32")
    s.add_argument("--rounds", type=int, default=2)
    e = sub.add_parser("edge-profile")
    e.add_argument("--every", type=int, default=4, help="every k-th test image (default 4)")
    e.add_argument("--step", type=int, default=2, help="band step in map pixels")
    e.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("graph-match")
    g.add_argument("--variant", required=True, choices=[v for v in RECIPES if v.startswith("tiled_ens")])
    g.add_argument("--checkpoint", help="default: the variant's run folder")
    r = sub.add_parser("rss")
    r.add_argument("--precision", default="int8")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    {"train": train, "table": table, "shared-vs-independent": shared_vs_independent,
     "edge-profile": edge_profile, "graph-match": graph_match, "rss": rss}[args.what](args)


if __name__ == "__main__":
    main()
