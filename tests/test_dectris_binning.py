"""Crop and bin on arrival: integer counts, exact sums, masks, saturation, beam-centre placement."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu.framestore import NARROW_MAX
from cryoptycho.protocols.dectris.binning import PEAK_EXACT_ABOVE, FrameReducer
from hypothesis import given, settings
from hypothesis import strategies as st


def _frames(n: int, h: int, w: int, dtype: type = np.uint16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3, (n, h, w)).astype(dtype)


@pytest.mark.parametrize(("crop", "b"), [(192, 2), (192, 4), (96, 2), (48, 1)])
def test_binning_keeps_integer_counts_and_exact_sums(crop: int, b: int) -> None:
    frames = _frames(3, 192, 192)
    red = FrameReducer.build((192, 192), frames.dtype, beam_center_px=(96, 96), crop=crop, bin=b)
    counts, valid = red(frames)
    m = crop // b
    assert counts.shape == (3, m, m) and valid.all()
    assert counts.dtype.kind == "u"
    lo = 96 - crop // 2
    window = frames[:, lo : lo + crop, lo : lo + crop].astype(np.int64)
    # every binned pixel is the sum of its own b×b block, computed here with a loop
    for i in range(0, m, max(1, m // 5)):
        for j in range(0, m, max(1, m // 7)):
            block = window[:, i * b : (i + 1) * b, j * b : (j + 1) * b].sum(axis=(1, 2))
            np.testing.assert_array_equal(counts[:, i, j], block)
    assert counts.sum() == window.sum()


def test_beam_centre_lands_on_pixel_m_over_2() -> None:
    frame = np.zeros((100, 140), np.uint8)
    frame[37, 81] = 5  # the direct beam
    for b, crop in ((1, 32), (2, 32), (4, 48)):
        red = FrameReducer.build(frame.shape, frame.dtype, beam_center_px=(37.0, 81.0), crop=crop, bin=b)
        counts, _ = red(frame)
        m = crop // b
        assert counts[0, m // 2, m // 2] == 5, (b, crop)
        assert counts.sum() == 5


def test_output_dtype_is_wide_enough_for_the_bin() -> None:
    red8 = FrameReducer.build((8, 8), np.uint8, bin=1)
    assert red8.out_dtype == np.uint8
    red8b = FrameReducer.build((8, 8), np.uint8, bin=2)
    assert red8b.out_dtype == np.uint16
    frames = np.full((1, 8, 8), 254, np.uint8)
    counts, _ = red8b(frames)
    assert (counts == 4 * 254).all()
    assert FrameReducer.build((8, 8), np.uint16, bin=2).out_dtype == np.uint32


def test_masked_pixels_invalidate_their_bin_and_count_zero() -> None:
    frames = np.full((2, 8, 8), 3, np.uint16)
    bad = np.zeros((8, 8), bool)
    bad[1, 2] = True  # in bin (0, 1) of a 2×2 binning
    frames[:, 1, 2] = 65535  # detector flag value
    red = FrameReducer.build((8, 8), np.uint16, beam_center_px=(4, 4), crop=8, bin=2, bad_pixels=bad)
    counts, valid = red(frames)
    expected_valid = np.ones((4, 4), bool)
    expected_valid[0, 1] = False
    np.testing.assert_array_equal(red.static_valid, expected_valid)
    np.testing.assert_array_equal(valid[0], expected_valid)
    assert counts[0, 0, 1] == 9  # three good pixels of 3; the flagged one contributes 0
    assert counts[0, 0, 0] == 12


def test_saturated_pixels_are_invalid_in_their_frame_only() -> None:
    frames = np.full((2, 4, 4), 1, np.uint16)
    frames[1, 3, 3] = 500
    red = FrameReducer.build((4, 4), np.uint16, crop=4, bin=2, saturation_value=100)
    counts, valid = red(frames)
    assert valid[0].all()
    assert not valid[1, 1, 1] and valid[1].sum() == 3
    assert counts[1, 1, 1] == 3 + 100  # clipped to the saturation value, a lower bound
    # without a saturation value the dtype maximum is the no-data flag
    frames[1, 3, 3] = 65535
    _, valid = FrameReducer.build((4, 4), np.uint16, crop=4, bin=2)(frames)
    assert not valid[1, 1, 1]


def test_window_beyond_the_detector_is_zero_and_invalid() -> None:
    frames = np.ones((1, 10, 10), np.uint8)
    red = FrameReducer.build((10, 10), np.uint8, beam_center_px=(1, 5), crop=8, bin=1)
    counts, valid = red(frames)
    # beam at row 1 → pixel 4: window rows −3 … 4, of which −3, −2, −1 are off the detector
    assert not valid[0, :3].any() and valid[0, 3:].all()
    assert counts[0, :3].sum() == 0 and counts[0, 3:].sum() == 5 * 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detector_shape": (514, 1030)}, "not square: set crop"),
        ({"crop": 10, "bin": 4}, "multiple of bin"),
        ({"crop": 4, "bin": 4}, "give 1×1 frames; at least 2×2"),
        ({"detector_shape": (3, 3), "bin": 3}, "give 1×1 frames; at least 2×2"),
        ({"bin": 0}, "positive integer"),
        ({"bad_pixels": np.zeros((3, 3), bool)}, "pixel mask shape"),
        ({"in_dtype": np.float32}, "unsigned integer"),
    ],
)
def test_bad_reducer_settings_name_the_field(kwargs: dict, match: str) -> None:
    args = {"detector_shape": (16, 16), "in_dtype": np.uint16, **kwargs}
    with pytest.raises(ValueError, match=match):
        FrameReducer.build(args.pop("detector_shape"), args.pop("in_dtype"), **args)


def test_frames_of_another_shape_are_refused() -> None:
    red = FrameReducer.build((16, 16), np.uint16)
    with pytest.raises(ValueError, match="built for"):
        red(np.zeros((1, 8, 8), np.uint16))


def test_batch_binning_writes_into_the_rows_it_is_given() -> None:
    """reduce_batch(out=) fills the caller's rows (the decoding job's batch) for frames that
    saturate and frames that do not, and refuses rows of another shape or dtype."""
    rng = np.random.default_rng(3)
    stack = rng.poisson(2.0, (5, 8, 8)).astype(np.uint16)
    red = FrameReducer.build((8, 8), np.uint16, crop=8, bin=2, saturation_value=100)
    batch = np.zeros((7, 4, 4), red.out_dtype)
    for frames in (stack, np.where(np.arange(8) == 3, 500, stack).astype(np.uint16)):  # then saturated
        counts, saturated = red.reduce_batch(frames, out=batch[1:6])
        alone = [red.reduce_frame(f) for f in frames]
        assert np.shares_memory(counts, batch)
        np.testing.assert_array_equal(batch[1:6], [c for c, _ in alone])
        assert saturated.tolist() == [s for _, s in alone]
    assert not batch[0].any() and not batch[6].any()
    with pytest.raises(ValueError, match="out is"):
        red.reduce_batch(stack, out=np.zeros((5, 4, 4), np.uint64))


def _reference(frames: np.ndarray, corner: tuple[int, int], crop: int, b: int, bad: np.ndarray | None,
               saturation_value: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(counts int64, valid) by the definition, pixel by pixel in int64: the window's pixels off
    the detector or masked count 0 and invalidate their bin; a count above the largest valid one
    (the saturation value, else the dtype's maximum − 1, at most 2³²/b² as the reducer
    documents for 32-bit counts) counts as that value and invalidates its bin in its frame."""
    n, h, w = frames.shape
    top = saturation_value if saturation_value is not None else int(np.iinfo(frames.dtype).max) - 1
    if top * b * b > 2**32 - 1:
        top = (2**32 - 1) // (b * b)
    ys, xs = corner[0] + np.arange(crop), corner[1] + np.arange(crop)
    inside = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
    window = np.zeros((n, crop, crop), np.int64)
    good = np.zeros((crop, crop), bool)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            if inside[i, j]:
                window[:, i, j] = frames[:, y, x]
                good[i, j] = bad is None or not bad[y, x]
    over = good & (window > top)
    value = np.where(good, np.minimum(window, top), 0)
    m = crop // b
    counts = value.reshape(n, m, b, m, b).sum(axis=(2, 4))
    static = good.reshape(m, b, m, b).all(axis=(1, 3))
    return counts, static & ~over.reshape(n, m, b, m, b).any(axis=(2, 4))


@st.composite
def _binning_cases(draw: st.DrawFn) -> tuple:
    dtype = np.dtype(draw(st.sampled_from(["uint8", "uint16", "uint32"])))
    b = draw(st.sampled_from([1, 2, 4]))
    h, w = draw(st.integers(b, 20)), draw(st.integers(b, 20))
    crop = b * draw(st.integers(2, max(2, 24 // b)))  # frames of at least 2×2
    n = draw(st.integers(1, 3))
    top = int(np.iinfo(dtype).max)
    # counts near the limits the fast paths depend on: 2¹⁴ − 1 (four uint16 add in a lane),
    # 2¹⁵ − 1 (two do), the saturation value, the dtype's maximum (the detector's flag); and
    # low-dose counts
    level = draw(st.sampled_from([3, 0x3FFF, 0x4000, 0x7FFF, 0x8000, top]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, min(level, top) + 1, (n, h, w), dtype=np.uint64).astype(dtype)
    if draw(st.booleans()):
        frames[rng.random((n, h, w)) < 0.02] = top
    bad = rng.random((h, w)) < 0.05 if draw(st.booleans()) else None
    saturation_value = draw(st.none() | st.integers(1, top - 1))
    centre = (draw(st.floats(-2, h + 1)), draw(st.floats(-2, w + 1)))
    return frames, b, crop, bad, saturation_value, centre


@settings(max_examples=250, deadline=None)
@given(_binning_cases())
def test_every_binning_path_agrees_with_the_definition(case: tuple) -> None:
    """All three entry points (a stack, a batch into caller rows, one frame) give the sums and
    valid bins of the definition, for 8/16/32-bit counts, bin 1/2/4, masks, saturation, flags,
    an off-centre window partly off the detector, counts at and past the 16-bit lane limit."""
    frames, b, crop, bad, saturation_value, centre = case
    red = FrameReducer.build(frames.shape[1:], frames.dtype, beam_center_px=centre, crop=crop, bin=b,
                             bad_pixels=bad, saturation_value=saturation_value)
    want, want_valid = _reference(frames, red.corner, crop, b, bad, red.saturation_value)
    counts, valid = red(frames)
    assert counts.dtype == red.out_dtype
    np.testing.assert_array_equal(counts.astype(np.int64), want)
    np.testing.assert_array_equal(valid, want_valid)
    m = crop // b
    rows = np.full((len(frames) + 2, m, m), 7, red.out_dtype)
    batch, saturated = red.reduce_batch(frames, out=rows[1:-1])
    np.testing.assert_array_equal(batch.astype(np.int64), want)
    assert (rows[0] == 7).all() and (rows[-1] == 7).all()
    assert saturated.tolist() == (red.static_valid & ~want_valid).any(axis=(1, 2)).tolist()
    for i, frame in enumerate(frames):
        one, flag = red.reduce_frame(frame)
        np.testing.assert_array_equal(one.astype(np.int64), want[i])
        assert flag == bool((red.static_valid & ~want_valid[i]).any())
    rows[:] = 7
    batch, saturated, peak = red.reduce_batch_peak(frames, out=rows[1:-1])
    np.testing.assert_array_equal(batch.astype(np.int64), want)
    assert saturated.tolist() == (red.static_valid & ~want_valid).any(axis=(1, 2)).tolist()
    _check_peak(peak, int(want.max()))


def _check_peak(peak: int, true: int) -> None:
    """A reducer's peak (what the engine's narrow store trusts): never below the largest
    count, exact past the narrow store's byte, so that it decides a byte as the max would."""
    assert isinstance(peak, int) and peak >= true
    assert (peak <= NARROW_MAX) == (true <= NARROW_MAX)
    if peak > PEAK_EXACT_ABOVE:
        assert peak == true


def test_the_reducers_peak_is_the_narrow_stores_byte() -> None:
    """The peak's exactness threshold is the store's (protocols cannot import gpu)."""
    assert PEAK_EXACT_ABOVE == NARROW_MAX


@pytest.mark.parametrize("level", [0, 1, 63, 64, 65, 200, 0x3FFF, 0xFFFE, 0xFFFF])
@pytest.mark.parametrize("b", [2, 3, 4])
def test_the_peak_of_a_batch_bounds_its_counts(level: int, b: int) -> None:
    """192×192 uint16 frames at a given largest count (the flag 65,535 included: saturated),
    bin 2, 3 and 4: the bound bin² × the window's largest count is not below the binned peak,
    and the peak is the binned max itself past 255 (around 4 × 63 = 252 / 4 × 64 = 256)."""
    rng = np.random.default_rng(level + b)
    crop = 192 - 192 % b
    frames = rng.integers(0, level + 1, (4, 192, 192), dtype=np.uint32).astype(np.uint16)
    frames[1, 10:10 + b, 20:20 + b] = level  # one bin at b² × level
    red = FrameReducer.build((192, 192), np.uint16, crop=crop, bin=b)
    counts, _, peak = red.reduce_batch_peak(frames)
    _check_peak(peak, int(counts.max()))
    assert red.reduce_batch_peak(frames[:0])[2] == 0


@pytest.mark.parametrize("peak", [0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFE])
@pytest.mark.parametrize("saturation_value", [None, 16383])
def test_two_by_two_uint16_sums_at_the_lane_limit(peak: int, saturation_value: int | None) -> None:
    """192×192 uint16 → 96×96 (the DECTRIS case) with every count at 2¹⁴ − 1 (the largest for
    which four add in a 16-bit lane: one multiply), just past it, at 2¹⁵ − 1 (the 16-bit lane
    path's largest) and just past it (the widening path): exact sums, in uint32 and uint16."""
    rng = np.random.default_rng(peak)
    frames = rng.integers(0, peak + 1, (3, 192, 192), dtype=np.uint32).astype(np.uint16)
    frames[:, 5:9, 7:11] = peak
    red = FrameReducer.build((192, 192), np.uint16, crop=192, bin=2, saturation_value=saturation_value)
    counts, _ = red.reduce_batch(frames)
    top = saturation_value if saturation_value is not None else 0xFFFE
    want = np.minimum(frames.astype(np.int64), top).reshape(3, 96, 2, 96, 2).sum(axis=(2, 4))
    np.testing.assert_array_equal(counts.astype(np.int64), want)
    assert counts[0, 3, 4] == 4 * min(peak, top)
