"""The report page: one self-contained HTML file (inline CSS, figures as data: URIs, no scripts, no external
assets), from the records, the figures and the bundle's typed metadata."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.report.bunching import NEAR_THRESHOLD_LOGITS
from ssn_edge.report.reference import compared_row
from ssn_edge.report.variants import Variant
from ssn_edge.runtime.bundle import Bundle
from ssn_edge.runtime.schema import (SCHEMA_VERSION, CalibrationInfo, CollapseCheck, ModelEntry, Supervision, Thresholds,
                                    Tiling)


@dataclass
class Figures:
    """Inline PNGs (data: URIs) and what the page says about them; None: not drawn."""

    roc: str | None = None
    pr: str | None = None
    scatter: str | None = None
    scatter_title: str = ""
    flip_table: str = ""
    heatmaps: str | None = None
    heatmap_note: str = ""


@dataclass
class ReportInfo:
    """What the report ran on and how."""

    dataset: str
    data_path: str
    split: str
    n_images: int
    n_defective: int
    reference: str
    runs: int
    throughput_note: str
    generated: str
    device: str
    warnings: list[str] = field(default_factory=list)


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
    ("near_threshold_fraction", "near threshold %", "{:.0%}"),
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
            bunched = key == "near_threshold_fraction" and rec.get("scores_bunched")
            if (key == "flips" and rec.get("flips")) or bunched:
                cls = "bad"
            cells.append(f'<td class="{cls}">{_cell(rec.get(key), fmt)}</td>' if cls else f"<td>{_cell(rec.get(key), fmt)}</td>")
        rows.append(f'<tr class="ref">{"".join(cells)}</tr>' if rec.get("is_reference") else f"<tr>{''.join(cells)}</tr>")
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def flip_table(arrays: ArraySet, ref: Variant, other: Variant, flipped: np.ndarray, threshold: float) -> str:
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


def map_text(gate: str) -> str:
    if gate == "score":
        return ("log(sigmoid(map) x sigmoid(score)): the pixel's defect probability times the image's "
                "(model.map_gate score)")
    return "segmentation logits (model.map_gate none)"


def supervision_text(sup: Supervision | None) -> str:
    if sup is None:
        return "not recorded (checkpoint from before ssn-edge recorded it)"
    text = (f"{sup.normal} normal, {sup.with_mask} defective with mask, {sup.label_only} defective "
            f"with image label only, {sup.ignored} defective ignored; setting "
            f"{'inferred from the data' if sup.source == 'data' else 'from the recipe'}")
    if sup.mask_fraction < 1.0:
        text += f"; masks kept on a fraction {sup.mask_fraction:g} of the annotated defects"
    if sup.pasted:
        text += f"; {sup.pasted} training images made by pasting a masked defect onto a normal image"
    return text


def collapse_text(check: CollapseCheck | None) -> str:
    if check is None:
        return "not run (tiled or knn model, no held-out normal images, or trained before ssn-edge checked)"
    return check.message


def int8_check_text(models: dict[str, ModelEntry]) -> str | None:
    """Export's INT8 check of each INT8 model (None: the bundle has no INT8 model)."""
    quantized = {p: e for p, e in models.items() if e.weights_precision == "int8"}
    if not quantized:
        return None
    return "; ".join(f"{p}: {e.check.message}" if e.check is not None else
                     f"{p}: not run (no held-out normal images, or exported before ssn-edge checked)"
                     for p, e in quantized.items())


def quantization_text(models: dict[str, ModelEntry]) -> str | None:
    """How each INT8 model was quantized, so a reader of the report knows what the INT8 check measured."""
    parts = []
    for p, e in models.items():
        q = e.quantization
        if q is None:
            continue
        offset = f"{q.score_offset_value:+.4f} logits" if q.score_offset_value is not None else "off"
        parts.append(f"{p}: {q.activation_range} activation ranges, {q.bias_correction} bias correction, score "
                     f"offset {offset}, segmentation head {'float' if q.float_map else 'INT8'}")
    return "; ".join(parts) or None


def tiling_text(tiling: Tiling | None) -> str:
    if tiling is None:
        return "none (whole image at the input size)"
    t = tiling.config
    size = list(t.image_size) if t.image_size else None
    return (
        f"{t.mode} ({t.locations} model(s)), tiles {list(t.tile)} stride {list(t.stride)}, "
        f"graph '{t.graph}', images {'resized to ' + str(size) if size else 'at their own size'}, "
        f"score {t.score}, seams sigma {t.seam_sigma} over {t.seam_halfwidth} of a tile; heads trained on "
        f"{tiling.heads_trained_on.replace('_', ' ')}"
    )


def thresholds_text(thr: Thresholds) -> tuple[str, str]:
    """(the thresholds, where they came from)."""
    values = f"image {thr.image:.6g} (sigmoid score), pixel {thr.pixel:.6g} (map value)"
    if thr.review is not None:
        values += f", review {thr.review:.6g} (score in [review, image): review)"
    if thr.source == "held_out_normal":
        source = (f"{thr.max_false_alarm:g} target false-alarm rate (pixels: {thr.max_false_alarm_pixel:g}) on "
                  f"{thr.data or '?'}, never trained on, FP32 outputs")
    else:
        source = (f"{thr.method} (pixel: {thr.pixel_method}) on the '{thr.source or '?'}' split of {thr.data or '?'} "
                  f"({thr.count if thr.count is not None else '?'} images), FP32 outputs")
        if thr.source == "test":
            source += ": chosen explicitly (--threshold-from test-f1); test numbers are optimistic"
    if thr.held_out:
        source += (f"; false alarms on the {thr.held_out} held-out normal images: {100 * thr.false_alarm:.1f} % "
                   f"of images, {100 * thr.pixel_false_alarm:.3f} % of pixels")
    elif thr.source != "held_out_normal":
        source += "; no held-out normal images (trained on all of them): false-alarm rate unknown"
    return values, source


def calibration_text(calib: CalibrationInfo | None) -> str:
    if calib is None:
        return "none (no INT8 model)"
    s = calib.spec
    return (f"{calib.count} images (source {s.source}" + (f" {s.path}" if s.path else "")
            + f", size {s.size}, seed {s.seed}, synthetic defects on {s.defects:g} of them)")


def metadata_items(bundle: Bundle, info: ReportInfo) -> list[tuple[str, Any]]:
    meta, prov = bundle.metadata, bundle.metadata.provenance
    thr_values, thr_source = thresholds_text(meta.thresholds)
    src = prov.source_checkpoint
    version = f"{bundle.schema_version}" + (
        f" (read as v{SCHEMA_VERSION})" if bundle.schema_version != SCHEMA_VERSION else "")
    return [
        ("bundle", str(bundle.path)),
        ("bundle schema", f"ssn-edge-bundle v{version}"),
        ("created", prov.created),
        ("ssn-edge version", prov.ssn_edge_version),
        ("model kind", prov.model_kind),
        ("models", ", ".join(bundle.precisions)),
        ("input", f"{bundle.input_size[0]}x{bundle.input_size[1]} {meta.input.layout}"),
        ("thresholds", thr_values),
        ("threshold source", thr_source),
        ("calibration set", calibration_text(meta.calibration)),
        ("backbone", prov.backbone.name),
        ("backbone weights", prov.backbone.weights_source),
        ("backbone fingerprint", prov.backbone.fingerprint),
        ("recipe", prov.recipe.get("name")),
        ("setting", prov.setting),
        ("map output", map_text(bundle.map_gate)),
        ("training data", supervision_text(meta.supervision)),
        ("collapse check", collapse_text(meta.collapse_check)),
        ("INT8 quantization", quantization_text(meta.models)),
        ("INT8 check", int8_check_text(meta.models)),
        ("tiling", tiling_text(meta.tiling)),
        ("source checkpoint", f"{src.name} (epoch {src.epoch}, sha256 {str(src.sha256)[:16]}...)" if src else None),
        ("report data", f"{info.data_path} (split '{info.split}', {info.n_images} images, "
                        f"{info.n_defective} defective)"),
        ("reference", info.reference),
        ("device", info.device),
    ]


def _figure_sections(figures: Figures) -> list[str]:
    parts = []
    if figures.roc is not None:
        parts += [
            "<h2>ROC and precision-recall curves (image scores)</h2>",
            f'<div class="figs"><img alt="ROC curves" src="{figures.roc}"><img alt="precision-recall curves" '
            f'src="{figures.pr}"></div>',
        ]
    if figures.scatter is not None:
        parts += [
            f"<h2>{html.escape(figures.scatter_title)}</h2>",
            f'<div class="figs"><img alt="score scatter" src="{figures.scatter}">'
            f'<div class="side">{figures.flip_table}</div></div>',
        ]
    if figures.heatmaps is not None:
        parts += [
            "<h2>Example anomaly maps</h2>",
            f'<p class="note">{html.escape(figures.heatmap_note)}</p>',
            f'<img class="wide" alt="example heatmaps" src="{figures.heatmaps}">',
        ]
    return parts


_BASELINE_KEYS = ("image_auroc", "image_ap", "pixel_aupro", "pixel_ap", "latency_ms", "file_mb")
_BASELINE_COLUMNS = tuple(c for c in _TABLE_COLUMNS if c[0] in _BASELINE_KEYS)


def baseline_section(records: Sequence[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """This bundle's OpenVINO FP32 row beside the memory-bank baseline fitted on the same training images."""
    own = compared_row(records)
    head = "<th>model</th>" + "".join(f"<th>{html.escape(t)}</th>" for _, t, _ in _BASELINE_COLUMNS)

    def row(name: str, rec: dict[str, Any]) -> str:
        cells = "".join(f"<td>{_cell(rec.get(k), f)}</td>" for k, _, f in _BASELINE_COLUMNS)
        return f'<tr><td class="txt">{html.escape(name)}</td>{cells}</tr>'

    fit = f"{baseline['fit_s']:.0f} s" if baseline.get("fit_s") is not None else "?"
    own_name = f"this bundle ({own.get('runtime')} {own.get('precision')})"
    return [
        "<h2>Memory-bank baseline</h2>",
        f'<div class="tablewrap"><table><tr>{head}</tr>'
        f'{row(own_name, own)}'
        f'{row("knn baseline (OpenVINO fp32)", baseline)}</table></div>',
        f'<p class="note">The nearest-neighbour model (PatchCore-style, default settings, bank of '
        f'{baseline.get("bank", "?")} patches) fitted in {fit} on the normal images of this bundle\'s training split '
        "at its input size and scored on the same images as above. A model below it has not learned what a "
        "one-minute baseline finds on this data.</p>",
    ]


def render_html(bundle: Bundle, records: Sequence[dict[str, Any]], figures: Figures, info: ReportInfo,
                baseline: dict[str, Any] | None = None) -> str:
    prov = bundle.metadata.provenance
    title = f"ssn-edge report: {info.dataset} ({prov.backbone.name}, {prov.setting or '?'})"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">Bundle <code>{html.escape(str(bundle.path))}</code> on split <code>{html.escape(info.split)}'
        f"</code> of <code>{html.escape(str(info.data_path))}</code>, generated {html.escape(info.generated)}.</p>",
    ]
    parts += [f'<p class="warning">{html.escape(w)}</p>' for w in info.warnings]
    parts += [
        "<h2>Summary</h2>",
        _table(records),
        f'<p class="note">Reference (highlighted): {html.escape(info.reference)}. Δscore: |sigmoid score − reference '
        f"score| per image. Flips: images whose decision at the bundle's image threshold "
        f"({bundle.image_threshold:.4g}) differs from the reference's. Near threshold: images scored within "
        f"{NEAR_THRESHOLD_LOGITS:g} logits of it (red: bunched). Latency: batch 1, median of {info.runs} runs; "
        f"throughput: {html.escape(info.throughput_note)}. Metrics in percent. "
        "bf16 is the FP32 IR executed with a bf16 inference-precision hint.</p>",
    ]
    if baseline is not None:
        parts += baseline_section(records, baseline)
    parts += _figure_sections(figures)
    parts += ["<h2>Metadata</h2>", _meta_list(metadata_items(bundle, info)), "</body></html>"]
    return "\n".join(parts) + "\n"
