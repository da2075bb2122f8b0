"""A growable store of detector frames for a scan that is still arriving.

Frames are kept in their own integer (or float) dtype — never a float copy of the dataset — in
FFT order, converted once on append. The store is pre-allocated; when it fills it grows
geometrically (amortised O(1) per frame), and when the scan's frame count is known up front it
is allocated exactly, so the store ends the scan at ≈ the raw frame bytes.

Per-frame bookkeeping (positions, scan indices, visit counts) stays on the host: it is small
and the batch selection that reads it runs on the host anyway.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .backend import asarray


class FrameStore:
    """Pre-allocated ``(capacity, M, M)`` frames in FFT order plus per-frame bookkeeping.

    ``frames`` (device/backend array) holds valid data in ``[:n]``; ``positions`` (host, m),
    ``indices`` (host, scan index of each frame) and ``visits`` (host, how many mini-batch steps
    have used each frame) are aligned with it.
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        dtype: Any,
        capacity: int,
        xp: ModuleType = np,
        growth: float = 1.5,
    ) -> None:
        if len(frame_shape) != 2 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (M, M) with M ≥ 1, got {frame_shape!r}")
        dt = np.dtype(dtype)
        if dt.kind not in "uif":
            raise ValueError(f"frame dtype must hold counts (integer or float), got {dt}")
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if growth <= 1.0:
            raise ValueError(f"growth factor must be > 1 (geometric growth), got {growth}")
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = dt
        self.xp = xp
        self.growth = float(growth)
        self.n = 0
        #: how many times the frame array was re-allocated (growth events)
        self.reallocations = 0
        self.frames = xp.empty((capacity,) + self.frame_shape, dtype=dt)
        self.positions = np.empty((capacity, 2), dtype=np.float64)
        self.indices = np.empty(capacity, dtype=np.int64)
        self.visits = np.zeros(capacity, dtype=np.int32)

    @property
    def capacity(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the store (allocated capacity, frames plus bookkeeping)."""
        return int(
            self.frames.nbytes + self.positions.nbytes + self.indices.nbytes + self.visits.nbytes
        )

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the frames received so far in their own dtype (the floor for ``nbytes``)."""
        return self.n * self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize

    def reserve(self, capacity: int) -> None:
        """Make room for at least ``capacity`` frames (one re-allocation at most)."""
        if capacity <= self.capacity:
            return
        xp = self.xp
        frames = xp.empty((capacity,) + self.frame_shape, dtype=self.dtype)
        frames[: self.n] = self.frames[: self.n]
        self.frames = frames
        self.positions = _grow_host(self.positions, capacity, self.n)
        self.indices = _grow_host(self.indices, capacity, self.n)
        self.visits = _grow_host(self.visits, capacity, self.n)
        self.reallocations += 1

    def append(self, frames: Any, positions_m: Any, indices: Any | None = None) -> slice:
        """Append ``frames`` (n, M, M) in *detector order* with positions (n, 2) in metres.

        The caller validates content; this checks only what the store itself relies on.
        Returns the slice of the store that now holds them.
        """
        k = int(frames.shape[0])
        start = self.n
        need = start + k
        if need > self.capacity:
            self.reserve(max(need, int(np.ceil(self.capacity * self.growth))))
        _write_fft_order(self.frames[start:need], asarray(frames, self.xp))
        self.positions[start:need] = np.asarray(positions_m, dtype=np.float64).reshape(k, 2)
        if indices is None:
            self.indices[start:need] = np.arange(start, need)
        else:
            self.indices[start:need] = np.asarray(indices, dtype=np.int64).reshape(k)
        self.visits[start:need] = 0
        self.n = need
        return slice(start, need)

    def counts(self, which: Any) -> Any:
        """Frames (FFT order, own dtype) for the store indices ``which`` (host int array)."""
        return self.frames[self.xp.asarray(which)]


def _grow_host(arr: np.ndarray, capacity: int, n: int) -> np.ndarray:
    out = np.zeros((capacity,) + arr.shape[1:], dtype=arr.dtype)
    out[:n] = arr[:n]
    return out


def _write_fft_order(dest: Any, frames: Any) -> None:
    """``dest[...] = ifftshift(frames)`` (detector → FFT order) as four quadrant copies, so no
    temporary of the chunk is made (``operators.to_fft_order`` rolls twice)."""
    my, mx = frames.shape[-2:]
    hy, hx = my // 2, mx // 2
    dest[:, : my - hy, : mx - hx] = frames[:, hy:, hx:]
    dest[:, : my - hy, mx - hx :] = frames[:, hy:, :hx]
    dest[:, my - hy :, : mx - hx] = frames[:, :hy, hx:]
    dest[:, my - hy :, mx - hx :] = frames[:, :hy, :hx]
