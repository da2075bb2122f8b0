"""Block matching for BM3D, vectorised over all reference blocks of a tile.

For every reference block (top-left corner on the step grid) we need the squared distance to
every candidate block in a ``window × window`` search neighbourhood. Instead of looping over
reference blocks, we loop over the vertical search offsets only: for one offset row ``dy`` the
squared differences between the tile and its copies shifted by every ``dx`` form one 3-D array,
and the block sums at the reference positions are separable box sums over it. This is the same
array code on NumPy and CuPy, its memory is bounded by the tile size, and the per-offset work is
proportional to the tile area (no per-block Python work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import array_module


@dataclass
class Matches:
    """The groups of one tile: for each reference block, its most similar blocks, best first.

    Coordinates are tile-local block corners. Only the first ``size[i]`` entries of row ``i``
    belong to group ``i``; ``size`` is a power of two (the Haar transform along the group needs it)
    and entry 0 is always the reference block itself.
    """

    ys: Any  #: (n_ref, k) int64: block corner rows, tile-local
    xs: Any  #: (n_ref, k) int64: block corner columns, tile-local
    size: Any  #: (n_ref,) int64: group size, a power of two ≤ k


def reference_grid(n: int, block: int, step: int) -> np.ndarray:
    """Reference block corners along one axis: every ``step``, plus the last possible corner so
    that every pixel is covered by at least one reference block."""
    last = n - block
    grid = np.arange(0, last + 1, step, dtype=np.int64)
    if grid[-1] != last:
        grid = np.append(grid, last)
    return grid


def window_sums(a: Any, starts: Any, length: int, axis: int) -> Any:
    """Sums of ``length`` consecutive entries of ``a`` along ``axis``, starting at ``starts``.

    Built by doubling (sums over 1, 2, 4, … entries), so a length-8 box costs three full-array
    additions and one gather, with a fixed summation order on every backend (no cumulative-sum
    cancellation, and NumPy and CuPy add in the same order).
    """
    xp = array_module(a)
    starts = xp.asarray(starts)
    total = None
    span, pos, partial, left = 1, starts, a, length
    while True:
        if left & 1:
            part = xp.take(partial, pos, axis=axis)
            total = part if total is None else total + part
            pos = pos + span
        left >>= 1
        if not left:
            return total
        if left == 1:
            # The last level is only needed at ``pos``: two gathers, not a full-size addition.
            part = xp.take(partial, pos, axis=axis) + xp.take(partial, pos + span, axis=axis)
            return part if total is None else total + part
        n = partial.shape[axis] - span
        head = [slice(None)] * a.ndim
        tail = [slice(None)] * a.ndim
        head[axis], tail[axis] = slice(0, n), slice(span, span + n)
        partial = partial[tuple(head)] + partial[tuple(tail)]
        span *= 2


def match_blocks(
    tile: Any,
    ref_y: Any,
    ref_x: Any,
    *,
    block: int,
    window: int,
    max_group: int,
    tau: float,
) -> Matches:
    """Match every reference block (corners ``ref_y`` × ``ref_x``, tile-local) within ``tile``.

    ``tau`` bounds the mean squared pixel difference of a match (the d-distance of Lebrun 2012,
    already on the image's scale). Candidates must lie wholly inside the tile; the caller makes
    the tile large enough to hold each reference block's whole (image-clipped) search window.
    """
    xp = array_module(tile)
    h, w = tile.shape
    half = window // 2
    offsets = np.arange(-half, half + 1)
    n_off = offsets.size
    ry = xp.asarray(ref_y, dtype=np.int64)
    rx = xp.asarray(ref_x, dtype=np.int64)
    nry, nrx = int(ry.shape[0]), int(rx.shape[0])

    # Pad so that every shifted view exists; padded candidates are masked out below.
    padded = xp.pad(tile, half, mode="edge")
    y0, y1 = int(ref_y[0]), int(ref_y[-1]) + block
    x0, x1 = int(ref_x[0]), int(ref_x[-1]) + block
    ref_region = tile[y0:y1, x0:x1]
    ry_rel = ry - y0
    rx_rel = rx - x0
    width = x1 - x0

    dist = xp.empty((n_off, nry, n_off, nrx), dtype=tile.dtype)
    for i, dy in enumerate(offsets):
        rows = padded[y0 + half + dy : y1 + half + dy, x0 : x1 + 2 * half]
        # A strided view, not a copy: (rows, dx, cols) with dx running over the window.
        shifted = xp.lib.stride_tricks.sliding_window_view(rows, width, axis=1)
        sq = ref_region[:, None, :] - shifted
        xp.square(sq, out=sq)
        dist[i] = window_sums(window_sums(sq, ry_rel, block, axis=0), rx_rel, block, axis=2)
    # (dy, ry, dx, rx) → (ry, rx, dy, dx): one row of candidates per reference block.
    dist = dist.transpose(1, 3, 0, 2).reshape(nry * nrx, n_off * n_off)

    off = xp.asarray(offsets)
    cand_y = ry[:, None] + off[None, :]  # (nry, dy)
    cand_x = rx[:, None] + off[None, :]  # (nrx, dx)
    ok_y = (cand_y >= 0) & (cand_y <= h - block)
    ok_x = (cand_x >= 0) & (cand_x <= w - block)
    ok = (ok_y[:, None, :, None] & ok_x[None, :, None, :]).reshape(nry * nrx, n_off * n_off)
    limit = tau * block * block
    ok &= dist <= limit
    dist = xp.where(ok, dist, xp.inf)
    # The reference itself leads its group even when identical blocks tie at distance 0, so
    # every reference block is estimated (every pixel then has a non-zero aggregation weight).
    centre = half * n_off + half
    dist[:, centre] = -1.0

    k = min(max_group, n_off * n_off)
    best = xp.argpartition(dist, k - 1, axis=1)[:, :k]
    best_d = xp.take_along_axis(dist, best, axis=1)
    order = xp.argsort(best_d, axis=1)
    best = xp.take_along_axis(best, order, axis=1)
    count = xp.minimum(ok.sum(axis=1), k)
    count = xp.maximum(count, 1)  # the reference is always there, even if tau is tiny

    from .bm3d_transforms import power_of_two_floor

    size = power_of_two_floor(count)
    dy_idx = best // n_off - half
    dx_idx = best % n_off - half
    ref_rows = xp.repeat(ry, nrx)[:, None]
    ref_cols = xp.tile(rx, nry)[:, None]
    return Matches(ys=ref_rows + dy_idx, xs=ref_cols + dx_idx, size=size)
