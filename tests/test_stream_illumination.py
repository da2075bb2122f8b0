"""The vectorised illumination of the live engine (``operators.place_kernel``: dense scan rows
by one Toeplitz matrix product, the rest window by window or by one scatter-add) equals the
plain per-position sum it replaced — Σ_k |ψ|² placed at every window's top-left pixel — on
every backend, for raster rows, scattered positions, repeated corners and sub-pixel positions
(rounded to their window's pixel as ``make_batch`` does), also inside the engine."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import operators, strict
from cryoptycho.gpu.backend import backend_name, to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import StreamingReconstructor
from hypothesis import given, settings
from hypothesis import strategies as st


def _loop_reference(shape, kernel, corners):
    out = np.zeros(shape, dtype=np.float64)
    my, mx = kernel.shape
    for r, c in corners:
        out[r : r + my, c : c + mx] += kernel
    return out


def _raster(n_rows, n_cols, step, start=(0, 0)):
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return np.stack([r * step + start[0], c * step + start[1]], axis=-1).reshape(-1, 2)


def _corner_sets():
    rng = np.random.default_rng(3)
    raster = _raster(5, 20, 2)  # every row dense: all by the matrix product
    scattered = rng.integers(0, 50, size=(30, 2))  # no row dense: all window by window
    partial = np.concatenate([_raster(3, 20, 2)[7:], scattered[:6]])  # both kinds at once
    repeated = np.concatenate([raster[:25], raster[:25], scattered[:3], scattered[:3]])
    one = np.array([[7, 11]])
    # one scan row (a raster batch's usual case: planned without a sort), repeats included
    row = np.concatenate([_raster(1, 20, 2, start=(4, 3)), _raster(1, 5, 3, start=(4, 3))])
    return {"raster": raster, "scattered": scattered, "partial": partial,
            "repeated": repeated, "one": one, "row": row}


@pytest.mark.parametrize("name", list(_corner_sets()))
def test_place_kernel_equals_per_position_sum(xp, name):
    corners = _corner_sets()[name]
    rng = np.random.default_rng(8)
    kernel = rng.random((12, 10)).astype(np.float32)  # not square: rows and columns apart
    shape = (70, 72)
    expect = _loop_reference(shape, kernel.astype(np.float64), corners.tolist())
    start = rng.random(shape).astype(np.float32)  # accumulates onto what is there
    out = xp.asarray(start.copy())
    dev_kernel = xp.asarray(kernel)
    if backend_name(xp) == "strict":
        with strict.counting() as counted:
            operators.place_kernel(out, dev_kernel, corners)
        assert counted.syncs == 0, counted.summary()  # planned on the host: nothing read back
    else:
        operators.place_kernel(out, dev_kernel, corners)
    if xp is not np:  # the corners already on the device serve the per-window part
        again = xp.asarray(start.copy())
        dev_corners = xp.asarray(corners)
        with strict.counting() as counted:
            operators.place_kernel(again, dev_kernel, corners, dev_corners)
        if backend_name(xp) == "strict":
            assert counted.syncs == 0, counted.summary()
            if name in ("scattered", "one"):  # no dense row: nothing crosses at all
                assert not counted.h2d, counted.summary()
        np.testing.assert_allclose(to_numpy(again), to_numpy(out), rtol=1e-6, atol=1e-6 * expect.max())
    np.testing.assert_allclose(to_numpy(out), start + expect, rtol=1e-5, atol=1e-5 * expect.max())


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(0, 3), min_size=1, max_size=40), cols=st.data(),
       gain=st.sampled_from([1, 3, 10**6]))
def test_place_kernel_equals_per_position_sum_for_any_corners(rows, cols, gain):
    """Any corners, a single scan row (planned without a sort) or a few, repeats and all, on
    either side of the dense-row threshold (``gain`` moves it): the per-position sum. The
    products' counts are whole numbers, so their float32 sums are exact here (kernel values
    are multiples of 1/8 up to 1, at most 40 windows overlap): equality, not closeness."""
    corners = np.array([[r, cols.draw(st.integers(0, 30))] for r in rows])
    kernel = (np.random.default_rng(len(rows)).integers(1, 9, (6, 5)) / 8).astype(np.float32)
    expect = _loop_reference((12, 40), kernel.astype(np.float64), corners.tolist())
    out = np.zeros((12, 40), np.float32)
    real = operators.DENSE_ROW_GAIN
    operators.DENSE_ROW_GAIN = gain
    try:
        operators.place_kernel(out, kernel, corners)
    finally:
        operators.DENSE_ROW_GAIN = real
    np.testing.assert_array_equal(out, expect)


def test_dense_rows_take_the_matrix_product(monkeypatch):
    """The equality above would also hold window by window: check that raster rows do go
    through the product (and scattered windows do not), and that the product alone, with
    every row forced through it, gives the per-window sum too."""
    kernel = np.random.default_rng(1).random((12, 10)).astype(np.float32)
    products = []
    real = operators._one_blas_thread

    def counted():
        products.append(1)
        return real()

    monkeypatch.setattr(operators, "_one_blas_thread", counted)
    sets = _corner_sets()
    operators.place_kernel(np.zeros((70, 72), np.float32), kernel, sets["raster"])
    assert products == [1]
    operators.place_kernel(np.zeros((70, 72), np.float32), kernel, sets["scattered"])
    assert products == [1]
    monkeypatch.setattr(operators, "DENSE_ROW_GAIN", 10**6)  # every row by the product
    out = np.zeros((70, 72), np.float32)
    operators.place_kernel(out, kernel, sets["scattered"])
    assert products == [1, 1]
    expect = _loop_reference((70, 72), kernel.astype(np.float64), sets["scattered"].tolist())
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5 * expect.max())


def _engine_corners(geometry, positions, quantum):
    """Window corners as make_batch rounds them, written out: floor, plus one pixel where the
    fraction rounds up to a whole pixel at the sub-pixel quantum."""
    px = geometry.to_pixels(positions)
    corner = np.floor(px)
    steps = round(1 / quantum)
    corner += np.round((px - corner) / quantum) >= steps
    return corner.astype(int)


@pytest.mark.parametrize("jitter", [0.0, 0.37], ids=["integer", "sub-pixel"])
def test_engine_coverage_equals_per_position_sum(xp, jitter):
    m, pixel = 16, 1e-10
    rng = np.random.default_rng(2)
    probe = (rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m))).astype(np.complex64)
    pos_px = _raster(6, 12, 2.5).astype(float) + rng.uniform(-jitter, jitter, size=(72, 2))
    positions = pos_px * pixel
    frames = rng.poisson(3.0, size=(72, m, m)).astype(np.uint16)
    opts = ReconOptions(backend=backend_name(xp))
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=pixel,
                                    probe=probe, options=opts,
                                    extent_m=((-pixel, 15 * pixel), (-pixel, 30 * pixel)))
    for lo in range(0, 72, 30):  # several calls accumulate
        engine.add_frames(xp.asarray(frames[lo : lo + 30]), positions[lo : lo + 30])
    corners = _engine_corners(engine.geometry, positions, opts.stream.subpixel_quantum)
    expect = _loop_reference(engine.geometry.object_shape, np.abs(probe.astype(np.complex128)) ** 2,
                             corners.tolist())
    got = engine.coverage()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5 * expect.max())
    engine._refresh_illumination()  # the sweep over the store gives the same map
    np.testing.assert_allclose(engine.coverage(), expect, rtol=1e-5, atol=1e-5 * expect.max())


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_mean_counts_over_valid_pixels(dtype, masked):
    """The per-batch count (integer sum less the masked-off pixels) against a direct sum."""
    m, pixel = 8, 1e-10
    rng = np.random.default_rng(6)
    frames = rng.poisson(40.0, size=(10, m, m)).astype(dtype)
    frames[3] = min(np.iinfo(dtype).max, 2**31) if frames.dtype.kind in "ui" else 1e30  # full scale
    mask = rng.random((m, m)) > 0.3 if masked else None
    probe = np.ones((m, m), np.complex64)
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=dtype, pixel_size=pixel,
                                    probe=probe, options=ReconOptions(), mask=mask)
    engine.add_frames(frames[:4], rng.uniform(0, 5e-10, size=(4, 2)))
    engine.add_frames(frames[4:], rng.uniform(0, 5e-10, size=(6, 2)))
    valid = np.ones((m, m), bool) if mask is None else mask
    wide = np.int64 if frames.dtype.kind in "ui" else np.float64  # exact for these values
    expect = sum(float(f[valid].astype(wide).sum()) for f in frames) / len(frames)
    assert engine.mean_counts == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("top", [2**32 // 256 - 1, 2**32 // 256, 2**32 - 1])
def test_uint32_frame_counts_are_exact_either_side_of_32_bits(top):
    """uint32 frames (2×2-binned uint16) are summed per frame in 32 bits only when their largest
    count bounds the sum below 2³²: a frame of 16×16 pixels all at 2³²/256 − 1 sums just under
    it, all at 2³²/256 just over (a 32-bit sum would wrap to 0), one pixel at 2³² − 1 alone."""
    m = 16
    frames = np.full((3, m, m), top, np.uint32) if top < 2**32 - 1 else np.ones((3, m, m), np.uint32)
    frames[0, 4, 5] = top
    frames[2] = 7  # a batch of frames of both kinds
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint32, pixel_size=1e-10,
                                    probe=np.ones((m, m), np.complex64), options=ReconOptions())
    engine.add_frames(frames, np.zeros((3, 2)))
    expect = sum(int(v) for v in frames.ravel().tolist()) / 3
    assert engine.mean_counts == expect


@pytest.mark.parametrize("m, top, lanes", [(8, 4095, True), (8, 4096, False), (96, 28, True), (96, 29, False),
                                           (7, 3, False)])
@pytest.mark.parametrize("masked", [False, True])
def test_uint16_frame_counts_are_exact_either_side_of_the_lane_bound(monkeypatch, m, top, lanes, masked):
    """uint16 frames are summed four counts to a 64-bit word (gpu/stream.py ``_lane_sum``) only
    when no 16-bit lane can carry into the next: largest count × pixels / 4 ≤ 65,535. 8×8 frames
    all at 4095 sum to 65,520 a lane, at 4096 to 65,536 (a lane sum would carry: one count too
    many in the next lane, a wrong total); 96×96 low-dose frames qualify up to 28; 7×7 frames
    (49 pixels, not whole words) never."""
    from cryoptycho.gpu import stream

    calls, lane_sum = [], stream._lane_sum
    monkeypatch.setattr(stream, "_lane_sum", lambda flat: calls.append(flat.shape) or lane_sum(flat))
    rng = np.random.default_rng(9)
    frames = np.full((3, m, m), top, np.uint16)
    frames[1] = rng.integers(0, top + 1, size=(m, m))  # a batch of frames of both kinds
    mask = rng.random((m, m)) > 0.3 if masked else None
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=1e-10,
                                    probe=np.ones((m, m), np.complex64), options=ReconOptions(), mask=mask)
    engine.add_frames(frames, np.zeros((3, 2)))
    valid = np.ones((m, m), bool) if mask is None else mask
    expect = sum(int(v) for v in frames[:, valid].ravel().tolist()) / 3
    assert engine.mean_counts == expect
    assert bool(calls) == lanes



def _laid_out(frames: np.ndarray, layout: str) -> np.ndarray:
    """``frames`` (n, m, m) uint16, as a producer's buffer may hold them: the same counts in
    another memory layout or byte order."""
    n, m, _ = frames.shape
    if layout == "fortran":
        return np.asfortranarray(frames)
    if layout == "every_other":  # a view of every second frame of a larger batch
        both = np.zeros((2 * n, m, m), np.uint16)
        both[::2] = frames
        return both[::2]
    if layout == "columns":  # a view of the columns of wider frames
        wide = np.zeros((n, m, m + 3), np.uint16)
        wide[:, :, 1:m + 1] = frames
        return wide[:, :, 1:m + 1]
    if layout in ("unaligned", "off_word"):  # a buffer not aligned to 2 (or 8) bytes
        shift = 1 if layout == "unaligned" else 2
        buf = np.zeros(frames.nbytes + 8, np.uint8)
        out = np.frombuffer(buf.data, np.uint16, count=frames.size, offset=shift).reshape(frames.shape)
        np.copyto(np.frombuffer(buf.data, np.uint16, count=frames.size, offset=shift).reshape(frames.shape), frames)
        return out
    if layout == "big_endian":
        return frames.astype(">u2")
    return frames


@settings(max_examples=150, deadline=None)
@given(data=st.data(), m=st.integers(2, 13), n=st.integers(1, 5),
       layout=st.sampled_from(["c", "fortran", "every_other", "columns", "unaligned", "off_word", "big_endian",
                               "device"]),
       masked=st.booleans(), backend=st.sampled_from(["numpy", "strict"]))
def test_uint16_frame_counts_are_exact_in_every_layout(data, m, n, layout, masked, backend):
    """The per-batch count of uint16 frames (gpu/stream.py ``_lane_sum`` where it holds, else
    the 32-bit or exact sums) is the exact sum over the valid pixels whatever the frames' size
    (odd pixel counts: not whole 64-bit words), largest count (at and around the lanes' bound
    65,535 / (pixels / 4)), memory layout, alignment, byte order and mask, on either host-frame
    backend (and device frames on the strict one: summed there, no peak measured)."""
    pixels = m * m
    bound = 0xFFFF // max(1, pixels // 4)
    top = data.draw(st.sampled_from(sorted({0, 1, max(0, bound - 1), min(bound, 0xFFFF), min(bound + 1, 0xFFFF),
                                             0xFFFF}))) if data.draw(st.booleans()) else data.draw(st.integers(0, 0xFFFF))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    frames = rng.integers(0, top + 1, size=(n, m, m), dtype=np.uint16)
    frames.reshape(n, -1)[rng.integers(0, n), rng.integers(0, pixels)] = top  # the largest count, somewhere
    mask = rng.random((m, m)) > 0.3 if masked else None
    engine = StreamingReconstructor(frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=1e-10,
                                    probe=np.ones((m, m), np.complex64), options=ReconOptions(backend=backend),
                                    mask=mask)
    given_frames = strict.xp.asarray(frames) if layout == "device" else _laid_out(frames, layout)
    np.testing.assert_array_equal(to_numpy(given_frames), frames)
    engine.add_frames(given_frames, np.zeros((n, 2)))
    valid = np.ones((m, m), bool) if mask is None else mask
    expect = sum(int(v) for v in frames[:, valid].ravel().tolist())
    assert engine.mean_counts == expect / n
    assert engine.peak_count == (None if layout == "device" else int(frames.max()))
