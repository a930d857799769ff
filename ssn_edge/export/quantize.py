"""INT8 post-training quantization of SSN's OpenVINO graph (NNCF), tuned so decisions survive it.

Three things, each measured on MVTec bottle against the FP32 model's decisions at the bundle threshold
(benchmarks/results/quantization.json; NNCF defaults flipped 3 of 83 test images):

* **Synthetic defects in the calibration images** (`CalibrationSpec.defects`): calibration sets hold normal
  parts only, so NNCF measures no activation range for what a defect does to the features, and INT8 clips it:
  defective images' score logits fell by 0.85 on average. Scratches, spots and cracks painted onto the
  calibration images (`ssn_edge.data.synthetic`, deterministic from the spec's seed) put those responses into the
  ranges. No real defect is needed.
* **Min/max activation ranges** (`activation_range: minmax`) instead of NNCF's default quantile/mean estimators,
  which clip the tails where a defect's evidence lives (max |score change| 3.46 -> 0.80 logits).
* **Score-offset correction** (`score_offset: true`): what remains is mostly a constant shift of the score logit
  (+0.54 on normal images): the mean INT8-minus-FP32 score logit over the calibration images (as they are, not
  painted; no labels needed) is subtracted inside the INT8 graph, so every runtime gets it. The value is
  recorded in the bundle (`models.int8.quantization.score_offset_value`).

And NNCF's **full bias correction** (`bias_correction: full`, instead of nncf.quantize's fast one): each layer's
output mean is corrected on the calibration images with the layers before it already quantized, so the shifts do
not add up through the backbone. It held the map where the backbone's drift reached it: supervised Magnetic tile
with the memory bank, test AUPRO drops of 1.15 / 1.45 / 1.21 became 0.29 / 0.86 / -0.25 (3 seeds), image AUROC
unchanged (benchmarks/results/recipe.md, INT8 variant full_bias). Its cost is export time: 23-50 s on 2 loaded
cores for these graphs by NNCF's progress output (not a benchmark record), where the fast correction took under one.

Tiled graphs get the same: defects are painted on the whole image before it is cut, and the offset is the
mean shift over every tile's score. Not free: wider ranges mean coarser steps for the map. On Magnetic tile (unsupervised, seed 0) INT8 pixel AUPRO was
35.8 with these defaults and 40.8 with NNCF's (FP32 44.1), image AUROC unchanged. The report shows both; the CLI
switches each measure off.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from ssn_edge.runtime.preprocess import read_image
from ssn_edge.runtime.schema import BIAS_CORRECTIONS
from ssn_edge.data.synthetic import DEFECTS, paint_defect

log = logging.getLogger("ssn_edge")

ACTIVATION_RANGES = ("minmax", "nncf_default")

# What stays float in each model family's INT8 graph (NNCF ignored scope, as node-name patterns), and why.
# knn: the nearest-neighbour distances (model/knn/graph.py KnnHead): |q|^2 - 2 q.b + |b|^2 is a small difference
# of large, nearly equal terms, and the nearest distance is small next to the feature norms, so int8 steps on the
# MatMul's inputs and on the sums after it are as large as the distances themselves. The backbone and the local
# averaging before it are INT8 like SSN's; the head is a tiny share of the time (one MatMul against the bank).
# ssn: the same distances where model.memory_bank is on, and the standardised sum with SSN's map after them (a
# pattern that matches no node, in a graph without a bank, keeps nothing in float).
FLOAT_SCOPES: dict[str, tuple[str, ...]] = {"knn": (r".*\.head/.*",), "ssn": (r".*\.memory_bank[./].*",)}


def segmentation_subgraph(ov_model):
    """SSN's segmentation head in the graph, as an nncf.Subgraph (first conv -> logit conv): OpenVINO folds the
    head's batch norm into its first convolution, which then has a generated name, so it is found by walking back
    from the named logit convolution."""
    import nncf

    last = next((n for n in ov_model.get_ordered_ops() if n.get_type_name() == "Convolution"
                 and "heads.segmentation.net.3" in n.get_friendly_name()), None)
    if last is None:
        raise ValueError("the graph has no segmentation head to keep in float (model.cls_head cam?)")
    first = last.input_value(0).get_node()
    while first.get_type_name() != "Convolution":
        first = first.input_value(0).get_node()
    return nncf.Subgraph(inputs=[first.get_friendly_name()], outputs=[last.get_friendly_name()])


def check_float_map(model_kind: str) -> None:
    """--float-map applies to a plain SSN graph only: one segmentation head to keep in float."""
    if model_kind != "ssn":
        raise ValueError(f"--float-map keeps a plain SSN model's segmentation head in float; this is a {model_kind} "
                         "model (a tiled graph holds one head per tile, a knn graph none)")


def _names_match(ov_model, pattern: str) -> bool:
    """Whether any node of the graph is named by pattern: a scope that names none is left out, so an SSN graph
    without a memory bank is quantized exactly as before the bank existed."""
    rx = re.compile(pattern)
    return any(rx.fullmatch(op.get_friendly_name()) for op in ov_model.get_ordered_ops())


def float_scope(model_kind: str, ov_model=None, float_map: bool = False):
    """The nncf.IgnoredScope keeping the family's FLOAT_SCOPES (and, with float_map, SSN's segmentation head) in
    float, or None."""
    import nncf

    if float_map:
        check_float_map(model_kind)
    patterns = [p for p in FLOAT_SCOPES.get(model_kind, ()) if ov_model is None or _names_match(ov_model, p)]
    subgraphs = [segmentation_subgraph(ov_model)] if float_map else []
    if not patterns and not subgraphs:
        return None
    return nncf.IgnoredScope(patterns=patterns, subgraphs=subgraphs, validate=False)


@dataclass(frozen=True)
class QuantizeOptions:
    activation_range: str = "minmax"  # "minmax" or "nncf_default" (NNCF's own estimators)
    score_offset: bool = True  # subtract the calibration images' mean INT8-vs-FP32 score shift in the graph
    # keep SSN's segmentation head in float (the map's precision at the head's cost); None: where SSN's map is summed
    # with a memory bank's float distances (ssn_edge.export.exporter.resolve_float_map)
    float_map: bool | None = None
    bias_correction: str = "full"  # "full" or "fast" (NNCF's default: quicker, coarser)

    def __post_init__(self) -> None:
        if self.activation_range not in ACTIVATION_RANGES:
            raise ValueError(f"activation range {self.activation_range!r} is not one of {', '.join(ACTIVATION_RANGES)}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"bias correction {self.bias_correction!r} is not one of {', '.join(BIAS_CORRECTIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"activation_range": self.activation_range, "score_offset": self.score_offset,
                "float_map": self.float_map, "bias_correction": self.bias_correction}


def with_defects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB float image in [0, 1] with one synthetic defect (scratch, spot or crack) painted in, same size."""
    h, w = image.shape[:2]
    side = max(h, w)
    gray = cv2.resize((image.mean(axis=2) * 255).astype(np.uint8), (side, side), interpolation=cv2.INTER_AREA)
    before = gray.copy()
    paint_defect(gray, DEFECTS[int(rng.integers(len(DEFECTS)))], rng)
    delta = cv2.resize((gray.astype(np.float32) - before) / 255.0, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(image + delta[..., None], 0.0, 1.0).astype(np.float32)


InputFn = Callable[[np.ndarray], np.ndarray]  # (H, W, 3) RGB float image -> the graph's input (GraphPlan.input_for)


def calibration_inputs(images: Sequence[Path], to_input: InputFn, defects: float = 0.0, seed: int = 0) -> list[np.ndarray]:
    """The graph inputs for calibration: each image as the runtime prepares it (to_input), a fraction `defects`
    of them (chosen with `seed`) with a synthetic defect painted in first."""
    if not 0.0 <= defects <= 1.0:
        raise ValueError(f"calibration defects must be a fraction in [0, 1], got {defects}")
    rng = np.random.default_rng(seed)
    out = []
    for path in images:
        image = read_image(path)
        if rng.random() < defects:
            image = with_defects(image, rng)
        out.append(to_input(image))
    return out


@dataclass
class Calibration:
    """What every INT8 model of one export quantizes with, prepared once: the inputs NNCF sees (defects painted
    in) and, for the score-offset correction, the unpainted inputs with the FP32 model's score logits."""

    inputs: list[np.ndarray]
    plain: list[np.ndarray] | None = None
    fp32_scores: np.ndarray | None = None


def prepare_calibration(fp32_model, images: Sequence[Path], to_input: InputFn, defects: float, seed: int,
                        options: QuantizeOptions) -> Calibration:
    from ssn_edge.export.inference import compile_f32, score_logits

    inputs = calibration_inputs(images, to_input, defects, seed)
    if not options.score_offset:
        return Calibration(inputs)
    plain = inputs if defects == 0 else calibration_inputs(images, to_input)
    return Calibration(inputs, plain, score_logits(compile_f32(fp32_model), plain))


def correct_score_offset(quantized, calib: Calibration):
    """The quantized model, its score shifted back by its mean shift on the (unpainted) calibration inputs
    (over every score the graph gives: one per image, or one per tile); (model, offset or None)."""
    from ssn_edge.export.inference import compile_f32, score_logits

    if calib.plain is None:
        return quantized, None
    shift = float(np.mean(score_logits(compile_f32(quantized), calib.plain).astype(np.float64) - calib.fp32_scores))
    log.info("INT8 score-offset correction: %+.4f logits (mean over %d scores)", shift, len(calib.fp32_scores))
    return subtract_from_score(quantized, shift), shift


def quantize_int8(ov_model, calib: Calibration, options: QuantizeOptions, model_kind: str = "ssn"):
    """INT8 by NNCF post-training quantization, score offset corrected; (model, score offset or None)."""
    return correct_score_offset(quantize(ov_model.clone(), calib.inputs, options, model_kind), calib)


def advanced_parameters(options: QuantizeOptions):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if options.activation_range == "minmax":
        return AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    return None


def quantize(ov_model, inputs: list[np.ndarray], options: QuantizeOptions, model_kind: str = "ssn"):
    """nncf.quantize on the calibration inputs with the options' range estimator, the family's float scope kept."""
    import nncf

    kwargs = {}
    params = advanced_parameters(options)
    if params is not None:
        kwargs["advanced_parameters"] = params
    scope = float_scope(model_kind, ov_model, options.float_map)
    if scope is not None:
        kwargs["ignored_scope"] = scope
    return nncf.quantize(ov_model, nncf.Dataset(inputs), subset_size=len(inputs),
                         fast_bias_correction=options.bias_correction == "fast", **kwargs)


def subtract_from_score(ov_model, offset: float, output: str = "score"):
    """The model with `offset` subtracted from its score output, the output keeping its name."""
    import openvino.opset13 as ops

    result = next(r for r in ov_model.get_results() if output in r.output(0).get_names())
    source = result.input_value(0)
    names = source.get_names()
    shifted = ops.subtract(source, ops.constant(np.array(offset, dtype=np.float32)))
    source.get_tensor().set_names(set())
    shifted.output(0).get_tensor().set_names(set(names))
    result.input(0).replace_source_output(shifted.output(0))
    ov_model.validate_nodes_and_infer_types()
    return ov_model
