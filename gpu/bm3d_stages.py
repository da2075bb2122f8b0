"""One BM3D stage over the whole image: tiles → block matching → collaborative filter → aggregation.

Tiles partition the *reference blocks*; each tile carries the image margin its search windows
need, so every reference block sees exactly the candidates it would see in an untiled run and
tiling changes only the order of floating-point additions in the aggregation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import array_module, host_floats, scatter_add_flat
from .bm3d_matching import match_blocks, reference_grid
from .bm3d_transforms import block_transform, haar_matrix, kaiser_window

if TYPE_CHECKING:
    from .bm3d import StageParams


def filter_stage(
    noisy: Any,
    basic: Any | None,
    sigma: float,
    params: StageParams,
    lambda_3d: float,
    tile_refs: int,
) -> Any:
    """Hard-thresholding stage (``basic`` None) or Wiener stage (guided by ``basic``).

    ``noisy`` and ``basic`` are on the 0–255 working scale, ``sigma`` too.
    """
    xp = array_module(noisy)
    dtype = noisy.dtype
    h, w = noisy.shape
    b = params.block
    half = params.window // 2
    grid_y = reference_grid(h, b, params.step)
    grid_x = reference_grid(w, b, params.step)
    numerator = xp.zeros(h * w, dtype=np.float64)
    corner_weight = xp.zeros(h * w, dtype=np.float64)
    fwd_host, inv_host = block_transform(params.transform, b)
    fwd = xp.asarray(fwd_host, dtype=dtype)
    inv = xp.asarray(inv_host, dtype=dtype)
    kaiser_host = kaiser_window(b, params.beta)
    kaiser = xp.asarray(kaiser_host, dtype=dtype)
    guide_image = noisy if basic is None else basic
    # Group sizes are powers of two: one batch per size, ≤ log2(N2) + 1 batches per tile.
    sizes = [1 << i for i in range(params.max_group.bit_length())]
    haars = {size: xp.asarray(haar_matrix(size), dtype=dtype) for size in sizes}

    # Equal tiles (not a full tile and a sliver): the per-offset work is then evenly batched.
    for refs_y in np.array_split(grid_y, -(-grid_y.size // tile_refs)):
        y_lo = max(0, int(refs_y[0]) - half)
        y_hi = min(h, int(refs_y[-1]) + half + b)
        for refs_x in np.array_split(grid_x, -(-grid_x.size // tile_refs)):
            x_lo = max(0, int(refs_x[0]) - half)
            x_hi = min(w, int(refs_x[-1]) + half + b)
            guide = guide_image[y_lo:y_hi, x_lo:x_hi]
            matches = match_blocks(
                guide,
                refs_y - y_lo,
                refs_x - x_lo,
                block=b,
                window=params.window,
                max_group=params.max_group,
                tau=params.tau_match,
            )
            spectra_noisy = _block_spectra(noisy[y_lo:y_hi, x_lo:x_hi], fwd)
            spectra_basic = None if basic is None else _block_spectra(guide, fwd)
            # The references of each size, without a synchronisation per size (``nonzero``'s
            # output size is data: on a device the host would wait for it): the references
            # sorted by group size, cut by the counts per size, read in ONE transfer per tile.
            counts = host_floats(*((matches.size == size).sum() for size in sizes))
            by_size = _stable_argsort(matches.size)
            start = 0
            for size, count in zip(sizes, counts):
                if not count:
                    continue
                sel = by_size[start : start + int(count)]  # ascending reference order, as nonzero's
                start += int(count)
                gy = matches.ys[sel, :size]
                gx = matches.xs[sel, :size]
                group = spectra_noisy[gy, gx]  # (n, size, b, b)
                haar = haars[size]
                if spectra_basic is None:
                    blocks, weight = _hard_threshold(group, haar, inv, sigma * lambda_3d, sigma)
                else:
                    guide_group = spectra_basic[gy, gx]
                    blocks, weight = _wiener(group, guide_group, haar, inv, sigma)
                _aggregate(
                    numerator, corner_weight, blocks, weight, kaiser, gy + y_lo, gx + x_lo, w
                )
    denominator = _spread(corner_weight.reshape(h, w), kaiser_host)
    return (numerator.reshape(h, w) / denominator).astype(dtype)


def _block_spectra(tile: Any, fwd: Any) -> Any:
    """2-D transform of every block of the tile: (h-b+1, w-b+1, b, b)."""
    xp = array_module(tile)
    b = fwd.shape[0]
    blocks = xp.lib.stride_tricks.sliding_window_view(tile, (b, b))
    return fwd @ blocks @ fwd.T


def _along_group(matrix: Any, group: Any) -> Any:
    """Apply an (s×s) matrix along the group axis of (n, s, b, b) blocks, as one batched matmul."""
    n, s, b, _ = group.shape
    return (matrix @ group.reshape(n, s, b * b)).reshape(n, s, b, b)


def _hard_threshold(group: Any, haar: Any, inv: Any, threshold: float, sigma: float) -> tuple:
    xp = array_module(group)
    spec = _along_group(haar, group)
    keep = xp.abs(spec) > threshold
    spec = spec * keep
    nonzero = keep.sum(axis=(1, 2, 3))
    # Fewer retained coefficients = less residual noise in the group estimate = more weight.
    weight = 1.0 / (sigma**2 * xp.maximum(nonzero, 1).astype(group.dtype))
    blocks = inv @ _along_group(haar.T, spec) @ inv.T
    return blocks, weight


def _wiener(group: Any, guide: Any, haar: Any, inv: Any, sigma: float) -> tuple:
    xp = array_module(group)
    spec = _along_group(haar, group)
    energy = _along_group(haar, guide) ** 2
    gain = energy / (energy + sigma**2)
    spec = spec * gain
    weight = 1.0 / (sigma**2 * xp.maximum((gain**2).sum(axis=(1, 2, 3)), 1e-12))
    blocks = inv @ _along_group(haar.T, spec) @ inv.T
    return blocks, weight.astype(group.dtype)


def _spread(corner_weight: Any, kaiser: np.ndarray) -> Any:
    """Σ of weight × Kaiser window over all blocks, from the total weight at each block corner.

    Every block of a corner shares the same window, so the per-pixel scatter of the
    denominator reduces to b² shifted additions of one image.
    """
    xp = array_module(corner_weight)
    h, w = corner_weight.shape
    b = kaiser.shape[0]
    out = xp.zeros_like(corner_weight)
    corners = corner_weight[: h - b + 1, : w - b + 1]
    for a in range(b):
        for c in range(b):
            out[a : a + h - b + 1, c : c + w - b + 1] += float(kaiser[a, c]) * corners
    return out


def _aggregate(
    numerator: Any,
    corner_weight: Any,
    blocks: Any,
    weight: Any,
    kaiser: Any,
    ys: Any,
    xs: Any,
    width: int,
) -> None:
    """Add weighted blocks (n, s, b, b) with corners (ys, xs) (n, s) into the flat numerator,
    and their weights into the flat per-corner weight sum."""
    xp = array_module(blocks)
    b = blocks.shape[-1]
    ar = xp.arange(b)
    flat = (ys[:, :, None, None] + ar[:, None]) * width + (xs[:, :, None, None] + ar[None, :])
    flat = flat.reshape(-1)
    wk = weight[:, None, None, None] * kaiser  # (n, 1, b, b)
    _add_at(numerator, flat, (blocks * wk).reshape(-1))
    corners = (ys * width + xs).reshape(-1)
    block_weight = xp.broadcast_to(weight[:, None], ys.shape).reshape(-1)
    _add_at(corner_weight, corners, block_weight)


def _stable_argsort(a: Any) -> Any:
    """Indices that sort ``a``, equal keys in their order. CuPy's sort is always stable, and
    its older releases take no ``kind``."""
    xp = array_module(a)
    if xp.__name__.startswith("cupy"):
        return xp.argsort(a)
    return xp.argsort(a, kind="stable")


def _add_at(acc: Any, index: Any, values: Any) -> None:
    """``acc[index] += values``, repeated indices summed. ``bincount`` on the host (faster than
    ``np.add.at``); on a device a scatter-add, as CuPy's ``bincount`` reads ``max(index)`` on
    the host (a synchronisation per call)."""
    xp = array_module(acc)
    if xp is np:
        acc += np.bincount(index, weights=values, minlength=acc.size)
    else:
        scatter_add_flat(acc, index, values.astype(acc.dtype))
