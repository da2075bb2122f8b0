"""Denoisers registered with :mod:`cryoptycho.gpu.denoise` besides the open GPU BM3D:

* ``"gaussian"``: Gaussian smoothing (always available, NumPy and CuPy) — cheap, for tests and as
  a baseline. Its width comes from the factory (``width_px``, default 1 pixel); the noise level
  argument is not used (a fixed-width low-pass, like the Tikhonov prior's).
* ``"bm3d-package"``: adapter for the optional ``bm3d`` PyPI package (non-commercial licence,
  extra ``[bm3d]``): imported lazily, a clear error when absent, never a required dependency.
  It runs on the host; CuPy inputs are copied over and back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import array_module, ndimage, to_numpy
from .denoise import Denoiser, register_denoiser


def estimate_noise_sigma(image: Any) -> float:
    """Noise standard deviation of a 2-D image by Immerkær's method (one 3×3 Laplacian-like
    mask that cancels locally linear structure; Immerkær 1996)."""
    img = to_numpy(image).astype(np.float64)
    if img.ndim != 2 or min(img.shape) < 3:
        raise ValueError(f"noise estimate needs a 2-D image of at least 3×3, got {img.shape}")
    c = img[1:-1, 1:-1]
    conv = (
        4 * c
        - 2 * (img[:-2, 1:-1] + img[2:, 1:-1] + img[1:-1, :-2] + img[1:-1, 2:])
        + (img[:-2, :-2] + img[:-2, 2:] + img[2:, :-2] + img[2:, 2:])
    )
    h, w = img.shape
    return float(np.sqrt(np.pi / 2.0) / (6.0 * (w - 2) * (h - 2)) * np.abs(conv).sum())


class GaussianDenoiser:
    def __init__(self, width_px: float = 1.0) -> None:
        if not width_px > 0:
            raise ValueError(f"gaussian denoiser: width_px must be positive, got {width_px}")
        self.width_px = float(width_px)

    def __call__(self, image: Any, sigma: float | None = None) -> Any:
        gaussian_filter = ndimage(array_module(image)).gaussian_filter
        return gaussian_filter(image, self.width_px, mode="nearest").astype(image.dtype, copy=False)


class Bm3dPackageDenoiser:
    def __init__(self, profile: str = "np") -> None:
        try:
            import bm3d  # optional and non-commercial: never imported unless asked for
        except ImportError as exc:
            raise ImportError(
                "denoiser 'bm3d-package' needs the optional bm3d package: "
                "pip install 'cryoptycho[bm3d]' (non-commercial licence), or use denoiser 'bm3d'"
            ) from exc
        self._bm3d = bm3d
        self.profile = profile

    def __call__(self, image: Any, sigma: float | None = None) -> Any:
        xp = array_module(image)
        host = to_numpy(image).astype(np.float64)
        s = estimate_noise_sigma(host) if sigma is None else float(sigma)
        if s <= 0:
            return image
        out = self._bm3d.bm3d(host, sigma_psd=s, profile=self.profile)
        return xp.asarray(np.asarray(out), dtype=image.dtype)


def _gaussian(**params: Any) -> Denoiser:
    return GaussianDenoiser(**params)


def _bm3d_package(**params: Any) -> Denoiser:
    return Bm3dPackageDenoiser(**params)


register_denoiser("gaussian", _gaussian)
register_denoiser("bm3d-package", _bm3d_package)
