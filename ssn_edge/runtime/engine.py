"""OpenVINO inference on a bundle: compile one precision, run images through it, return scores and maps.

Torch-free (OpenVINO, NumPy, OpenCV). The inference precision is always set explicitly and read back:
on a CPU with native BF16 (AVX512-BF16 / AMX), OpenVINO's default for an "FP32" model is to execute it in
bf16, so a model called fp32 would silently not run in fp32. Here "fp32" means f32 and "bf16" is asked for
by name, and `Engine.inference_precision` reports what the compiled model actually uses.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import openvino as ov

from ssn_edge.runtime.bundle import Bundle, BundleError, load_bundle
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid
from ssn_edge.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageError, prepare
from ssn_edge.runtime.tiled import TiledRunner

# Runtime precision name -> INFERENCE_PRECISION_HINT. fp16 IRs store f16 weights but execute in f32 on CPU
# (what the accuracy of the export was checked at); int8 IRs run their quantized layers in int8 regardless of
# the hint, the rest in f32. "bf16" is not a file: it is the fp32 IR executed with a bf16 hint.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f32", "int8": "f32", "int8_acc": "f32"}
# The bundle model each runtime precision loads.
PRECISION_MODELS = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp16", "int8": "int8", "int8_acc": "int8_acc"}
MODES = {"latency": "LATENCY", "throughput": "THROUGHPUT"}

_core: ov.Core | None = None
_core_lock = threading.Lock()


def get_core() -> ov.Core:
    """One process-wide OpenVINO Core (creating one costs plugin discovery each time)."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


# Virtual devices that name the real ones after a colon (AUTO:GPU,CPU).
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception ('Exception from src/...' location lines dropped)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    text = (useful or lines or [type(exc).__name__])[0]
    return re.sub(r'"[^"]*/([^/"]+)"', r'"\1"', text)[:200]  # a library's name, not its full path


def check_device(device: str, core: ov.Core | None = None) -> None:
    """A one-line ValueError saying why OpenVINO cannot use device on this machine (OpenVINO's own message is
    a stack of source locations); passes for a device it lists, or a virtual device over such devices."""
    if not device or not device.strip():
        raise ValueError("--device is empty; give an OpenVINO device name such as CPU")
    core = core or get_core()
    available = list(core.available_devices)
    head, _, rest = device.partition(":")
    names = [d for d in rest.split(",") if d] if head.upper() in _VIRTUAL_DEVICES else [device]
    if head.upper() in _VIRTUAL_DEVICES and head != head.upper():
        raise ValueError(f"device {device!r}: device names are case-sensitive; did you mean {head.upper()!r}?")
    for name in names:
        if name in available:
            continue
        hint = ""
        if name.upper() in available or name.split(".")[0].upper() in available:
            hint = f"; did you mean {name.split('.')[0].upper()!r}? (device names are case-sensitive; the CPU takes no index)"
        else:
            try:
                core.get_property(name, "SUPPORTED_PROPERTIES")
                hint = " (its plugin loads, but finds no such device)"
            except RuntimeError as exc:
                hint = f" ({openvino_reason(exc)})"
        raise ValueError(f"device {name!r} is not available on this machine (OpenVINO sees: {', '.join(available) or 'none'}){hint}")


def device_supports_bf16(device: str = "CPU", core: ov.Core | None = None) -> bool:
    """True when the device executes bf16 natively (OPTIMIZATION_CAPABILITIES lists BF16)."""
    core = core or get_core()
    try:
        caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False
    return "BF16" in [str(c).upper() for c in caps]


def type_name(value: Any) -> str:
    """An ov.Type (or its string) as OpenVINO's short name: 'f32', 'bf16', 'f16'..."""
    if isinstance(value, ov.Type):
        return value.get_type_name()
    return str(value)


def check_precision(bundle: Bundle, precision: str) -> str:
    """The bundle model name behind a runtime precision; one-line error for an unknown or absent one."""
    if precision not in PRECISION_HINTS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISION_HINTS)}")
    model = PRECISION_MODELS[precision]
    if model not in bundle.metadata.models:
        have = list(bundle.precisions)
        if "fp32" in have:
            have.append("bf16")
        raise BundleError(f"{bundle.path}: no {model} model in this bundle for precision {precision!r} (has: {', '.join(have)})")
    return model


def _check_normalization(bundle: Bundle) -> None:
    """The runtime prepares inputs with ImageNet mean/std; refuse a bundle whose input says otherwise."""
    spec = bundle.metadata.input
    for key, values, expected in (("mean", spec.mean, IMAGENET_MEAN), ("std", spec.std, IMAGENET_STD)):
        if not np.allclose(np.asarray(values, dtype=np.float32), expected, atol=1e-4):
            raise BundleError(
                f"{bundle.path}: input {key} {list(values)} is not the ImageNet {key} "
                f"{[round(float(v), 6) for v in expected]} this runtime applies"
            )


@dataclass(eq=False)
class Prediction:
    path: str | None
    score: float  # sigmoid of the score logit, in [0, 1]
    decision: bool  # True = defective (score >= the bundle's image threshold)
    anomaly_map: np.ndarray = field(repr=False)  # (H, W) float32 logits at the original image size
    latency_ms: float  # preprocess + inference + postprocess for this image
    map_scale: int = 1  # 1: anomaly_map is at the image's size; f: a preview, each value the mean of f x f pixels
    max_value: float | None = None  # the full-resolution map's max when anomaly_map is a preview
    result: str = ""  # "ok" | "review" | "defect" (review: score in the bundle's review band, if it has one)

    @property
    def map_max(self) -> float:
        if self.max_value is not None:
            return float(self.max_value)
        return float(self.anomaly_map.max()) if self.anomaly_map.size else float("nan")

    def record(self) -> dict[str, Any]:
        """JSON/CSV-ready fields (the map itself left out)."""
        return {
            "path": self.path,
            "score": float(self.score),
            "decision": bool(self.decision),
            "result": self.result,
            "latency_ms": float(self.latency_ms),
            "map_max": self.map_max,
        }


class Engine:
    """One compiled precision of a bundle.

    bundle: a Bundle or a bundle path (loaded and checksum-verified). precision: fp32 | bf16 | fp16 | int8 |
    int8_acc. mode: "latency" (one image at a time as fast as possible) or "throughput" (parallel streams).
    num_requests: optional cap for PERFORMANCE_HINT_NUM_REQUESTS.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        precision: str = "int8",
        device: str = "CPU",
        mode: str = "latency",
        num_requests: int | None = None,
        core: ov.Core | None = None,
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose latency or throughput")
        model_name = check_precision(self.bundle, precision)
        self.core = core or get_core()
        self.precision = precision
        self.device = device
        self.mode = mode
        self.precision_hint = PRECISION_HINTS[precision]
        check_device(device, self.core)
        if self.precision_hint == "bf16" and not device_supports_bf16(device, self.core):
            raise ValueError(f"precision 'bf16' needs a {device} with native BF16 (OPTIMIZATION_CAPABILITIES lacks it)")
        _check_normalization(self.bundle)
        self.model_path = self.bundle.model_path(model_name)
        self.weights_path = self.bundle.weights_path(model_name)
        self.input_size = self.bundle.input_size
        meta = self.bundle.metadata
        self.map_name, self.score_name = meta.outputs.map.name, meta.outputs.score.name
        self.blur_sigma, self.blur_kernel = meta.postprocess.blur_sigma, meta.postprocess.blur_kernel
        # The graph ends in the final map (input size) and score (in [0, 1]): post-processing is not done here
        self.postprocess_in_graph = meta.postprocess.in_graph
        self.thresholds = meta.thresholds
        self.image_threshold = self.bundle.image_threshold
        self.pixel_threshold = self.bundle.pixel_threshold

        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision_hint, "PERFORMANCE_HINT": MODES[mode]}
        if num_requests is not None:
            if num_requests < 1:
                raise ValueError(f"num_requests must be >= 1, got {num_requests}")
            config["PERFORMANCE_HINT_NUM_REQUESTS"] = int(num_requests)
        try:
            self.model = self.core.read_model(str(self.model_path), str(self.weights_path))
            self.compiled = self.core.compile_model(self.model, device, config)
        except RuntimeError as exc:
            raise BundleError(f"{self.model_path}: OpenVINO cannot load this model on {device}: {openvino_reason(exc)}") from None
        self.config = config
        self.tiling = self.bundle.tiling
        names = {name for out in self.compiled.outputs for name in out.get_names()}
        for name in (self.map_name, self.score_name):
            if name not in names:
                raise BundleError(f"{self.model_path}: model has no output named {name!r} (has: {', '.join(sorted(names))})")
        self.inference_precision = type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        first = self.compiled.inputs[0].get_partial_shape()[0]
        self.batch_size = first.get_length() if first.is_static else None  # None: dynamic batch
        self._runners: dict[int, TiledRunner] = {}
        self.optimal_requests = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Engine({self.bundle.path}, precision={self.precision}, device={self.device}, mode={self.mode}, "
            f"inference_precision={self.inference_precision})"
        )

    # -- raw inference -------------------------------------------------------------------------------

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        h, w = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
            raise ValueError(f"model input must be (N, 3, {h}, {w}); got shape {tuple(batch.shape)}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def _outputs(self, request: ov.InferRequest) -> tuple[np.ndarray, np.ndarray]:
        raw = np.array(request.get_tensor(self.map_name).data, dtype=np.float32, copy=True)
        score = np.array(request.get_tensor(self.score_name).data, dtype=np.float32, copy=True)
        if raw.ndim == 4:
            raw = raw[:, 0]
        return raw, score.reshape(raw.shape[0])

    def infer_raw(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared (N, 3, H, W) float32 -> the graph's (maps (N, h, w), scores (N,)), synchronously: raw logits,
        or for a bundle with post-processing in its graph the final map (input size) and score (see
        infer_final). A static-batch graph (batch 1, the default export) runs the N inputs one batch at a time."""
        batch = self._check_batch(batch)
        step = self.batch_size or len(batch)
        maps, scores = [], []
        with self._lock:
            for start in range(0, len(batch), max(step, 1)):
                self._request.infer({0: batch[start : start + step]})
                m, s = self._outputs(self._request)
                maps.append(m)
                scores.append(s)
        if not maps:
            return np.zeros((0, 0, 0), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps), np.concatenate(scores)

    def infer_final(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared (N, 3, H, W) float32 -> (maps (N, H, W) at the input size, scores (N,) in [0, 1]): the graph's
        own for a post-processed bundle, else runtime.postprocess applied to the raw outputs. Plain bundles."""
        maps, scores = self.infer_raw(batch)
        if self.postprocess_in_graph:
            return maps, scores
        return anomaly_map(maps, self.input_size, self.blur_sigma, self.blur_kernel), sigmoid(scores)

    def result(self, score: float) -> str:
        """'defect' (score >= the image threshold), 'review' (in the bundle's review band) or 'ok'."""
        if score >= self.image_threshold:
            return "defect"
        review = self.thresholds.review
        return "review" if review is not None and score >= review else "ok"

    # -- images -> predictions -----------------------------------------------------------------------

    def runner(self, tile_batch: int = 8) -> TiledRunner:
        """The tiled path for a tiled bundle (tiles batched, as many requests in flight as is optimal); one per
        engine and tile batch, kept: its infer requests are reused image after image."""
        if self.tiling is None:
            raise BundleError(f"{self.bundle.path}: not a tiled bundle")
        runners = self._runners
        if tile_batch not in runners:
            runners[tile_batch] = TiledRunner(
                self.compiled, self.tiling, self.map_name, self.score_name, self.blur_sigma, self.blur_kernel,
                tile_batch=tile_batch, requests=max(1, self.optimal_requests),
            )
        return runners[tile_batch]

    def predict_tiled(self, image: np.ndarray, path: str | Path | None = None, maps_to: Path | None = None) -> Prediction:
        """One image through a tiled bundle. image: (H, W, 3) RGB, uint8/uint16 or float in [0, 1], or a strip
        reader (`preprocess.BmpStrips`) that is read one row of tiles at a time.
        maps_to: also stream the full-resolution map there (float16 .npy), whatever the image size."""
        name = str(path) if path is not None else None
        if isinstance(image, np.ndarray):
            self._check_image(image, name or "image", any_dtype=True)
        t0 = time.perf_counter()
        r = self.runner().run(image, stream_to=maps_to)
        return Prediction(
            path=name,
            score=r.score,
            decision=bool(r.score >= self.image_threshold),
            anomaly_map=r.anomaly_map,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            map_scale=r.map_scale,
            max_value=r.map_max,
            result=self.result(r.score),
        )

    def _check_image(self, image: np.ndarray, name: str, any_dtype: bool = False) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            channels = image.shape[2] if image.ndim == 3 else (1 if image.ndim == 2 else None)
            what = f"{channels} channels" if channels is not None else f"shape {tuple(image.shape)}"
            raise ImageError(f"{name}: image has {what}; expected an (H, W, 3) RGB image (use read_image)")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ImageError(f"{name}: empty image")
        if not any_dtype and not np.issubdtype(image.dtype, np.floating):
            raise ImageError(f"{name}: expected float pixels in [0, 1], got {image.dtype} (use read_image)")
        return image

    def postprocess(self, raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The graph's map (h, w) -> smoothed map at size=(H, W).

        Blurred at the model input size exactly as in training-time evaluation (so the bundle's pixel
        threshold, calibrated there, means the same thing): by the graph itself when the bundle says
        postprocess.in_graph, else here (runtime.postprocess: tiled and older bundles); then resized to the
        image's own size.
        """
        m = raw if self.postprocess_in_graph else anomaly_map(raw, self.input_size, self.blur_sigma, self.blur_kernel)
        h, w = size
        if m.shape != (h, w):
            m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
        return m

    def predict_images(self, images: Sequence[np.ndarray], paths: Sequence[str | Path | None] | None = None) -> list[Prediction]:
        """Run images ((H, W, 3) float RGB in [0, 1], any size) through the model, one inference request per
        image, as many in flight as the compiled model's optimal number of requests."""
        if paths is not None and len(paths) != len(images):
            raise ValueError(f"{len(images)} images but {len(paths)} paths")
        if self.tiling is not None:
            return [self.predict_tiled(img, p) for img, p in zip(images, paths or [None] * len(images))]
        names = [str(p) if p is not None else None for p in (paths or [None] * len(images))]
        labels = [n if n is not None else f"image #{i}" for i, n in enumerate(names)]
        checked = [self._check_image(img, label) for img, label in zip(images, labels)]
        n = len(checked)
        raws: list[np.ndarray | None] = [None] * n
        scores = np.zeros(n, dtype=np.float32)
        infer_ms = np.zeros(n, dtype=np.float64)
        prep_ms = np.zeros(n, dtype=np.float64)
        starts = np.zeros(n, dtype=np.float64)
        errors: list[BaseException] = []

        def done(request: ov.InferRequest, index: int) -> None:
            try:
                raw, score = self._outputs(request)
                raws[index] = raw[0]
                scores[index] = score[0]
                infer_ms[index] = (time.perf_counter() - starts[index]) * 1e3
            except BaseException as exc:  # surfaced after wait_all; an exception here would be lost
                errors.append(exc)

        if n:
            queue = ov.AsyncInferQueue(self.compiled, max(1, self.optimal_requests))
            queue.set_callback(done)
            for i, image in enumerate(checked):
                t0 = time.perf_counter()
                x = prepare(image, self.input_size)[None]
                prep_ms[i] = (time.perf_counter() - t0) * 1e3
                queue.get_idle_request_id()  # wait for a free request here: queueing is not this image's latency
                starts[i] = time.perf_counter()
                queue.start_async({0: x}, userdata=i)
            queue.wait_all()
            if errors:
                raise errors[0]

        return [self.prediction(raws[i], scores[i], image.shape[:2], names[i], float(prep_ms[i] + infer_ms[i]))
                for i, image in enumerate(checked)]

    def prediction(self, raw: np.ndarray, score_logit: float, size: tuple[int, int], path: str | None = None,
                   elapsed_ms: float = 0.0) -> Prediction:
        """The model's outputs for one image (its map output (h, w) and score output: raw logits, or the final map
        and score of a post-processed graph) -> its Prediction, the map at size=(H, W).
        elapsed_ms: time already spent on the image (preprocess + inference); postprocessing is added to it."""
        t0 = time.perf_counter()
        m = self.postprocess(raw, size)
        score = float(score_logit) if self.postprocess_in_graph else float(sigmoid(score_logit))
        return Prediction(path=path, score=score, decision=bool(score >= self.image_threshold), anomaly_map=m,
                          latency_ms=float(elapsed_ms + (time.perf_counter() - t0) * 1e3),
                          result=self.result(score))

    def predict_tensor(self, x: np.ndarray, request: ov.InferRequest | None = None, size: tuple[int, int] | None = None,
                       path: str | None = None, elapsed_ms: float = 0.0) -> Prediction:
        """One prepared input (1, 3, H, W) float32, as `preprocess.prepare` makes it -> its Prediction, the map at
        size (default: the model's input size). request: an infer request of self.compiled that only this caller
        uses, so callers in several threads run at once (None: the engine's own, one caller at a time)."""
        x = self._check_batch(x)
        if x.shape[0] != 1:
            raise ValueError(f"predict_tensor takes one image (1, 3, H, W); got batch {x.shape[0]}")
        t0 = time.perf_counter()
        if request is None:
            raw, score = self.infer_raw(x)
        else:
            request.infer({0: x})
            raw, score = self._outputs(request)
        elapsed_ms += (time.perf_counter() - t0) * 1e3
        return self.prediction(raw[0], score[0], size or self.input_size, path, elapsed_ms)

    def predict_one(self, image: np.ndarray, request: ov.InferRequest | None = None, path: str | None = None) -> Prediction:
        """predict_images for one (H, W, 3) float RGB image, run in the caller's thread on its own infer request
        (see predict_tensor): the same preparation, inference and postprocessing, so the same numbers."""
        if self.tiling is not None:
            return self.predict_tiled(image, path)
        image = self._check_image(image, path or "image")
        t0 = time.perf_counter()
        x = prepare(image, self.input_size)[None]
        return self.predict_tensor(x, request, image.shape[:2], path, (time.perf_counter() - t0) * 1e3)

    def predict_image(self, image: np.ndarray, path: str | Path | None = None) -> Prediction:
        return self.predict_images([image], [path])[0]
