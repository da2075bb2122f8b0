"""Compact images for the browser: 8-bit PNG plus the value range it spans.

The browser maps the 8-bit values back to physical units with the range and applies its own
colour map and fixed/auto scale, so one encoding per preview serves every viewer.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Longest side of an image sent to browsers; larger images are block-averaged down.
DEFAULT_MAX_SIDE = 512


@dataclass(frozen=True)
class EncodedImage:
    png: bytes
    lo: float  #: value of pixel 0
    hi: float  #: value of pixel 255
    shape: tuple[int, int]  #: (rows, cols) of the PNG
    scale: int  #: block-averaging factor applied (source pixels per PNG pixel)

    def as_json(self) -> dict[str, object]:
        return {
            "png": "data:image/png;base64," + base64.b64encode(self.png).decode("ascii"),
            "range": [self.lo, self.hi],
            "shape": list(self.shape),
            "scale": self.scale,
        }


def downsample(image: np.ndarray, max_side: int = DEFAULT_MAX_SIDE) -> tuple[np.ndarray, int]:
    """Block-average by the smallest integer factor that brings the longest side ≤ max_side."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    factor = max(1, int(np.ceil(max(image.shape) / max_side)))
    if factor == 1:
        return image, 1
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    return blocks.mean(axis=(1, 3)), factor


def encode(
    image: np.ndarray,
    max_side: int = DEFAULT_MAX_SIDE,
    value_range: tuple[float, float] | None = None,
    percentile: float = 0.5,
) -> EncodedImage:
    """8-bit PNG of a real image. Without ``value_range`` the range is the
    [percentile, 100 − percentile] span, robust to a few hot pixels; NaNs map to 0."""
    data = np.asarray(image, dtype=np.float64)
    data, factor = downsample(data, max_side)
    finite = np.isfinite(data)
    if value_range is None:
        if finite.any():
            lo, hi = np.percentile(data[finite], [percentile, 100.0 - percentile])
        else:
            lo, hi = 0.0, 1.0
    else:
        lo, hi = value_range
    if not hi > lo:
        hi = lo + 1e-12
    scaled = np.clip((np.where(finite, data, lo) - lo) / (hi - lo), 0.0, 1.0)
    pixels = np.round(scaled * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", optimize=False)
    return EncodedImage(buf.getvalue(), float(lo), float(hi), pixels.shape, factor)


def decode(encoded: EncodedImage) -> np.ndarray:
    """Back to physical values (to 8-bit precision) — used by tests and the `watch` saver."""
    pixels = np.asarray(Image.open(io.BytesIO(encoded.png)), dtype=np.float64)
    return encoded.lo + pixels / 255.0 * (encoded.hi - encoded.lo)


def specimen_phase(obj: np.ndarray) -> np.ndarray:
    """Phase of a complex object with its median (the ice / background phase) removed, so the
    colour scale shows the specimen, not the mean inner potential of the ice."""
    phase = np.angle(obj * np.exp(-1j * np.angle(np.median(obj.real) + 1j * np.median(obj.imag))))
    return phase.astype(np.float32)
