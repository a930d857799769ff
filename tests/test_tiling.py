"""Tiled inference core (spec 6): grid geometry, tile/untile, seam smoothing, score merging, config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssn_edge.runtime.seams import seam_band_mask, smooth_seams
from ssn_edge.runtime.tiling import TileGrid, TilingConfig, image_score, merge_scores, tile, untile

# Per axis, keep (tiles per axis) * (tile size) <= this, so one example stays well under ~10 MB and the whole
# property test runs in seconds; stride 1 is still drawn for small tiles, and stride == tile always can be.
AXIS_BUDGET = 1024


@st.composite
def axis(draw):
    size = draw(st.integers(1, 300))
    t = draw(st.integers(1, 128))
    min_stride = 1
    if size > t and AXIS_BUDGET // t > 1:
        min_stride = max(1, math.ceil((size - t) / (AXIS_BUDGET // t - 1)))
    min_stride = min(min_stride, t)
    s = draw(st.integers(min_stride, t))
    return size, t, s


@st.composite
def tiling_case(draw):
    (h, th, sh), (w, tw, sw) = draw(axis()), draw(axis())
    channels = draw(st.sampled_from([None, 3]))
    dtype = draw(st.sampled_from([np.float32, np.uint8]))
    seed = draw(st.integers(0, 2**32 - 1))
    return TileGrid((h, w), (th, tw), (sh, sw)), channels, np.dtype(dtype), seed


def _random_image(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    # a wide spread of magnitudes and signs, so an inexact average would show up
    return (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, size=shape)).astype(dtype)


def _check_grid_geometry(grid: TileGrid) -> None:
    (h, w), (th, tw), (sh, sw) = grid.image_size, grid.tile, grid.stride
    ph, pw = grid.padded_size
    assert grid.count == grid.rows * grid.cols == len(grid.boxes)
    assert ph >= h and pw >= w
    assert (ph, pw) == ((grid.rows - 1) * sh + th, (grid.cols - 1) * sw + tw)
    # minimal: one tile fewer along an axis would leave the image's last row/column uncovered
    if grid.rows > 1:
        assert (grid.rows - 2) * sh + th < h
    if grid.cols > 1:
        assert (grid.cols - 2) * sw + tw < w
    # every image pixel is covered by >= 1 tile (the grid is a product, so per axis suffices)
    covered_y, covered_x = np.zeros(ph, bool), np.zeros(pw, bool)
    for y0, x0, y1, x1 in set(grid.boxes):
        assert y1 - y0 == th and x1 - x0 == tw and y0 >= 0 and x0 >= 0 and y1 <= ph and x1 <= pw
        covered_y[y0:y1] = True
        covered_x[x0:x1] = True
    assert covered_y[:h].all() and covered_x[:w].all()


def _check_round_trip(grid: TileGrid, channels, dtype, seed) -> None:
    shape = grid.image_size if channels is None else (*grid.image_size, channels)
    x = _random_image(shape, dtype, seed)
    tiles = tile(x, grid)
    assert tiles.shape == (grid.count, *grid.tile, *(() if channels is None else (channels,)))
    assert tiles.dtype == x.dtype
    # tile contents: the zero-padded image under each box (a sample of boxes, boxes are row-major)
    padded = np.zeros((*grid.padded_size, *shape[2:]), dtype)
    padded[: shape[0], : shape[1]] = x
    boxes = grid.boxes
    for k in np.random.default_rng(seed).choice(len(boxes), size=min(len(boxes), 20), replace=False):
        y0, x0, y1, x1 = boxes[k]
        assert np.array_equal(tiles[k], padded[y0:y1, x0:x1])
    back = untile(tiles, grid)
    assert back.shape == x.shape
    if dtype == np.float32:
        assert back.dtype == np.float32
        assert np.array_equal(back, x)
    else:
        assert back.dtype == np.float64
        assert np.array_equal(back, x.astype(np.float64))
        assert np.array_equal(back.astype(dtype), x)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiling_case())
def test_tile_untile_round_trip_and_coverage(case):
    grid, channels, dtype, seed = case
    _check_grid_geometry(grid)
    _check_round_trip(grid, channels, dtype, seed)


@pytest.mark.parametrize(
    "image_size,tile_size,stride",
    [
        ((1, 1), (1, 1), (1, 1)),
        ((1, 300), (128, 1), (1, 1)),  # smaller than a tile on one axis, stride-1 single-pixel tiles on the other
        ((20, 30), (128, 64), (7, 64)),  # smaller than one tile: padded up to exactly one tile
        ((300, 300), (128, 128), (128, 128)),  # stride == tile, not an exact fit
        ((256, 256), (128, 128), (64, 64)),  # exact fit with overlap: no padding
        ((300, 17), (100, 3), (33, 2)),
    ],
)
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_round_trip_edge_cases(image_size, tile_size, stride, channels, dtype):
    grid = TileGrid(image_size, tile_size, stride)
    _check_grid_geometry(grid)
    _check_round_trip(grid, channels, np.dtype(dtype), seed=0)


def test_padded_size_examples():
    assert TileGrid((20, 30), (128, 64), (7, 64)).padded_size == (128, 64)
    g = TileGrid((300, 300), (128, 128), (128, 128))
    assert (g.rows, g.cols, g.padded_size) == (3, 3, (384, 384))
    g = TileGrid((512, 512), (256, 256), (128, 128))  # spec 6: 9 overlapping 256 tiles
    assert (g.rows, g.cols, g.padded_size) == (3, 3, (512, 512))
    assert g.boxes[:4] == [(0, 0, 256, 256), (0, 128, 256, 384), (0, 256, 256, 512), (128, 0, 384, 256)]
    assert g.interior_seams() == ([128, 256, 384], [128, 256, 384])


def test_stride_larger_than_tile_is_rejected_naming_both():
    with pytest.raises(ValueError) as err:
        TileGrid((100, 100), (32, 32), (40, 16))
    assert "(40, 16)" in str(err.value) and "(32, 32)" in str(err.value)
    with pytest.raises(ValueError):
        TileGrid((100, 100), (32, 32), (16, 33))
    for bad in [((0, 10), (4, 4), (2, 2)), ((10, 10), (4, -1), (2, 2)), ((10, 10), (4, 4), (2.0, 2))]:
        with pytest.raises(ValueError):
            TileGrid(*bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_overlap_region_is_the_mean_of_its_tiles(dtype):
    # 2 x 2 tiles of 10 with stride 6 on a 16 x 16 image: the centre [6:10, 6:10] is under all four
    grid = TileGrid((16, 16), (10, 10), (6, 6))
    assert grid.count == 4
    values = [1, 2, 3, 10]
    tiles = np.stack([np.full((10, 10), v, dtype=dtype) for v in values])
    merged = untile(tiles, grid)
    assert merged[6:10, 6:10] == pytest.approx(np.full((4, 4), np.mean(values)))  # 4.0
    assert merged[0:6, 6:10] == pytest.approx(np.full((6, 4), 1.5))  # tiles 0 and 1
    assert merged[6:10, 0:6] == pytest.approx(np.full((4, 6), 2.0))  # tiles 0 and 2
    assert merged[10:, 10:] == pytest.approx(np.full((6, 6), 10.0))  # tile 3 alone
    assert merged[0:6, 0:6] == pytest.approx(np.full((6, 6), 1.0))
    # a non-integral mean is not truncated for integer tiles
    two = TileGrid((10, 16), (10, 10), (10, 6))
    merged = untile(np.stack([np.full((10, 10), 1, dtype), np.full((10, 10), 4, dtype)]), two)
    assert merged[:, 6:10] == pytest.approx(np.full((10, 4), 2.5))


def test_untile_rejects_wrong_tile_batch():
    grid = TileGrid((16, 16), (10, 10), (6, 6))
    with pytest.raises(ValueError):
        untile(np.zeros((3, 10, 10), np.float32), grid)
    with pytest.raises(ValueError):
        untile(np.zeros((4, 10, 9), np.float32), grid)


@pytest.mark.parametrize("axis_", [0, 1])
def test_seam_smoothing_removes_a_step_and_leaves_the_rest_untouched(axis_):
    grid = TileGrid((128, 128), (64, 64), (64, 64))
    step = 5.0
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.01, size=(128, 128)).astype(np.float32)  # texture: "unchanged" must be exact
    base[64:, :] += step  # the two tile rows disagree by `step` at the seam y = 64
    m = base if axis_ == 0 else np.ascontiguousarray(base.T)
    out = smooth_seams(m, grid)
    assert out.shape == m.shape and out.dtype == m.dtype
    o = out if axis_ == 0 else out.T
    assert np.abs(base[64] - base[63]).min() > 0.99 * step
    assert np.abs(o[64] - o[63]).max() < 0.25 * step  # continuous across the seam
    assert np.abs(np.diff(o.astype(np.float64), axis=0)).max() < 0.25 * step  # and nowhere a new cliff
    mask = seam_band_mask(grid)
    assert mask.any() and not mask.all()
    assert np.array_equal(out[~mask], m[~mask])  # bit-identical outside the band
    assert not np.array_equal(out[mask], m[mask])


def test_band_width_is_ten_percent_of_the_tile_per_axis():
    # tile height 40 -> 4 rows each side of y = 40; tile width 100 -> 10 columns each side of x = 100
    grid = TileGrid((80, 200), (40, 100), (40, 100))
    assert grid.interior_seams() == ([40], [100])
    mask = seam_band_mask(grid)
    assert mask.shape == (80, 200)
    assert np.flatnonzero(mask[:, 0]).tolist() == list(range(36, 44))
    assert np.flatnonzero(mask[0, :]).tolist() == list(range(90, 110))
    assert mask.sum() == 8 * 200 + 20 * 80 - 8 * 20
    assert np.flatnonzero(seam_band_mask(grid, 0.2)[:, 0]).tolist() == list(range(32, 48))
    assert not seam_band_mask(grid, 0.0).any()


def test_band_is_cropped_to_the_image_and_padding_seams_are_ignored():
    # 100 wide, tiles 64 stride 64: padded to 128, the only interior seam x = 64 (x = 128 is the padded edge)
    grid = TileGrid((30, 100), (64, 64), (64, 64))
    assert grid.interior_seams() == ([], [64])
    mask = seam_band_mask(grid)
    assert mask.shape == (30, 100)
    assert np.flatnonzero(mask[0]).tolist() == list(range(58, 70))
    # a seam just inside the image edge: its band is cut at the image border
    grid = TileGrid((10, 66), (10, 64), (10, 2))
    assert grid.interior_seams() == ([], [2, 64])
    assert np.flatnonzero(seam_band_mask(grid)[0]).tolist() == list(range(0, 8)) + list(range(58, 66))


def test_single_tile_grid_leaves_the_map_unchanged():
    m = np.random.default_rng(1).standard_normal((50, 60)).astype(np.float32)
    for grid in [TileGrid((50, 60), (64, 64), (32, 32)), TileGrid((50, 60), (50, 60), (50, 60))]:
        assert grid.count == 1 and grid.interior_seams() == ([], [])
        assert not seam_band_mask(grid).any()
        out = smooth_seams(m, grid)
        assert out is not m and np.array_equal(out, m) and out.dtype == m.dtype


def test_merge_scores_and_image_score():
    s = np.array([0.1, 0.5, 0.9, 0.3])
    assert merge_scores(s, "mean") == pytest.approx(0.45)
    assert merge_scores(s, "max") == pytest.approx(0.9)
    assert merge_scores(s) == pytest.approx(0.45)  # spec default: mean
    merged = np.zeros((8, 8), np.float32)
    merged[3, 4] = 7.5
    assert image_score(s, merged, "mean") == pytest.approx(0.45)
    assert image_score(s, merged, "max") == pytest.approx(0.9)
    assert image_score(s, merged, "map_max") == pytest.approx(7.5)
    assert isinstance(image_score(s, merged, "map_max"), float)
    for bad in ["median", "MAX", ""]:
        with pytest.raises(ValueError):
            merge_scores(s, bad)
        with pytest.raises(ValueError):
            image_score(s, merged, bad)
    with pytest.raises(ValueError):
        merge_scores(np.array([]), "mean")


def test_tiling_config_round_trip_and_bad_key():
    cfg = TilingConfig(
        tile=(256, 256), stride=(128, 128), score="max", seam_halfwidth=0.15, mode="ensemble",
        image_size=(512, 512), locations=9, graph="image",
    )
    d = json.loads(json.dumps(cfg.to_dict()))  # the bundle metadata is JSON
    assert d["tile"] == [256, 256] and d["mode"] == "ensemble" and d["image_size"] == [512, 512]
    again = TilingConfig.from_dict(d)
    assert again == cfg and again.tile == (256, 256) and again.stride == (128, 128)
    assert TilingConfig.from_dict({"tile": [64, 64], "stride": [32, 32]}) == TilingConfig((64, 64), (32, 32))
    assert cfg.grid((512, 512)).count == 9
    with pytest.raises(ValueError, match="strid_e"):
        TilingConfig.from_dict({"tile": [64, 64], "strid_e": [32, 32]})
    with pytest.raises(ValueError, match="stride"):
        TilingConfig.from_dict({"tile": [64, 64]})
    with pytest.raises(ValueError, match="mode"):
        TilingConfig.from_dict({"tile": [64, 64], "stride": [32, 32], "mode": "many"})
    with pytest.raises(ValueError, match="score"):
        TilingConfig((64, 64), (32, 32), score="median")
    with pytest.raises(ValueError):
        TilingConfig((64, 64), (65, 32))
    with pytest.raises(ValueError, match="image_size is required"):
        TilingConfig((64, 64), (32, 32), graph="image")
    with pytest.raises(ValueError, match="ensemble"):
        TilingConfig((64, 64), (32, 32), mode="ensemble", image_size=(128, 128), locations=9)
    with pytest.raises(ValueError, match="9 locations"):
        TilingConfig((64, 64), (32, 32), mode="ensemble", image_size=(128, 128), locations=4, graph="tiles")
    with pytest.raises(ValueError, match="multiples of 16"):
        TilingConfig((72, 72), (36, 36), image_size=(144, 144), graph="image")


def test_large_map_tiles_with_one_tiles_worth_of_memory():
    grid = TileGrid((2048, 2048), (256, 256), (128, 128))
    assert (grid.rows, grid.cols) == (15, 15)
    assert len(grid.boxes) == grid.rows * grid.cols == grid.count == 225
    assert grid.padded_size == (2048, 2048)
    x = np.random.default_rng(2).random((2048, 2048), dtype=np.float32)
    tracemalloc.start()
    try:
        tiles = tile(x, grid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tiles.shape == (225, 256, 256) and tiles.dtype == np.float32
    assert peak < 1.1 * tiles.nbytes  # the batch itself, no intermediate copies
    assert np.array_equal(tiles[16], x[128:384, 128:384])  # row 1, col 1
    assert np.array_equal(untile(tiles, grid), x)


def test_tiling_core_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import ssn_edge.runtime.tiling, ssn_edge.runtime.seams\n"
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
