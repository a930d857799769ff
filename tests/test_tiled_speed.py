"""The fast tiled runtime (issue 32) gives what the straightforward tiled path gives.

The reference below is today's behaviour written the slow, obvious way: every tile cut from the normalised image,
its part beyond the image filled with its own part mirrored (a single model's tiles; numpy's reflect), run alone and synchronously, upsampled and blurred on its own, the overlaps averaged in
float64 with an explicit count, the whole map blurred and the blur kept inside the seam bands. The runner
(banded normalisation, batched asynchronous requests, row-band merging, analytic counts) must agree within 1e-5.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

ov = pytest.importorskip("openvino")
import openvino.opset13 as ops  # noqa: E402

from ssn_edge.runtime.tiled import TiledRunner, merge_outputs  # noqa: E402
from ssn_edge.runtime.tiling import TileGrid, TilingConfig  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
TILE, STRIDE, MAP_STRIDE = (64, 48), (32, 40), 4
SIGMA, KERNEL = 4.0, 25  # SSN's post-processing blur (spec 1.7)


def tiny_tile_model(th: int, tw: int) -> "ov.Model":
    """(N, 3, th, tw) -> map (N, 1, th/4, tw/4), score (N,): a strided conv, so each map value depends on the
    pixels near it and the score on the whole tile, as in SSN's tile graph."""
    x = ops.parameter([-1, 3, th, tw], np.float32, name="image")
    return ov.Model(_tiny_outputs(x), [x], "tiny_tile")


def _tiny_outputs(tiles) -> list:
    """(N, 3, th, tw) tiles -> [map, score] of tiny_tile_model (the same weights every call)."""
    rng = np.random.default_rng(7)
    w = ops.constant(rng.standard_normal((1, 3, 5, 5)).astype(np.float32) * 0.3)
    m = ops.convolution(tiles, w, [MAP_STRIDE, MAP_STRIDE], [2, 2], [1, 1], [1, 1])
    m.output(0).get_tensor().set_names({"map"})
    s = ops.reduce_mean(ops.multiply(m, m), ops.constant(np.array([1, 2, 3], np.int64)), False)
    s.output(0).get_tensor().set_names({"score"})
    return [m, s]


@pytest.fixture(scope="module")
def compiled():
    core = ov.Core()
    return core.compile_model(tiny_tile_model(*TILE), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"})


def _unit(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    return image.astype(np.float64)


def _seam_mask(h: int, w: int, grid: TileGrid, frac: float) -> np.ndarray:
    """True within round(frac * tile) pixels of an interior tile edge (a tile's first row / column, or the one
    after its last), either side."""
    ph, pw = grid.padded_size
    mask = np.zeros((h, w), dtype=bool)
    for axis, (size, t, s, n) in enumerate(((ph, grid.tile[0], grid.stride[0], grid.rows),
                                            (pw, grid.tile[1], grid.stride[1], grid.cols))):
        half = int(math.floor(frac * t + 0.5))
        edges = {s * k for k in range(n)} | {s * k + t for k in range(n)}
        for e in (e for e in edges if 0 < e < size):
            lo, hi = max(0, e - half), e + half
            if axis == 0:
                mask[lo:hi, :] = True
            else:
                mask[:, lo:hi] = True
    return mask


def reference_merge(raw: np.ndarray, logits: np.ndarray, grid: TileGrid, cfg: TilingConfig) -> tuple[np.ndarray, float]:
    """(T, h, w) raw tile maps, (T,) score logits -> (map (H, W), score): per tile, then averaged, then seams."""
    ph, pw = grid.padded_size
    total = np.zeros((ph, pw), dtype=np.float64)
    count = np.zeros((ph, pw), dtype=np.float64)
    th, tw = grid.tile
    for k, (y0, x0, y1, x1) in enumerate(grid.boxes):
        up = cv2.resize(raw[k].astype(np.float32), (tw, th), interpolation=cv2.INTER_LINEAR)
        up = cv2.GaussianBlur(up, (KERNEL, KERNEL), sigmaX=SIGMA, sigmaY=SIGMA, borderType=cv2.BORDER_REFLECT)
        total[y0:y1, x0:x1] += up
        count[y0:y1, x0:x1] += 1
    h, w = grid.image_size
    merged = (total / count)[:h, :w].astype(np.float32)
    blurred = cv2.GaussianBlur(merged, (0, 0), sigmaX=cfg.seam_sigma, sigmaY=cfg.seam_sigma, borderType=cv2.BORDER_REFLECT)
    out = np.where(_seam_mask(h, w, grid, cfg.seam_halfwidth), blurred, merged)
    return out, float(np.mean(1.0 / (1.0 + np.exp(-logits.astype(np.float64)))))


def reference_run(compiled, image: np.ndarray, cfg: TilingConfig) -> tuple[np.ndarray, float]:
    """Every tile of the normalised image, mirrored beyond it, through the model one at a time, then reference_merge."""
    h, w = image.shape[:2]
    grid = cfg.grid((h, w))
    normalised = ((_unit(image).astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)
    request = compiled.create_infer_request()
    raws, logits = [], []
    for y0, x0, y1, x1 in grid.boxes:
        part = normalised[:, y0:y1, x0:x1]
        part = np.pad(part, ((0, 0), (0, y1 - y0 - part.shape[1]), (0, x1 - x0 - part.shape[2])), mode="reflect")
        request.infer({0: np.ascontiguousarray(part[None])})
        raws.append(np.array(request.get_tensor("map").data)[0, 0])
        logits.append(float(np.array(request.get_tensor("score").data).reshape(-1)[0]))
    return reference_merge(np.stack(raws), np.array(logits), grid, cfg)


def _image(h: int, w: int, dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 3.0)  # structure, not only noise
    base = np.clip(base * 0.6 + rng.random((h, w, 3)).astype(np.float32) * 0.4, 0, 1)
    if dtype == "uint8":
        return np.round(base * 255).astype(np.uint8)
    if dtype == "uint16":
        return np.round(base * 65535).astype(np.uint16)
    return base


def _check(got_map, got_score, ref_map, ref_score):
    assert got_map.shape == ref_map.shape
    assert float(np.abs(got_map - ref_map).max()) < 1e-5
    assert abs(got_score - ref_score) < 1e-5
    assert float(np.ptp(ref_map)) > 0.1  # a map with something in it, or the comparison would prove little


@pytest.mark.parametrize("h,w,dtype,tile_batch,requests", [
    (150, 205, "uint8", 8, 2),   # padding on both axes, two chunks per row
    (150, 205, "uint8", 1, 1),   # one tile per request, one request
    (97, 300, "uint16", 3, 3),
    (64, 48, "float32", 8, 2),   # one tile
    (230, 130, "uint8", 2, 4),   # more rows than columns
])
def test_runner_equals_the_reference(compiled, h, w, dtype, tile_batch, requests):
    cfg = TilingConfig(TILE, STRIDE)
    image = _image(h, w, dtype)
    ref_map, ref_score = reference_run(compiled, image, cfg)
    runner = TiledRunner(compiled, cfg, tile_batch=tile_batch, requests=requests)
    for _ in range(2):  # the runner's queue and buffers are reused image after image
        r = runner.run(image)
        _check(r.anomaly_map, r.score, ref_map, ref_score)
        assert r.tiles == cfg.grid((h, w)).count


def test_runner_reads_a_bmp_in_bands_to_the_same_result(compiled, tmp_path):
    from ssn_edge.runtime.preprocess import BmpStrips

    cfg = TilingConfig(TILE, STRIDE)
    image = _image(181, 157, "uint8", seed=3)
    path = tmp_path / "frame.bmp"
    cv2.imwrite(str(path), image[..., ::-1])
    ref_map, ref_score = reference_run(compiled, image, cfg)
    stream = tmp_path / "map.npy"
    r = TiledRunner(compiled, cfg).run(BmpStrips(path), stream_to=stream)
    _check(r.anomaly_map, r.score, ref_map, ref_score)
    np.testing.assert_allclose(np.load(stream).astype(np.float32), ref_map, atol=2e-2)  # float16 on disk


@pytest.mark.parametrize("preview_side", [2048, 64])
def test_runner_preview_is_the_block_mean_of_the_reference(compiled, monkeypatch, preview_side):
    from ssn_edge.runtime import tiled

    monkeypatch.setattr(tiled, "PREVIEW_SIDE", preview_side)
    cfg = TilingConfig(TILE, STRIDE)
    image = _image(150, 205, "uint8", seed=5)
    ref_map, ref_score = reference_run(compiled, image, cfg)
    r = TiledRunner(compiled, cfg).run(image, keep_full=False)
    f = r.map_scale
    assert f == (1 if preview_side >= 205 else -(-205 // preview_side))  # no larger than PREVIEW_SIDE a side
    padded = np.pad(ref_map, ((0, -150 % f), (0, -205 % f)), mode="edge")
    expected = padded.reshape(-(-150 // f), f, -(-205 // f), f).mean(axis=(1, 3))  # f 1: the map itself
    assert r.anomaly_map.shape == expected.shape and float(np.abs(r.anomaly_map - expected).max()) < 1e-5
    assert abs(r.map_max - float(ref_map.max())) < 1e-5 and abs(r.score - ref_score) < 1e-5


def test_run_normalized_equals_the_reference(compiled):
    cfg = TilingConfig(TILE, STRIDE)
    image = _image(120, 150, "float32", seed=2)
    ref_map, ref_score = reference_run(compiled, image, cfg)
    x = ((image - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)
    r = TiledRunner(compiled, cfg, tile_batch=2).run_normalized(np.ascontiguousarray(x))
    _check(r.anomaly_map, r.score, ref_map, ref_score)


@pytest.mark.parametrize("size,tile,stride", [((96, 96), (32, 32), (16, 16)), ((70, 90), (32, 32), (24, 24)), ((64, 64), (32, 32), (32, 32))])
def test_merge_outputs_equals_the_reference(size, tile, stride):
    """The fixed-size (ensemble) path: all tiles' raw outputs at once."""
    grid = TileGrid(size, tile, stride)
    cfg = TilingConfig(tile, stride)
    rng = np.random.default_rng(11)
    raw = cv2.GaussianBlur(rng.standard_normal((grid.count * 8, 8)).astype(np.float32), (0, 0), 1.0).reshape(grid.count, 8, 8) * 4
    logits = rng.standard_normal(grid.count).astype(np.float32)
    got, score = merge_outputs(raw, logits, grid, cfg, SIGMA, KERNEL)
    ref, ref_score = reference_merge(raw, logits, grid, cfg)
    _check(got, score, ref, ref_score)


@pytest.mark.parametrize("shape,size,dtype", [((300, 420), (64, 96), "uint8"), ((257, 1000), (64, 64), "uint16"),
                                              ((512, 512), (64, 64), "uint8"), ((90, 70), (90, 70), "float32")])
def test_area_shrink_in_strips_equals_resizing_the_whole_image(shape, size, dtype):
    from ssn_edge.runtime.preprocess import resize_image
    from ssn_edge.runtime.tiled import area_shrink, to_unit

    image = _image(*shape, dtype, seed=4)
    whole = resize_image(to_unit(image), size)
    for strip in (7, 64, 1000):
        got = area_shrink(lambda y0, y1: image[y0:y1], image.shape, size, strip=strip)
        assert got.shape == (*size, 3) and float(np.abs(got - whole).max()) < 1e-6


def test_a_fixed_size_graph_reads_a_large_bmp_in_strips_to_the_same_input(tmp_path, monkeypatch):
    from ssn_edge.runtime import tiled
    from ssn_edge.runtime.preprocess import BmpStrips, prepare

    cfg = TilingConfig((32, 32), (16, 16), image_size=(64, 64), graph="image", mode="ensemble", locations=9)
    image = _image(200, 310, "uint8", seed=6)
    path = tmp_path / "frame.bmp"
    cv2.imwrite(str(path), image[..., ::-1])
    expected = tiled.normalized_graph_input(prepare(tiled.to_unit(image), cfg.image_size), cfg)
    monkeypatch.setattr(tiled, "STRIP_SHRINK_PIXELS", 1000)  # this small frame counts as large
    for source in (image, BmpStrips(path)):
        got = tiled.graph_input(source, cfg)
        assert got.shape == expected.shape and float(np.abs(got - expected).max()) < 1e-5
    with pytest.raises(ValueError, match="at least 64x64"):
        small = tmp_path / "small.bmp"
        cv2.imwrite(str(small), image[:40, :40])
        tiled.graph_input(BmpStrips(small), cfg)


def tiny_tiles_graph(count: int, th: int, tw: int) -> "ov.Model":
    """A "tiles" graph, (1, T, 3, th, tw) -> map (T, 1, th/4, tw/4), score (T,): tiny_tile_model on every tile."""
    x = ops.parameter([1, count, 3, th, tw], np.float32, name="tiles")
    flat = ops.reshape(x, ops.constant(np.array([count, 3, th, tw], np.int64)), False)
    return ov.Model(_tiny_outputs(flat), [x], "tiny_tiles")


def test_a_fixed_size_graph_on_a_large_frame_streams_a_preview_without_the_full_map(tmp_path, monkeypatch):
    """A whole-image graph on a frame larger than its input: the full map is the merged map resized to the frame
    (as before), and past FULL_MAP_PIXELS the runner keeps a block-mean preview and streams the full map instead,
    from the same rows."""
    from ssn_edge.runtime import tiled

    cfg = TilingConfig(TILE, STRIDE, image_size=(96, 112), graph="tiles")
    grid = cfg.grid(cfg.image_size)
    compiled = ov.Core().compile_model(tiny_tiles_graph(grid.count, *TILE), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    image = _image(700, 530, "uint8", seed=9)
    full = TiledRunner(compiled, cfg).run(image, keep_full=True)
    # the merged map at the graph's size, brought to the frame's by OpenCV as a whole
    x = tiled.graph_input(image, cfg)
    request = compiled.create_infer_request()
    request.infer({0: x})
    raw = request.get_tensor("map").data
    merged, score = merge_outputs(raw.reshape(grid.count, *raw.shape[-2:]), request.get_tensor("score").data.reshape(-1),
                                  grid, cfg, SIGMA, KERNEL)
    want = cv2.resize(merged, (530, 700), interpolation=cv2.INTER_LINEAR)
    assert full.map_scale == 1 and float(np.abs(full.anomaly_map - want).max()) < 1e-5 and abs(full.score - score) < 1e-6
    monkeypatch.setattr(tiled, "FULL_MAP_PIXELS", 100 * 100)
    monkeypatch.setattr(tiled, "PREVIEW_SIDE", 128)
    stream = tmp_path / "map.npy"
    small = TiledRunner(compiled, cfg).run(image, stream_to=stream)
    f = small.map_scale
    assert f == -(-700 // 128)
    padded = np.pad(want, ((0, -700 % f), (0, -530 % f)), mode="edge")
    expected = padded.reshape(-(-700 // f), f, -(-530 // f), f).mean(axis=(1, 3))
    assert float(np.abs(small.anomaly_map - expected).max()) < 1e-5
    np.testing.assert_allclose(np.load(stream).astype(np.float32), want, atol=2e-2)  # float16 on disk
    assert abs(small.map_max - float(want.max())) < 1e-5 and small.score == full.score
