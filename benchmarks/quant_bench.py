"""Export + accuracy-vs-quantization + speed benchmark (issue 3), all in one run on this machine.

  python benchmarks/quant_bench.py --checkpoint runs/bench/mvtec_bottle_unsupervised_cpu_schedule_s0/checkpoint.pt \
      --dataset mvtec_bottle

1. exports the checkpoint to a bundle (FP32, FP16, INT8 PTQ, INT8 accuracy-controlled);
2. `ssn_edge.report.build_report`: PyTorch FP32 vs every OpenVINO precision on the test split
   (accuracy, score differences, decision flips), report.json + report.html;
3. batch-1 latency in one process: PyTorch eager FP32, OpenVINO f32/bf16/fp16/int8/int8_acc, and the
   CPU's measured 3x3-convolution peak (f32, int8), giving the speed-up and achieved/peak ratios.
Records go to benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, record_results  # noqa: E402

ACC_KEYS = ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap", "score_max_abs_diff", "score_mean_abs_diff",
            "flips", "flip_fraction", "file_mb", "inference_precision_hint")


def torch_latency(checkpoint: Path, size: tuple[int, int], warmup: int, runs: int) -> float:
    import torch

    from ssn_edge.evaluation.evaluate import torch_latency_ms
    from ssn_edge.model.load import model_from_checkpoint

    torch.set_num_threads(2)
    model, _, _ = model_from_checkpoint(checkpoint)
    return torch_latency_ms(model, torch.randn(1, 3, *size), warmup=warmup, runs=runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data", help="default: the checkpoint recipe's data.path")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "bottle_bundle")
    p.add_argument("--acc-metric", default="image_auroc")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--skip-export", action="store_true", help="reuse the bundle at --out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.checkpoint.is_file():
        print(f"skipped: {args.checkpoint} not found (run benchmarks/train_bench.py accuracy first)")
        return

    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions, export_bundle
    from ssn_edge.report.build import build_report
    from ssn_edge.runtime.bench import bench_bundle, conv_peak_sweep
    from ssn_edge.runtime.bundle import load_bundle

    t0 = time.perf_counter()
    if not args.skip_export:
        shutil.rmtree(args.out, ignore_errors=True)
        export_bundle(args.checkpoint, args.out, ExportOptions(
            fp16=True, int8=True, int8_acc=True, calibration=CalibrationSpec(source="recipe", size=128),
            max_drop=args.max_drop, acc_metric=args.acc_metric, threshold_data=args.data, overwrite=True,
        ))
    export_s = time.perf_counter() - t0
    bundle = load_bundle(args.out)
    meta = bundle.metadata
    base = {"dataset": args.dataset, "backbone": meta.provenance.backbone.name, "setting": meta.provenance.setting,
            "command": command_line()}

    report = build_report(args.out, data_path=args.data, checkpoint=args.checkpoint,
                          out_dir=ROOT / "runs" / "bench" / "bottle_report", runs=30)
    print("report:", report.report_html)

    # Speed: every measurement below in this one process, back to back.
    size = bundle.input_size
    torch_ms = torch_latency(args.checkpoint, size, warmup=10, runs=max(20, args.runs // 2))
    speed = {r["precision"]: r for r in bench_bundle(bundle, warmup=10, runs=args.runs, throughput_seconds=5.0)}
    peaks = {prec: conv_peak_sweep(prec, warmup=10, runs=args.runs) for prec in ("f32", "int8")}

    records = []
    for r in report.records:
        rec = {**base, "runtime": r["runtime"], "precision": r["precision"]}
        rec.update({k: r[k] for k in ACC_KEYS if r.get(k) is not None})
        entry = meta.models.get(r["precision"]) if r["runtime"] == "openvino" else None
        q = entry.quantization if entry is not None else None
        if q:  # how this INT8 model was quantized (ssn_edge.export.quantize)
            rec.update(calibration_defects=meta.calibration.spec.defects, act_range=q.activation_range,
                       score_offset=q.score_offset_value)
        s = speed.get(r["precision"]) if r["runtime"] == "openvino" else None
        if s:
            rec.update(latency_ms=round(s["latency_ms"], 3), latency_p10_ms=round(s["latency_p10_ms"], 3),
                       latency_p90_ms=round(s["latency_p90_ms"], 3), throughput_ips=round(s["throughput_ips"], 2),
                       gops=round(s["gops"], 1), inference_precision_hint=s["inference_precision_hint"])
        elif r["runtime"] == "torch":
            rec.update(latency_ms=round(torch_ms, 3), throughput_ips=r.get("throughput_ips"))
        records.append(rec)
    int8 = speed["int8"]
    records += [
        {**base, "runtime": "openvino", "precision": "int8", "ratio": round(speed["fp32"]["latency_ms"] / int8["latency_ms"], 3),
         "ratio_of": "int8_vs_openvino_f32"},
        {**base, "runtime": "openvino", "precision": "int8", "ratio": round(torch_ms / int8["latency_ms"], 3),
         "ratio_of": "int8_vs_torch_fp32"},
        {**base, "runtime": "openvino", "precision": "int8", "ratio": round(int8["gops"] / peaks["int8"]["gops"], 3),
         "ratio_of": "int8_vs_conv_peak", "gops": round(int8["gops"], 1), "peak_gops": round(peaks["int8"]["gops"], 1),
         "peak_model": peaks["int8"]["model"], "peak_sweep_gops": peaks["int8"]["sweep"]},
        {**base, "runtime": "openvino", "precision": "fp32", "ratio": round(speed["fp32"]["gops"] / peaks["f32"]["gops"], 3),
         "ratio_of": "f32_vs_conv_peak", "gops": round(speed["fp32"]["gops"], 1), "peak_gops": round(peaks["f32"]["gops"], 1),
         "peak_model": peaks["f32"]["model"], "peak_sweep_gops": peaks["f32"]["sweep"]},
    ]
    path = record_results("quantization", records)
    print(path)
    print(f"export {export_s:.0f} s")
    for r in records:
        print({k: v for k, v in r.items() if k not in ("command", "dataset", "backbone", "setting")})


if __name__ == "__main__":
    main()
