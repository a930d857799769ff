"""Predict on image files with a bundle: scores, decisions, predictions.json/.csv and optional heatmap overlays.

Every input image is read and checked before anything is written, so a bad file in a folder fails the run
with its name and leaves no half-written results behind. Result files are written to a temporary name and
renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import Bundle, load_bundle
from ssn_edge.runtime.engine import Engine, Prediction
from ssn_edge.runtime.postprocess import sigmoid
from ssn_edge.runtime.preprocess import ImageError, open_strips, read_image, read_image_raw
from ssn_edge.runtime.tiled import to_unit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CSV_FIELDS = ("path", "score", "decision", "latency_ms", "map_max")
# Images read (and later predicted) per chunk: bounds memory on large folders.
CHUNK = 32


def collect_images(inputs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Files as given, folders scanned for image extensions (sorted); duplicates dropped, order kept."""
    files: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            pattern = item.rglob("*") if recursive else item.iterdir()
            found = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ImageError(f"{item}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise ImageError(f"{item}: file or folder not found")
    if not files:
        raise ValueError("no input images given")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def map_display_range(bundle: Bundle) -> tuple[float, float] | None:
    """(low, high) map-logit values for the colour scale, when the bundle's normalization gives them."""
    norm = bundle.metadata.get("normalization")
    if not isinstance(norm, dict):
        return None
    candidates = [norm.get("map"), norm.get("pixel"), norm]
    for c in candidates:
        if not isinstance(c, dict):
            continue
        for lo_key, hi_key in (("min", "max"), ("map_min", "map_max"), ("pixel_min", "pixel_max")):
            if lo_key in c and hi_key in c:
                try:
                    lo, hi = float(c[lo_key]), float(c[hi_key])
                except (TypeError, ValueError):
                    continue
                if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
                    return lo, hi
    return None


def normalize_map(m: np.ndarray, pixel_threshold: float, display_range: tuple[float, float] | None) -> np.ndarray:
    """Map logits -> [0, 1] for display, the same scale for every image (never per-image min/max, which
    would paint a clean part as red as a defective one).

    With a (low, high) range from the bundle: linear and clipped. Otherwise: sigmoid(map - pixel threshold),
    so the pixel threshold sits at the middle of the colour scale (green in JET)."""
    if display_range is not None:
        lo, hi = display_range
        return np.clip((m - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return sigmoid(m - pixel_threshold)


def render_overlay(
    image: np.ndarray,
    m: np.ndarray,
    pixel_threshold: float,
    display_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """(H, W, 3) RGB image (float in [0, 1], uint8 or uint16) + (h, w) map logits -> BGR uint8 overlay: JET
    heatmap blended over the image (shrunk to the map's size when the map is a preview), with the contour of
    map >= pixel threshold drawn in white."""
    if image.shape[:2] != m.shape:
        image = cv2.resize(image, (m.shape[1], m.shape[0]), interpolation=cv2.INTER_AREA)
    image = to_unit(image)
    base = cv2.cvtColor((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)
    heat = cv2.applyColorMap((normalize_map(m, pixel_threshold, display_range) * 255 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(heat, alpha, base, 1.0 - alpha, 0.0)
    mask = (m >= pixel_threshold).astype(np.uint8)
    if mask.any():
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        thickness = max(1, round(max(m.shape) / 256))
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness)
    return out


def _overlay_names(files: Sequence[Path]) -> list[str]:
    names, used = [], set()
    for f in files:
        name, k = f"{f.stem}.png", 1
        while name in used:
            name, k = f"{f.stem}_{k}.png", k + 1
        used.add(name)
        names.append(name)
    return names


def write_results(out_dir: Path, predictions: Sequence[Prediction], header: dict, overlays: Sequence[str | None] | None = None) -> tuple[Path, Path]:
    """predictions.json (header + one record per image) and predictions.csv, each written atomically."""
    records = []
    for i, p in enumerate(predictions):
        rec = p.record()
        if overlays is not None and overlays[i] is not None:
            rec["overlay"] = overlays[i]
        records.append(rec)
    json_path, csv_path = out_dir / "predictions.json", out_dir / "predictions.csv"
    atomic_write(json_path, (json.dumps({**header, "predictions": records}, indent=2) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({**rec, "score": f"{rec['score']:.6f}", "latency_ms": f"{rec['latency_ms']:.3f}", "map_max": f"{rec['map_max']:.6f}", "decision": int(rec["decision"])})
    atomic_write(csv_path, buf.getvalue().encode())
    return json_path, csv_path


def predict_paths(
    bundle_path: str | Path | Bundle,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    precision: str = "int8",
    overlays: bool = False,
    device: str = "CPU",
    recursive: bool = False,
    mode: str = "throughput",
    save_maps: bool = False,
) -> list[Prediction]:
    """Predict every image in inputs (files, or folders scanned for image extensions, sorted).

    Writes out_dir/predictions.json and predictions.csv (path, score, decision, latency_ms, map_max) and,
    with overlays, out_dir/overlays/<stem>.png. The bundle and every image are checked first: a bad one
    raises BundleError/ImageError naming it, and nothing is written. mode "throughput" (default) keeps all
    cores busy over a folder; "latency" runs one image at a time on all cores. save_maps: also write each
    full-resolution map as out_dir/maps/<stem>.npy (float16; streamed band by band for tiled bundles).

    A tiled bundle reads one image at a time in its own pixel type and keeps, per image, one row of tiles
    and (above 16 megapixels) a preview of the map: memory is set by the tile size, not by the image's.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out_dir = Path(out_dir)
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    engine = Engine(bundle, precision=precision, device=device, mode=mode)
    files = collect_images(inputs, recursive=recursive)
    for f in files:  # pass 1: every file readable and usable, before any output exists
        if open_strips(f) is None:  # (a strip-readable BMP has had its header and size checked)
            read_image_raw(f)

    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir = out_dir / "overlays"
    names = _overlay_names(files) if (overlays or save_maps) else None
    if overlays:
        overlay_dir.mkdir(exist_ok=True)
    maps_dir = out_dir / "maps"
    if save_maps:
        maps_dir.mkdir(exist_ok=True)
    display_range = map_display_range(bundle)
    predictions: list[Prediction] = []

    def write_overlay(image: np.ndarray, pred: Prediction, k: int) -> None:
        ov_img = render_overlay(image, pred.anomaly_map, engine.pixel_threshold, display_range)
        ok, png = cv2.imencode(".png", ov_img)
        if not ok:
            raise ImageError(f"{files[k]}: could not encode overlay")
        atomic_write(overlay_dir / names[k], png.tobytes())

    if engine.tiling is not None:
        for k, f in enumerate(files):
            # An uncompressed BMP tiled at its own size is read a band at a time; anything else is decoded whole.
            strips = open_strips(f) if (engine.tiling.graph == "tile" and engine.tiling.image_size is None and not overlays) else None
            image = strips if strips is not None else read_image_raw(f)
            target = maps_dir / f"{Path(names[k]).stem}.npy" if save_maps else None
            partial = target.with_name(f".{target.name}.partial") if target else None
            pred = engine.predict_tiled(image, str(f), maps_to=partial)
            if partial is not None:
                partial.replace(target)
            if overlays:
                write_overlay(image, pred, k)
            predictions.append(pred)
            del image
    else:
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            images = [read_image(f) for f in chunk]
            preds = engine.predict_images(images, [str(f) for f in chunk])
            for j, (image, pred) in enumerate(zip(images, preds)):
                if overlays:
                    write_overlay(image, pred, start + j)
                if save_maps:
                    buf = io.BytesIO()
                    np.save(buf, pred.anomaly_map.astype(np.float16))
                    atomic_write(maps_dir / f"{Path(names[start + j]).stem}.npy", buf.getvalue())
            predictions.extend(preds)

    header = {
        "bundle": str(bundle.path),
        "precision": engine.precision,
        "inference_precision": engine.inference_precision,
        "device": device,
        "image_threshold": engine.image_threshold,
        "pixel_threshold": engine.pixel_threshold,
        "count": len(predictions),
        "defective": int(sum(p.decision for p in predictions)),
    }
    overlay_paths = [str(Path("overlays") / n) for n in names] if (names and overlays) else None
    write_results(out_dir, predictions, header, overlay_paths)
    return predictions
