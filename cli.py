"""ssn-edge command line: a thin layer over ssn_edge; every command's work lives in the package."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import click

from ssn_edge import __version__
from ssn_edge.config import MAP_GATES

MAP_GATE_HELP = ("The map: 'score' = log(sigmoid(map) x sigmoid(score)), so the maps of images scored normal sink below "
                 "those of defective ones; 'none' = the segmentation logits. Default: the recipe's model.map_gate.")

# Errors that are the user's to fix (bad file, bad recipe, missing weights): one line, no traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    try:
        from ssn_edge.model.backbones import WeightsError

        extra.append(WeightsError)
    except Exception:  # the torch-free install has no training side
        pass
    return _USER_ERRORS + tuple(extra)


def _os_error_line(exc: OSError) -> str:
    """A full disk, a folder that cannot be written: '<file>: no space left on device' (one line)."""
    from ssn_edge.runtime.atomic import describe_os_error

    if exc.errno is None:  # raised with a message of our own
        return str(exc)
    where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
    return f"{where}{describe_os_error(exc)}"


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        from ssn_edge.runtime.atomic import Interrupted

        try:
            return super().invoke(ctx)
        except Interrupted as exc:  # SIGTERM/SIGINT during work that cleans up after itself (export)
            click.echo(f"error: {exc}", err=True)
            sys.exit(128 + exc.signum)
        except (OSError, *_user_errors()) as exc:
            if os.environ.get("SSN_EDGE_DEBUG"):
                raise
            line = _os_error_line(exc) if isinstance(exc, OSError) else str(exc)
            click.echo("error: " + " ".join(part.strip() for part in line.splitlines() if part.strip()), err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train SuperSimpleNet, export it to OpenVINO FP32/FP16/INT8 and run it on a CPU."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        click.echo(f"  {key:<{width}}  {value:8.2f}")


@main.command()
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False), help="recipes/<name>.yaml")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder (MVTec layout) or manifest CSV.")
@click.option("--out", "out_dir", default="runs/train", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--weights", help="Backbone weights file (torchvision state_dict).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue from this checkpoint.")
@click.option("--setting", type=click.Choice(["unsupervised", "supervised", "weak", "mixed", "auto"]),
              help="Override train.setting (auto: from the data: masks on every defect, some, or none).")
@click.option("--mask-fraction", type=float, help="Use the masks of only this fraction of the defective training images.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe key, e.g. train.batch_size=16.")
def train(recipe_path, data_path, out_dir, epochs, seed, weights, resume, setting, mask_fraction, sets) -> None:
    """Train SSN from a recipe; writes checkpoint.pt, history.json and metrics.json to --out."""
    from ssn_edge.config import load_recipe, parse_override
    from ssn_edge.train.job import train_job

    overrides = dict(parse_override(s) for s in sets)
    if data_path:
        overrides["data.path"] = data_path
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if seed is not None:
        overrides["train.seed"] = seed
    if weights:
        overrides["model.weights"] = weights
    if setting:
        overrides["train.setting"] = setting
    if mask_fraction is not None:
        overrides["data.mask_fraction"] = mask_fraction
    recipe = load_recipe(recipe_path, overrides)
    result = train_job(recipe, Path(out_dir), resume=Path(resume) if resume else None)
    click.echo(f"checkpoint: {result.checkpoint}")
    if result.metrics:
        click.echo("test metrics:")
        _print_metrics(result.metrics)


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False))
@click.option("--data", "data_path", type=click.Path(), help="Dataset; default: the recipe's data.path.")
@click.option("--split", default="test", show_default=True)
@click.option("--weights", help="Backbone weights file, if not where training found it.")
@click.option("--map-gate", type=click.Choice(MAP_GATES), default=None, help=MAP_GATE_HELP)
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False), help="metrics.json path (default: beside the checkpoint).")
def evaluate(checkpoint, data_path, split, weights, map_gate, out_file) -> None:
    """Evaluate a checkpoint: image AUROC/AP/F1-max, pixel AUPRO/AP/AUROC."""
    from ssn_edge.evaluation.job import eval_job

    metrics = eval_job(Path(checkpoint), data_path, split, weights, map_gate)
    _print_metrics(metrics)
    out = Path(out_file) if out_file else Path(checkpoint).with_name("metrics.json")
    out.write_text(json.dumps(metrics, indent=2))
    click.echo(f"metrics: {out}")


@main.command("predict")
@click.argument("bundle", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--precision", default="int8", show_default=True, help="fp32 | bf16 | fp16 | int8 | int8_acc")
@click.option("--out", "out_dir", default="runs/predict", show_default=True, type=click.Path(file_okay=False))
@click.option("--overlays", is_flag=True, help="Also write heatmap overlays to OUT/overlays/.")
@click.option("--maps", "save_maps", is_flag=True, help="Also write full-resolution maps to OUT/maps/<image>.npy (float16).")
@click.option("--device", default="CPU", show_default=True)
@click.option("--recursive", is_flag=True, help="Also scan the sub-folders of folders given.")
@click.option("--bit-depth", "bit_depth", default="auto", show_default=True, type=click.Choice(["auto", "8", "10", "12", "14", "16"]),
              help="Significant bits of 16-bit images' samples (a 12-bit camera's PNGs: 12). auto: the PNG's sBIT "
                   "chunk, else the smallest depth that holds the image's maximum. Pin it on a production line.")
def predict(bundle, images, precision, out_dir, overlays, save_maps, device, recursive, bit_depth) -> None:
    """Score IMAGES (files or folders) with a bundle; results go to --out as they come.

    OUT/predictions.jsonl and .csv get one row per input (scored, or the reason it could not be); when the run
    ends, OUT/predictions.json holds the summary. The previous run's results in OUT are removed first. Exit
    status: 0 every input scored, 3 some could not be (the rest were scored; each is listed), 2 nothing ran
    (bad bundle or option). A tiled bundle takes images of any size: it tiles them, merges the tiles' maps and
    smooths the seams."""
    from ssn_edge.runtime.predict import run_predict

    width, shown = 48, []

    def show(record, _prediction) -> None:
        name = record.path if len(record.path) <= width else "..." + record.path[-(width - 3):]
        if record.ok and not shown:  # the header once something is scored (not above a bundle error)
            shown.append(True)
            click.echo(f"{'image':<{width}}  {'score':>7}  {'decision':<8}  {'map max':>8}  {'ms':>7}")
        if record.ok:
            click.echo(f"{name:<{width}}  {record.score:7.4f}  {'DEFECT' if record.decision else 'ok':<8}  {record.map_max:8.3f}  {record.latency_ms:7.1f}")
        else:
            click.echo(f"error: {record.path}: {record.error}", err=True)

    run = run_predict(bundle, list(images), Path(out_dir), precision=precision, overlays=overlays, device=device,
                      save_maps=save_maps, recursive=recursive, bit_depth=None if bit_depth == "auto" else int(bit_depth),
                      on_result=show)
    integer_depths = [d for d in run.bit_depths if d not in ("8", "float")]
    if bit_depth == "auto" and len(integer_depths) > 1:
        counts = ", ".join(f"{run.bit_depths[d]} at {d} bits" for d in sorted(integer_depths, key=int))
        click.echo(f"note: 16-bit images were read at different bit depths ({counts}); if they come from one camera, "
                   "pass --bit-depth", err=True)
    if run.same_file:
        click.echo(f"note: {run.same_file} input(s) name a file also named by another input (each scored; see same_file_as)", err=True)
    if run.skipped:
        click.echo(f"note: {run.skipped} file(s) in the folders given have no image name and were skipped", err=True)
    click.echo(f"{run.scored} images scored, {run.defective} defective, {run.failed} could not be scored; "
               f"results: {run.summary}")
    if run.failed:
        sys.exit(3)


def _bench_frames(bundle, frames, precisions, runs, throughput_seconds, device, json_file) -> None:
    """`bench --frame`: a tiled bundle's frame latency and MP/s beside its tile model's images/s."""
    from ssn_edge.runtime.bench import bench_frames, parse_frame_size

    sizes = [parse_frame_size(f) for f in frames]
    runs = 3 if click.get_current_context().get_parameter_source("runs").name == "DEFAULT" else runs
    records = bench_frames(bundle, sizes, list(precisions) or None, runs, throughput_seconds, device)
    click.echo(f"{'precision':<9} {'frame':>11} {'tiles':>6} {'frame ms':>10} {'MP/s':>7} {'model img/s':>11} {'ratio':>6}")
    for r in records:
        ips = f"{r['model_throughput_ips']:11.1f}" if r["model_throughput_ips"] else f"{'-':>11}"
        ratio = f"{r['ratio']:6.2f}" if r["ratio"] is not None else f"{'-':>6}"
        frame = f"{r['frame'][0]}x{r['frame'][1]}"
        click.echo(f"{r['precision']:<9} {frame:>11} {r['tiles']:6d} {r['latency_ms']:10.1f} {r['megapixels_per_s']:7.3f} {ips} {ratio}")
    click.echo("ratio: tiled MP/s / (model img/s x tile pixels / frame pixels covered, overlap counted); 1.0 = no overhead")
    if json_file:
        from ssn_edge.runtime.atomic import atomic_write

        out = Path(json_file)
        try:
            atomic_write(out, json.dumps({"results": records}, indent=2) + "\n")
        except OSError as exc:
            raise ValueError(f"{out}: cannot write the results: {exc.strerror or exc}") from None
        click.echo(f"results: {out}")

def _window_seconds(_ctx, _param, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value} is not a time window: give seconds >= 0 (0 skips the throughput run)")
    return value


@main.command("bench")
@click.argument("bundle", type=click.Path())
@click.option("--precision", "precisions", multiple=True, help="Repeatable; default: all in the bundle (+ bf16 where the CPU has it).")
@click.option("--runs", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(min=0))
@click.option("--seconds", "throughput_seconds", default=5.0, show_default=True, type=float, callback=_window_seconds,
              help="Throughput window per precision (0: skip).")
@click.option("--peak/--no-peak", default=False, show_default=True, help="Also measure this CPU's 3x3-conv peak (f32, int8) and the achieved/peak ratio.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), help="Write all records to this file.")
@click.option("--device", default="CPU", show_default=True)
@click.option("--frame", "frames", multiple=True, metavar="WxH",
              help="Tiled bundles: time whole frames of this size (repeatable; 5472x3648 or 2048) beside the tile "
                   "model's own images/s; --runs frames each (default 3 here).")
def bench(bundle, precisions, runs, warmup, throughput_seconds, peak, json_file, device, frames) -> None:
    """Latency (batch 1), throughput, MACs and GOPS of a bundle per precision on this machine."""
    from ssn_edge.runtime.bench import bench_bundle, conv_peak_sweep, peak_ratio

    if json_file:  # refused now, not after minutes of measuring
        first = next((p for p in Path(json_file).resolve().parents if p.exists()), None)
        if first is not None and not first.is_dir():
            raise ValueError(f"{json_file}: cannot write the results: {first} is a file, not a folder")
    if frames:
        _bench_frames(bundle, frames, precisions, runs, throughput_seconds, device, json_file)
        return
    records = bench_bundle(bundle, list(precisions) or None, warmup, runs, throughput_seconds, device)
    peaks: dict = {}
    if peak:
        kinds = ["f32", "int8"] + (["bf16"] if any(r["inference_precision_hint"] == "bf16" for r in records) else [])
        for kind in kinds:
            try:
                peaks[kind] = conv_peak_sweep(kind, warmup=warmup, runs=runs, device=device)
            except ValueError as exc:  # e.g. no nncf on a runtime-only install: report, keep the rest
                click.echo(f"note: no {kind} peak: {exc}", err=True)
    click.echo(f"{'precision':<9} {'hint':<5} {'median ms':>9} {'p10-p90 ms':>15} {'img/s':>8} {'GOPS':>8}" + (f" {'% peak':>7}" if peaks else ""))
    for r in records:
        tput = f"{r['throughput_ips']:8.1f}" if r["throughput_ips"] is not None else f"{'-':>8}"
        spread = f"{r['latency_p10_ms']:.2f}-{r['latency_p90_ms']:.2f}"
        line = f"{r['precision']:<9} {r['inference_precision_hint']:<5} {r['latency_ms']:9.2f} {spread:>15} {tput} {r['gops']:8.1f}"
        if peaks:
            ratio = peak_ratio(r, peaks)
            r["peak_ratio"] = ratio
            line += f" {ratio * 100:6.1f}%" if ratio is not None else f" {'-':>7}"
        click.echo(line)
    for kind, p in peaks.items():
        click.echo(f"peak {kind:<5} {p['model']}: {p['latency_ms']:.2f} ms, {p['gops']:.1f} GOPS")
    if records:
        click.echo(f"MACs (batch 1): {records[0]['macs'] / 1e9:.3f} G; cpu: {records[0]['cpu']}")
    if json_file:
        from ssn_edge.runtime.atomic import atomic_write

        out = Path(json_file)
        try:
            atomic_write(out, json.dumps({"results": records, "peaks": list(peaks.values())}, indent=2) + "\n")
        except OSError as exc:
            raise ValueError(f"{out}: cannot write the results: {exc.strerror or exc}") from None
        click.echo(f"results: {out}")


@main.command("export")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="checkpoint.pt from `ssn-edge train`.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Bundle directory (default: 'bundle' beside the checkpoint).")
@click.option("--fp16", is_flag=True, help="Also an FP16-weights model.")
@click.option("--int8", is_flag=True, help="Also an INT8 model (NNCF post-training quantization).")
@click.option("--int8-acc", "int8_acc", is_flag=True, help="Also an accuracy-controlled INT8 model (NNCF, reverts layers until --max-drop holds), held on the data's 'val' split, else on the INT8 check's images: held-out normal training images, painted copies of them and, for a model trained unsupervised, the training split's defective images (never the test split).")
@click.option("--max-drop", default=0.5, show_default=True, type=float, help="--int8-acc: largest drop of --acc-metric, in percentage points.")
@click.option("--acc-metric", default="image_auroc", show_default=True, type=click.Choice(["image_auroc", "image_ap", "pixel_ap", "pixel_aupro", "decision_agreement"]), help="--int8-acc: the metric to hold; decision_agreement = %% of validation images deciding as FP32 does.")
@click.option("--calibration", "calibration_yaml", type=click.Path(dir_okay=False), help="Calibration definition, e.g. calibration/mvtec_bottle.yaml.")
@click.option("--calibration-folder", type=click.Path(file_okay=False), help="Calibrate on images under this folder (recursive).")
@click.option("--calibration-manifest", type=click.Path(dir_okay=False), help="Calibrate on the train/label-0 rows of this manifest CSV.")
@click.option("--calibration-size", type=int, help="Number of calibration images (1..1000; default 128).")
@click.option("--calibration-defects", type=float, help="Fraction of calibration images given a synthetic defect (default 1.0; 0: as they are).")
@click.option("--act-range", default="minmax", show_default=True, type=click.Choice(["minmax", "nncf_default"]), help="INT8 activation range estimator.")
@click.option("--score-offset/--no-score-offset", default=True, show_default=True, help="Correct the INT8 score's mean shift on the calibration images.")
@click.option("--bias-correction", default="full", show_default=True, type=click.Choice(["full", "fast"]), help="NNCF's INT8 bias correction: full (per layer, on the calibration images) or fast (quicker export, coarser).")
@click.option("--float-map/--no-float-map", default=None, help="Keep SSN's segmentation head in float in INT8 models (the map as FP32 gives it, at the head's cost in latency). Default: on where the map adds the head's to a memory bank's float distances (model.memory_bank with SSN's map weighing > 0), off otherwise.")
@click.option("--data", "data_path", type=click.Path(), help="Threshold/validation data (val split, else test); default: the recipe's data.path.")
@click.option("--weights", help="Backbone weights file, if not where training found it.")
@click.option("--map-gate", type=click.Choice(MAP_GATES), default=None, help=MAP_GATE_HELP)
@click.option("--threshold-from", default="normal", show_default=True, type=click.Choice(["normal", "f1", "test-f1"]),
              help="normal: a target false-alarm rate on normal images training never saw (held out: data.val_fraction); "
                   "f1: F1-max on the 'val' split (needs defects); test-f1: F1-max on the 'test' split (optimistic; the bundle says so).")
@click.option("--max-false-alarm", default=0.01, show_default=True, type=float,
              help="--threshold-from normal: largest fraction of held-out normal images at or above the image threshold.")
@click.option("--max-false-alarm-pixel", default=0.001, show_default=True, type=float,
              help="--threshold-from normal: largest fraction of held-out normal pixels at or above the pixel threshold.")
@click.option("--review-false-alarm", type=float, default=None,
              help="Also a review threshold at this (higher) false-alarm rate: results ok | review | defect.")
@click.option("--dynamic-batch", is_flag=True, help="Plain graphs with a dynamic batch (default: batch 1, fully static shapes).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
def export(**opts) -> None:
    """Export a checkpoint to an OpenVINO bundle: FP32 always, FP16/INT8/accuracy-controlled INT8 on request."""
    from ssn_edge.export.exporter import export_bundle

    options = _export_options(opts)
    out = Path(opts["out_dir"]) if opts["out_dir"] else Path(opts["checkpoint"]).resolve().parent / "bundle"
    bundle = export_bundle(Path(opts["checkpoint"]), out, options)
    click.echo(f"bundle: {bundle.path}")
    click.echo(f"  {'precision':<10} {'weights':<8} {'size MB':>9}")
    for precision in bundle.precisions:
        size = (bundle.model_path(precision).stat().st_size + bundle.weights_path(precision).stat().st_size) / 1e6
        click.echo(f"  {precision:<10} {bundle.metadata.models[precision].weights_precision:<8} {size:>9.2f}")
    th = bundle.metadata.thresholds
    rate = f", false alarms on {th.held_out} held-out normal images {100 * th.false_alarm:.2f} %" if th.held_out else ""
    review = f", review {th.review:.4f}" if th.review is not None else ""
    click.echo(f"thresholds ({th.method} on {th.source}): image {th.image:.4f}{review}, pixel {th.pixel:.4f}{rate}")


def _calibration_spec(opts: dict):
    """The calibration set the export options name (None without INT8); one source at most."""
    import dataclasses

    from ssn_edge.export.calibration import CalibrationSpec, load_calibration_spec

    given = [o for o, key in (("--calibration", "calibration_yaml"), ("--calibration-folder", "calibration_folder"),
                              ("--calibration-manifest", "calibration_manifest")) if opts[key]]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)}: give one calibration source")
    tuned = opts["calibration_size"] is not None or opts["calibration_defects"] is not None
    if not (opts["int8"] or opts["int8_acc"]):
        if given or tuned:
            raise click.UsageError("calibration options only apply with --int8 or --int8-acc")
        return None
    if opts["calibration_yaml"]:
        spec = load_calibration_spec(opts["calibration_yaml"])
    elif opts["calibration_folder"]:
        spec = CalibrationSpec(source="folder", path=opts["calibration_folder"])
    elif opts["calibration_manifest"]:
        spec = CalibrationSpec(source="manifest", path=opts["calibration_manifest"])
    else:
        spec = CalibrationSpec()
    if opts["calibration_size"] is not None:
        spec = dataclasses.replace(spec, size=opts["calibration_size"])
    if opts["calibration_defects"] is not None:
        spec = dataclasses.replace(spec, defects=opts["calibration_defects"])
    return spec


def _export_options(opts: dict):
    from ssn_edge.export.exporter import ExportOptions
    from ssn_edge.export.quantize import QuantizeOptions
    from ssn_edge.export.thresholds import ThresholdChoice

    return ExportOptions(
        fp16=opts["fp16"], int8=opts["int8"], int8_acc=opts["int8_acc"], calibration=_calibration_spec(opts),
        quantize=QuantizeOptions(activation_range=opts["act_range"], score_offset=opts["score_offset"],
                                 float_map=opts["float_map"], bias_correction=opts["bias_correction"]),
        max_drop=opts["max_drop"], acc_metric=opts["acc_metric"], threshold_data=opts["data_path"],
        weights=opts["weights"], map_gate=opts["map_gate"], overwrite=opts["overwrite"],
        thresholds=ThresholdChoice(opts["threshold_from"], opts["max_false_alarm"], opts["max_false_alarm_pixel"],
                                   opts["review_false_alarm"]),
        dynamic_batch=opts["dynamic_batch"],
    )


def _num(record: dict, key: str, fmt: str) -> str:
    return format(record[key], fmt) if record.get(key) is not None else "-"


@main.command("report")
@click.argument("bundle", type=click.Path())
@click.option("--data", "data_path", type=click.Path(), help="Dataset; default: the bundle recipe's data.path.")
@click.option("--split", default="test", show_default=True)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="The checkpoint the bundle came from: adds PyTorch FP32 as the reference.")
@click.option("--weights", help="Backbone weights file for --checkpoint, if not where training found it.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Report folder (default: <bundle>_report beside the bundle).")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=1), help="Timed batch-1 runs per variant.")
@click.option("--seconds", "throughput_seconds", default=2.0, show_default=True, type=float, callback=_window_seconds,
              help="Throughput window per variant (0: skip).")
@click.option("--reference", "reference_model", default="none", show_default=True, type=click.Choice(["none", "knn"]),
              help="knn: also fit the memory-bank baseline on the bundle's training images (about a minute per "
                   "200 images; needs PyTorch) and add its row.")
def report(bundle, data_path, split, checkpoint, weights, out_dir, runs, throughput_seconds, reference_model) -> None:
    """Accuracy/speed report of every precision of a bundle vs FP32: report.json + a self-contained report.html."""
    from ssn_edge.report.build import build_report

    result = build_report(bundle, data_path, split, checkpoint, out_dir, runs=runs, weights=weights,
                          throughput_seconds=throughput_seconds, reference_model=reference_model)
    click.echo(f"{'runtime':<8} {'precision':<9} {'img AUROC':>9} {'px AUPRO':>9} {'max dscore':>10} {'flips':>5} {'ms':>8}")
    for r in result.records:
        click.echo(f"{r['runtime']:<8} {r['precision']:<9} {_num(r, 'image_auroc', '.2f'):>9} "
                   f"{_num(r, 'pixel_aupro', '.2f'):>9} {_num(r, 'score_max_abs_diff', '.2e'):>10} {r['flips']:>5} "
                   f"{_num(r, 'latency_ms', '.2f'):>8}")
    if result.baseline is not None:
        b = result.baseline
        click.echo(f"knn baseline (openvino fp32, fitted in {b['fit_s']:.0f} s): image AUROC {_num(b, 'image_auroc', '.2f')}, "
                   f"pixel AUPRO {_num(b, 'pixel_aupro', '.2f')}, {_num(b, 'latency_ms', '.2f')} ms")
    for w in result.warnings:
        click.echo(w)
    click.echo(f"reference: {result.reference}")
    click.echo(f"report: {result.report_html}")


@main.command("demo")
@click.option("--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--weights", help="ResNet18 weights file (torchvision state_dict); default: torch hub cache, then download.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Training epochs (default: the demo's).")
def demo(out_dir, weights, epochs) -> None:
    """Procedural defects -> quick ResNet18 SSN -> FP32 + INT8 bundle -> report.html, in a few minutes."""
    from ssn_edge.demo.run import DEMO_EPOCHS, run_demo

    run_demo(out_dir, epochs or DEMO_EPOCHS, weights, echo=click.echo)


@main.command("serve")
@click.argument("bundles", nargs=-1, type=str)
@click.option("--repo", "repo_dir", type=click.Path(file_okay=False), help="Serve every version of every model in this model repository.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (keep 127.0.0.1 unless the line's network needs another).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--precision", default=None, help="For BUNDLE folders: fp32 | bf16 | fp16 | int8 | int8_acc (default: int8 if present, else fp32).")
@click.option("--queue", "queue_size", default=8, show_default=True, type=click.IntRange(min=0), help="Requests waiting per model beyond those running; more get 503.")
@click.option("--timeout", "timeout_s", default=30.0, show_default=True, type=float, help="Seconds a request may take before a 504.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=float, help="Largest request body; larger gets 413.")
@click.option("--device", default="CPU", show_default=True)
def serve(bundles, repo_dir, host, port, precision, queue_size, timeout_s, max_body_mb, device) -> None:
    """KServe v2 (Open Inference Protocol) REST server for BUNDLE folders ([NAME=]PATH) and/or --repo DIR.

    POST /v2/models/NAME/infer with the IR's input (FP32 [N, 3, H, W]) or encoded images (image_bytes, BYTES);
    outputs score, decision, map_max and, on request, map. /metrics: Prometheus. Needs the extra .[serve]."""
    try:
        from ssn_edge.serve.registry import ServeOptions, build_registry
        from ssn_edge.serve.server import serve as run_server
    except ImportError as exc:
        raise ValueError(f"serve needs the serving extra: pip install 'ssn-edge[serve]' ({exc})") from None

    options = ServeOptions(precision=precision, queue_size=queue_size, timeout_s=timeout_s, max_body_mb=max_body_mb, device=device)
    registry = build_registry(list(bundles), repo_dir, options)
    for name, versions in registry.models.items():
        for v, entry in sorted(versions.items()):
            click.echo(f"model {name} version {v}: {entry.bundle.path} ({entry.precision}, runs {entry.engine.inference_precision})")
    click.echo(f"listening on http://{host}:{port} (KServe v2 REST; Ctrl-C stops)")
    run_server(registry, options, host, port)


@main.group("repo")
def repo() -> None:
    """Model repository in OpenVINO Model Server's layout (NAME/VERSION/model.xml + config.json)."""


@repo.command("add")
@click.argument("repo_dir", type=click.Path(file_okay=False))
@click.argument("bundle", type=click.Path())
@click.option("--name", required=True, help="The model's name in the repository (and in KServe URLs).")
@click.option("--precision", default=None, type=click.Choice(["fp32", "fp16", "int8", "int8_acc"]),
              help="The bundle precision the version holds (default: int8 if present, else fp32).")
def repo_add(repo_dir, bundle, name, precision) -> None:
    """Add BUNDLE to REPO_DIR as a new version of model NAME; rewrites REPO_DIR/config.json for OVMS."""
    from ssn_edge.serve.repository import CONFIG, add_bundle

    added = add_bundle(Path(repo_dir), Path(bundle), name, precision)
    click.echo(f"{added.name} version {added.version}: {added.path}")
    click.echo(f"OVMS config: {Path(repo_dir) / CONFIG}")


@main.command("train-many")
@click.argument("plan_file", type=click.Path(dir_okay=False))
@click.option("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or auto); default: a local Ray for this run.")
@click.option("--num-cpus", default=None, type=click.IntRange(min=1), help="CPUs of the local Ray (default: all).")
@click.option("--repo", "repo_dir", default=None, type=click.Path(file_okay=False), help="Model repository (default: the plan's repo).")
@click.option("--force", multiple=True, metavar="NAME", help="Train this job again even if finished (repeatable).")
def train_many(plan_file, address, num_cpus, repo_dir, force) -> None:
    """Train and export every job of PLAN_FILE as Ray tasks; bundles go to the model repository. Jobs finished
    by an earlier run with the same plan entry are kept. Exit status 3 when a job failed. Needs .[fleet]."""
    from ssn_edge.fleet.plan import load_plan

    import importlib.util

    plan = load_plan(plan_file, repo_dir)
    if importlib.util.find_spec("ray") is None:
        raise ValueError("train-many needs Ray: pip install 'ssn-edge[fleet]'")
    from ssn_edge.fleet.run import summary_table, train_many as run_plan

    def show(outcome) -> None:
        where = f"version {outcome.version}" if outcome.version is not None else outcome.error
        click.echo(f"{outcome.name}: {outcome.status} ({where})")

    outcomes = run_plan(plan, address=address, num_cpus=num_cpus, force=force, on_outcome=show)
    click.echo(summary_table(outcomes))
    click.echo(f"repository: {plan.repo}")
    if any(o.status == "failed" for o in outcomes):
        sys.exit(3)


if __name__ == "__main__":
    main()
