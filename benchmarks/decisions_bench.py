"""Decisions a line can trust (issue 29), measured on MVTec bottle (SSN) and Magnetic tile (knn):

(a) thresholds from held-out normal images at the default false-alarm rate vs the old F1-max-on-test threshold:
    false-alarm rate on the test split's normal images, miss rate on its defects (FP32 and INT8);
(b) the README's IR-only script (plain OpenVINO) vs the runtime (`ssn-edge predict`'s Engine): max |score diff|,
    max |map diff|, FP32 and INT8;
(c) openvino-model-api's AnomalyDetection (in .venv-modelapi) vs the runtime: decisions agreeing on the test split;
(d) `benchmark_app -m model_int8.xml -t 10` as it is, and with -hint latency beside `ssn-edge bench`'s latency;
(e) the latency cost of the in-graph post-processing: the same graph with and without it (ratio, one run).

    python benchmarks/decisions_bench.py --which bottle --checkpoint runs/decisions/ssn_bottle_s0/checkpoint.pt
    python benchmarks/decisions_bench.py --which magnetic_tile --checkpoint runs/decisions/knn_magnetic_tile_s0/checkpoint.pt

Writes benchmarks/results/decisions.json (benchmarks/results.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results import command_line, record_results  # noqa: E402

DATASETS = {"bottle": ("mvtec_bottle", "/work/shared/data/mvtec_ad_512/bottle"),
            "magnetic_tile": ("magnetic_tile", "/work/shared/data/magnetic_tile/manifest.csv")}
MODELAPI_PYTHON = REPO / ".venv-modelapi" / "bin" / "python"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}

MODEL_API_SCRIPT = """
import json, sys
import cv2
from model_api.adapters import OpenvinoAdapter, create_core
from model_api.models import AnomalyDetection
adapter = OpenvinoAdapter(create_core(), sys.argv[1], device="CPU", plugin_config={"INFERENCE_PRECISION_HINT": "f32"})
model = AnomalyDetection.create_model(adapter)
out = []
for path in json.load(open(sys.argv[2])):
    r = model(cv2.imread(path, cv2.IMREAD_COLOR))
    out.append({"label": r.pred_label == "True", "score": float(r.pred_score)})
print(json.dumps(out))
"""


def readme_script() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"```python\n(# ir_only\.py:.*?)```", text, re.S).group(1)


def rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    flagged = scores >= threshold
    return {"false_alarm_pct": 100.0 * float(flagged[labels == 0].mean()),
            "miss_pct": 100.0 * float((~flagged[labels == 1]).mean()),
            "false_alarms": int(flagged[labels == 0].sum()), "misses": int((~flagged[labels == 1]).sum())}


def threshold_records(bundle, arrays, base: dict) -> list[dict]:
    """(a): the bundle's held-out-normal threshold vs F1-max on the test split, per precision."""
    from ssn_edge.export.inference import predict_arrays
    from ssn_edge.export.graph import GraphPlan
    from ssn_edge.export.thresholds import thresholds_from_predictions

    meta = bundle.metadata
    plan = GraphPlan("plain", None, (1, 3, *bundle.input_size))
    out = []
    fp32 = predict_arrays(bundle.model_path("fp32"), plan, arrays)
    f1 = thresholds_from_predictions(arrays, fp32, "test").image  # the old default on MVTec data: optimistic
    for precision in bundle.precisions:
        pred = fp32 if precision == "fp32" else predict_arrays(bundle.model_path(precision), plan, arrays)
        for variant, t in (("threshold_held_out_normal", meta.thresholds.image), ("threshold_f1_on_test", f1)):
            out.append({**base, "variant": variant, "precision": precision, "threshold": float(t),
                        "target_false_alarm_pct": 100.0 * meta.thresholds.max_false_alarm
                        if variant == "threshold_held_out_normal" else None,
                        "held_out_images": meta.thresholds.held_out,
                        "held_out_false_alarm_pct": 100.0 * meta.thresholds.false_alarm
                        if variant == "threshold_held_out_normal" else None,
                        "test_normal": int((arrays.labels == 0).sum()), "test_defective": int((arrays.labels == 1).sum()),
                        **rates(pred.scores, arrays.labels, t)})
    return out


def ir_only_records(bundle, samples, count: int, base: dict) -> list[dict]:
    """(b): the README script, run as a user would (a subprocess per image), vs Engine.predict_image."""
    import tempfile

    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    paths = [str(s.image) for s in samples][:: max(1, len(samples) // count)][:count]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ir_only.py"
        script.write_text(readme_script())
        for precision in bundle.precisions:
            engine = Engine(bundle, precision)
            ds, dm = 0.0, 0.0
            for i, path in enumerate(paths):
                npy = Path(tmp) / f"{i}.npy"
                done = subprocess.run([sys.executable, str(script), str(bundle.model_path(precision)), path, str(npy)],
                                      capture_output=True, text=True, check=True)
                got = json.loads(done.stdout)
                want = engine.predict_image(read_image(path), path)
                ds = max(ds, abs(got["score"] - want.score))
                dm = max(dm, float(np.abs(np.load(npy) - want.anomaly_map).max()))
            out.append({**base, "variant": "ir_only_vs_predict", "precision": precision, "images": len(paths),
                        "max_abs_score_diff": ds, "max_abs_map_diff": dm})
    return out


def model_api_records(bundle, samples, base: dict) -> list[dict]:
    """(c): model_api's decisions vs the runtime's on the whole test split (FP32)."""
    import tempfile

    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.preprocess import read_image

    if not MODELAPI_PYTHON.exists():
        print(f"skip model_api: {MODELAPI_PYTHON} absent")
        return []
    paths = [str(s.image) for s in samples]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(paths, fh)
    done = subprocess.run([str(MODELAPI_PYTHON), "-c", MODEL_API_SCRIPT, str(bundle.model_path("fp32")), fh.name],
                          capture_output=True, text=True, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    engine = Engine(bundle, "fp32")
    ours = [engine.predict_image(read_image(p), p) for p in paths]
    agree = sum(g["label"] == o.decision for g, o in zip(got, ours))
    diffs = [abs(g["score"] - o.score) for g, o in zip(got, ours)]
    return [{**base, "variant": "model_api_vs_predict", "precision": "fp32", "images": len(paths),
             "agreeing_decisions": agree, "max_abs_score_diff": float(max(diffs)),
             "note": "model_api resizes with its own bilinear Interpolate in the graph (the runtime: area filter "
                     "when shrinking), so scores of resized images differ slightly"}]


def benchmark_app(xml: Path, *flags: str) -> dict[str, float]:
    done = subprocess.run(["benchmark_app", "-m", str(xml), "-t", "10", *flags], capture_output=True, text=True,
                          check=True)
    text = done.stdout
    grab = lambda pattern: float(re.search(pattern, text).group(1))  # noqa: E731
    return {"latency_ms": grab(r"Median:\s+([\d.]+) ms"), "throughput_ips": grab(r"Throughput:\s+([\d.]+) FPS")}


def latency_records(bundle, base: dict) -> list[dict]:
    """(d): benchmark_app as it is and with -hint latency, beside ssn-edge bench's batch-1 latency."""
    from ssn_edge.runtime.bench import time_latency
    from ssn_edge.runtime.engine import Engine

    precision = "int8" if "int8" in bundle.precisions else "fp32"
    xml = bundle.model_path(precision)
    as_is = benchmark_app(xml)
    latency = benchmark_app(xml, "-hint", "latency", "-infer_precision", "f32")
    engine = Engine(bundle, precision, mode="latency")
    x = np.random.default_rng(0).normal(size=(1, 3, *bundle.input_size)).astype(np.float32)
    ours = time_latency(engine.compiled, x, warmup=10, runs=200)
    cmd = f"benchmark_app -m {xml} -t 10"
    return [{**base, "variant": "benchmark_app_as_is", "runtime": "openvino", "precision": precision, **as_is,
             "command": cmd},
            {**base, "variant": "benchmark_app_latency", "runtime": "openvino", "precision": precision, **latency,
             "command": cmd + " -hint latency -infer_precision f32"},
            {**base, "variant": "ssn_edge_bench_latency", "runtime": "openvino", "precision": precision,
             "latency_ms": ours["latency_ms"], "ratio": ours["latency_ms"] / latency["latency_ms"],
             "ratio_of": "ssn_edge bench latency / benchmark_app -hint latency"}]


def postprocess_cost_records(bundle, base: dict, runs: int = 200) -> list[dict]:
    """(e): latency of the graph with its post-processing / without it (interleaved, one run), and / the graph
    without it plus the runtime's NumPy post-processing (what older bundles cost)."""
    import openvino as ov

    from ssn_edge.export.graph import without_postprocess
    from ssn_edge.runtime.postprocess import anomaly_map, sigmoid

    out = []
    core = ov.Core()
    x = np.random.default_rng(0).normal(size=(1, 3, *bundle.input_size)).astype(np.float32)
    cfg = {**F32, "PERFORMANCE_HINT": "LATENCY"}
    for precision in bundle.precisions:
        full = core.read_model(bundle.model_path(precision))
        with_post = core.compile_model(full, "CPU", cfg).create_infer_request()
        without = core.compile_model(without_postprocess(full), "CPU", cfg).create_infer_request()
        times = {"with": [], "without": [], "numpy": []}
        for _ in range(10):
            with_post.infer({0: x}), without.infer({0: x})
        for _ in range(runs):
            t0 = time.perf_counter()
            with_post.infer({0: x})
            t1 = time.perf_counter()
            res = without.infer({0: x})
            t2 = time.perf_counter()
            anomaly_map(res[0], bundle.input_size), sigmoid(res[1])
            t3 = time.perf_counter()
            times["with"].append(t1 - t0), times["without"].append(t2 - t1), times["numpy"].append(t3 - t1)
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        out.append({**base, "variant": "postprocess_in_graph", "runtime": "openvino", "precision": precision,
                    "latency_ms": med["with"], "latency_without_ms": med["without"],
                    "latency_without_plus_numpy_ms": med["numpy"], "ratio": med["with"] / med["without"],
                    "ratio_of": "graph with post-processing / without", "ratio_vs_numpy": med["with"] / med["numpy"]})
    return out


@click.command()
@click.option("--which", type=click.Choice(sorted(DATASETS)), required=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Bundle folder (default: beside the checkpoint).")
@click.option("--ir-images", default=10, show_default=True)
@click.option("--skip-export", is_flag=True, help="Reuse the bundle at --out.")
def main(which: str, checkpoint: str, out_dir: str | None, ir_images: int, skip_export: bool) -> None:
    from ssn_edge.data import load_arrays, load_dataset, select
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.model.load import load_model
    from ssn_edge.runtime.bundle import load_bundle

    dataset, data_path = DATASETS[which]
    out = Path(out_dir) if out_dir else Path(checkpoint).parent / "bundle_decisions"
    t0 = time.perf_counter()
    if skip_export:
        bundle = load_bundle(out)
    else:
        bundle = export_bundle(checkpoint, out, ExportOptions(int8=True, threshold_data=data_path, overwrite=True))
    export_s = time.perf_counter() - t0
    loaded = load_model(checkpoint)
    base = {"model": loaded.kind, "dataset": dataset, "backbone": loaded.recipe.model.backbone,
            "setting": loaded.recipe.train.setting, "seed": loaded.recipe.train.seed, "runtime": "openvino",
            "checkpoint": checkpoint, "command": command_line()}
    test = select(load_dataset(data_path), "test")
    arrays = load_arrays(test, bundle.input_size, progress=False)
    records = threshold_records(bundle, arrays, base)
    records[0]["export_s"] = export_s
    records += ir_only_records(bundle, test, ir_images, base)
    records += model_api_records(bundle, test, base)
    records += latency_records(bundle, base)
    records += postprocess_cost_records(bundle, base)
    for r in records:
        print(json.dumps({k: v for k, v in r.items() if k not in ("command", "checkpoint")}))
    print("results:", record_results("decisions", records))


if __name__ == "__main__":
    main()
