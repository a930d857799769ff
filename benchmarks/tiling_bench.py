"""Tiled inference benchmark (issue 4) on MVTec bottle at 512: the variants table, shared-backbone vs
independent tiles, and peak memory of `ssn-edge predict` on an 8192x8192 vs a 2048x2048 image.

  python benchmarks/tiling_bench.py train --variant single_512          # (and tiled_single9, tiled_ens4, tiled_ens9)
  python benchmarks/tiling_bench.py table                                # export + evaluate every trained variant
  python benchmarks/tiling_bench.py shared-vs-independent                # 9-tile ensemble, one run
  python benchmarks/tiling_bench.py edge-profile                         # where the two graphs' maps differ
  python benchmarks/tiling_bench.py graph-match --variant tiled_ens4     # accuracy run in either graph (PyTorch)
  python benchmarks/tiling_bench.py rss                                  # 8192 vs 2048 through ssn-edge predict
  python benchmarks/tiling_bench.py profile --before REF                 # issue 32: where a frame's time goes
  python benchmarks/tiling_bench.py overhead --before REF                # issue 32: the runner's own ms per tile
  python benchmarks/tiling_bench.py memory --before REF                  # issue 32: peak RSS per frame (null model)
  python benchmarks/tiling_bench.py layouts                              # issue 32: each stride's time and accuracy
  python benchmarks/tiling_bench.py shared-vs-independent --speed-bundles --precision int8 --images 20

profile / overhead / --speed-bundles use the speed bundles (runs/bench/tiling/speed, made by `speed-bundles`
on first use): the production graph (ResNet18 ImageNet layers, 256 tiles every 128 px; 9-location ensemble at
512) with heads trained one epoch on synthetic images, since speed does not depend on what the heads learned.
--before REF runs the same measurement on ssn_edge as of git commit REF (unpacked with git archive) in fresh
processes, interleaved with this code's.

Checkpoints and bundles go to runs/bench/tiling/<variant>/; records to benchmarks/results/tiling.json.
single_256 is the issue-2 model (runs/bench/mvtec_bottle_unsupervised_cpu_schedule_s0), run on 512 images
resized to 256. Every variant is evaluated the same way: through the OpenVINO runtime (the path a factory PC
runs), on the 512x512 test images, pixel metrics at 512 against the 512 masks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if os.environ.get("SSN_EDGE_CODE"):  # a child measuring an earlier commit's ssn_edge (profile --before): it comes first
    sys.path.insert(0, os.environ["SSN_EDGE_CODE"])

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
    from ssn_edge.runtime.engine import Engine

    return evaluate_engine(Engine(bundle_of(variant), precision=precision, mode="latency"), arrays, images)


def frame_times(engine, images: list[np.ndarray]) -> tuple[list, list[float]]:
    """Each image through the engine (tiled or not): its prediction and milliseconds."""
    predictions, times = [], []
    for image in images:
        t0 = time.perf_counter()
        predictions.append(engine.predict_tiled(image) if engine.tiling is not None else engine.predict_images([image])[0])
        times.append((time.perf_counter() - t0) * 1e3)
    return predictions, times


def evaluate_engine(engine, arrays, images: list[np.ndarray]) -> dict:
    from ssn_edge.export.inference import Predictions
    from ssn_edge.export.thresholds import metrics_from_predictions

    predictions, times = frame_times(engine, images)
    scores, maps = [p.score for p in predictions], [p.anomaly_map for p in predictions]
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
    if args.speed_bundles:  # the speed bundles (same graphs, heads trained on synthetic data): no bottle run needed
        bundles = speed_bundles()
        paths, base = {g: bundles[f"ens9_{g}"] for g in ("image", "tiles")}, {**SPEED_BASE, "code": "after"}
    elif not checkpoint_of(variant).is_file():
        print(f"skipped: {checkpoint_of(variant)} not trained")
        return
    else:
        paths, base = {g: bundle_of(variant, g) for g in ("image", "tiles")}, BASE
    images = [read_image(s.image) for s in select(load_dataset(DATA), "test")][: args.images]
    engines = {g: Engine(paths[g], precision=args.precision, mode="latency") for g in ("image", "tiles")}
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
    rec = {**base, "variant": variant, "runtime": "openvino", "precision": args.precision,
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


# -- speed of the tiled runtime (issue 32) ---------------------------------------------------------------
# Speed depends on the graph, not on what its heads learned: the speed bundles are the production architecture
# (ResNet18 with the ImageNet weights, 256 tiles every 128 px) with heads trained one epoch on a small synthetic
# set, so they are made in a minute and measure what a trained bottle bundle would.
SPEED = RUNS / "speed"
SPEED_TILING = {
    "single": {"tile": [256, 256], "stride": [128, 128], "mode": "single", "shared_backbone": False, "resize": False},
    "ens9": {"tile": [256, 256], "stride": [128, 128], "mode": "ensemble", "shared_backbone": True},
}
SPEED_BASE = {"dataset": "synthetic_512", "backbone": "resnet18", "setting": "unsupervised"}
# Where the runner's main thread spends its time, by the functions that do each stage (old and new names: the
# profile runs on the code of any commit). Nested stages are made exclusive by subtracting the inner ones.
STAGES = {
    "decode": ["rows", "load_image", "read_image_raw"],
    "cut": ["batch", "stack"],
    "preprocess": ["prepare_tile", "normalize_rows", "graph_input"],
    "inference_wait": ["get_idle_request_id", "wait_all", "start_async", "infer"],
    "postprocess": ["anomaly_map"],
    "merge": ["add_row", "add_tiles", "untile"],
    "seams": ["_emit", "smooth_seams"],
    "write": ["__call__", "save"],
}
# BandMerger.add_row / add_tiles call _emit (the seam blur), which hands rows to the sink (MapSink.__call__,
# writing); TileRows.batch normalises the columns it cuts (normalize_rows, since the band is kept as read)
NESTED = {"merge": ("_emit", ["add_row", "add_tiles"]), "seams": ("__call__", ["_emit"]), "cut": ("normalize_rows", ["batch"])}


def speed_bundles(_args=None) -> dict[str, Path]:
    """The speed bundles (INT8 + FP32): the single-model tile graph, and the 9-location ensemble exported with
    the shared-backbone ("image") and the independent-tiles ("tiles") graph."""
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.data.synthetic import SyntheticSpec, make_dataset
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.train.job import train_job

    weights = ROOT / ".." / "shared" / "weights" / "resnet18-imagenet1k-v1-to-layer3.pth"
    if not weights.exists():
        print(f"skipped: {weights} is absent")
        sys.exit(0)
    data = SPEED / "data512"
    if not data.exists():
        make_dataset(data, SyntheticSpec(size=512, n_train=6, n_test_good=3, n_test_defect_per_type=1))
    out = {}
    for name, tiling in SPEED_TILING.items():
        run = SPEED / f"run_{name}"
        if not (run / "checkpoint.pt").exists():
            train_job(recipe_from_dict({
                "name": f"speed_{name}", "data": {"path": str(data), "image_size": [512, 512]},
                "model": {"backbone": "resnet18", "weights": str(weights.resolve())},
                "train": {"epochs": 1, "batch_size": 8, "seed": 0, "crop_epochs": 1}, "tiling": tiling}), run, progress=False)
        for graph in ([None] if name == "single" else ["image", "tiles"]):
            bundle = SPEED / (f"bundle_{name}" + (f"_{graph}" if graph else ""))
            if not (bundle / "metadata.json").exists():
                export_bundle(run / "checkpoint.pt", bundle, ExportOptions(
                    int8=True, calibration=CalibrationSpec(source="recipe", size=6, defects=0.0),
                    threshold_data=str(data), overwrite=True, graph=graph))
            out[f"{name}_{graph}" if graph else name] = bundle
    return out


def parse_frame(text: str) -> tuple[int, int]:
    """'2048' -> (2048, 2048); '5472x3648' -> (3648, 5472): (H, W) from side or WxH."""
    w, _, h = text.lower().partition("x")
    return (int(h or w), int(w))


def speed_frame(size: tuple[int, int]) -> Path:
    """A BMP frame of (H, W) (line cameras write uncompressed BMP; read a band at a time): a real bottle
    texture repeated, so the maps are those of a real part, not of noise."""
    import cv2

    h, w = size
    path = SPEED / "frames" / f"bottle_{w}x{h}.bmp"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        src = cv2.imread(str(sorted((DATA / "test" / "broken_large").glob("*.png"))[0]))
        reps = (-(-h // src.shape[0]), -(-w // src.shape[1]), 1)
        cv2.imwrite(str(path), np.tile(src, reps)[:h, :w])
    return path


def stage_times(stats) -> dict[str, float]:
    """ms per stage from a cProfile run's pstats (cumulative time of each stage's functions, made exclusive)."""
    by_name: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tt, ct, _callers) in stats.stats.items():
        builtin = filename == "~"
        name = func.split(" of ")[0].split("method ")[-1].split(".")[-1].strip("<>'}{") if builtin else func
        ours = builtin or "ssn_edge" in filename or "numpy" in filename
        if ours:
            by_name[name] = by_name.get(name, 0.0) + (tt if builtin else ct)
    out = {stage: 1e3 * sum(by_name.get(f, 0.0) for f in funcs) for stage, funcs in STAGES.items()}
    for stage, (inner, outer) in NESTED.items():
        if any(f in by_name for f in outer):
            out[stage] -= 1e3 * by_name.get(inner, 0.0)
    return out


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def profile_one(args) -> None:
    """One frame through one bundle on the code on sys.path (a child process of `profile`): prints a JSON line."""
    import cProfile
    import pstats
    import tempfile

    from ssn_edge.runtime.bench import time_throughput
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import BmpStrips

    engine = Engine(args.bundle, precision=args.precision, mode="throughput")
    streamed = engine.tiling.graph == "tile"
    # a BMP is read in strips by both graphs, as `ssn-edge predict` reads it (a whole-image graph shrinks it to its
    # input strip by strip)
    open_frame = lambda: BmpStrips(args.frame)  # noqa: E731
    runner = engine.runner()
    # warm-up: one row of tiles of the frame's width (the same batch shape, compiled before timing), read as a
    # strip so the warm-up adds nothing to the peak RSS the frame itself needs
    runner.run(BmpStrips(args.frame).rows(0, engine.tiling.tile[0]) if streamed else open_frame())
    x = np.random.default_rng(0).standard_normal((1, 3, *engine.tiling.tile)).astype(np.float32)
    # the tile model's own images/s just before and just after the frame (the load on a shared machine drifts)
    ips = [time_throughput(engine.compiled, x, seconds=args.throughput_seconds)["throughput_ips"]] if streamed else []
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        profiler.enable()
        result = runner.run(open_frame(), stream_to=Path(tmp) / "map.npy")
        profiler.disable()
        latency = time.perf_counter() - t0
    rss = vm_hwm_mb()
    if streamed:
        ips.append(time_throughput(engine.compiled, x, seconds=args.throughput_seconds)["throughput_ips"])
    getattr(runner, "close", lambda: None)()  # (earlier commits' runners have no close)
    import ssn_edge

    print("PROFILE " + json.dumps({"ssn_edge": str(Path(ssn_edge.__file__).parent), "latency_ms": latency * 1e3,
                                   "tiles": result.tiles, "score": result.score,
                                   "peak_rss_mb": rss, "model_ips": float(np.mean(ips)) if ips else None,
                                   "model_ips_each": ips, "stages": stage_times(pstats.Stats(profiler))}))


def _child(code: Path | None, *argv: str) -> dict:
    """Run a child subcommand (profile-one, overhead-one) in a fresh process (its own peak RSS), on `code`'s
    ssn_edge when given; its last 'PROFILE {json}' line."""
    env = {k: v for k, v in os.environ.items() if k != "SSN_EDGE_CODE"}
    if code is not None:
        env["SSN_EDGE_CODE"] = str(code)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(lines[-1][len("PROFILE "):])
    expected = str((code or ROOT) / "ssn_edge")
    if not out.get("ssn_edge", expected).startswith(expected):
        raise RuntimeError(f"{' '.join(cmd)} ran {out['ssn_edge']}, not {expected}")
    return out


def compared_codes(before: str | None) -> list[tuple[str, Path | None]]:
    """The code a speed measure runs: this checkout ("after", None) and, with --before REF, REF's tree."""
    return [("after", None)] + ([(f"before_{before}", code_tree(before))] if before else [])


def frame_side(size: tuple[int, int]) -> str:
    """A frame's name in variants: its side when square ("8192"), else WxH ("5472x3648")."""
    return f"{size[1]}" if size[0] == size[1] else f"{size[1]}x{size[0]}"


def code_tree(ref: str) -> Path:
    """ssn_edge as it was at git commit `ref`, unpacked read-only from the repository (git archive)."""
    out = SPEED / "code" / ref
    if not (out / "ssn_edge").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "ssn_edge"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def profile(args) -> None:
    """Where a frame's time goes (main thread, by stage) and its latency, MP/s and peak RSS, for the single-model
    tiles and the shared-backbone ensemble, on this code and (--before REF) on an earlier commit's, frame by frame
    interleaved so load drifts hit both alike. Each run is a fresh process."""
    _require_data()
    bundles = speed_bundles()
    codes = compared_codes(args.before)
    print(f"{'frame':>10} {'model':<7} {'code':<16} {'ms':>9} {'MP/s':>6} {'ratio':>5} {'RSS MB':>6}  stages (ms, main thread)")
    for text in args.frames:
        size = parse_frame(text)
        frame = speed_frame(size)
        side = frame_side(size)
        for model in args.models:
            bundle = bundles["single" if model == "single" else "ens9_image"]
            for code, tree in codes:
                r = _child(tree, "profile-one", "--bundle", str(bundle), "--frame", str(frame), "--precision", args.precision,
                           "--throughput-seconds", str(args.throughput_seconds))
                record_results("tiling", _profile_records(r, model, side, size, code, args))


def _profile_records(r: dict, model: str, side: str, size: tuple[int, int], code: str, args) -> list[dict]:
    mp_s = size[0] * size[1] / 1e6 / (r["latency_ms"] / 1e3)
    variant = f"tiled_{side}" if model == "single" else f"tiled_ens9_{side}"
    base = {**SPEED_BASE, "variant": variant, "runtime": "openvino", "precision": args.precision, "code": code,
            "tiling_graph": "tile" if model == "single" else "image", "image_width": size[1], "image_height": size[0],
            "image_format": "bmp", "tiles": r["tiles"], "command": command_line()}
    rec = {**base, "latency_ms": round(r["latency_ms"], 1), "megapixels_per_s": round(mp_s, 3),
           "peak_rss_mb": round(r["peak_rss_mb"], 1), "score": round(r["score"], 6),
           **{f"{k}_ms": round(v, 1) for k, v in r["stages"].items()}}
    out = [rec]
    ratio = ""
    if r["model_ips"]:
        # tiled MP/s / (model images/s x tile pixels / covered pixels) = (tiles / model images/s) / latency
        value = r["tiles"] / r["model_ips"] / (r["latency_ms"] / 1e3)
        out.append({**base, "ratio": round(value, 3), "ratio_of": "tiled_vs_model_throughput",
                    "model_throughput_ips": round(r["model_ips"], 2), "latency_ms": rec["latency_ms"],
                    "model_throughput_ips_before_after": [round(v, 2) for v in r.get("model_ips_each") or []]})
        ratio = f"{value:.2f}"
    stages = " ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
    print(f"{side:>10} {model:<7} {code:<16} {r['latency_ms']:9.0f} {mp_s:6.3f} {ratio:>5} {r['peak_rss_mb']:6.0f}  {stages}", flush=True)
    return out


def _null_outputs(tiles, map_stride: int) -> list:
    """(N, 3, th, tw) tiles -> [map (N, 1, th/stride, tw/stride): a strided mean of the input, score (N,): its max]."""
    import openvino.opset13 as ops

    mean = ops.reduce_mean(tiles, ops.constant(np.array([1], np.int64)), True)
    m = ops.avg_pool(mean, [map_stride] * 2, [0, 0], [0, 0], [map_stride] * 2, True)
    m.output(0).get_tensor().set_names({"map"})
    s = ops.reduce_max(m, ops.constant(np.array([1, 2, 3], np.int64)), False)
    s.output(0).get_tensor().set_names({"score"})
    return [m, s]


def null_tile_model(th: int, tw: int, map_stride: int = 4):
    """A tile graph that costs almost nothing (the map a strided average of the input): what the runner spends
    around inference (cutting, normalising, post-processing, merging, seams) is then nearly all there is."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 3, th, tw], np.float32, name="image")
    return ov.Model(_null_outputs(x, map_stride), [x], "null_tile")


def null_tiles_graph(count: int, th: int, tw: int, map_stride: int = 4):
    """The null tile model as a whole-image "tiles" graph (1, T, 3, th, tw) -> map (T, 1, th/4, tw/4), score (T,):
    the fixed-size (ensemble) path of the runner with inference nearly free."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, count, 3, th, tw], np.float32, name="tiles")
    flat = ops.reshape(x, ops.constant(np.array([count, 3, th, tw], np.int64)), False)
    return ov.Model(_null_outputs(flat, map_stride), [x], "null_tiles")


# --graph tiles: a 3 x 3 grid of 256-pixel tiles over a 768 x 768 image, as the 9-location ensemble bundles
ENSEMBLE_TILING = {"tile": (256, 256), "stride": (256, 256), "image_size": (768, 768), "graph": "tiles"}


def overhead_one(args) -> None:
    """Child of `overhead`: the runner on a BMP frame with the null tile model; prints a JSON line."""
    import openvino as ov

    from ssn_edge.runtime.preprocess import BmpStrips
    from ssn_edge.runtime.tiled import TiledRunner
    from ssn_edge.runtime.tiling import TilingConfig

    compiled = ov.Core().compile_model(null_tile_model(256, 256), "CPU",
                                       {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
    runner = TiledRunner(compiled, TilingConfig((256, 256), (128, 128)), requests=2)
    runner.run(BmpStrips(args.frame))
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        result = runner.run(BmpStrips(args.frame))
        times.append(time.perf_counter() - t0)
    import ssn_edge

    print("PROFILE " + json.dumps({"ssn_edge": str(Path(ssn_edge.__file__).parent), "tiles": result.tiles,
                                   "latency_ms": float(np.median(times)) * 1e3, "peak_rss_mb": vm_hwm_mb()}))


def overhead(args) -> None:
    """The runner's own cost per tile (null model, so inference is nearly free), this code and --before REF's,
    interleaved run by run; fresh processes."""
    _require_data()
    codes = compared_codes(args.before)
    records = []
    for text in args.frames:
        size = parse_frame(text)
        frame = speed_frame(size)
        side = frame_side(size)
        for code, tree in codes:
            r = _child(tree, "overhead-one", "--frame", str(frame), "--runs", str(args.runs))
            per_tile = r["latency_ms"] / r["tiles"]
            records.append({**SPEED_BASE, "variant": f"tiled_{side}_null_model", "runtime": "openvino", "precision": "fp32",
                            "code": code, "measure": "runner_ms_per_tile", "value": round(per_tile, 3),
                            "latency_ms": round(r["latency_ms"], 1), "tiles": r["tiles"],
                            "peak_rss_mb": round(r["peak_rss_mb"], 1), "command": command_line()})
            print(f"{side:>10} {code:<16} {r['latency_ms']:8.0f} ms  {per_tile:.2f} ms/tile  {r['peak_rss_mb']:.0f} MB", flush=True)
    record_results("tiling", records)


NULL_MODEL = "null tile model (a strided mean: inference nearly free, so the peak is the runner's own)"


def memory_one(args) -> None:
    """Child of `memory`: one BMP frame through the runner with the null tile model, once, its map streamed to a
    file as `ssn-edge predict --save-maps` does; prints a JSON line with this process's peak RSS."""
    import tempfile

    import openvino as ov

    from ssn_edge.runtime.preprocess import BmpStrips
    from ssn_edge.runtime.tiled import TiledRunner
    from ssn_edge.runtime.tiling import TilingConfig

    if args.graph == "tiles":
        cfg = TilingConfig(**ENSEMBLE_TILING)
        model = null_tiles_graph(cfg.grid(cfg.image_size).count, *cfg.tile)
    else:
        cfg, model = TilingConfig((256, 256), (128, 128)), null_tile_model(256, 256)
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": "f32"})
    runner = TiledRunner(compiled, cfg, requests=2)
    # warm-up: one row of tiles of the frame's width (the batch shape compiled), as profile-one warms up; a
    # fixed-size graph on a frame of its own input size
    runner.run(BmpStrips(args.frame).rows(0, 256) if args.graph == "tile" else np.zeros((768, 768, 3), np.uint8))
    warm = vm_hwm_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = runner.run(BmpStrips(args.frame), stream_to=Path(tmp) / "map.npy")
        latency = time.perf_counter() - t0
    rss = vm_hwm_mb()
    runner.close()
    import ssn_edge

    print("PROFILE " + json.dumps({"ssn_edge": str(Path(ssn_edge.__file__).parent), "tiles": result.tiles,
                                   "latency_ms": latency * 1e3, "peak_rss_mb": rss, "peak_rss_warm_mb": warm,
                                   "map_scale": result.map_scale}))


def memory(args) -> None:
    """Peak RSS of one frame through the tiled runner (issue 32: 8192^2 within 1.2x of 2048^2), with the null tile
    model so a frame takes seconds, not the real model's 15 minutes: it measures what the runner holds (the model's
    own memory does not depend on the frame: every request has the same batch shape). A fresh process per frame,
    this code's and --before REF's interleaved."""
    _require_data()
    codes = compared_codes(args.before)
    ensemble = args.graph == "tiles"
    base = {**SPEED_BASE, "backbone": "null_tiles_model" if ensemble else "null_tile_model", "runtime": "openvino",
            "precision": "fp32", "model": NULL_MODEL, **({"tiling": ENSEMBLE_TILING} if ensemble else {})}
    name = "tiled_ens9" if ensemble else "tiled"
    peaks: dict[tuple[str, str], float] = {}
    records = []
    for text in args.frames:
        size = parse_frame(text)
        frame = speed_frame(size)
        side = frame_side(size)
        for code, tree in codes:
            r = _child(tree, "memory-one", "--frame", str(frame), "--graph", args.graph)
            peaks[(code, side)] = r["peak_rss_mb"]
            records.append({**base, "variant": f"{name}_{side}", "code": code, "image_width": size[1],
                            "image_height": size[0], "image_format": "bmp", "tiles": r["tiles"],
                            "map_scale": r["map_scale"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
                            "peak_rss_after_warmup_mb": round(r["peak_rss_warm_mb"], 1),
                            "latency_ms": round(r["latency_ms"], 1), "command": command_line()})
            print(f"{side:>10} {code:<16} peak RSS {r['peak_rss_mb']:6.1f} MB (after the warm-up row "
                  f"{r['peak_rss_warm_mb']:6.1f})  {r['latency_ms']:8.0f} ms", flush=True)
    for code, _ in codes:
        if (code, "8192") in peaks and (code, "2048") in peaks:
            ratio = peaks[(code, "8192")] / peaks[(code, "2048")]
            records.append({**base, "variant": f"{name}_8192", "code": code, "ratio": round(ratio, 3),
                            "ratio_of": "tiled_8192_vs_2048_peak_rss", "target": 1.2,
                            "peak_rss_2048_mb": round(peaks[(code, "2048")], 1),
                            "peak_rss_8192_mb": round(peaks[(code, "8192")], 1), "command": command_line()})
            print(f"{code}: peak RSS 8192 / 2048 = {ratio:.3f} (target <= 1.2)")
    record_results("tiling", records)


def relaid(engine, stride: int):
    """The engine's single-model tile graph laid out at another stride. One model runs any layout: the recipe's
    tiling.stride picks it (the tiles training sees, and the layout the bundle runs)."""
    from dataclasses import replace

    engine.tiling = replace(engine.tiling, stride=(stride, stride))
    engine._runners.clear()  # the runner keeps the layout it was made with
    return engine


def layouts(args) -> None:
    """Issue 32: what the tiling layout costs. tiled_single9's model (256 tiles) re-laid at each stride (overlap =
    256 - stride): accuracy and frame latency on bottle's test images at 512, and latency on the same images
    upsampled to 1024 (the model was trained at 512's scale, so accuracy there would measure the scale, not the
    layout). Strides alternate image by image, so load drifts reach every stride alike."""
    import cv2

    from ssn_edge.data import load_dataset, select
    from ssn_edge.data.arrays import load_arrays
    from ssn_edge.export.inference import Predictions
    from ssn_edge.export.thresholds import metrics_from_predictions
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image
    from ssn_edge.runtime.tiling import TileGrid

    _require_data()
    if not checkpoint_of("tiled_single9").is_file():
        sys.exit("no tiled_single9 model: run `python benchmarks/tiling_bench.py train --variant tiled_single9` first")
    samples = select(load_dataset(DATA), "test")
    arrays = load_arrays(samples, (512, 512))
    frames = {512: [read_image(s.image) for s in samples]}
    frames[1024] = [cv2.resize(im, (1024, 1024), interpolation=cv2.INTER_LINEAR) for im in frames[512][: args.images_1024]]
    records = []
    for precision in args.precisions:
        engines = {st: relaid(Engine(bundle_of("tiled_single9"), precision=precision, mode="latency"), st)
                   for st in args.strides}
        for side, images in frames.items():
            runs = {st: ([], []) for st in args.strides}
            for image in images:
                for st, engine in engines.items():
                    (pred,), (ms,) = frame_times(engine, [image])
                    runs[st][0].append(pred), runs[st][1].append(ms)
            base_ms = float(np.median(runs[max(args.strides)][1]))
            for st, (preds, times) in runs.items():
                ms, tile = float(np.median(times)), engines[st].tiling.tile
                grid = TileGrid((side, side), tile, (st, st))
                fill = engines[st].tiling.fill  # records without it: zeros, the code before the mirror fill
                rec = {**BASE, "variant": f"layout_{side}_stride{st}_{fill}", "runtime": "openvino",
                       "precision": precision, "inference_precision": engines[st].inference_precision,
                       "fill": fill, "tile": tile[0], "stride": st,
                       "overlap_px": tile[0] - st, "tiles": grid.count,
                       "coverage": round(grid.count * tile[0] * tile[1] / side**2, 3),
                       "latency_ms": round(ms, 2), "megapixels_per_s": round(side**2 / 1e6 / (ms / 1e3), 3),
                       "ratio": round(ms / base_ms, 3), "ratio_of": f"latency_vs_stride_{max(args.strides)}",
                       "images": len(images), "command": command_line()}
                if side == 512:
                    m = metrics_from_predictions(arrays, Predictions(np.asarray([p.score for p in preds], np.float32),
                                                                     np.stack([p.anomaly_map for p in preds])))
                    rec.update({k: round(v, 3) for k, v in m.items() if k in ("image_auroc", "image_ap", "pixel_aupro",
                                                                            "pixel_ap", "pixel_auroc")})
                records.append(rec)
                acc = f"I-AUROC {rec['image_auroc']:6.2f}  AUPRO {rec['pixel_aupro']:6.2f}" if side == 512 else ""
                print(f"{side:>5} {precision:<5} stride {st:>3} ({grid.count:>3} tiles, coverage {rec['coverage']:5.2f}x) "
                      f"{ms:8.1f} ms  x{rec['ratio']:.2f}  {acc}")
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
    s.add_argument("--images", type=int, default=None, help="the first N test images (default: all)")
    s.add_argument("--speed-bundles", action="store_true", help="the issue-32 speed bundles instead of tiled_ens9")
    e = sub.add_parser("edge-profile")
    e.add_argument("--every", type=int, default=4, help="every k-th test image (default 4)")
    e.add_argument("--step", type=int, default=2, help="band step in map pixels")
    e.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("graph-match")
    g.add_argument("--variant", required=True, choices=[v for v in RECIPES if v.startswith("tiled_ens")])
    g.add_argument("--checkpoint", help="default: the variant's run folder")
    r = sub.add_parser("rss")
    r.add_argument("--precision", default="int8")
    pr = sub.add_parser("profile", help="where a frame's time goes, before (--before REF) and after (issue 32)")
    pr.add_argument("--frames", nargs="+", default=["2048", "5472x3648", "8192"], help="side or WxH")
    pr.add_argument("--models", nargs="+", default=["single", "ens9"], choices=["single", "ens9"])
    pr.add_argument("--before", metavar="REF", help="also profile ssn_edge as of this git commit")
    pr.add_argument("--precision", default="int8")
    pr.add_argument("--throughput-seconds", type=float, default=5.0, help="the tile model's own images/s, per run")
    one = sub.add_parser("profile-one")  # the child process of profile
    one.add_argument("--bundle", required=True)
    one.add_argument("--frame", required=True)
    one.add_argument("--precision", default="int8")
    one.add_argument("--throughput-seconds", type=float, default=5.0)
    sb = sub.add_parser("speed-bundles", help="make the speed bundles (issue 32) under runs/bench/tiling/speed")
    ov_ = sub.add_parser("overhead", help="the runner's own ms per tile with a near-free model, before and after")
    ov_.add_argument("--frames", nargs="+", default=["2048", "8192"], help="side or WxH")
    ov_.add_argument("--before", metavar="REF", help="also measure ssn_edge as of this git commit")
    ov_.add_argument("--runs", type=int, default=2)
    ovo = sub.add_parser("overhead-one")  # the child process of overhead
    ovo.add_argument("--frame", required=True)
    ovo.add_argument("--runs", type=int, default=2)
    me = sub.add_parser("memory", help="peak RSS per frame with the null tile model, before and after (issue 32)")
    me.add_argument("--frames", nargs="+", default=["2048", "5472x3648", "8192"], help="side or WxH")
    me.add_argument("--before", metavar="REF", help="also measure ssn_edge as of this git commit")
    me.add_argument("--graph", choices=["tile", "tiles"], default="tile",
                    help="tile: single-model tiles; tiles: a whole-image (ensemble) graph at 768 x 768")
    meo = sub.add_parser("memory-one")  # the child process of memory
    meo.add_argument("--frame", required=True)
    meo.add_argument("--graph", choices=["tile", "tiles"], default="tile")
    la = sub.add_parser("layouts", help="what each tiling stride costs in time and accuracy (issue 32)")
    la.add_argument("--strides", nargs="+", type=int, default=[256, 192, 128, 64])
    la.add_argument("--precisions", nargs="+", default=["int8", "fp32"], choices=["int8", "fp32"])
    la.add_argument("--images-1024", type=int, default=20, help="test images upsampled to 1024 for the latency")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    {"train": train, "table": table, "shared-vs-independent": shared_vs_independent,
     "edge-profile": edge_profile, "graph-match": graph_match, "rss": rss, "profile": profile,
     "profile-one": profile_one, "speed-bundles": speed_bundles, "overhead": overhead,
     "overhead-one": overhead_one, "memory": memory, "memory-one": memory_one, "layouts": layouts}[args.what](args)


if __name__ == "__main__":
    main()
