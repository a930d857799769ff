"""Predict on image files with a bundle: scores, decisions, streamed result files and optional overlays/maps.

A folder run scores every image it can read and lists every one it cannot, with the reason (`decode`,
`preprocess` rules); results are appended as each image is done and a previous run's results are removed
first (`results` says the file format and why nothing stale can look current). Memory stays flat in the
number of images: each image, its map and its overlay are dropped once written; a plain bundle's images
are batched in chunks of at most CHUNK images and CHUNK_PIXELS pixels, a tiled bundle runs one at a time.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import Bundle, load_bundle
from ssn_edge.runtime.engine import Engine, Prediction
from ssn_edge.runtime.inputs import IMAGE_EXTENSIONS, InputItem, Inputs, collect_inputs
from ssn_edge.runtime.postprocess import sigmoid
from ssn_edge.runtime.preprocess import ImageError, ImageInfo, check_geometry, load_image, open_strips, to_unit_float
from ssn_edge.runtime.results import ResultRecord, ResultWriter, clear_previous, write_error
from ssn_edge.runtime.tiled import to_unit

__all__ = ["IMAGE_EXTENSIONS", "PredictRun", "predict_paths", "run_predict", "render_overlay"]

# A plain bundle's images are read and predicted per chunk, sent on when it holds this many images or pixels
# (a frame above CHUNK_PIXELS goes alone), so memory does not grow with the folder or with frame size.
CHUNK = 32
CHUNK_PIXELS = 8_000_000


def map_display_range(bundle: Bundle) -> tuple[float, float] | None:
    """(low, high) map values for the colour scale: the bundle's map_range, when it has a usable one."""
    r = bundle.metadata.map_range
    if r is None or not (np.isfinite(r.min) and np.isfinite(r.max) and r.max > r.min):
        return None
    return r.min, r.max


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


def _overlay_names(items: Sequence[InputItem]) -> list[str]:
    """One output file name per input (<stem>.png, <stem>_1.png, ...): two inputs never share one."""
    names, used = [], set()
    for item in items:
        stem = item.path.stem or "image"
        name, k = f"{stem}.png", 1
        while name in used:
            name, k = f"{stem}_{k}.png", k + 1
        used.add(name)
        names.append(name)
    return names


@dataclass
class PredictRun:
    """What a predict run did. failures: the records of inputs that could not be scored (their reasons)."""

    out_dir: Path
    inputs: int
    scored: int
    defective: int
    failures: list[ResultRecord] = field(default_factory=list)
    skipped: int = 0  # files in scanned folders without an image name
    same_file: int = 0  # inputs that name a file an earlier input named too (each scored)
    bit_depths: dict[str, int] = field(default_factory=dict)
    summary: Path | None = None
    jsonl: Path | None = None
    csv: Path | None = None

    @property
    def failed(self) -> int:
        return len(self.failures)

    def failure_message(self) -> str:
        """One line: the failure itself when there is one, else how many and the first."""
        first = self.failures[0]
        if self.failed == 1:
            return f"{first.path}: {first.error}"
        return f"{self.failed} of {self.inputs} inputs could not be scored (first: {first.path}: {first.error}); all are listed in {self.summary}"


ResultCallback = Callable[[ResultRecord, "Prediction | None"], None]


class _Run:
    """One predict run's state: the engine, the writer, where overlays and maps go. Each image goes in, its
    record comes out (written, and handed to on_result), and nothing of it is kept."""

    def __init__(self, engine: Engine, writer: ResultWriter, items: list[InputItem], overlays: bool, save_maps: bool,
                 bit_depth: int | None, on_result: ResultCallback | None):
        self.engine, self.writer, self.items = engine, writer, items
        self.overlays, self.save_maps, self.bit_depth, self.on_result = overlays, save_maps, bit_depth, on_result
        self.names = _overlay_names(items) if (overlays or save_maps) else []
        self.overlay_dir, self.maps_dir = writer.out_dir / "overlays", writer.out_dir / "maps"
        if overlays:
            self.overlay_dir.mkdir(exist_ok=True)
        if save_maps:
            self.maps_dir.mkdir(exist_ok=True)
        self.display_range = map_display_range(engine.bundle)
        tiling = engine.tiling
        # The size the whole image is resized to (aspect rule), or None where a tiled model tiles it as it is.
        self.geometry = engine.input_size if tiling is None else tiling.image_size
        self.failures: list[ResultRecord] = []

    def fail(self, item: InputItem, error: ImageError) -> None:
        reason = str(error)
        prefix = f"{item.name}: "
        record = ResultRecord(path=item.name, status="error", error=reason[len(prefix):] if reason.startswith(prefix) else reason,
                              kind=getattr(error, "kind", "unusable"))
        self.failures.append(record)
        self.writer.add(record)
        if self.on_result:
            self.on_result(record, None)

    def read(self, item: InputItem) -> tuple[np.ndarray, ImageInfo]:
        if item.problem is not None:
            raise item.problem
        image, info = load_image(item.path, self.bit_depth)
        check_geometry(image.shape, item.name, self.geometry)
        return image, info

    def done(self, k: int, image: np.ndarray, info: ImageInfo, pred: Prediction, map_streamed: bool = False) -> None:
        item = self.items[k]
        record = ResultRecord(path=item.name, status="ok", score=float(pred.score), decision=bool(pred.decision),
                              result=pred.result or None,
                              latency_ms=float(pred.latency_ms), map_max=pred.map_max, bit_depth=info.bit_depth,
                              same_file_as=item.same_as)
        if self.overlays:
            ov_img = render_overlay(image, pred.anomaly_map, self.engine.pixel_threshold, self.display_range)
            ok, png = cv2.imencode(".png", ov_img)
            if not ok:
                raise ImageError(f"{item.name}: could not encode overlay", "overlay")
            atomic_write(self.overlay_dir / self.names[k], png.tobytes())
            record.overlay = f"overlays/{self.names[k]}"
        if self.save_maps:
            target = self.maps_dir / f"{Path(self.names[k]).stem}.npy"
            if not map_streamed:
                buf = io.BytesIO()
                np.save(buf, pred.anomaly_map.astype(np.float16))
                atomic_write(target, buf.getvalue())
            record.map = f"maps/{target.name}"
        self.writer.add(record)
        if self.on_result:
            self.on_result(record, pred)

    def run_plain(self) -> None:
        chunk: list[tuple[int, np.ndarray, ImageInfo]] = []
        pixels = 0
        for k, item in enumerate(self.items):
            try:
                raw, info = self.read(item)
            except ImageError as exc:
                self.flush(chunk)  # results stay in input order
                chunk, pixels = [], 0
                self.fail(item, exc)
                continue
            image = to_unit_float(raw)
            del raw
            chunk.append((k, image, info))
            pixels += image.shape[0] * image.shape[1]
            del image
            if len(chunk) >= CHUNK or pixels >= CHUNK_PIXELS:  # before the next image is read: a big frame goes alone
                self.flush(chunk)
                chunk, pixels = [], 0
        self.flush(chunk)

    def flush(self, chunk: list[tuple[int, np.ndarray, ImageInfo]]) -> None:
        if not chunk:
            return
        preds = self.engine.predict_images([c[1] for c in chunk], [self.items[c[0]].name for c in chunk])
        for i, (k, image, info) in enumerate(chunk):
            pred, preds[i] = preds[i], None  # each map dropped once written
            self.done(k, image, info, pred)
        chunk.clear()

    def run_tiled(self) -> None:
        tiling = self.engine.tiling
        fixed = tiling.graph != "tile"  # a whole-image graph shrinks the frame to its input a strip at a time
        streamable = (fixed or tiling.image_size is None) and not self.overlays
        for k, item in enumerate(self.items):
            try:
                # An uncompressed BMP tiled at its own size, or at least as large as a whole-image graph's input, is
                # read a band at a time; anything else is decoded whole.
                strips = open_strips(item.path) if (streamable and item.problem is None) else None
                if strips is not None and fixed and not _covers(strips.shape, tiling.image_size):
                    strips = None
                if strips is not None:
                    check_geometry(strips.shape, item.name, self.geometry)
                    image, info = strips, ImageInfo("BMP", 8)
                else:
                    image, info = self.read(item)
            except ImageError as exc:
                self.fail(item, exc)
                continue
            target = self.maps_dir / f"{Path(self.names[k]).stem}.npy" if self.save_maps else None
            partial = target.with_name(f".{target.name}.partial") if target else None
            pred = self.engine.predict_tiled(image, item.name, maps_to=partial)
            if partial is not None:
                partial.replace(target)
            self.done(k, image, info, pred, map_streamed=partial is not None)
            del image, pred


def run_predict(
    bundle_path: str | Path | Bundle,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    precision: str = "int8",
    overlays: bool = False,
    device: str = "CPU",
    recursive: bool = False,
    mode: str = "throughput",
    save_maps: bool = False,
    bit_depth: int | None = None,
    on_result: ResultCallback | None = None,
) -> PredictRun:
    """Score every input image (files, or folders scanned for image names) and write the result files
    (`results`): a bad image is recorded with its reason and the run goes on. A bad bundle, precision or
    device raises (BundleError / ValueError) before anything is written. on_result(record, prediction) is
    called per input as it is done (prediction None for a failure; its map is dropped after the call).

    mode "throughput" (default) keeps all cores busy over a folder; "latency" runs one image at a time on all
    cores. overlays: out_dir/overlays/<stem>.png. save_maps: each full-resolution map as
    out_dir/maps/<stem>.npy (float16; streamed band by band for tiled bundles). bit_depth: the depth of
    16-bit images' samples (None: the sBIT / detection rule of `preprocess`)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out_dir = Path(out_dir)
    try:
        clear_previous(out_dir)  # first: a run that fails from here on leaves nothing that looks current
    except OSError as exc:
        raise write_error(out_dir, exc) from None
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    engine = Engine(bundle, precision=precision, device=device, mode=mode)
    found = collect_inputs(inputs, recursive=recursive)
    try:
        writer = ResultWriter(out_dir)
        run = _Run(engine, writer, found.items, overlays, save_maps, bit_depth, on_result)
        try:
            run.run_plain() if engine.tiling is None else run.run_tiled()
        finally:
            writer.close()
        summary, jsonl, csv_path = writer.finish(_header(bundle, engine, device, bit_depth, found))
    except OSError as exc:  # a full disk or a folder that cannot be written: no half-written results stay
        _discard(out_dir)
        raise write_error(out_dir, exc) from None
    return PredictRun(out_dir=out_dir, inputs=len(found.items), scored=writer.scored, defective=writer.defective,
                      failures=run.failures, skipped=found.skipped, same_file=found.aliases,
                      bit_depths=dict(writer.bit_depths), summary=summary, jsonl=jsonl, csv=csv_path)


def _discard(out_dir: Path) -> None:
    try:
        clear_previous(out_dir)
    except OSError:
        pass


def _header(bundle: Bundle, engine: Engine, device: str, bit_depth: int | None, found: Inputs) -> dict:
    return {
        "bundle": str(bundle.path),
        "precision": engine.precision,
        "inference_precision": engine.inference_precision,
        "device": device,
        "image_threshold": engine.image_threshold,
        "pixel_threshold": engine.pixel_threshold,
        "bit_depth": bit_depth if bit_depth is not None else "auto",
        "inputs": len(found.items),
        "skipped": found.skipped,
        "same_file": found.aliases,
    }


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
    bit_depth: int | None = None,
) -> list[Prediction]:
    """run_predict for a library caller that wants the Predictions (maps included: for small sets; the CLI
    keeps none). Every readable image is scored and written; then, if any input failed, ImageError says
    which (one line)."""
    kept: list[Prediction] = []
    run = run_predict(bundle_path, inputs, out_dir, precision=precision, overlays=overlays, device=device,
                      recursive=recursive, mode=mode, save_maps=save_maps, bit_depth=bit_depth,
                      on_result=lambda _record, pred: kept.append(pred) if pred is not None else None)
    if run.failures:
        raise ImageError(run.failure_message(), run.failures[0].kind or "unusable")
    return kept


def _covers(shape: tuple[int, ...], size: tuple[int, int]) -> bool:
    """A frame of `shape` at least `size` (H, W) in both sides: shrunk, not enlarged, to a whole-image graph's input."""
    return shape[0] >= size[0] and shape[1] >= size[1]
