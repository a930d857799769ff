"""A loaded model -> the OpenVINO graph a bundle ships, for every graph kind, and how an image becomes its input.

Graph kinds (what the runtime feeds it):
* "plain": a whole-image SSN, image (B, 3, H, W) -> map (B, 1, h, w), score (B,); dynamic batch;
* "tile": a tiled checkpoint's single model on one tile, the same interface at tile size: the runtime tiles
  images of any size and merges;
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
        return np.stack([prepare_tile(image, box) for box in self.tiling.grid(image.shape[:2]).boxes])


def plan_graph(loaded: LoadedModel) -> GraphPlan:
    """The graph for a loaded model: plain for an SSN, else the tiling's graph (loaded with the one asked for).
    A single tiled model exported as "tile" without recipe.tiling.resize tiles every image at its own size."""
    size = tuple(int(v) for v in loaded.recipe.data.image_size)
    if not loaded.tiled:
        return GraphPlan("plain", None, (-1, 3, *size))
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
