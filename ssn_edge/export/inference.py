"""Running an exported graph during export: raw outputs, and post-processed predictions through the runtime's own
path (so thresholds and metrics mean on the factory PC exactly what they meant here). Always at an f32 hint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssn_edge.data import ArraySet
from ssn_edge.export.graph import OUTPUT_NAMES, GraphPlan
from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA, anomaly_map, sigmoid
from ssn_edge.runtime.tiled import TiledRunner

F32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # never let the CPU plugin pick bf16 for reference numbers


@dataclass
class Predictions:
    """Post-processed outputs on a set of images: scores (N,) in [0, 1], maps (N, H, W) at the images' size; for a
    plain graph also its raw outputs (map logits (N, h, w), score logits (N,)), which accuracy control scores."""

    scores: np.ndarray
    maps: np.ndarray
    raw: tuple[np.ndarray, np.ndarray] | None = None


def compile_f32(model: Any):
    """Compile an ov.Model or IR path on CPU with FP32 inference precision."""
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", F32_CONFIG)


def output(compiled, index: int):
    try:
        return compiled.output(OUTPUT_NAMES[index])
    except RuntimeError:
        return compiled.outputs[index]


def infer(compiled, images: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A plain graph's two outputs: maps (N, h, w) and scores (N,): raw (logits at stride) or, for a
    post-processed graph, final (map at input size, score in [0, 1]). A static-batch graph runs its own batch."""
    out_map, out_score = output(compiled, 0), output(compiled, 1)
    batch = compiled.inputs[0].get_partial_shape()[0]
    if batch.is_static:
        batch_size = batch.get_length()
    request = compiled.create_infer_request()
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        result = request.infer({0: np.ascontiguousarray(images[start : start + batch_size])})
        maps.append(np.asarray(result[out_map], dtype=np.float32)[:, 0])
        scores.append(np.asarray(result[out_score], dtype=np.float32).reshape(-1))
    return np.concatenate(maps), np.concatenate(scores)


def score_logits(compiled, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Every score logit the graph gives for each input (one per image, or one per tile), in order, flattened."""
    out_score = output(compiled, 1)
    request = compiled.create_infer_request()
    scores = [np.asarray(request.infer({0: np.ascontiguousarray(x)})[out_score], dtype=np.float32).reshape(-1)
              for x in inputs]
    return np.concatenate(scores)


def predict_arrays(xml: Path, plan: GraphPlan, arrays: ArraySet) -> Predictions:
    """Scores and maps of evaluation arrays (normalised, at the recipe's size) through the runtime's path."""
    compiled = compile_f32(xml)
    if plan.postprocess_in_graph:
        maps, scores = infer(compiled, arrays.images)
        return Predictions(scores, maps)
    if plan.tiling is None:  # a raw plain graph
        raw, logits = infer(compiled, arrays.images)
        return Predictions(sigmoid(logits), anomaly_map(raw, arrays.images.shape[-2:]), (raw, logits))
    runner = TiledRunner(compiled, plan.tiling, blur_sigma=BLUR_SIGMA, blur_kernel=BLUR_KERNEL)
    results = [runner.run_normalized(x) for x in arrays.images]
    return Predictions(np.asarray([r.score for r in results], dtype=np.float32), np.stack([r.anomaly_map for r in results]))


def count_quantized_ops(xml: Path) -> int:
    """FakeQuantize nodes in an IR (what NNCF inserts; the CPU plugin runs them as INT8 kernels)."""
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(xml).get_ops())
