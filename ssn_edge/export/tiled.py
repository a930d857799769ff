"""Export a tiled checkpoint (single model on tiles, or a tiled ensemble) to a deployment bundle.

The bundle holds one graph per precision and the tiling config; what the graph takes depends on
tiling.graph (see `ssn_edge.runtime.tiling.GRAPHS`):
* "tile": a single model's tile -> map, score, dynamic batch: the runtime tiles images of any size;
* "image": the whole image, backbone once, every location's heads on their crop of its features;
* "tiles": the image's tiles, each through the backbone (the paper's way; for comparison).
Thresholds come from the FP32 graph run through the runtime's own tiled path (`TiledRunner`), so they mean on
the factory PC exactly what they meant here. Same atomic write as every bundle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ssn_edge import __version__
from ssn_edge.export.calibration import CALIBRATION_FILE, CalibrationSpec, calibration_record, select_calibration
from ssn_edge.data import ArraySet, load_arrays
from ssn_edge.export.exporter import (
    F32_CONFIG,
    INPUT_NAME,
    MAP_STRIDE,
    OUTPUT_NAMES,
    WEIGHTS_PRECISION,
    _input_metadata,
    _with_seg_bias,
    convert,
    map_output,
    metrics_from_maps,
    threshold_split,
    thresholds_from_predictions,
)
from ssn_edge.model.ssn import SuperSimpleNet
from ssn_edge.runtime.bundle import Bundle, BundleError, sha256_file, write_bundle
from ssn_edge.runtime.postprocess import BLUR_KERNEL, BLUR_SIGMA
from ssn_edge.runtime.preprocess import read_image, resize_image
from ssn_edge.runtime.tiled import TiledRunner, graph_input, prepare_tile
from ssn_edge.runtime.tiling import TilingConfig

log = logging.getLogger("ssn_edge")


def tile_model(model, recipe) -> SuperSimpleNet:
    """The single model of a tiled checkpoint as a plain SuperSimpleNet at tile size (the "tile" graph)."""
    ssn = SuperSimpleNet(recipe.model)
    ssn.features = model.features
    ssn.heads = model.heads[0]
    return ssn.eval()


def convert_tiled(model, cfg: TilingConfig):
    """TiledSSN -> ov.Model for the "image" or "tiles" graph: outputs 'map' (1, T, h, w), 'score' (1, T).

    Batch 1, fully static: one image per request is how these graphs run, and with a dynamic batch
    OpenVINO 2026.4's CPU plugin corrupted the heap on this graph (crash after a few requests)."""
    import openvino as ov
    import torch

    model = _with_seg_bias(model)
    model.tiling = cfg
    grid = cfg.grid(cfg.image_size)
    if cfg.graph == "image":
        ph, pw = grid.padded_size
        example, shape = torch.zeros(1, 3, ph, pw), [1, 3, ph, pw]
    else:
        example, shape = torch.zeros(1, grid.count, 3, *grid.tile), [1, grid.count, 3, *grid.tile]

    class Graph(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            m, s = self.inner(x)
            return m.float(), s.float()

    with torch.no_grad():
        ov_model = ov.convert_model(Graph(model).eval(), example_input=example, input=[shape])
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for output, name in zip(ov_model.outputs, OUTPUT_NAMES):
        output.get_tensor().set_names({name})
    return ov_model


def calibration_input(path: Path, cfg: TilingConfig) -> np.ndarray:
    """One NNCF calibration item: an image's tiles (T, 3, th, tw) for a "tile" graph, else the graph's input."""
    image = read_image(path)
    if cfg.graph != "tile":
        return graph_input(image, cfg)
    if cfg.image_size is not None:
        image = resize_image(image, cfg.image_size)
    return np.stack([prepare_tile(image, box) for box in cfg.grid(image.shape[:2]).boxes])


def run_arrays(compiled, cfg: TilingConfig, arrays: ArraySet) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and merged maps (N, H, W) of evaluation arrays through the runtime's tiled path."""
    runner = TiledRunner(compiled, cfg, blur_sigma=BLUR_SIGMA, blur_kernel=BLUR_KERNEL)
    scores, maps = [], []
    for x in arrays.images:
        r = runner.run_normalized(x)
        scores.append(r.score)
        maps.append(r.anomaly_map)
    return np.asarray(scores, dtype=np.float32), np.stack(maps)


def export_tiled_bundle(
    checkpoint: Path,
    out_dir: Path,
    fp16: bool,
    int8: bool,
    calibration: CalibrationSpec | None = None,
    weights: str | None = None,
    overwrite: bool = False,
    threshold_data: str | None = None,
    graph: str | None = None,
    map_gate: str | None = None,
) -> Bundle:
    import openvino as ov

    from ssn_edge.model.load import heads_trained_on, tiled_from_checkpoint

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (choose another --out or pass --overwrite)")
    model, recipe, state = tiled_from_checkpoint(checkpoint, weights, map_gate=map_gate)
    cfg = model.tiling if graph is None else dataclasses.replace(model.tiling, graph=graph)
    if cfg.mode == "ensemble" and cfg.graph == "tile":
        raise ValueError(f"{checkpoint}: a tiled ensemble exports as graph 'image' or 'tiles', not 'tile'")
    if cfg.graph == "tile" and not recipe.tiling.resize:
        cfg = dataclasses.replace(cfg, image_size=None)  # tile every image at its own resolution
    size = tuple(recipe.data.image_size)
    if int8 and calibration is None:
        calibration = CalibrationSpec()
    calib_images = select_calibration(calibration, recipe) if int8 else []
    data_path = threshold_data or recipe.data.path
    split, samples = threshold_split(data_path)
    arrays = load_arrays(samples, size)

    with tempfile.TemporaryDirectory(prefix="ssn-edge-export-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, Path] = {}
        models: dict[str, dict[str, Any]] = {}
        predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def save(precision: str, ov_model, compress: bool) -> None:
            xml, bin_ = f"model_{precision}.xml", f"model_{precision}.bin"
            ov.save_model(ov_model, tmp / xml, compress_to_fp16=compress)
            files[xml], files[bin_] = tmp / xml, tmp / bin_
            models[precision] = {"xml": xml, "bin": bin_, "weights_precision": WEIGHTS_PRECISION[precision]}
            compiled = ov.Core().compile_model(tmp / xml, "CPU", F32_CONFIG)
            predictions[precision] = run_arrays(compiled, cfg, arrays)

        log.info("converting the tiled model to OpenVINO (graph %s, %d location(s))", cfg.graph, cfg.locations)
        if cfg.graph == "tile":
            ov_fp32 = convert(tile_model(model, recipe), cfg.tile)
            input_size = cfg.tile
        else:
            ov_fp32 = convert_tiled(model, cfg)
            input_size = cfg.grid(cfg.image_size).padded_size if cfg.graph == "image" else cfg.tile
        save("fp32", ov_fp32, compress=False)
        fp32_xml = tmp / "model_fp32.xml"
        if fp16:
            save("fp16", ov.Core().read_model(fp32_xml), compress=True)
        calib_meta = None
        if int8:
            import nncf

            if calibration.defects:
                # Painting defects and the score-offset correction (ssn_edge.export.quantize) are measured on whole-image
                # models only; tiled graphs calibrate on the images as they are, and the record says so.
                calibration = dataclasses.replace(calibration, defects=0.0)
            calib_meta = calibration_record(calibration, calib_images, recipe)
            (tmp / CALIBRATION_FILE).write_text(json.dumps(calib_meta, indent=2))
            files[CALIBRATION_FILE] = tmp / CALIBRATION_FILE
            log.info("quantizing to INT8 on %d calibration images", len(calib_images))
            dataset = nncf.Dataset(calib_images, lambda p: calibration_input(p, cfg))
            quantized = nncf.quantize(ov.Core().read_model(fp32_xml), dataset, subset_size=len(calib_images))
            save("int8", quantized, compress=False)
            models["int8"].update(calibration={"file": CALIBRATION_FILE, "size": len(calib_images)})

        thresholds, normalization = thresholds_from_predictions(arrays, *predictions["fp32"])
        thresholds.update(source=split, method="f1_max", placement="middle of the gap below the f1_max score", data=str(data_path), images=len(arrays))
        for precision, (scores, maps) in predictions.items():
            models[precision]["metrics"] = metrics_from_maps(arrays, scores, maps)
        inp = _input_metadata(input_size)
        if cfg.graph == "tiles":
            inp["layout"] = "NTCHW"
            inp["tiles"] = cfg.locations
        metadata = {
            "input": inp,
            "outputs": {
                "map": map_output(recipe.model.map_gate, per="tile"),
                "score": {"name": "score", "kind": "logit", "per": "tile"},
            },
            "postprocess": {
                "map_upsample": "bilinear",
                "blur_sigma": BLUR_SIGMA,
                "blur_kernel": BLUR_KERNEL,
                "score": "sigmoid",
                "per": "tile, before merging",
            },
            "thresholds": thresholds,
            "normalization": normalization,
            "models": models,
            "calibration": (
                {"file": CALIBRATION_FILE, "count": calib_meta["count"], "spec": calib_meta["spec"]} if calib_meta else None
            ),
            "tiling": cfg.to_dict(),
            # which features the heads learned on; a graph that differs from it shifts maps near tile edges
            "heads_trained_on": heads_trained_on(state),
            "backbone": state["backbone"],
            "recipe": state["recipe"],
            "setting": recipe.train.setting,
            "ssn_edge_version": __version__,
            "source_checkpoint": {"name": checkpoint.name, "sha256": sha256_file(checkpoint), "epoch": state.get("epoch")},
        }
        return write_bundle(out_dir, metadata, files, overwrite=overwrite)
