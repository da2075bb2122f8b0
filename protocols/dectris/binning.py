"""Crop about the beam centre and bin, on arrival, keeping counts integer.

A binned pixel is the exact sum of its b×b detector pixels, so Poisson statistics survive; it is
valid only when all of them are (a masked or saturated sub-pixel would bias the sum low), and
masked pixels contribute 0 to the sum rather than a detector flag value such as 65535.
The window is placed so that the beam centre lands on pixel M//2 of the output (the engine's
"detector order"); parts of it beyond the detector are zero and invalid.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from ..limits import MIN_FRAME_SIDE


def binned_side(crop: int, bin: int) -> int:
    """The side of the frames a ``crop`` window binned by ``bin`` gives; ValueError (rule
    ``min_frame_side``, as a scan_start's check) when it is below :data:`MIN_FRAME_SIDE`."""
    side = crop // bin
    if side < MIN_FRAME_SIDE:
        raise ValueError(f"crop {crop} and bin {bin} give {side}×{side} frames; at least {MIN_FRAME_SIDE}×"
                         f"{MIN_FRAME_SIDE} are needed (rule min_frame_side): lower bin or widen crop")
    return side


@dataclass(frozen=True)
class FrameReducer:
    """Crop-and-bin of one detector geometry; build it with :meth:`build`."""

    detector_shape: tuple[int, int]  #: (height, width) of detector frames
    corner: tuple[int, int]  #: (y, x) detector pixel of the window's top-left (may be outside)
    window: int  #: window side in detector pixels (a multiple of ``bin``)
    bin: int
    static_valid: np.ndarray  #: (M, M) bool after crop and bin: mask, gaps, outside-detector
    window_valid: np.ndarray  #: (window, window) bool before binning
    saturation_value: int | None  #: largest valid count; larger values are invalid
    out_dtype: np.dtype
    #: dtype of the detector frames it was built for (None: not known, a reducer read back
    #: from a spool): a decoding job refuses an image of another on its own
    in_dtype: np.dtype | None = None

    @property
    def frame_side(self) -> int:
        return self.window // self.bin

    @classmethod
    def build(
        cls,
        detector_shape: tuple[int, int],
        in_dtype: np.dtype,
        *,
        beam_center_px: tuple[float, float] | None = None,
        crop: int | None = None,
        bin: int = 1,
        bad_pixels: np.ndarray | None = None,
        saturation_value: int | None = None,
    ) -> FrameReducer:
        """``crop`` is the window side in detector pixels (None: the whole detector, which must
        then be square); ``bad_pixels`` is True where the detector's pixel mask flags a pixel;
        without a beam centre the window is centred on the detector."""
        h, w = (int(v) for v in detector_shape)
        in_dtype = np.dtype(in_dtype)
        if in_dtype.kind != "u":
            raise ValueError(f"image dtype must be unsigned integer counts, got {in_dtype}")
        if not isinstance(bin, (int, np.integer)) or bin < 1:
            raise ValueError(f"bin must be a positive integer, got {bin!r}")
        if crop is None:
            if h != w:
                raise ValueError(f"detector frames are {h}×{w}, not square: set crop (a side in pixels)")
            crop = h
        if crop < bin or crop % bin:
            raise ValueError(f"crop {crop} must be a positive multiple of bin {bin}")
        binned_side(crop, bin)
        cy, cx = beam_center_px if beam_center_px is not None else ((h - 1) / 2, (w - 1) / 2)
        corner = (_corner(cy, h, crop, bin), _corner(cx, w, crop, bin))
        valid = np.ones((h, w), dtype=bool)
        if bad_pixels is not None:
            if bad_pixels.shape != (h, w):
                raise ValueError(f"pixel mask shape {bad_pixels.shape} differs from images {(h, w)}")
            valid &= ~bad_pixels.astype(bool)
        window_valid = np.zeros((crop, crop), dtype=bool)
        src, dst = _overlap(corner, crop, (h, w))
        window_valid[dst] = valid[src]
        m = crop // bin
        static = window_valid.reshape(m, bin, m, bin).all(axis=(1, 3))
        top = saturation_threshold(in_dtype, saturation_value)
        u32 = int(np.iinfo(np.uint32).max)
        if in_dtype.itemsize <= 4 and top * bin * bin > u32:
            # a 32-bit detector (EIGER2 in 32-bit mode) whose header gives no saturation_value
            # (or one near 2³²): the sums must stay uint32, so counts above 2³²/bin² — far
            # beyond what a counting pixel records in one frame — are taken as saturated
            # (invalid), instead of skipping every series
            saturation_value = top = u32 // (bin * bin)
        out_dtype = next(np.dtype(t) for t in ("uint8", "uint16", "uint32", "uint64")
                         if np.iinfo(t).max >= top * bin * bin and np.dtype(t).itemsize >= in_dtype.itemsize)
        if out_dtype.itemsize > 4:
            raise ValueError(f"bin {bin} of {in_dtype} counts can overflow uint32")
        return cls((h, w), corner, crop, bin, static, window_valid, saturation_value, out_dtype, in_dtype)

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduce (n, H, W) or (H, W) images → (counts (n, M, M) ``out_dtype``, valid (n, M, M)).

        ``valid`` is the static mask less this frame's saturated pixels. A saturated pixel
        counts as the saturation value, a lower bound of its true count; pixels of the static
        mask count 0."""
        stack = frames[None] if frames.ndim == 2 else frames
        n, b, m = stack.shape[0], self.bin, self.frame_side
        window = self._window(stack)
        top = saturation_threshold(stack.dtype, self.saturation_value)
        peak = int(window.max()) if window.size else 0
        if peak <= top:  # the common case: nothing saturated
            counts = _block_sum(window, b, np.empty((n, m, m), self.out_dtype), peak)
            return counts, np.broadcast_to(self.static_valid, (n, m, m)).copy()
        window = self._window(stack, copy=True)
        over = window > top
        np.minimum(window, top, out=window)
        saturated = _block_sum(over, b, np.empty((n, m, m), np.uint32)) > 0
        counts = _block_sum(window, b, np.empty((n, m, m), self.out_dtype))
        return counts, self.static_valid[None] & ~saturated

    def reduce_frame(self, frame: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """One (H, W) image → (counts (M, M), whether a pixel of a valid bin saturated): the
        bridge's per-arrival path. It builds no per-frame mask unless something saturated (the
        mask is then ``static_valid``), and writes the counts into ``out`` when given (a row
        of the batch being filled, which saves gathering the frames again)."""
        m = self.frame_side
        if out is None:
            out = np.empty((m, m), self.out_dtype)
        window = self._window(frame[None])
        peak = int(window.max())
        if peak <= saturation_threshold(frame.dtype, self.saturation_value):
            _block_sum(window, self.bin, out[None], peak)
            return out, False
        counts, valid = self(frame)
        out[...] = counts[0]
        return out, bool((self.static_valid & ~valid[0]).any())

    def reduce_batch(self, stack: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W) images → (counts (n, M, M), which frames had a valid bin saturate): the
        direct source's path, one NumPy pass for the whole batch when nothing saturated (a
        third of the per-frame cost of :meth:`reduce_frame` at 192 → 96). The counts are
        written into ``out`` (n, M, M) ``out_dtype`` when given (rows of the job's batch:
        no temporary and no copy into it)."""
        counts, saturated, _ = self.reduce_batch_peak(stack, out)
        return counts, saturated

    def reduce_batch_peak(self, stack: np.ndarray,
                          out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """:meth:`reduce_batch` and a bound of the counts' largest value (0 for no frame),
        never below it, and exact where either is over :data:`PEAK_EXACT_ABOVE`: the engine
        takes it instead of a max pass over the binned frames (read from memory by then) to
        decide whether its store's rows fit a byte, which the bound decides as the exact peak
        would. The bound is free: bin² × the window's largest count, which the saturation
        check measured already; past :data:`PEAK_EXACT_ABOVE` the binned counts' own max,
        while they are in cache."""
        n, m = stack.shape[0], self.frame_side
        if out is None:
            out = np.empty((n, m, m), self.out_dtype)
        elif out.shape != (n, m, m) or out.dtype != self.out_dtype:
            raise ValueError(f"out is {out.shape} {out.dtype}, the counts are {(n, m, m)} {self.out_dtype}")
        window = self._window(stack)
        peak = int(window.max()) if n else 0
        top = saturation_threshold(stack.dtype, self.saturation_value)
        if peak <= top:
            _block_sum(window, self.bin, out, peak)
            saturated = np.zeros(n, bool)
        else:
            counts, valid = self(stack)
            out[...] = counts
            saturated = (self.static_valid[None] & ~valid).any(axis=(1, 2))
            peak = top  # saturated pixels count as the saturation value
        bound = peak * self.bin * self.bin
        if bound > PEAK_EXACT_ABOVE:
            bound = int(out.max())
        return out, saturated, bound

    def _window(self, stack: np.ndarray, copy: bool = False) -> np.ndarray:
        """(n, c, c) window with masked pixels 0: a view of the images when it lies on the
        detector and nothing in it is masked (and ``copy`` is False), else a copy in the images'
        dtype (the sums widen as they add; a uint16 copy keeps :func:`_pairs_in_lanes` open to
        a detector with a pixel mask)."""
        if stack.shape[1:] != self.detector_shape:
            raise ValueError(f"images are {stack.shape[1:]}, the reducer was built for {self.detector_shape}")
        src, dst, on_detector = self._overlap
        if on_detector and self.all_valid and not copy:
            return stack[src]
        if on_detector:
            # masked in the same pass as the copy (a bool factor keeps the images' dtype)
            return stack[src].copy() if self.all_valid else np.multiply(stack[src], self.window_valid)
        window = np.zeros((stack.shape[0], self.window, self.window), dtype=stack.dtype)
        window[dst] = stack[src]
        if not self.all_valid:
            window *= self.window_valid
        return window

    @cached_property
    def all_valid(self) -> bool:
        """No pixel of the window is masked or off the detector."""
        return bool(self.window_valid.all())

    @cached_property
    def _overlap(self) -> tuple[tuple[slice, ...], tuple[slice, ...], bool]:
        """(image-stack slices, window-stack slices, whether the window lies on the detector)."""
        c = self.window
        src, dst = _overlap(self.corner, c, self.detector_shape)
        on = src[0].stop - src[0].start == c and src[1].stop - src[1].start == c
        return (slice(None), *src), (slice(None), *dst), on


@lru_cache(maxsize=64)
def saturation_threshold(dtype: np.dtype, saturation_value: int | None) -> int:
    """Largest valid count: the detector's saturation value, else one below the dtype's maximum
    (DECTRIS marks gaps and defective pixels with the maximum)."""
    return int(saturation_value) if saturation_value is not None else int(np.iinfo(dtype).max) - 1


def _block_sum(window: np.ndarray, b: int, out: np.ndarray, peak: int | None = None) -> np.ndarray:
    """Sums of b×b blocks of (n, c, c) into ``out`` (n, c/b, c/b), accumulating in its dtype:
    rows of each block first (contiguous rows, the larger add), then columns. Adding strided
    sub-grids is over twenty times faster than a reduction over a reshaped 5-D view, which NumPy
    walks with poor locality (192×192 uint16 → 96×96: about 15 µs against 400 µs). ``peak``
    (the window's largest count, when the caller knows it) allows :func:`_pairs_in_lanes`."""
    if b == 1:
        out[...] = window
        return out
    if b == 2 and peak is not None and peak <= _PAIR_PEAK and window.dtype == np.uint16 and out.dtype == np.uint32:
        return _pairs_in_lanes(window, out, quad=peak <= _QUAD_PEAK)
    rows = np.add(window[:, 0::b], window[:, 1::b], dtype=out.dtype,
                  out=scratch((window.shape[0], window.shape[1] // b, window.shape[2]), out.dtype, "rows"))
    for i in range(2, b):
        rows += window[:, i::b]
    np.add(rows[..., 0::b], rows[..., 1::b], out=out)
    for j in range(2, b):
        out += rows[..., j::b]
    return out


#: the largest count a bound of :meth:`FrameReducer.reduce_batch_peak` may give without being the
#: exact peak: the narrow frame store's (gpu/framestore.py NARROW_MAX), so that the bound keeps
#: rows as bytes exactly where the exact peak would
PEAK_EXACT_ABOVE = 255

#: largest uint16 count for which two add without a carry out of their 16-bit lane
_PAIR_PEAK = 0x7FFF
#: largest uint16 count for which four add without a carry out of a 16-bit lane
_QUAD_PEAK = 0x3FFF


def _pairs_in_lanes(window: np.ndarray, out: np.ndarray, quad: bool = False) -> np.ndarray:
    """2×2 sums of uint16 counts ≤ :data:`_PAIR_PEAK` into uint32 ``out``, exact:
    the vertical pairs add in uint16 lanes (any two such counts fit in 16 bits; no widening cast,
    which NumPy runs through a buffered loop), then each 32-bit word of that row — two
    horizontally adjacent pair sums ``p, q`` as ``p + q·2¹⁶`` — splits into its halves, which
    add in 32 bits (``p + q`` needs 17; whichever half is which, so byte order does not matter).
    Four contiguous passes instead of a widening add and a strided one. (A uint16 ``out``, a
    saturation value ≤ 16,383, already adds without a cast, in two passes, which is faster.)

    ``quad``: the counts are ≤ :data:`_QUAD_PEAK` (what a sparse frame holds), so ``p + q`` fits
    in 16 bits, and one multiply by ``2¹⁶ + 1`` puts it in the word's high half (``p + q·2¹⁶ +
    p·2¹⁶``, nothing carried past bit 31): three passes, the last two in ``out``, no temporary
    (measured ≈ 2–3 µs of the ≈ 10 µs a 192×192 frame's binning took)."""
    n, c = window.shape[0], window.shape[1]
    rows = scratch((n, c // 2, c), np.uint16, "pair-rows")
    np.add(window[:, 0::2], window[:, 1::2], out=rows)
    words = rows.view(np.uint32)  # (n, c/2, c/2): rows' last axis is contiguous and even
    if quad:
        np.multiply(words, 0x10001, out=out)
        return np.right_shift(out, 16, out=out)
    high = scratch(words.shape, np.uint32, "pair-high")
    np.right_shift(words, 16, out=high)
    words &= 0xFFFF
    return np.add(words, high, out=out)


def _corner(centre: float, size: int, crop: int, b: int) -> int:
    """Window start along one axis: the beam's pixel must fall in output pixel M//2; within
    that, the beam is put mid-bin, unless a shift keeps the window on the detector."""
    half = b * ((crop // b) // 2)
    ideal = int(np.floor(centre - half - (b - 1) / 2 + 0.5))
    beam = int(np.floor(centre + 0.5))
    lo, hi = max(beam - half - b + 1, 0), min(beam - half, size - crop)
    return min(max(ideal, lo), hi) if lo <= hi else ideal


def _overlap(corner: tuple[int, int], side: int, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(detector slices, window slices) of the part of the window that lies on the detector."""
    src, dst = [], []
    for c, n in zip(corner, shape):
        lo, hi = max(c, 0), min(c + side, n)
        if hi <= lo:
            src.append(slice(0, 0))
            dst.append(slice(0, 0))
        else:
            src.append(slice(lo, hi))
            dst.append(slice(lo - c, hi - c))
    return (src[0], src[1]), (dst[0], dst[1])


_scratch = threading.local()


def scratch(shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """A work array of this thread, reused by its next call of the same ``name``: a new
    temporary of a batch (a megabyte) comes from fresh pages, which this kind of host backs only
    on first touch — measured 17.5 page faults per 192×192 frame of a decoding job, a sixth of
    its CPU time. The leading axis may be shorter than before (a job's last, partial group: the
    first rows of the kept array). Its content is undefined; nothing may keep it."""
    dtype = np.dtype(dtype)
    cache: dict[str, np.ndarray] = _scratch.__dict__.setdefault("arrays", {})
    arr = cache.get(name)
    if arr is None or arr.dtype != dtype or arr.shape[1:] != tuple(shape[1:]) or len(arr) < shape[0]:
        arr = cache[name] = np.empty(shape, dtype)
    return arr[:shape[0]]
