"""Tiled runtime (spec 6): streaming band merge == whole-image merge, previews, tile inputs, scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssn_edge.runtime import tiled
from ssn_edge.runtime.preprocess import normalize
from ssn_edge.runtime.seams import smooth_seams
from ssn_edge.runtime.tiled import (BandMerger, MapSink, TileRows, balanced_chunks, graph_input, merge_outputs,
                                    prepare_tile, tiled_image_score)
from ssn_edge.runtime.tiling import TileGrid, TilingConfig, tile, untile


def _stream(grid: TileGrid, cfg: TilingConfig, maps: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    sink = MapSink(grid.image_size, full=True)
    calls: list[tuple[int, int]] = []

    def record(y0: int, rows: np.ndarray) -> None:
        calls.append((y0, len(rows)))
        sink(y0, rows)

    merger = BandMerger(grid, cfg, record)
    per_row = maps.reshape(grid.rows, grid.cols, *grid.tile)
    for i in range(grid.rows):
        merger.add_row(i, per_row[i])
    return sink.full, calls


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 200),
    w=st.integers(1, 200),
    th=st.integers(8, 64),
    tw=st.integers(8, 64),
    fy=st.floats(0.3, 1.0),
    fx=st.floats(0.3, 1.0),
    sigma=st.sampled_from([0.0, 1.0, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_band_merger_equals_whole_image_merge(h, w, th, tw, fy, fx, sigma, seed):
    grid = TileGrid((h, w), (th, tw), (max(1, int(th * fy)), max(1, int(tw * fx))))
    cfg = TilingConfig(grid.tile, grid.stride, seam_sigma=sigma)
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((grid.count, th, tw)).astype(np.float32)
    expected = smooth_seams(untile(maps, grid), grid, cfg.seam_halfwidth, cfg.seam_sigma)
    got, calls = _stream(grid, cfg, maps)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # every row handed out exactly once, in order
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert sum(c[1] for c in calls) == h


def test_band_merger_memory_does_not_grow_with_height():
    """The merger's two buffers are made once, a tile row (plus the blur context) high, whatever the height; rows
    go out EMIT_ROWS at most at a time."""
    grid = TileGrid((4096, 64), (64, 64), (32, 32))
    cfg = TilingConfig(grid.tile, grid.stride)
    seen = []
    merger = BandMerger(grid, cfg, lambda y0, rows: seen.append((merger.sum, merger.done, merger.held, len(rows))))
    buffers = merger.sum, merger.done
    for i in range(grid.rows):
        merger.add_row(i, np.ones((grid.cols, 64, 64), dtype=np.float32))
    assert all(s is buffers[0] and d is buffers[1] for s, d, _, _ in seen)
    assert len(merger.sum) == 64 and len(merger.done) == 64 + 2 * merger.radius
    assert max(held for *_, held, _ in seen) <= len(merger.done)
    assert max(n for *_, n in seen) <= tiled.EMIT_ROWS and sum(n for *_, n in seen) == 4096


@pytest.mark.parametrize("emit_rows", [1, 3, 7])
def test_band_merger_in_small_pieces_and_tile_chunks_equals_whole_image_merge(monkeypatch, emit_rows):
    """Rows handed out a few at a time, tiles added a few at a time (as the runner's requests come back)."""
    monkeypatch.setattr(tiled, "EMIT_ROWS", emit_rows)
    rng = np.random.default_rng(emit_rows)
    for size, tile_, stride in (((70, 90), (32, 32), (24, 24)), ((120, 50), (16, 24), (5, 7)), ((40, 40), (40, 40), (40, 40))):
        grid = TileGrid(size, tile_, stride)
        cfg = TilingConfig(grid.tile, grid.stride)
        maps = rng.standard_normal((grid.count, *grid.tile)).astype(np.float32)
        expected = smooth_seams(untile(maps, grid), grid, cfg.seam_halfwidth, cfg.seam_sigma)
        sink = MapSink(grid.image_size, full=True)
        merger = BandMerger(grid, cfg, sink)
        per_row = maps.reshape(grid.rows, grid.cols, *grid.tile)
        for i in range(grid.rows):
            for j in range(0, grid.cols, 2):
                merger.add_tiles(i, j, per_row[i, j : j + 2])
        np.testing.assert_allclose(sink.full, expected, rtol=0, atol=1e-5)


def test_band_merger_rejects_tiles_out_of_order():
    grid = TileGrid((64, 96), (32, 32), (32, 32))
    merger = BandMerger(grid, TilingConfig(grid.tile, grid.stride), lambda *a: None)
    with pytest.raises(ValueError, match="tile 1 arrived before tile 0"):
        merger.add_tiles(0, 1, np.zeros((1, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="expected maps of shape"):
        merger.add_tiles(0, 0, np.zeros((4, 32, 32), dtype=np.float32))  # more tiles than the row has


def test_tile_rows_read_each_row_once_in_pieces_and_keep_it_as_read(monkeypatch):
    """The band holds the rows as read (uint8), each image row is read once, READ_ROWS at most at a time, and
    each request's input is what tiling the normalised image gives."""
    monkeypatch.setattr(tiled, "READ_ROWS", 5)
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, size=(100, 300, 3), dtype=np.uint8)
    grid = TileGrid((100, 300), (32, 48), (16, 40))  # padding on both axes
    reads: list[tuple[int, int]] = []

    def rows_of(y0: int, y1: int) -> np.ndarray:
        reads.append((y0, y1))
        return image[y0:y1]

    rows = TileRows(rows_of, grid)
    reference = tile(normalize(image.astype(np.float32) / 255.0).transpose(1, 2, 0), grid).transpose(0, 3, 1, 2)
    size, chunks = balanced_chunks(grid.cols, 3)
    for i in range(grid.rows):
        rows.row(i)
        for c, n in chunks:
            got = rows.batch(c, n, size)
            first = i * grid.cols + c
            np.testing.assert_allclose(got[:n], reference[first : first + n], rtol=0, atol=1e-6)
            assert (got[n:] == got[n - 1]).all()
    assert rows.band.dtype == np.uint8 and rows.band.shape == (32, 300, 3)
    assert rows._span.shape[2] <= grid.stride[1] * (size - 1) + grid.tile[1]  # floats only a request wide
    assert [y for y0, y1 in reads for y in range(y0, y1)] == list(range(100))
    assert max(y1 - y0 for y0, y1 in reads) <= 5


def test_band_merger_rejects_rows_out_of_order():
    grid = TileGrid((64, 64), (32, 32), (32, 32))
    merger = BandMerger(grid, TilingConfig(grid.tile, grid.stride), lambda *a: None)
    with pytest.raises(ValueError, match="row 1 arrived before row 0"):
        merger.add_row(1, np.zeros((2, 32, 32), dtype=np.float32))


@pytest.mark.parametrize("h,w,f", [(100, 70, 4), (64, 64, 8), (33, 17, 5)])
def test_map_sink_preview_is_block_mean(h, w, f):
    rng = np.random.default_rng(0)
    full = rng.standard_normal((h, w)).astype(np.float32)
    sink = MapSink((h, w), full=False, preview_factor=f)
    y = 0
    for band in (7, 13, 1, 50, 200):  # bands of any height
        if y >= h:
            break
        sink(y, full[y : y + band])
        y += len(full[y : y + band])
    padded = np.pad(full, ((0, -h % f), (0, -w % f)), mode="edge")
    expected = padded.reshape(-(-h // f), f, -(-w // f), f).mean(axis=(1, 3))
    np.testing.assert_allclose(sink.preview, expected, atol=1e-6)
    assert sink.max == pytest.approx(full.max())


def test_prepare_tile_matches_tiling_a_normalised_image():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    grid = TileGrid((70, 90), (32, 32), (24, 24))  # padding on both axes
    for fill in ("zero", "mirror"):
        reference = tile(normalize(image.astype(np.float32) / 255.0).transpose(1, 2, 0), grid, fill)
        for k, box in enumerate(grid.boxes):
            np.testing.assert_allclose(prepare_tile(image, box, fill), reference[k].transpose(2, 0, 1), atol=1e-6)


def test_a_single_models_tiles_mirror_the_image_where_they_leave_it_and_an_ensembles_hold_zeros():
    from ssn_edge.runtime.tiling import TilingConfig

    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    grid = TileGrid((5, 7), (4, 4), (3, 3))  # rows 0-3 and 3-6 of 5, columns 0-3 and 3-6 of 7: 1 row, 0 columns out
    last = tile(x, grid, "mirror")[-1]  # its own rows 3, 4, then reflected within itself: 3, 4 (columns 3..6)
    np.testing.assert_array_equal(last, x[[3, 4, 3, 4]][:, 3:7])
    assert not tile(x, grid, "zero")[-1][2:].any()
    thin = tile(x, TileGrid((5, 7), (4, 4), (4, 4)), "mirror")[-1]  # one image row (repeated), columns 4, 5, 6, 5
    np.testing.assert_array_equal(thin, np.repeat(x[4:5, [4, 5, 6, 5]], 4, axis=0))
    single = TilingConfig(tile=(4, 4), stride=(3, 3))
    ensemble = TilingConfig(tile=(4, 4), stride=(3, 3), mode="ensemble", graph="tiles", image_size=(5, 7), locations=4)
    assert (single.fill, ensemble.fill, TilingConfig(tile=(32, 32), stride=(32, 32), graph="image", image_size=(40, 40)).fill) \
        == ("mirror", "zero", "zero")


def test_graph_input_shapes_and_consistency():
    rng = np.random.default_rng(2)
    image = rng.random((64, 64, 3)).astype(np.float32)
    shared = TilingConfig((32, 32), (16, 16), image_size=(64, 64), graph="image")
    independent = TilingConfig((32, 32), (16, 16), image_size=(64, 64), graph="tiles")
    whole = graph_input(image, shared)
    tiles = graph_input(image, independent)
    assert whole.shape == (1, 3, 64, 64) and tiles.shape == (1, 9, 3, 32, 32)
    # tile k of the "tiles" input is the k-th box of the "image" input
    y0, x0, y1, x1 = shared.grid((64, 64)).boxes[4]
    np.testing.assert_array_equal(tiles[0, 4], whole[0, :, y0:y1, x0:x1])


def test_merge_outputs_scores():
    grid = TileGrid((64, 64), (32, 32), (32, 32))
    raw = np.zeros((4, 8, 8), dtype=np.float32)
    raw[3] = 5.0  # one hot tile
    logits = np.array([-4.0, -4.0, -4.0, 4.0], dtype=np.float32)
    for method, expected in (("mean", np.mean(1 / (1 + np.exp(-logits)))), ("max", 1 / (1 + np.exp(-4.0)))):
        merged, score = merge_outputs(raw, logits, grid, TilingConfig(grid.tile, grid.stride, score=method))
        assert score == pytest.approx(expected, rel=1e-5)
    merged, score = merge_outputs(raw, logits, grid, TilingConfig(grid.tile, grid.stride, score="map_max"))
    assert merged.shape == (64, 64) and merged[48, 48] == pytest.approx(5.0, abs=1e-3) and merged[8, 8] == pytest.approx(0.0)
    assert score == pytest.approx(tiled_image_score(logits, float(merged.max()), "map_max"))


@pytest.mark.parametrize("tile_batch", [1, 2, 3, 8, 9])
def test_balanced_chunks_cover_a_row_with_one_batch_size(tile_batch):
    from ssn_edge.runtime.tiled import balanced_chunks

    for cols in range(1, 41):
        batch, chunks = balanced_chunks(cols, tile_batch)
        assert 1 <= batch <= tile_batch
        covered = [c + k for c, n in chunks for k in range(n)]
        assert covered == list(range(cols))  # every tile once, in order
        assert all(1 <= n <= batch for _, n in chunks)
        assert len(chunks) == -(-cols // tile_batch)  # no more requests than plain chunking
        assert sum(batch - n for _, n in chunks) < len(chunks)  # padding: less than one tile per request
