"""A loaded model -> the OpenVINO graph a bundle ships, for every graph kind, and how an image becomes its input.

Graph kinds (what the runtime feeds it):
* "plain": a whole-image SSN or knn, image (B, 3, H, W) -> the final map (B, 1, H, W) and score (B,) in [0, 1],
  post-processing included (add_postprocess), plus the decisions pred_label (B,) and pred_mask (B, 1, H, W);
  batch 1 unless exported with a dynamic batch;
* "tile": a tiled checkpoint's single model on one tile, raw outputs (map logits (B, 1, h, w), score logit (B,))
  at tile size: the runtime tiles images of any size, post-processes each tile and merges;
* "image": a tiled model with a shared backbone: the whole (padded) image (1, 3, H', W') -> every location's
  map (1, T, h, w) and score (1, T);
* "tiles": the image's tiles (1, T, 3, th, tw), each through the backbone, -> (1, T, h, w), (1, T).
"image" and "tiles" are batch 1 and fully static: with a dynamic batch OpenVINO 2026.4's CPU plugin corrupted
the heap on them (crash after a few requests).

The graph goes straight from PyTorch to OpenVINO with ``openvino.convert_model`` (no ONNX round trip: one set
of operator-mapping quirks instead of two, and no intermediate file); NNCF then quantizes the ov.Model itself.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ssn_edge.runtime.preprocess import prepare, resize_image
from ssn_edge.runtime.tiled import graph_input, prepare_tile
from ssn_edge.runtime.tiling import TilingConfig

if TYPE_CHECKING:  # pragma: no cover
    from ssn_edge.model.load import LoadedModel

INPUT_NAME = "image"
OUTPUT_NAMES = ("map", "score")
MAP_STRIDE = 4
GRAPH_KINDS = ("plain", "tile", "image", "tiles")

# OpenVINO's CPU plugin (2026.4) miscomputes a quantized model in which a convolution *without bias* feeds both
# a model output and ReduceMax/ReduceMean: the INT8 image score of SSN shifted by +0.4 (AUROC 96.6 -> 67.6 on
# MVTec bottle) while the map stayed right. SSN's last segmentation conv is bias-free (spec), and feeds the map
# output and the classification head's pooling. A zero bias is folded away by the converter, so the exported
# graph carries a bias this small instead: it moves the map logits by 1e-6, far below any threshold's resolution.
SEG_BIAS_WORKAROUND = 1e-6


@dataclass(frozen=True)
class GraphPlan:
    """Which graph an export builds and what it takes: kind (GRAPH_KINDS), the runtime tiling (None: plain),
    input shape (-1: dynamic batch)."""

    kind: str
    tiling: TilingConfig | None
    input_shape: tuple[int, ...]

    @property
    def postprocess_in_graph(self) -> bool:
        """Plain graphs end in the final map and score (add_postprocess); tiled ones stop at per-tile outputs,
        which the runtime merges."""
        return self.kind == "plain"

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input_shape[-2]), int(self.input_shape[-1])

    @property
    def layout(self) -> str:
        return "NTCHW" if self.kind == "tiles" else "NCHW"

    @property
    def tiles(self) -> int | None:
        return int(self.input_shape[1]) if self.kind == "tiles" else None

    def input_for(self, image: np.ndarray) -> np.ndarray:
        """The graph's input for one (H, W, 3) RGB float image in [0, 1]: what calibration feeds NNCF."""
        if self.tiling is None:
            return prepare(image, self.input_size)[None]
        if self.kind != "tile":
            return graph_input(image, self.tiling)
        if self.tiling.image_size is not None:
            image = resize_image(image, self.tiling.image_size)
        return np.stack([prepare_tile(image, box, self.tiling.fill) for box in self.tiling.grid(image.shape[:2]).boxes])


def plan_graph(loaded: LoadedModel, dynamic_batch: bool = False) -> GraphPlan:
    """The graph for a loaded model: plain for an SSN, else the tiling's graph (loaded with the one asked for).
    A single tiled model exported as "tile" without recipe.tiling.resize tiles every image at its own size.
    Plain graphs are batch 1 (fully static: `benchmark_app -m` runs them as they are) unless dynamic_batch;
    "tile" graphs keep a dynamic batch (the tiled runtime batches tiles); "image" and "tiles" are batch 1."""
    size = tuple(int(v) for v in loaded.recipe.data.image_size)
    batch = -1 if dynamic_batch else 1
    if not loaded.tiled:
        return GraphPlan("plain", None, (batch, 3, *size))
    cfg = loaded.model.tiling
    if cfg.graph == "tile":
        if not loaded.recipe.tiling.resize:
            cfg = dataclasses.replace(cfg, image_size=None)
        return GraphPlan("tile", cfg, (-1, 3, *cfg.tile))
    grid = cfg.grid(cfg.image_size)
    if cfg.graph == "image":
        return GraphPlan("image", cfg, (1, 3, *grid.padded_size))
    return GraphPlan("tiles", cfg, (1, grid.count, 3, *grid.tile))


def with_seg_bias(model):
    """A copy of the model whose final segmentation conv(s) have a (negligible) bias; see SEG_BIAS_WORKAROUND.
    Every segmentation head is patched: one in SuperSimpleNet, one per location in a tiled ensemble."""
    import torch

    model = copy.deepcopy(model)
    for owner in [m for m in model.modules() if getattr(m, "segmentation", None) is not None]:  # SSNHeads
        net = owner.segmentation.net  # (the CAM baseline has none: its map conv has a bias)
        last = net[-1]
        if isinstance(last, torch.nn.Conv2d) and last.bias is None:
            biased = torch.nn.Conv2d(last.in_channels, last.out_channels, last.kernel_size, bias=True)
            with torch.no_grad():
                biased.weight.copy_(last.weight)
                biased.bias.fill_(SEG_BIAS_WORKAROUND)
            net[-1] = biased
    return model


def _module(loaded: LoadedModel, plan: GraphPlan):
    """The torch module behind the plan, in eval mode, outputs as float32."""
    import torch

    class SingleTile(torch.nn.Module):  # a tiled checkpoint's one model, on a tile
        def __init__(self, tiled):
            super().__init__()
            self.features, self.heads = tiled.features, tiled.heads[0]

        def forward(self, x):
            return self.heads(self.features(x))

    class Float(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            m, s = self.inner(x)
            return m.float(), s.float()

    # TiledSSN runs "image" on an image input and "tiles" on a tiles input: the input shape picks the graph
    return Float(SingleTile(loaded.model) if plan.kind == "tile" else loaded.model).eval()


def convert_module(module, input_shape: tuple[int, ...]) -> Any:
    """PyTorch module -> ov.Model, input 'image' of input_shape (-1: dynamic), outputs named 'map' and 'score';
    the segmentation bias workaround applied."""
    import openvino as ov
    import torch

    example = torch.zeros(*[1 if d == -1 else d for d in input_shape])
    with torch.no_grad():
        ov_model = ov.convert_model(with_seg_bias(module).eval(), example_input=example, input=[list(input_shape)])
    if len(ov_model.outputs) != 2:
        raise RuntimeError(f"converted graph has {len(ov_model.outputs)} outputs, expected 2 (map, score)")
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for output, name in zip(ov_model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    return ov_model


def convert(loaded: LoadedModel, plan: GraphPlan) -> Any:
    """The FP32 ov.Model of a loaded model, for the plan's graph kind."""
    return convert_module(_module(loaded, plan), plan.input_shape)


# --------------------------------------------------------------------------------------------------------------
# Post-processing and decisions inside the graph (plain graphs), and the IR's rt_info
# --------------------------------------------------------------------------------------------------------------

# A post-processed graph's outputs carry anomalib's names, which model_api (openvino-model-api, AnomalyDetection)
# reads: one name per tensor (with two, which one OpenVINO reports as "the" name differs between an ov.Model and
# its compiled model, and model_api keys its outputs by that one).
FINAL_NAMES = {"map": "anomaly_map", "score": "pred_score"}
DECISION_NAMES = ("pred_label", "pred_mask")


def _result(ov_model, name: str):
    return next(r for r in ov_model.get_results()
                if name in r.output(0).get_names() or name in r.input_value(0).get_names())


def _reroute(ov_model, name: str, node, names: set[str]) -> None:
    """Make `node` the output that `name` was, its tensor (and the Result's: OpenVINO keeps both) carrying
    `names`."""
    result = _result(ov_model, name)
    source = result.input_value(0)
    source.get_tensor().set_names(set())
    node.output(0).get_tensor().set_names(names)
    result.input(0).replace_source_output(node.output(0))
    result.output(0).get_tensor().set_names(names)


def gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """OpenCV's 1-D Gaussian (cv2.getGaussianKernel), float32: the weights runtime.postprocess blurs with."""
    import cv2

    return cv2.getGaussianKernel(size, sigma).astype(np.float32).reshape(-1)


def add_postprocess(ov_model, size: tuple[int, int], sigma: float, kernel: int):
    """The graph's raw outputs -> the final ones, as runtime.postprocess.anomaly_map and sigmoid compute them:
    map logits bilinearly upsampled to the input size (half-pixel centres, cv2.INTER_LINEAR), Gaussian-blurred
    (kernel x kernel, sigma, edges mirrored with the edge pixel repeated: cv2.BORDER_REFLECT), score through a
    sigmoid. Appended to an ov.Model after any quantization, so these ops always run in float."""
    import openvino.opset11 as ops11
    import openvino.opset13 as ops

    h, w = size
    source = _result(ov_model, "map").input_value(0)
    up = ops11.interpolate(source, ops.constant(np.array([h, w], dtype=np.int64)), "linear_onnx", "sizes",
                           coordinate_transformation_mode="half_pixel", axes=ops.constant(np.array([2, 3], dtype=np.int64)))
    out = up
    if sigma > 0:
        r = kernel // 2
        out = ops.pad(out, np.array([0, 0, r, r], dtype=np.int64), np.array([0, 0, r, r], dtype=np.int64), "symmetric")
        g = gaussian_kernel(kernel, sigma)
        for shape in ((1, 1, 1, kernel), (1, 1, kernel, 1)):  # separable: rows, then columns, as OpenCV does
            out = ops.convolution(out, ops.constant(g.reshape(shape)), [1, 1], [0, 0], [0, 0], [1, 1])
    _reroute(ov_model, "map", out, {FINAL_NAMES["map"]})
    score = ops.sigmoid(_result(ov_model, "score").input_value(0))
    _reroute(ov_model, "score", score, {FINAL_NAMES["score"]})
    ov_model.validate_nodes_and_infer_types()
    return ov_model


def without_postprocess(ov_model):
    """A post-processed graph cut back to its raw outputs ('map' logits at stride, 'score' logit): what bundles
    before in-graph post-processing shipped, and the baseline its latency cost is measured against."""
    import openvino as ov

    def before(name: str, kind: str):
        node = _result(ov_model, name).input_value(0).get_node()
        while node.get_type_name() != kind:  # map: Convolution x2 <- Pad <- Interpolate; score: Sigmoid
            node = node.input_value(0).get_node()
        return node.input_value(0)

    outputs = [before(FINAL_NAMES["map"], "Interpolate"), before(FINAL_NAMES["score"], "Sigmoid")]
    model = ov.Model(outputs, ov_model.get_parameters(), "raw")
    for output, name in zip(model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    return model


def add_decisions(ov_model, image_threshold: float, pixel_threshold: float):
    """Two more outputs, anomalib's (what model_api reads): pred_label = score >= image threshold (B,) and
    pred_mask = map >= pixel threshold (B, 1, H, W), both boolean."""
    import openvino.opset13 as ops

    score = _result(ov_model, FINAL_NAMES["score"]).input_value(0)
    amap = _result(ov_model, FINAL_NAMES["map"]).input_value(0)
    label = ops.greater_equal(score, ops.constant(np.array(image_threshold, dtype=np.float32)))
    mask = ops.greater_equal(amap, ops.constant(np.array(pixel_threshold, dtype=np.float32)))
    results = [ops.result(label), ops.result(mask)]
    for result, name in zip(results, DECISION_NAMES):
        result.input_value(0).get_tensor().set_names({name})
        result.output(0).get_tensor().set_names({name})
    ov_model.add_results(results)
    ov_model.validate_nodes_and_infer_types()
    return ov_model


def set_rt_info(ov_model, info: dict[str, dict[str, Any]]) -> None:
    """rt_info sections (e.g. model_info, ssn_edge) written as strings: what OpenVINO's readers of rt_info
    (model_api's from_str parsers among them) expect; lists space-separated."""
    for section, values in info.items():
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                value = " ".join(_rt_text(v) for v in value)
            ov_model.set_rt_info(_rt_text(value), [section, key])


def _rt_text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # every digit: a threshold read back from rt_info equals the bundle's
    return str(value)
