"""The ways of running a bundle's model that the report compares: PyTorch FP32 from the checkpoint (when torch and
the checkpoint are at hand) and each OpenVINO precision of the bundle; their outputs on the report's images."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.runtime.bundle import Bundle, sha256_file
from ssn_edge.runtime.postprocess import anomaly_map, sigmoid
from ssn_edge.runtime.schema import PostProcess

# OpenVINO variants in report order; "bf16" is the fp32 IR executed at a bf16 inference-precision hint.
OPENVINO_VARIANTS = ("fp32", "bf16", "fp16", "int8", "int8_acc")


@dataclass
class Variant:
    """One way of running the model, and its outputs on the report's images."""

    runtime: str  # "torch" | "openvino"
    precision: str  # fp32 | bf16 | fp16 | int8 | int8_acc
    hint: str  # inference precision hint asked for
    scores: np.ndarray  # (N,) in [0, 1]
    maps: np.ndarray  # (N, H, W) smoothed map values at the report's size
    inference_precision: str | None = None  # what the compiled model reports using
    raw_maps: np.ndarray | None = None  # (N, h, w) map logits, for a plain graph

    @property
    def label(self) -> str:
        return f"{'PyTorch' if self.runtime == 'torch' else 'OpenVINO'} {self.precision.upper()}"


@dataclass
class Timing:
    latency_ms: float | None = None
    throughput_ips: float | None = None
    file_mb: float | None = None


def torch_available() -> bool:
    """True when PyTorch can be imported here (a factory PC usually has none)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def check_checkpoint_matches(checkpoint: Path, bundle: Bundle) -> None:
    """Refuse a reference checkpoint that is not the file the bundle was exported from (by sha256)."""
    source = bundle.metadata.provenance.source_checkpoint
    if source is not None and source.sha256 and sha256_file(checkpoint) != source.sha256:
        raise ValueError(
            f"{checkpoint}: not the checkpoint this bundle was exported from "
            f"(bundle records {source.name!r} with sha256 {source.sha256[:12]}...); "
            "pass that checkpoint, or none to use OpenVINO FP32 as the reference"
        )


# --------------------------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------------------------


def _torch_throughput(model, images: np.ndarray, seconds: float) -> float | None:
    """Images per second of batches of 8 for `seconds` (None: not measured)."""
    import torch

    if seconds <= 0:
        return None
    xb = torch.from_numpy(np.ascontiguousarray(np.repeat(images[:1], 8, axis=0)))
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while True:
            model(xb)
            done += len(xb)
            if time.perf_counter() - t0 >= seconds:
                break
    return done / (time.perf_counter() - t0)


def _model_mb(model) -> float:
    # The checkpoint holds the heads only (the backbone comes from its weights file): the FP32 size of the whole
    # inference graph instead, comparable with the IR files.
    return sum(p.numel() * 4 for p in model.parameters()) / 1e6


def torch_variant(
    checkpoint: Path, images: np.ndarray, weights: str | None, runs: int, throughput_seconds: float,
    map_gate: str | None = None, post: PostProcess = PostProcess(),
) -> tuple[Variant, Timing]:
    """PyTorch FP32 of a plain checkpoint on normalised images, and its batch-1 latency / throughput;
    map_gate and post: the bundle's."""
    import torch

    from ssn_edge.evaluation.evaluate import predict_raw, torch_latency_ms
    from ssn_edge.model.load import load_model

    model = load_model(Path(checkpoint), weights, map_gate).model
    raw_maps, logits = predict_raw(model, images, batch_size=8)
    latency = torch_latency_ms(model, torch.from_numpy(np.ascontiguousarray(images[:1])), warmup=3, runs=runs)
    timing = Timing(latency, _torch_throughput(model, images, throughput_seconds), _model_mb(model))
    maps = anomaly_map(raw_maps, images.shape[-2:], post.blur_sigma, post.blur_kernel)
    variant = Variant("torch", "fp32", "f32", sigmoid(logits), maps, "f32", raw_maps)
    return variant, timing


def torch_tiled_variant(checkpoint: Path, images: np.ndarray, weights: str | None, runs: int, graph: str,
                        map_gate: str | None = None) -> tuple[Variant, Timing]:
    """PyTorch FP32 of a tiled checkpoint in the bundle's graph ("tile" runs as "tiles": the same per-tile
    computation), its tiles' outputs merged by the runtime's own merge."""
    import torch

    from ssn_edge.evaluation.evaluate import merged_predictions, predict_tiled_raw
    from ssn_edge.model.load import load_model

    model = load_model(Path(checkpoint), weights, map_gate).model
    graph = "tiles" if graph == "tile" else graph
    scores, maps = merged_predictions(model.tiling, *predict_tiled_raw(model, images, graph))
    times = []
    for _ in range(max(1, min(runs, 10))):
        t0 = time.perf_counter()
        with torch.no_grad():
            predict_tiled_raw(model, images[:1], graph)
        times.append((time.perf_counter() - t0) * 1e3)
    return Variant("torch", "fp32", "f32", scores, maps, "f32"), Timing(float(np.median(times)), None, _model_mb(model))


# --------------------------------------------------------------------------------------------------------------
# OpenVINO
# --------------------------------------------------------------------------------------------------------------


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


def _raw_outputs(engine, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    maps, logits = [], []
    for start in range(0, len(images), batch_size):
        m, s = engine.infer_raw(images[start : start + batch_size])
        maps.append(m)
        logits.append(s)
    return np.concatenate(maps), np.concatenate(logits)


def openvino_variant(bundle: Bundle, precision: str, arrays: ArraySet, device: str = "CPU") -> Variant:
    """One precision of the bundle on the arrays, post-processed with the bundle's blur; tiled bundles through the
    runtime's tiled path."""
    from ssn_edge.runtime.engine import Engine

    engine = Engine(bundle, precision=precision, device=device, mode="latency")
    if engine.tiling is not None:
        runner = engine.runner()
        results = [runner.run_normalized(x) for x in arrays.images]
        scores = np.array([r.score for r in results], dtype=np.float32)
        return Variant("openvino", precision, engine.precision_hint, scores, np.stack([r.anomaly_map for r in results]),
                       engine.inference_precision)
    if engine.postprocess_in_graph:  # the graph's own final map and score
        maps, scores = _raw_outputs(engine, arrays.images)
        return Variant("openvino", precision, engine.precision_hint, scores, maps, engine.inference_precision)
    raw_maps, logits = _raw_outputs(engine, arrays.images)
    maps = anomaly_map(raw_maps, arrays.images.shape[-2:], engine.blur_sigma, engine.blur_kernel)
    return Variant("openvino", precision, engine.precision_hint, sigmoid(logits), maps, engine.inference_precision,
                   raw_maps)
