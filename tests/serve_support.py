"""Tiny hand-built FP32 bundles for the serving and repository tests (torch-free, no exporter, milliseconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SIZE = 64


def tiny_bundle(out: Path, seed: int = 0, image_threshold: float = 0.6, slow: bool = False) -> Path:
    """The tiny SSN-shaped IR of test_runtime (input [-1, 3, 64, 64] -> "map" (B, 1, 16, 16), "score" = max of the
    map) as an FP32 bundle at out. slow: 24 extra 3x3 convolutions at 64 channels, a model that takes
    tens of ms (to fill a server's queue)."""
    import openvino as ov
    import openvino.opset13 as ops

    from ssn_edge.runtime.bundle import write_bundle
    from ssn_edge.runtime.schema import Backbone, BundleMetadata, InputSpec, ModelEntry, Provenance, Thresholds

    rng = np.random.default_rng(seed)
    x = ops.parameter([-1, 3, SIZE, SIZE], np.float32, name="input")
    w1 = ops.constant((rng.standard_normal((8 if not slow else 64, 3, 3, 3)) * 0.3).astype(np.float32))
    h = ops.relu(ops.convolution(x, w1, [1, 1], [1, 1], [1, 1], [1, 1]))
    for _ in range(24 if slow else 0):
        w = ops.constant((rng.standard_normal((64, 64, 3, 3)) * 0.02).astype(np.float32))
        h = ops.relu(ops.convolution(h, w, [1, 1], [1, 1], [1, 1], [1, 1]))
    w2 = ops.constant((rng.standard_normal((1, 64 if slow else 8, 4, 4)) * 0.1).astype(np.float32))
    m = ops.add(ops.convolution(h, w2, [4, 4], [0, 0], [0, 0], [1, 1]), ops.constant(np.full((1, 1, 1, 1), 0.25, np.float32)))
    s = ops.reduce_max(m, ops.constant(np.array([1, 2, 3], dtype=np.int64)), keep_dims=False)
    m.output(0).get_tensor().set_names({"map"})
    s.output(0).get_tensor().set_names({"score"})
    work = out.parent / f".{out.name}.irs"
    work.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.Model([m, s], [x], "tiny_ssn"), work / "model_fp32.xml", compress_to_fp16=False)
    meta = BundleMetadata(
        input=InputSpec(SIZE, SIZE, name="input"),
        thresholds=Thresholds(image=image_threshold, pixel=0.5),
        models={"fp32": ModelEntry(xml="model_fp32.xml", bin="model_fp32.bin", weights_precision="fp32")},
        provenance=Provenance(backbone=Backbone("tiny"), recipe={"name": "tiny"}, setting="unsupervised"),
    )
    write_bundle(out, meta, {"model_fp32.xml": work / "model_fp32.xml", "model_fp32.bin": work / "model_fp32.bin"})
    return out


def png_bytes(seed: int, h: int = 80, w: int = 96) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    img[h // 3: h // 2, w // 3: w // 2] = 255
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()
