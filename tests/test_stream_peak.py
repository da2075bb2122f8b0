"""The engine's largest count of the frames it took in (StreamingReconstructor.peak_count): what
a detector scan's spool stores its binned frames in at the scan's end (spool.py HeldPeak)."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.gpu import framestore
from cryoptycho.gpu.operators import from_fft_order
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.stream import StreamingReconstructor
from daemon_support import synthetic_scan


def _engine(scan, dtype, mask=None) -> StreamingReconstructor:
    return StreamingReconstructor(frame_shape=scan.frames.shape[1:], frame_dtype=dtype, pixel_size=1e-10,
                                  probe=scan.probe, options=ReconOptions(backend="numpy"),
                                  expected_frames=len(scan.frames), mask=mask)


def test_the_largest_count_of_uint32_frames_is_kept_masked_pixels_included() -> None:
    """Measured by the pass that rules out a 32-bit overflow of the frames' sums; the frames are
    stored as they came, masked pixels too, so their counts count."""
    scan = synthetic_scan(n_side=8)
    frames = scan.frames.astype(np.uint32)
    assert frames.shape[1] * frames.shape[2] * (2**32 - 1) >= 2**32 and frames.max() < 256
    mask = np.ones(frames.shape[1:], bool)
    mask[0, 0] = False
    frames[5, 0, 0] = 65536  # a masked pixel: not counted, but stored
    engine = _engine(scan, np.uint32, mask)
    assert engine.peak_count == 0
    engine.add_frames(frames[:4], scan.positions[:4])
    assert engine.peak_count == frames[:4].max()
    engine.add_frames(frames[4:], scan.positions[4:])
    assert engine.peak_count == 65536


def test_the_largest_count_of_uint16_frames_is_kept() -> None:
    """uint16 frames (2×2-binned counts of a detector that declares a saturation value): their
    sums cannot overflow, but their largest count lets the spool store them as uint8."""
    scan = synthetic_scan(n_side=8)
    frames = scan.frames.astype(np.uint16)
    frames[6, 3, 2] = 300
    engine = _engine(scan, np.uint16)
    engine.add_frames(frames[:4], scan.positions[:4])
    assert engine.peak_count == frames[:4].max()
    engine.add_frames(frames[4:], scan.positions[4:])
    assert engine.peak_count == 300


def test_the_largest_count_of_frames_it_does_not_measure_is_not_known() -> None:
    """uint8 frames (nothing narrower to store them in: no pass for their largest count): None,
    and the spool keeps the reducer's dtype."""
    scan = synthetic_scan(n_side=8)
    engine = _engine(scan, np.uint8)
    engine.add_frames(np.minimum(scan.frames, 255).astype(np.uint8), scan.positions)
    assert engine.peak_count is None


def test_a_given_peak_replaces_the_max_pass_and_the_frames_are_held_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_frames' ``peak`` (a DECTRIS reducer's bound of the batch's largest count): the
    engine takes it instead of measuring, holds the frames bit for bit as without it (byte rows
    while the bound is ≤ 255, widened at the bound over it), and reports it as the peak."""
    monkeypatch.setattr(framestore, "_MAP_BYTES", 1)  # a narrow store (the daemon's are ≥ 1 MiB)
    scan = synthetic_scan(n_side=8)
    frames = scan.frames.astype(np.uint32)
    assert frames.max() < 64
    measured, given = _engine(scan, np.uint32), _engine(scan, np.uint32)
    measured.add_frames(frames[:4], scan.positions[:4])
    given.add_frames(frames[:4], scan.positions[:4], peak=4 * int(frames[:4].max()))
    assert given.frame_store.frames.dtype == measured.frame_store.frames.dtype == np.uint8
    assert given.peak_count == 4 * frames[:4].max() >= measured.peak_count
    frames[6, 3, 2] = 300
    measured.add_frames(frames[4:], scan.positions[4:])
    given.add_frames(frames[4:], scan.positions[4:], peak=300)
    assert given.frame_store.frames.dtype == measured.frame_store.frames.dtype == np.uint32
    assert given.peak_count == measured.peak_count == 300
    for engine in (given, measured):
        np.testing.assert_array_equal(from_fft_order(engine.frame_store.frames[:len(frames)]), frames)
    for bad in (-1, 2.5, True, "7"):
        with pytest.raises(ValueError, match="peak must be a count"):
            given.add_frames(frames[:1], scan.positions[:1], peak=bad)
    assert given.n_frames == len(frames)
