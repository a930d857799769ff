"""Benchmark a bundle on this machine: batch-1 latency, throughput, MACs and achieved GOPS per precision, and
the CPU's measured convolution peak to compare them with.

Torch-free. Latency: synchronous inference of one fixed random input with the LATENCY hint (warm-up runs
discarded; median, mean, std, p10, p90 over the timed runs). Throughput: THROUGHPUT hint, an
AsyncInferQueue with the compiled model's optimal number of requests kept full for a fixed time window.
MACs: counted from the OpenVINO graph (Convolution, GroupConvolution, MatMul) at batch 1. GOPS: 2 * MACs /
median latency (one MAC = two operations), so it is the rate a single image actually achieves.
"""

from __future__ import annotations

import math
import platform
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov

from ssn_edge.runtime.bundle import Bundle, load_bundle
from ssn_edge.runtime.engine import (
    PRECISION_HINTS,
    Engine,
    check_device,
    check_precision,
    device_supports_bf16,
    get_core,
    type_name,
)

RESULT_KEYS = (
    "runtime",
    "precision",
    "latency_ms",
    "latency_p10_ms",
    "latency_p90_ms",
    "latency_std_ms",
    "throughput_ips",
    "gops",
    "macs",
    "inference_precision_hint",
    "file_mb",
)

# Which measured conv peak a bundle precision is compared with.
PEAK_FOR_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "int8", "int8_acc": "int8"}


# -- MAC counting --------------------------------------------------------------------------------------


def _static_dims(shape: ov.PartialShape, node: ov.Node, what: str) -> list[int]:
    if not shape.is_static:
        raise ValueError(f"cannot count MACs: {node.get_type_name()} {node.get_friendly_name()!r} has dynamic {what} shape {shape}")
    return [int(d) for d in shape.to_shape()]


def _at_batch_1(model: ov.Model) -> ov.Model:
    """A copy of model with every input's dynamic batch (first) dimension set to 1."""
    model = model.clone()
    shapes = {}
    for inp in model.inputs:
        ps = inp.get_partial_shape()
        if ps.is_static:
            continue
        dims = [ov.Dimension(1) if i == 0 else d for i, d in enumerate(ps)]
        shapes[inp] = ov.PartialShape(dims)
    if shapes:
        model.reshape(shapes)
    return model


def count_macs(model: ov.Model) -> int:
    """Multiply-accumulates of one forward pass at batch 1: Convolution, GroupConvolution and MatMul nodes,
    from their static input/output shapes. Other ops (activations, pooling, elementwise) are not counted."""
    model = _at_batch_1(model)
    total = 0
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        out = _static_dims(node.get_output_partial_shape(0), node, "output")
        if kind == "Convolution":
            # weights (C_out, C_in, k...): every output element sums C_in * prod(k) products
            w = _static_dims(node.get_input_partial_shape(1), node, "weight")
            total += math.prod(out) * math.prod(w[1:])
        elif kind == "GroupConvolution":
            # weights (G, C_out/G, C_in/G, k...)
            w = _static_dims(node.get_input_partial_shape(1), node, "weight")
            total += math.prod(out) * math.prod(w[2:])
        else:
            a = _static_dims(node.get_input_partial_shape(0), node, "input")
            attrs = node.get_attributes()
            if len(a) == 1:
                k = a[0]
            else:
                k = a[-2] if attrs.get("transpose_a", False) else a[-1]
            total += max(1, math.prod(out)) * k
    return int(total)


# -- timing ---------------------------------------------------------------------------------------------


def _random_input(compiled: ov.CompiledModel, seed: int = 0) -> np.ndarray:
    ps = compiled.input(0).get_partial_shape()
    dims = [1 if (i == 0 and d.is_dynamic) else d.get_length() for i, d in enumerate(ps)]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def time_latency(compiled: ov.CompiledModel, x: np.ndarray, warmup: int = 10, runs: int = 50) -> dict[str, float]:
    """Synchronous batch-1 inference of x, warm-up discarded; statistics in ms."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    request = compiled.create_infer_request()
    request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x)))
    for _ in range(max(0, warmup)):
        request.infer()
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        t0 = time.perf_counter()
        request.infer()
        times[i] = (time.perf_counter() - t0) * 1e3
    return {
        "latency_ms": float(np.median(times)),
        "latency_mean_ms": float(times.mean()),
        "latency_std_ms": float(times.std(ddof=1)) if runs > 1 else 0.0,
        "latency_p10_ms": float(np.percentile(times, 10)),
        "latency_p90_ms": float(np.percentile(times, 90)),
        "latency_min_ms": float(times.min()),
    }


def time_throughput(compiled: ov.CompiledModel, x: np.ndarray, seconds: float = 5.0, warmup: int = 2) -> dict[str, float]:
    """Images/s with the optimal number of requests kept in flight for `seconds` (each request: batch of x)."""
    nreq = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    queue = ov.AsyncInferQueue(compiled, nreq)
    tensor = ov.Tensor(np.ascontiguousarray(x))
    for i in range(len(queue)):
        queue[i].set_input_tensor(tensor)
    done = [0]
    lock = threading.Lock()

    def callback(_request: ov.InferRequest, _userdata: Any) -> None:
        with lock:
            done[0] += 1

    queue.set_callback(callback)
    for _ in range(max(0, warmup) * nreq):
        queue.start_async()
    queue.wait_all()
    done[0] = 0
    started = 0
    t0 = time.perf_counter()
    while True:
        queue.start_async()
        started += 1
        if time.perf_counter() - t0 >= seconds and started >= nreq:
            break
    queue.wait_all()
    elapsed = time.perf_counter() - t0
    batch = int(x.shape[0])
    return {"throughput_ips": done[0] * batch / elapsed, "throughput_requests": nreq, "throughput_seconds": elapsed}


def time_tiled_image(engine: Engine, size: tuple[int, int] | None = None, warmup: int = 3, runs: int = 10) -> dict[str, Any]:
    """A tiled bundle's whole-image latency: tiling, every tile's inference, merging and seam smoothing, on a
    random image of `size` (default: the tiling's image size, else 1024x1024). The graph-level latency
    above is per model input (one tile, or one whole image for a fixed-size ensemble)."""
    cfg = engine.tiling
    size = size or cfg.image_size or (1024, 1024)
    image = np.random.default_rng(0).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    runner = engine.runner()
    for _ in range(max(0, warmup)):
        runner.run(image)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        runner.run(image)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "image_latency_ms": float(np.median(times)),
        "image_latency_p90_ms": float(np.percentile(times, 90)),
        "image_size": list(size),
        "tiles_per_image": cfg.grid(size).count,
        "tiling_graph": cfg.graph,
    }


def parse_frame_size(text: str) -> tuple[int, int]:
    """'5472x3648' (width x height) or '2048' (a square side) -> (H, W); a one-line ValueError otherwise."""
    w, sep, h = text.strip().lower().partition("x")
    try:
        size = (int(h if sep else w), int(w))
    except ValueError:
        raise ValueError(f"frame {text!r}: give WIDTHxHEIGHT (5472x3648) or one side (2048)") from None
    if min(size) < 1:
        raise ValueError(f"frame {text!r}: width and height must be >= 1")
    return size


def frame_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 frame with structure at several scales (speed does not depend on content; a constant
    frame could flatter a data-dependent kernel, so not that)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = size
    coarse = cv2.resize(rng.integers(0, 256, (max(1, h // 64), max(1, w // 64), 3), dtype=np.uint8), (w, h),
                        interpolation=cv2.INTER_LINEAR)
    return cv2.add(coarse // 2, rng.integers(0, 128, (h, w, 3), dtype=np.uint8))


def bench_frame(engine: Engine, size: tuple[int, int], runs: int = 3, throughput_seconds: float = 5.0) -> dict[str, Any]:
    """A tiled bundle on one frame of `size`, beside the tile model's own throughput, in one run.

    Frame latency: tiling, every tile's inference, merging and seam smoothing of an in-memory uint8 frame (one
    warm-up run discarded, median of `runs`). Model throughput: the compiled graph alone at its input size
    (batch 1, the optimal number of requests in flight), measured right after. For a tile graph the overhead
    ratio is tiled MP/s over (model images/s x tile pixels / pixels covered counting overlap), which is
    (tiles / model images/s) / frame latency: 1.0 when the frame costs exactly its tiles' inference."""
    cfg = engine.tiling
    if cfg is None:
        raise ValueError(f"{engine.bundle.path}: --frame needs a tiled bundle")
    image = frame_image(size)
    runner = engine.runner()
    runner.run(image)
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        result = runner.run(image)
        times.append(time.perf_counter() - t0)
    latency = float(np.median(times))
    runner.close()
    record: dict[str, Any] = {
        "precision": engine.precision, "frame": [size[1], size[0]], "tiles": result.tiles, "tiling_graph": cfg.graph,
        "latency_ms": latency * 1e3, "latency_p90_ms": float(np.percentile(times, 90)) * 1e3,
        "megapixels_per_s": size[0] * size[1] / 1e6 / latency, "runs": max(1, runs), "mode": engine.mode,
        "model_throughput_ips": None, "ratio": None, "ratio_of": None,
    }
    if throughput_seconds > 0:
        ips = time_throughput(engine.compiled, _random_input(engine.compiled), throughput_seconds)["throughput_ips"]
        record["model_throughput_ips"] = ips
        if cfg.graph == "tile":
            record.update(ratio=result.tiles / ips / latency, ratio_of="tiled_vs_model_throughput")
    return record


def bench_frames(
    bundle_path: str | Path | Bundle,
    sizes: Sequence[tuple[int, int]],
    precisions: Sequence[str] | None = None,
    runs: int = 3,
    throughput_seconds: float = 5.0,
    device: str = "CPU",
) -> list[dict[str, Any]]:
    """bench_frame for every precision (default: int8 where the bundle has it, else fp32) and frame size, with
    the THROUGHPUT hint `ssn-edge predict` runs tiled bundles with."""
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    if bundle.tiling is None:
        raise ValueError(f"{bundle.path}: --frame needs a tiled bundle (this one runs whole images)")
    names = list(dict.fromkeys(precisions)) if precisions else (["int8"] if "int8" in bundle.precisions else ["fp32"])
    for name in names:
        check_precision(bundle, name)
    records = []
    for name in names:
        engine = Engine(bundle, precision=name, device=device, mode="throughput")
        for size in sizes:
            records.append({**bench_frame(engine, size, runs, throughput_seconds), "bundle": str(bundle.path)})
        del engine
    return records


def _file_mb(*files: Path) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def _cpu_name(core: ov.Core, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:
        return platform.processor() or "unknown"


def bench_precisions(bundle: Bundle, device: str = "CPU", core: ov.Core | None = None) -> list[str]:
    """Every precision in the bundle, plus "bf16" (the fp32 IR at a bf16 hint) where the device has BF16."""
    core = core or get_core()
    names = list(bundle.precisions)
    if "fp32" in names and device_supports_bf16(device, core):
        names.insert(names.index("fp32") + 1, "bf16")
    return names


def bench_bundle(
    bundle_path: str | Path | Bundle,
    precisions: Sequence[str] | None = None,
    warmup: int = 10,
    runs: int = 50,
    throughput_seconds: float = 5.0,
    device: str = "CPU",
) -> list[dict[str, Any]]:
    """One result record per precision (keys: RESULT_KEYS plus details). throughput_seconds <= 0 skips the
    throughput measurement (throughput_ips None)."""
    if not math.isfinite(throughput_seconds):
        raise ValueError(f"throughput seconds must be a finite number (0 skips), got {throughput_seconds}")
    core = get_core()
    check_device(device, core)
    bundle = bundle_path if isinstance(bundle_path, Bundle) else load_bundle(bundle_path)
    names = list(dict.fromkeys(precisions)) if precisions else bench_precisions(bundle, device, core)  # each once
    for name in names:  # all refused up front, before minutes of measuring
        check_precision(bundle, name)
        if PRECISION_HINTS[name] == "bf16" and not device_supports_bf16(device, core):
            raise ValueError(f"precision 'bf16' needs a {device} with native BF16 (OPTIMIZATION_CAPABILITIES lacks it)")
    cpu = _cpu_name(core, device)
    records = []
    for name in names:
        engine = Engine(bundle, precision=name, device=device, mode="latency", core=core)
        x = _random_input(engine.compiled)
        lat = time_latency(engine.compiled, x, warmup, runs)
        macs = count_macs(engine.model)
        record: dict[str, Any] = {
            "runtime": "openvino",
            "precision": name,
            **lat,
            "throughput_ips": None,
            "gops": 2.0 * macs / (lat["latency_ms"] * 1e-3) / 1e9,
            "macs": macs,
            "inference_precision_hint": engine.precision_hint,
            "inference_precision": engine.inference_precision,
            "file_mb": _file_mb(engine.model_path, engine.weights_path),
            "model": str(engine.model_path.relative_to(bundle.path)),
            "bundle": str(bundle.path),
            "input_size": list(bundle.input_size),
            "batch": 1,
            "warmup": warmup,
            "runs": runs,
            "device": device,
            "cpu": cpu,
            "openvino": ov.get_version(),
        }
        if engine.tiling is not None:
            record.update(time_tiled_image(engine, warmup=min(warmup, 3), runs=max(3, runs // 5)))
        del engine
        if throughput_seconds > 0:
            tput = Engine(bundle, precision=name, device=device, mode="throughput", core=core)
            record.update(time_throughput(tput.compiled, x, throughput_seconds))
            del tput
        records.append(record)
    return records


# -- the CPU's convolution peak -------------------------------------------------------------------------


def conv_model(channels: int = 256, size: int = 64, seed: int = 0) -> ov.Model:
    """One 3x3 convolution, channels -> channels, size x size, batch 1, 'same' padding."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    x = ops.parameter([1, channels, size, size], np.float32, name="input")
    w = ops.constant((rng.standard_normal((channels, channels, 3, 3)) / math.sqrt(9 * channels)).astype(np.float32))
    y = ops.convolution(x, w, [1, 1], [1, 1], [1, 1], [1, 1])
    y.output(0).get_tensor().set_names({"output"})
    return ov.Model([y], [x], "conv_peak")


def conv_peak(
    precision: str = "f32",
    channels: int = 256,
    size: int = 64,
    warmup: int = 10,
    runs: int = 50,
    device: str = "CPU",
) -> dict[str, Any]:
    """This device's achievable ops/s on a large 3x3 convolution, timed exactly like bench_bundle's latency.

    precision: "f32", "bf16" (the f32 model with a bf16 hint; needs native BF16) or "int8" (quantized with
    nncf.quantize on a few random inputs). nncf is a training/export dependency, not a runtime one: it is
    imported here only, so the int8 peak needs the train extras installed.
    """
    if precision not in ("f32", "bf16", "int8"):
        raise ValueError(f"unknown peak precision {precision!r}; choose f32, bf16 or int8")
    core = get_core()
    check_device(device, core)
    if precision == "bf16" and not device_supports_bf16(device, core):
        raise ValueError(f"precision 'bf16' needs a {device} with native BF16 (OPTIMIZATION_CAPABILITIES lacks it)")
    model = conv_model(channels, size)
    if precision == "int8":
        try:
            import nncf  # noqa: PLC0415 - optional: not a runtime dependency
        except ImportError:
            raise ValueError("the int8 conv peak needs nncf (pip install 'ssn-edge[train]')") from None
        rng = np.random.default_rng(1)
        samples = [rng.standard_normal((1, channels, size, size)).astype(np.float32) for _ in range(4)]
        model = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = core.compile_model(model, device, {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"})
    x = _random_input(compiled)
    lat = time_latency(compiled, x, warmup, runs)
    macs = count_macs(model)
    return {
        "runtime": "openvino",
        "precision": precision,
        **lat,
        "throughput_ips": None,
        "gops": 2.0 * macs / (lat["latency_ms"] * 1e-3) / 1e9,
        "macs": macs,
        "inference_precision_hint": hint,
        "inference_precision": type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "file_mb": None,
        "model": f"conv3x3 {channels}->{channels} {size}x{size} batch 1",
        "warmup": warmup,
        "runs": runs,
        "device": device,
        "cpu": _cpu_name(core, device),
        "openvino": ov.get_version(),
    }


# Convolution shapes the peak probe tries (channels, size): the best of them is the peak. One 256-channel
# 64x64 conv alone left the INT8 peak below what SSN itself achieved (its 1024-wide 1x1 and 385-channel 5x5
# convs feed the VNNI units better), so wider and smaller-map shapes are tried too.
PEAK_SHAPES = ((256, 64), (512, 64), (512, 32), (1024, 32))


def conv_peak_sweep(
    precision: str = "f32",
    shapes: Sequence[tuple[int, int]] = PEAK_SHAPES,
    warmup: int = 10,
    runs: int = 50,
    device: str = "CPU",
) -> dict[str, Any]:
    """The highest GOPS over several 3x3-conv shapes (conv_peak for each); the record names the winner and
    keeps every shape's GOPS under "sweep"."""
    results = [conv_peak(precision, c, n, warmup, runs, device) for c, n in shapes]
    best = max(results, key=lambda r: r["gops"])
    return {**best, "sweep": {r["model"]: round(r["gops"], 1) for r in results}}


def peak_ratio(record: dict[str, Any], peaks: dict[str, dict[str, Any]]) -> float | None:
    """record's achieved GOPS over the measured peak of its kind (f32 / bf16 / int8), or None."""
    peak = peaks.get(PEAK_FOR_PRECISION.get(record.get("precision", ""), ""))
    if not peak or not peak.get("gops"):
        return None
    return float(record["gops"]) / float(peak["gops"])
