"""An open, array-module agnostic BM3D denoiser (Dabov et al. 2007; Lebrun 2012, IPOL).

BM3D is the denoiser behind the sparse prior (Pelz et al. 2017, eq. 13/19). Two stages:

1. hard thresholding: group similar blocks of the noisy image, take a separable 3-D transform
   (2-D biorthogonal 1.5 wavelet per block, orthonormal Haar along the group), zero the
   coefficients below λ₃D·σ, invert, and aggregate every block estimate with weight
   ``1/(σ² N_nonzero)`` × a Kaiser window;
2. Wiener filtering: match again on this *basic* estimate, and shrink the 3-D spectrum of the
   noisy groups (2-D DCT × Haar) by the empirical Wiener gain ``|B|²/(|B|² + σ²)`` of the
   basic groups.

Everything is vectorised over the reference blocks of a tile (no Python loop over blocks), so the
same code runs on NumPy and CuPy; tiles with overlapping search margins bound the memory, and the
result does not depend on the tile size (each reference block sees its full search window).

Published parameters (N1 = 8, step 3, 39×39 window, 16/32 blocks per group, λ₃D = 2.7,
τ_match 2500/400) are defined on the 0–255 grey scale. Images here have any scale (a phase in
radians, a log-amplitude), so the image is first scaled so that the noise σ becomes
``SIGMA_GREY`` = 15 grey levels: the thresholds then keep the same meaning relative to the noise
at every scale (on camera/brick/moon crops at σ = 5…50 this is within 0.1 dB of running on the
true 0–255 scale). A known ``data_range`` instead maps that range onto 0–255, as the papers do.

Licence: BSD-3 like the rest of cryoptycho; written from the papers, no reference code used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .backend import array_module, free_device_bytes, host_floats, real_of
from .bm3d_stages import filter_stage
from .denoise import register_denoiser

#: Grey scale on which the published thresholds are defined.
GREY_SCALE = 255.0
#: Without a data range the image is scaled so that σ is this many grey levels.
SIGMA_GREY = 15.0


@dataclass(frozen=True)
class StageParams:
    """Parameters of one BM3D stage (names after Lebrun 2012)."""

    block: int = 8  #: N1: block side (pixels)
    step: int = 3  #: N_step: spacing of reference blocks
    window: int = 39  #: N_S: side of the search window (odd)
    max_group: int = 16  #: N2: most blocks per group (a power of two)
    tau_match: float = 2500.0  #: most mean squared difference of a match, 0–255 scale
    beta: float = 2.0  #: Kaiser window shape for aggregation
    transform: str = "dct"  #: 2-D block transform: "dct" or "bior1.5"

    def check(self, name: str) -> None:
        if self.block < 2:
            raise ValueError(f"{name}.block must be >= 2, got {self.block}")
        if self.step < 1 or self.step > self.block:
            raise ValueError(f"{name}.step must be in [1, block={self.block}], got {self.step}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"{name}.window must be a positive odd number, got {self.window}")
        if self.max_group < 1 or self.max_group & (self.max_group - 1):
            raise ValueError(f"{name}.max_group must be a power of two, got {self.max_group}")
        if self.tau_match < 0:
            raise ValueError(f"{name}.tau_match must be >= 0, got {self.tau_match}")
        if self.transform not in ("dct", "bior1.5"):
            raise ValueError(f"{name}.transform must be 'dct' or 'bior1.5', got {self.transform!r}")
        if self.transform == "bior1.5" and self.block & (self.block - 1):
            raise ValueError(f"{name}.block must be a power of two for bior1.5, got {self.block}")
        if self.beta < 0:
            raise ValueError(f"{name}.beta must be >= 0, got {self.beta}")


@dataclass(frozen=True)
class BM3DProfile:
    """Both stages' parameters; defaults are the normal profile of Lebrun 2012 (σ ≤ 40)."""

    hard: StageParams = field(default_factory=lambda: StageParams(transform="bior1.5"))
    wiener: StageParams = field(default_factory=lambda: StageParams(max_group=32, tau_match=400.0))
    lambda_3d: float = 2.7  #: hard threshold in units of σ
    #: Above this σ (0–255 scale) the matching thresholds of the high-noise profile are used.
    high_noise_sigma: float = 40.0
    high_noise_tau: tuple[float, float] = (5000.0, 3500.0)
    #: Tile side in reference blocks: bounds memory (~25 bytes × tile² × window², with the
    #: argpartition indices). None: 48 on NumPy (≈ 90 MB); on CuPy up to 128 (≈ 0.6 GB, fewer
    #: launches), bounded by a quarter of the free device memory.
    tile_refs: int | None = None

    def for_sigma(self, sigma255: float) -> BM3DProfile:
        if sigma255 <= self.high_noise_sigma:
            return self
        return replace(
            self,
            hard=replace(self.hard, tau_match=self.high_noise_tau[0]),
            wiener=replace(self.wiener, tau_match=self.high_noise_tau[1]),
        )

    def check(self) -> None:
        self.hard.check("hard")
        self.wiener.check("wiener")
        if self.lambda_3d <= 0:
            raise ValueError(f"lambda_3d must be > 0, got {self.lambda_3d}")
        if self.tile_refs is not None and self.tile_refs < 1:
            raise ValueError(f"tile_refs must be >= 1, got {self.tile_refs}")


def estimate_sigma(image: Any) -> float:
    """Noise σ from the median absolute deviation of the finest diagonal Haar band / 0.6745.

    Image structure is mostly smooth or edge-like, so the diagonal detail at the finest scale is
    dominated by white noise, and the median ignores the few edge coefficients (Donoho 1995).
    """
    return host_floats(_sigma_where_it_lives(image))[0]


def _sigma_where_it_lives(image: Any) -> Any:
    """:func:`estimate_sigma` as a 0-d array of the image's module (no device → host transfer)."""
    xp = array_module(image)
    img = xp.asarray(image)
    h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
    if h < 2 or w < 2:
        raise ValueError(f"image {img.shape} is too small to estimate the noise (needs >= 2×2)")
    x = img[:h, :w].astype(np.float64)
    hh = (x[0::2, 0::2] - x[0::2, 1::2] - x[1::2, 0::2] + x[1::2, 1::2]) / 2.0
    return xp.median(xp.abs(hh)) / 0.6745


def bm3d(
    image: Any,
    sigma: float | None = None,
    *,
    data_range: float | None = None,
    profile: BM3DProfile | None = None,
    stages: int = 2,
) -> Any:
    """Denoise a real 2-D image (NumPy or CuPy) with BM3D; returns the same module and dtype.

    ``sigma`` is the noise standard deviation on the image's own scale (None: estimated with
    :func:`estimate_sigma`). ``data_range`` is the image's signal range, mapped onto 0–255 where the
    published thresholds hold (None: scale so that σ is ``SIGMA_GREY`` grey levels). ``stages=1``
    stops after the hard-thresholding (basic) estimate.
    """
    xp = array_module(image)
    img = xp.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {tuple(img.shape)}")
    if xp.iscomplexobj(img):
        raise ValueError("image must be real; denoise complex fields with denoise_complex")
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2, got {stages}")
    prof = profile or BM3DProfile()
    prof.check()
    out_dtype = img.dtype if img.dtype.kind == "f" else np.dtype(np.float32)
    work = real_of(out_dtype)
    need = max(prof.hard.block, prof.wiener.block)
    if min(img.shape) < need:
        raise ValueError(f"image {tuple(img.shape)} is smaller than the BM3D block ({need} pixels)")
    # what the host needs of the image (finite?, its minimum, σ when estimated) in ONE
    # device → host transfer: on a GPU each would be a synchronisation of its own
    finite, offset, estimated = host_floats(
        xp.all(xp.isfinite(img)), img.min(), _sigma_where_it_lives(img) if sigma is None else 0.0)
    if not finite:
        raise ValueError("image contains NaN or infinite values")
    sigma = estimated if sigma is None else float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if data_range is not None and not (np.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
    if sigma == 0:
        return img.astype(out_dtype, copy=True)

    scale = SIGMA_GREY / sigma if data_range is None else GREY_SCALE / float(data_range)
    noisy = ((img.astype(work) - offset) * scale).astype(work)
    sigma255 = sigma * scale
    prof = prof.for_sigma(sigma255)
    tile = prof.tile_refs or _default_tile(xp, max(prof.hard.window, prof.wiener.window))
    basic = filter_stage(noisy, None, sigma255, prof.hard, prof.lambda_3d, tile)
    result = basic
    if stages == 2:
        result = filter_stage(noisy, basic, sigma255, prof.wiener, prof.lambda_3d, tile)
    return (result / scale + offset).astype(out_dtype)


#: Working bytes per (reference block, candidate) pair of a tile: distances, their transposed
#: copy, the validity mask and the argpartition indices, with slack.
_BYTES_PER_PAIR = 32


def _default_tile(xp: Any, window: int) -> int:
    """Tile side in reference blocks: 48 on the host; on a GPU up to 128 (fewer kernel
    launches), less when a quarter of the free device memory cannot hold the tile."""
    free = free_device_bytes(xp)
    if free is None:
        return 48
    fits = int(np.sqrt(free / 4 / (_BYTES_PER_PAIR * window * window)))
    return max(8, min(128, fits))


def _factory(**params: Any) -> Any:
    profile = params.pop("profile", None)
    data_range = params.pop("data_range", None)
    stages = params.pop("stages", 2)
    if params:
        raise ValueError(f"unknown bm3d parameter(s): {', '.join(sorted(params))}")

    def denoise(image: Any, sigma: float | None = None) -> Any:
        return bm3d(image, sigma, data_range=data_range, profile=profile, stages=stages)

    return denoise


register_denoiser("bm3d", _factory)

__all__ = ["BM3DProfile", "StageParams", "bm3d", "estimate_sigma"]
