"""Crop and bin on arrival: integer counts, exact sums, masks, saturation, beam-centre placement."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.protocols.dectris.binning import FrameReducer


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
