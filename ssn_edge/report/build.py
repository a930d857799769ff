"""Accuracy and speed report for a bundle: every precision against the FP32 reference, in one self-contained page.

For the PyTorch FP32 model (when torch and the training checkpoint are at hand) and each OpenVINO variant of the
bundle (fp32 at an f32 hint, bf16 = the fp32 IR at a bf16 hint where the CPU has native BF16, fp16, int8,
int8_acc), on one split of a dataset:

* image AUROC/AP and pixel AUPRO/AP, through the shared post-processing (``anomaly_map``, ``sigmoid``) and
  ``ssn_edge.evaluation.metrics``, i.e. exactly what training-time evaluation and the runtime compute;
* how far each variant's image scores move from the reference (max and mean |difference| of the sigmoid
  scores) and how many images change decision at the bundle's image threshold ("flips");
* batch-1 median latency and throughput (``ssn_edge.runtime.bench``), IR size.

The reference is PyTorch FP32 when available, else OpenVINO FP32: the report runs torch-free on a factory PC.
Outputs: ``report.json`` (a list of flat records, one per variant) and ``report.html`` (one file: inline CSS,
figures as base64 PNG, no scripts, no external assets). Both are written to a temporary file and renamed.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.evaluation.metrics import evaluate_arrays
from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import Bundle, load_bundle, sha256_file
from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA, anomaly_map, sigmoid
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("ssn_edge")

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
RECORD_KEYS = (
    "dataset",
    "backbone",
    "setting",
    "runtime",
    "precision",
    "inference_precision_hint",
    "image_auroc",
    "image_ap",
    "pixel_aupro",
    "pixel_ap",
    "score_max_abs_diff",
    "score_mean_abs_diff",
    "flips",
    "flip_fraction",
    "latency_ms",
    "throughput_ips",
    "file_mb",
)
# OpenVINO variants in report order; "bf16" is the fp32 IR executed at a bf16 inference-precision hint.
OPENVINO_VARIANTS = ("fp32", "bf16", "fp16", "int8", "int8_acc")
RANDOM_BACKBONE_WARNING = (
    "WARNING: this model was trained on a RANDOM (not ImageNet-pretrained) backbone: "
    "its accuracy is not representative of SuperSimpleNet."
)


@dataclass
class Variant:
    """One way of running the model, and its outputs on the report's images."""

    runtime: str  # "torch" | "openvino"
    precision: str  # fp32 | bf16 | fp16 | int8 | int8_acc
    hint: str  # inference precision hint asked for
    raw_maps: np.ndarray  # (N, h, w) map logits
    logits: np.ndarray  # (N,) score logits
    inference_precision: str | None = None  # what the compiled model reports using
    scores: np.ndarray = field(init=False)
    maps: np.ndarray | None = field(default=None, init=False)

    @property
    def label(self) -> str:
        return f"{'PyTorch' if self.runtime == 'torch' else 'OpenVINO'} {self.precision.upper()}"


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def torch_available() -> bool:
    """True when PyTorch can be imported here (a factory PC usually has none)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def default_out_dir(bundle_path: str | Path) -> Path:
    """Beside the bundle, not inside it: a bundle's directory holds only what its metadata lists."""
    bundle_path = Path(bundle_path)
    return bundle_path.parent / f"{bundle_path.name}_report"


def is_random_backbone(metadata: dict[str, Any]) -> bool:
    backbone = metadata.get("backbone") or {}
    source = str(backbone.get("weights_source", ""))
    pretrained = ((metadata.get("recipe") or {}).get("model") or {}).get("pretrained", True)
    return source.startswith("random") or pretrained is False


def _dataset_name(data_path: str) -> str:
    p = Path(data_path)
    if p.suffix.lower() == ".csv":
        p = p.parent
    return p.name or str(data_path)


# --------------------------------------------------------------------------------------------------------------
# Running the variants
# --------------------------------------------------------------------------------------------------------------


def _openvino_outputs(engine, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    maps, logits = [], []
    for start in range(0, len(images), batch_size):
        m, s = engine.infer_raw(images[start : start + batch_size])
        maps.append(m)
        logits.append(s)
    return np.concatenate(maps), np.concatenate(logits)


def openvino_variants(bundle: Bundle, device: str = "CPU") -> list[str]:
    """The OpenVINO variants this bundle and device allow, in report order."""
    from ssn_edge.runtime.engine import device_supports_bf16

    have = set(bundle.precisions)
    out = []
    for name in OPENVINO_VARIANTS:
        if name == "bf16":
            if "fp32" in have and device_supports_bf16(device):
                out.append(name)
        elif name in have:
            out.append(name)
    return out


def check_checkpoint_matches(checkpoint: Path, bundle: Bundle) -> None:
    """Refuse a reference checkpoint that is not the file the bundle was exported from (by sha256)."""
    source = bundle.metadata.get("source_checkpoint") or {}
    expected = source.get("sha256")
    if expected and sha256_file(checkpoint) != expected:
        raise ValueError(
            f"{checkpoint}: not the checkpoint this bundle was exported from "
            f"(bundle records {source.get('name')!r} with sha256 {expected[:12]}...); "
            "pass that checkpoint, or none to use OpenVINO FP32 as the reference"
        )


def torch_variant(
    checkpoint: Path, images: np.ndarray, weights: str | None, runs: int, throughput_seconds: float,
    map_gate: str | None = None,
) -> tuple[Variant, dict[str, Any]]:
    """PyTorch FP32 outputs of the checkpoint, and its batch-1 latency / throughput; map_gate: the bundle's."""
    import torch

    from ssn_edge.evaluation.evaluate import predict_raw, torch_latency_ms
    from ssn_edge.model.load import model_from_checkpoint

    model, _recipe, _state = model_from_checkpoint(Path(checkpoint), weights, map_gate)
    raw_maps, logits = predict_raw(model, images, batch_size=8)
    timing: dict[str, Any] = {"latency_ms": None, "throughput_ips": None, "file_mb": None}
    x1 = torch.from_numpy(np.ascontiguousarray(images[:1]))
    timing["latency_ms"] = torch_latency_ms(model, x1, warmup=3, runs=runs)
    with torch.no_grad():
        if throughput_seconds > 0:
            xb = torch.from_numpy(np.ascontiguousarray(np.repeat(images[:1], 8, axis=0)))
            done, t0 = 0, time.perf_counter()
            while True:
                model(xb)
                done += len(xb)
                if time.perf_counter() - t0 >= throughput_seconds:
                    break
            timing["throughput_ips"] = done / (time.perf_counter() - t0)
    # The checkpoint holds the heads only (the backbone comes from its weights file): report the
    # FP32 size of the whole inference graph instead, comparable with the IR files.
    timing["file_mb"] = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    variant = Variant("torch", "fp32", "f32", raw_maps, logits, inference_precision="f32")
    return variant, timing


def torch_tiled_variant(checkpoint: Path, images: np.ndarray, weights: str | None, runs: int,
                        map_gate: str | None = None) -> tuple[Variant, dict[str, Any]]:
    """PyTorch FP32 of a tiled checkpoint: its tiles' outputs merged by the runtime's own merge."""
    import torch

    from ssn_edge.evaluation.evaluate import merged_predictions, predict_tiled_raw

    from ssn_edge.model.load import tiled_from_checkpoint

    model, _recipe, _state = tiled_from_checkpoint(Path(checkpoint), weights, map_gate=map_gate)
    graph = "tiles" if model.tiling.graph == "tile" else model.tiling.graph
    raw, logits = predict_tiled_raw(model, images, graph)
    v = Variant("torch", "fp32", "f32", np.empty(0), np.empty(0), inference_precision="f32")
    v.scores, v.maps = merged_predictions(model.tiling, raw, logits)
    times = []
    for _ in range(max(1, min(runs, 10))):
        t0 = time.perf_counter()
        with torch.no_grad():
            predict_tiled_raw(model, images[:1], graph)
        times.append((time.perf_counter() - t0) * 1e3)
    timing = {"latency_ms": float(np.median(times)), "throughput_ips": None,
              "file_mb": sum(p.numel() * 4 for p in model.parameters()) / 1e6}
    return v, timing


# --------------------------------------------------------------------------------------------------------------
# Metrics and comparison
# --------------------------------------------------------------------------------------------------------------


def variant_metrics(arrays: ArraySet, scores: np.ndarray, maps: np.ndarray) -> dict[str, float | None]:
    """Image AUROC/AP (need both classes) and pixel AUPRO/AP (need defect masks); None where undefined."""
    out: dict[str, float | None] = {"image_auroc": None, "image_ap": None, "pixel_aupro": None, "pixel_ap": None}
    if len(set(arrays.labels.tolist())) < 2:
        return out
    result = evaluate_arrays(arrays, scores, maps)
    for key in out:
        if key in result:
            out[key] = float(result[key])
    return out


def compare_scores(scores: np.ndarray, reference: np.ndarray, threshold: float) -> dict[str, Any]:
    """|score - reference| statistics and decision flips at the image threshold (defective: score >= t)."""
    diff = np.abs(scores.astype(np.float64) - reference.astype(np.float64))
    flipped = (scores >= threshold) != (reference >= threshold)
    n = len(scores)
    return {
        "score_max_abs_diff": float(diff.max()) if n else 0.0,
        "score_mean_abs_diff": float(diff.mean()) if n else 0.0,
        "flips": int(flipped.sum()),
        "flip_fraction": float(flipped.sum() / n) if n else 0.0,
        "flipped": flipped,
    }


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_to_data_uri(fig) -> str:
    """A matplotlib Figure as a data: URI (PNG, base64)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1)))


def curves_figures(labels: np.ndarray, variants: Sequence[Variant]) -> dict[str, str]:
    """ROC and precision-recall curves of the image scores, all variants on one plot each."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    if len(set(labels.tolist())) < 2:
        return {}
    roc = _figure(5.6, 4.6)
    pr = _figure(5.6, 4.6)
    ax_roc, ax_pr = roc.add_subplot(), pr.add_subplot()
    for i, v in enumerate(variants):
        style = _LINESTYLES[i % len(_LINESTYLES)]
        fpr, tpr, _ = roc_curve(labels, v.scores)
        ax_roc.plot(fpr, tpr, linestyle=style, linewidth=1.6, label=f"{v.label} (AUC {100 * auc(fpr, tpr):.1f})")
        precision, recall, _ = precision_recall_curve(labels, v.scores)
        ax_pr.step(recall, precision, where="post", linestyle=style, linewidth=1.6, label=v.label)
    ax_roc.plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="Image ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.axhline(labels.mean(), color="0.7", linewidth=0.8)
    ax_pr.set(xlabel="recall", ylabel="precision", title="Image precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "lower left")
    return {"roc": figure_to_data_uri(roc), "pr": figure_to_data_uri(pr)}


def scatter_figure(
    labels: np.ndarray, ref: Variant, other: Variant, flipped: np.ndarray, threshold: float
) -> str:
    """Reference score vs other score per image; threshold lines; flipped images ringed in red."""
    fig = _figure(5.6, 5.0)
    ax = fig.add_subplot()
    normal, defect = labels == 0, labels == 1
    ax.scatter(ref.scores[normal], other.scores[normal], s=22, marker="o", color="tab:blue", alpha=0.75, label="normal")
    ax.scatter(ref.scores[defect], other.scores[defect], s=26, marker="^", color="tab:orange", alpha=0.75, label="defective")
    if flipped.any():
        ax.scatter(
            ref.scores[flipped], other.scores[flipped], s=120, facecolors="none", edgecolors="red", linewidths=1.8,
            label=f"decision flipped ({int(flipped.sum())})",
        )
    lo = float(min(ref.scores.min(), other.scores.min(), threshold))
    hi = float(max(ref.scores.max(), other.scores.max(), threshold))
    pad = max(1e-3, 0.05 * (hi - lo))
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="0.6", linewidth=0.8, label="y = x")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.0, label=f"image threshold {threshold:.4g}")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1.0)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"{ref.label} score", ylabel=f"{other.label} score")
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return figure_to_data_uri(fig)


def _display_image(image: np.ndarray) -> np.ndarray:
    """A prepared (3, H, W) input back to (H, W, 3) RGB in [0, 1]."""
    return np.clip(image.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def pick_examples(arrays: ArraySet, flipped: np.ndarray | None, ref_scores: np.ndarray, count: int = 4) -> list[int]:
    """Images to show: decision flips first, then the most and least anomalous defective images, then the
    most anomalous normal one (where a false alarm would come from)."""
    chosen: list[int] = []

    def add(indices) -> None:
        for i in indices:
            if len(chosen) >= count:
                return
            if int(i) not in chosen:
                chosen.append(int(i))

    if flipped is not None:
        add(np.flatnonzero(flipped)[: max(1, count // 2)])
    defect = np.flatnonzero(arrays.labels == 1)
    normal = np.flatnonzero(arrays.labels == 0)
    if len(defect):
        order = defect[np.argsort(-ref_scores[defect])]
        add(order[:1])
        add(order[-1:])
    if len(normal):
        add(normal[np.argsort(-ref_scores[normal])][:1])
    add(defect[np.argsort(-ref_scores[defect])] if len(defect) else [])
    add(range(len(arrays)))
    return chosen


def heatmaps_figure(
    arrays: ArraySet,
    indices: Sequence[int],
    ref: Variant,
    other: Variant | None,
    pixel_threshold: float,
    display_range: tuple[float, float],
) -> str:
    """Rows of: image, reference map, other (INT8) map, ground-truth mask; maps on one shared colour scale."""
    columns = ["image", f"{ref.label} map"] + ([f"{other.label} map"] if other is not None else []) + ["mask"]
    rows = len(indices)
    fig = _figure(2.3 * len(columns) + 0.8, 2.35 * rows + 0.3)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    lo, hi = display_range
    im = None
    for r, i in enumerate(indices):
        name = Path(arrays.paths[i])
        title = f"{name.parent.name}/{name.name}" if name.parent.name else name.name
        panels: list[tuple[str, Any]] = [("image", _display_image(arrays.images[i]))]
        panels.append(("map", (ref.maps[i], ref.scores[i])))
        if other is not None:
            panels.append(("map", (other.maps[i], other.scores[i])))
        panels.append(("mask", arrays.masks[i]))
        for c, (kind, data) in enumerate(panels):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if kind == "image":
                ax.imshow(data)
                ax.set_ylabel(title, fontsize=8)
            elif kind == "map":
                m, score = data
                im = ax.imshow(m, cmap="jet", vmin=lo, vmax=hi)
                if (m >= pixel_threshold).any() and (m < pixel_threshold).any():
                    ax.contour(m >= pixel_threshold, levels=[0.5], colors="white", linewidths=0.8)
                ax.set_xlabel(f"score {score:.3f}", fontsize=8)
            else:
                valid = bool(arrays.mask_valid[i])
                ax.imshow(data, cmap="gray", vmin=0, vmax=1)
                if arrays.labels[i] == 1 and not valid:
                    ax.set_xlabel("no mask", fontsize=8)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes, shrink=0.6, location="right")
        cbar.set_label("map logit (white contour: pixel threshold)", fontsize=8)
    return figure_to_data_uri(fig)


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1d2329; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #d8dde3; padding-bottom: 4px; }
.sub { color: #5b6672; margin-top: 0; }
.warning { background: #fff3cd; border: 1px solid #e0b400; color: #5c4400; padding: 8px 12px; border-radius: 4px;
           font-weight: 600; margin: 12px 0; }
.note { color: #5b6672; font-size: 0.9em; }
.tablewrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.86em; }
th, td { border: 1px solid #d8dde3; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #eef1f4; text-align: center; white-space: normal; vertical-align: bottom; min-width: 3.5em; }
th.nw { white-space: nowrap; }
td.txt { text-align: left; }
tr.ref td { background: #eef6ff; font-weight: 600; }
td.bad { color: #b00020; font-weight: 600; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.figs img, img.wide { max-width: 100%; height: auto; border: 1px solid #e4e8ec; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; font-size: 0.9em; }
dl.meta dt { font-weight: 600; color: #3b4650; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.side { flex: 1 1 320px; min-width: 280px; }
.side table { font-size: 0.82em; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.95em; }
"""

_TABLE_COLUMNS = (
    ("runtime", "runtime", None),
    ("precision", "precision", None),
    ("inference_precision_hint", "hint", None),
    ("image_auroc", "image AUROC", "{:.2f}"),
    ("image_ap", "image AP", "{:.2f}"),
    ("pixel_aupro", "pixel AUPRO", "{:.2f}"),
    ("pixel_ap", "pixel AP", "{:.2f}"),
    ("score_max_abs_diff", "max |Δscore|", "{:.2e}"),
    ("score_mean_abs_diff", "mean |Δscore|", "{:.2e}"),
    ("flips", "flips", "{:d}"),
    ("flip_fraction", "flip %", "{:.1%}"),
    ("latency_ms", "latency ms (batch 1, median)", "{:.2f}"),
    ("throughput_ips", "throughput img/s", "{:.1f}"),
    ("file_mb", "size MB", "{:.2f}"),
)


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "–"
    if fmt is None:
        return html.escape(str(value))
    try:
        return html.escape(fmt.format(value))
    except (ValueError, TypeError):
        return html.escape(str(value))


def _table(records: Sequence[dict[str, Any]]) -> str:
    # "|Δscore|" would break after its "|": keep such titles on one line.
    head = "".join(
        f'<th class="nw">{html.escape(title)}</th>' if "|" in title else f"<th>{html.escape(title)}</th>"
        for _, title, _ in _TABLE_COLUMNS
    )
    rows = []
    for rec in records:
        cells = []
        for key, _, fmt in _TABLE_COLUMNS:
            cls = "txt" if fmt is None else ""
            if key == "flips" and rec.get("flips"):
                cls = "bad"
            cells.append(f'<td class="{cls}">{_cell(rec.get(key), fmt)}</td>' if cls else f"<td>{_cell(rec.get(key), fmt)}</td>")
        rows.append(f'<tr class="ref">{"".join(cells)}</tr>' if rec.get("is_reference") else f"<tr>{''.join(cells)}</tr>")
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _flip_table(arrays: ArraySet, ref: Variant, other: Variant, flipped: np.ndarray, threshold: float) -> str:
    """The images whose decision differs between ref and other (ringed red in the scatter plot)."""
    idx = np.flatnonzero(flipped)
    head = (
        f"<p><b>{len(idx)}</b> of {len(flipped)} images change decision at the image threshold "
        f"{threshold:.4g} ({html.escape(other.label)} vs {html.escape(ref.label)}).</p>"
    )
    if not len(idx):
        return head
    rows = []
    for i in idx[:50]:
        p = Path(arrays.paths[i])
        name = f"{p.parent.name}/{p.name}"
        truth = "defective" if arrays.labels[i] else "normal"
        was = "defective" if ref.scores[i] >= threshold else "ok"
        now = "defective" if other.scores[i] >= threshold else "ok"
        rows.append(
            f'<tr><td class="txt">{html.escape(name)}</td><td class="txt">{truth}</td>'
            f"<td>{ref.scores[i]:.4f} ({was})</td><td>{other.scores[i]:.4f} ({now})</td></tr>"
        )
    more = f'<p class="note">... and {len(idx) - 50} more.</p>' if len(idx) > 50 else ""
    return (
        head + f'<table><thead><tr><th>image</th><th>truth</th><th>{html.escape(ref.label)}</th>'
        f"<th>{html.escape(other.label)}</th></tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"
    )


def _meta_list(items: Sequence[tuple[str, Any]]) -> str:
    out = []
    for key, value in items:
        if value is None or value == "":
            value = "–"
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        out.append(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(str(value))}</dd>")
    return f'<dl class="meta">{"".join(out)}</dl>'


def _map_text(gate: str) -> str:
    if gate == "score":
        return ("log(sigmoid(map) x sigmoid(score)): the pixel's defect probability times the image's "
                "(model.map_gate score)")
    return "segmentation logits (model.map_gate none)"


def _supervision_text(sup: dict | None) -> str:
    if not sup:
        return "not recorded (checkpoint from before ssn-edge recorded it)"
    text = (f"{sup.get('normal')} normal, {sup.get('with_mask')} defective with mask, {sup.get('label_only')} defective "
            f"with image label only, {sup.get('ignored')} defective ignored; setting "
            f"{'inferred from the data' if sup.get('source') == 'data' else 'from the recipe'}")
    if sup.get("mask_fraction", 1.0) < 1.0:
        text += f"; masks kept on a fraction {sup['mask_fraction']:g} of the annotated defects"
    if sup.get("pasted"):
        text += f"; {sup['pasted']} training images made by pasting a masked defect onto a normal image"
    return text


def _tiling_text(tiling: dict[str, Any] | None) -> str:
    if not tiling:
        return "none (whole image at the input size)"
    size = tiling.get("image_size")
    return (
        f"{tiling.get('mode')} ({tiling.get('locations')} model(s)), tiles {tiling.get('tile')} stride {tiling.get('stride')}, "
        f"graph '{tiling.get('graph')}', images {'resized to ' + str(size) if size else 'at their own size'}, "
        f"score {tiling.get('score')}, seams sigma {tiling.get('seam_sigma')} over {tiling.get('seam_halfwidth')} of a tile"
    )


def metadata_items(bundle: Bundle, info: dict[str, Any]) -> list[tuple[str, Any]]:
    meta = bundle.metadata
    thr = meta.get("thresholds", {})
    calib = meta.get("calibration") or {}
    backbone = meta.get("backbone") or {}
    recipe = meta.get("recipe") or {}
    source = meta.get("source_checkpoint") or {}
    thr_source = thr.get("source")
    def num(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)

    thr_text = f"image {num(thr.get('image'))} (sigmoid score), pixel {num(thr.get('pixel'))} (map logit)"
    thr_from = (
        f"{thr.get('method', '?')} (pixel: {thr.get('pixel_method', '?')}) on the '{thr_source}' split of "
        f"{thr.get('data', '?')} ({thr.get('images', '?')} images), FP32 outputs"
    )
    spec = calib.get("spec") or {}
    calib_text = (
        f"{calib.get('count')} images (source {spec.get('source')}"
        + (f" {spec.get('path')}" if spec.get("path") else "")
        + f", size {spec.get('size')}, seed {spec.get('seed')})"
        if calib
        else "none (no INT8 model)"
    )
    items: list[tuple[str, Any]] = [
        ("bundle", str(bundle.path)),
        ("bundle schema", f"{meta.get('schema')} v{meta.get('schema_version')}"),
        ("created", meta.get("created")),
        ("ssn-edge version", meta.get("ssn_edge_version")),
        ("models", ", ".join(bundle.precisions)),
        ("input", f"{bundle.input_size[0]}x{bundle.input_size[1]} {meta.get('input', {}).get('layout', '')}"),
        ("thresholds", thr_text),
        ("threshold source", thr_from),
        ("calibration set", calib_text),
        ("backbone", backbone.get("name")),
        ("backbone weights", backbone.get("weights_source")),
        ("backbone fingerprint", backbone.get("fingerprint")),
        ("recipe", recipe.get("name")),
        ("setting", meta.get("setting")),
        ("map output", _map_text(bundle.map_gate)),
        ("training data", _supervision_text(meta.get("supervision"))),
        ("tiling", _tiling_text(meta.get("tiling"))),
        ("source checkpoint", f"{source.get('name')} (epoch {source.get('epoch')}, sha256 {str(source.get('sha256'))[:16]}...)"),
        ("report data", f"{info['data_path']} (split '{info['split']}', {info['n_images']} images, "
                        f"{info['n_defective']} defective)"),
        ("reference", info["reference"]),
        ("device", info.get("device")),
    ]
    return items


def render_html(
    bundle: Bundle,
    records: Sequence[dict[str, Any]],
    figures: dict[str, str],
    info: dict[str, Any],
    warnings: Sequence[str],
) -> str:
    meta = bundle.metadata
    title = f"ssn-edge report: {info['dataset']} ({meta.get('backbone', {}).get('name', '?')}, {meta.get('setting', '?')})"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">Bundle <code>{html.escape(str(bundle.path))}</code> on split <code>{html.escape(info["split"])}</code> '
        f"of <code>{html.escape(str(info['data_path']))}</code>, generated {html.escape(info['generated'])}.</p>",
    ]
    for w in warnings:
        parts.append(f'<p class="warning">{html.escape(w)}</p>')
    parts += [
        "<h2>Summary</h2>",
        _table(records),
        f'<p class="note">Reference (highlighted): {html.escape(info["reference"])}. Δscore: |sigmoid score − reference '
        f"score| per image. Flips: images whose decision at the bundle's image threshold "
        f"({bundle.image_threshold:.4g}) differs from the reference's. Latency: batch 1, median of {info['runs']} runs; "
        f"throughput: {html.escape(info['throughput_note'])}. Metrics in percent. "
        "bf16 is the FP32 IR executed with a bf16 inference-precision hint.</p>",
    ]
    if "roc" in figures:
        parts += [
            "<h2>ROC and precision-recall curves (image scores)</h2>",
            f'<div class="figs"><img alt="ROC curves" src="{figures["roc"]}"><img alt="precision-recall curves" src="{figures["pr"]}"></div>',
        ]
    if "scatter" in figures:
        parts += [
            f"<h2>{html.escape(info['scatter_title'])}</h2>",
            f'<div class="figs"><img alt="score scatter" src="{figures["scatter"]}">'
            f'<div class="side">{info.get("flip_table", "")}</div></div>',
        ]
    if "heatmaps" in figures:
        parts += [
            "<h2>Example anomaly maps</h2>",
            f'<p class="note">{html.escape(info["heatmap_note"])}</p>',
            f'<img class="wide" alt="example heatmaps" src="{figures["heatmaps"]}">',
        ]
    parts += ["<h2>Metadata</h2>", _meta_list(metadata_items(bundle, info))]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------


def build_report(
    bundle_path: str | Path,
    data_path: str | Path | None = None,
    split: str = "test",
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
    runs: int = 30,
    weights: str | None = None,
    throughput_seconds: float = 2.0,
    device: str = "CPU",
    examples: int = 4,
) -> dict[str, Any]:
    """Evaluate every variant of a bundle on ``split`` of ``data_path`` and write report.json + report.html.

    bundle_path: an exported bundle. data_path: dataset (default: the bundle recipe's data.path).
    checkpoint: the PyTorch checkpoint the bundle was exported from (checked by sha256): adds a PyTorch FP32 row,
    which then is the reference; without it (or without torch) OpenVINO FP32 is the reference.
    weights: backbone weights file for rebuilding the PyTorch model, if not where training found it.
    out_dir: default ``<bundle>_report`` beside the bundle. runs: timed batch-1 runs per variant.
    throughput_seconds: per variant (0 skips throughput). examples: heatmap rows.

    Returns {"records", "report_json", "report_html", "reference", "warnings", "out_dir"}.
    """
    from ssn_edge.evaluation.job import split_arrays
    from ssn_edge.runtime.bench import bench_bundle
    from ssn_edge.runtime.engine import Engine
    from ssn_edge.runtime.predict import map_display_range

    bundle = load_bundle(bundle_path)
    meta = bundle.metadata
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(bundle.path)
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    recipe = meta.get("recipe") or {}
    data_path = str(data_path or (recipe.get("data") or {}).get("path") or "")
    if not data_path:
        raise ValueError(f"{bundle.path}: the bundle's recipe has no data.path; pass the dataset with --data")
    tiling = meta.get("tiling")
    if tiling:  # tiled: evaluated on whole images, through the runtime's tiled path
        size = tuple(tiling.get("image_size") or (recipe.get("data") or {}).get("image_size") or bundle.input_size)
    else:
        size = bundle.input_size
    arrays = split_arrays(data_path, split, size, progress=False)
    post = meta.get("postprocess", {})
    sigma = float(post.get("blur_sigma", BLUR_SIGMA))
    kernel = int(post.get("blur_kernel", BLUR_KERNEL))
    warnings: list[str] = []
    if is_random_backbone(meta):
        warnings.append(RANDOM_BACKBONE_WARNING)
    thr = meta.get("thresholds", {})
    if thr.get("source") == split and Path(str(thr.get("data", ""))).resolve() == Path(data_path).resolve():
        warnings.append(
            f"Note: the thresholds were set on this same '{split}' split, so decision-based numbers here are optimistic."
        )

    # -- outputs of every variant ----------------------------------------------------------------------------
    variants: list[Variant] = []
    timings: dict[str, dict[str, Any]] = {}
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        if torch_available():
            check_checkpoint_matches(checkpoint, bundle)
            log.info("report: PyTorch FP32 reference from %s", checkpoint)
            # the bundle's map gate, which export may have set differently from the training recipe
            if tiling:
                v, timing = torch_tiled_variant(checkpoint, arrays.images, weights, runs, bundle.map_gate)
            else:
                v, timing = torch_variant(checkpoint, arrays.images, weights, runs, throughput_seconds, bundle.map_gate)
            variants.append(v)
            timings["torch/fp32"] = timing
        else:
            warnings.append("Note: PyTorch is not installed here: the checkpoint was not used, OpenVINO FP32 is the reference.")
    names = openvino_variants(bundle, device)
    for name in names:
        log.info("report: OpenVINO %s", name)
        engine = Engine(bundle, precision=name, device=device, mode="latency")
        if tiling:
            runner = engine.runner()
            results = [runner.run_normalized(x) for x in arrays.images]
            v = Variant("openvino", name, engine.precision_hint, np.empty(0), np.empty(0), engine.inference_precision)
            v.scores = np.array([r.score for r in results], dtype=np.float32)
            v.maps = np.stack([r.anomaly_map for r in results])
        else:
            raw_maps, logits = _openvino_outputs(engine, arrays.images)
            v = Variant("openvino", name, engine.precision_hint, raw_maps, logits, engine.inference_precision)
        variants.append(v)
        del engine
    for v in variants:
        if v.maps is None:
            v.scores = sigmoid(v.logits)
            v.maps = anomaly_map(v.raw_maps, size, sigma, kernel)
    ref = variants[0]
    reference_text = (
        f"PyTorch FP32 ({checkpoint.name})" if ref.runtime == "torch" else "OpenVINO FP32 (f32 hint)"
    )

    # -- speed ---------------------------------------------------------------------------------------------
    log.info("report: timing %s (%d runs each)", ", ".join(names), runs)
    bench = {
        r["precision"]: r
        for r in bench_bundle(bundle, precisions=names, warmup=3, runs=runs, throughput_seconds=throughput_seconds, device=device)
    }
    for name, r in bench.items():
        timings[f"openvino/{name}"] = {k: r.get(k) for k in ("latency_ms", "throughput_ips", "file_mb")}

    # -- records -------------------------------------------------------------------------------------------
    threshold = bundle.image_threshold
    dataset = _dataset_name(data_path)
    backbone = (meta.get("backbone") or {}).get("name") or (recipe.get("model") or {}).get("backbone")
    setting = meta.get("setting") or (recipe.get("train") or {}).get("setting")
    records: list[dict[str, Any]] = []
    flips_by_variant: dict[int, np.ndarray] = {}
    for k, v in enumerate(variants):
        cmp = compare_scores(v.scores, ref.scores, threshold)
        flips_by_variant[k] = cmp.pop("flipped")
        timing = timings.get(f"{v.runtime}/{v.precision}", {})
        record = {
            "dataset": dataset,
            "backbone": backbone,
            "setting": setting,
            "runtime": v.runtime,
            "precision": v.precision,
            "inference_precision_hint": v.hint,
            **variant_metrics(arrays, v.scores, v.maps),
            **cmp,
            "latency_ms": timing.get("latency_ms"),
            "throughput_ips": timing.get("throughput_ips"),
            "file_mb": timing.get("file_mb"),
            "inference_precision": v.inference_precision,
            "is_reference": k == 0,
            "images": len(arrays),
        }
        records.append(_clean(record))

    # -- figures -------------------------------------------------------------------------------------------
    figures: dict[str, str] = {}
    figures.update(curves_figures(arrays.labels, variants))
    by_name = {(v.runtime, v.precision): i for i, v in enumerate(variants)}
    ov_fp32 = by_name.get(("openvino", "fp32"))
    quant = next((by_name[("openvino", p)] for p in ("int8", "int8_acc", "fp16", "bf16") if ("openvino", p) in by_name), None)
    if quant is None and ov_fp32 is not None and ov_fp32 != 0:
        quant = ov_fp32  # only FP32 in the bundle: compare OpenVINO FP32 with PyTorch
    other = variants[quant] if quant is not None else None
    info_extra: dict[str, Any] = {}
    if other is not None:
        figures["scatter"] = scatter_figure(arrays.labels, ref, other, flips_by_variant[quant], threshold)
        info_extra["scatter_title"] = f"{other.label} vs {ref.label} image scores"
        info_extra["flip_table"] = _flip_table(arrays, ref, other, flips_by_variant[quant], threshold)
    # Heatmaps: FP32 (OpenVINO FP32 where present: the map a deployment would compare) next to INT8.
    map_ref = variants[ov_fp32] if ov_fp32 is not None else ref
    map_other = other if other is not None and other is not map_ref else None
    flipped = flips_by_variant[quant] if quant is not None else None
    indices = pick_examples(arrays, flipped, ref.scores, examples) if examples > 0 else []
    display = map_display_range(bundle)
    if display is None:
        all_maps = np.concatenate([map_ref.maps.ravel()] + ([map_other.maps.ravel()] if map_other is not None else []))
        display = (float(all_maps.min()), float(all_maps.max()) if all_maps.max() > all_maps.min() else float(all_maps.min()) + 1.0)
    if indices:
        figures["heatmaps"] = heatmaps_figure(arrays, indices, map_ref, map_other, bundle.pixel_threshold, display)
        info_extra["heatmap_note"] = (
            f"Rows: decision flips first, then the highest- and lowest-scored defective images and the highest-scored "
            f"normal image. Maps are smoothed logits on one colour scale ({display[0]:.3g} to {display[1]:.3g}); "
            f"the white contour is the bundle's pixel threshold ({bundle.pixel_threshold:.4g})."
        )

    info = {
        "dataset": dataset,
        "data_path": data_path,
        "split": split,
        "n_images": len(arrays),
        "n_defective": int(arrays.labels.sum()),
        "reference": reference_text,
        "runs": runs,
        "throughput_note": (
            f"THROUGHPUT hint, requests kept in flight for {throughput_seconds:g} s (PyTorch: batches of 8)"
            if throughput_seconds > 0
            else "not measured"
        ),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": f"{device}: {next(iter(bench.values()), {}).get('cpu', '?')}",
        **info_extra,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write(out_dir / REPORT_JSON, json.dumps(records, indent=2) + "\n")
    html_path = atomic_write(out_dir / REPORT_HTML, render_html(bundle, records, figures, info, warnings))
    return {
        "records": records,
        "report_json": json_path,
        "report_html": html_path,
        "reference": reference_text,
        "warnings": warnings,
        "out_dir": out_dir,
    }
