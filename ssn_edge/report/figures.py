"""The report's figures, each a matplotlib Figure rendered to an inline PNG (data: URI): ROC and PR curves of the
image scores, the score scatter of two variants, example anomaly maps."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.report.variants import Variant
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD


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
