"""Scan patterns at a chosen probe-area overlap.

The paper uses a 75 % overlap of the *probe area*, the pixels holding more than 1 % of the
maximum intensity: two neighbouring positions share 75 % of that area. The step follows from the
area of the actual probe, treated as a disc of that area.
All patterns give one position per step² of field, so the dose per position is dose × step².
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..backend import to_numpy
from ..probes import probe_area_mask

ScanKind = Literal["raster", "spiral", "random"]
SCANS: tuple[str, ...] = ("raster", "spiral", "random")
_GOLDEN_ANGLE = np.pi * (3.0 - np.sqrt(5.0))


def disc_overlap(u: float) -> float:
    """Area shared by two equal discs whose centres are ``u`` diameters apart, as a fraction
    of one disc's area."""
    u = min(max(u, 0.0), 1.0)
    return float(2.0 / np.pi * (np.arccos(u) - u * np.sqrt(1.0 - u * u)))


def step_for_overlap(probe: Any, pixel_size: float, overlap: float = 0.75, threshold: float = 0.01) -> float:
    """Step (m) at which neighbouring probe areas overlap by ``overlap``.

    The probe area (pixels above ``threshold`` × max intensity) is taken as a disc of the same
    area: a randomized probe is a speckle whose bright grains would otherwise stop overlapping
    after a one-pixel shift although its envelope overlaps almost entirely."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    area_px = float(np.asarray(to_numpy(probe_area_mask(probe, threshold))).sum())
    diameter = 2.0 * np.sqrt(area_px / np.pi) * pixel_size
    lo, hi = 0.0, 1.0
    for _ in range(60):  # disc_overlap falls monotonically from 1 to 0 on [0, 1]
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if disc_overlap(mid) > overlap else (lo, mid)
    return float(0.5 * (lo + hi) * diameter)


def scan_positions(
    kind: ScanKind, extent: tuple[float, float], step: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """(K, 2) probe centres (y, x) in metres, centred on 0, covering ``extent`` = (Ly, Lx) m
    with one position per step² of area."""
    if step <= 0:
        raise ValueError(f"scan step must be positive, got {step!r}")
    ly, lx = extent
    if ly <= 0 or lx <= 0:
        raise ValueError(f"scan extent must be positive, got {extent!r}")
    if kind == "raster":
        ny = max(1, round(ly / step))
        nx = max(1, round(lx / step))
        y = (np.arange(ny) - (ny - 1) / 2.0) * step
        x = (np.arange(nx) - (nx - 1) / 2.0) * step
        yy, xx = np.meshgrid(y, x, indexing="ij")
        return np.stack([yy.ravel(), xx.ravel()], axis=-1)
    n = max(1, round(ly * lx / step**2))
    if kind == "spiral":
        # Fermat spiral: each point owns step² of area; keep those inside the rectangle
        k = np.arange(int(n * 4 / np.pi * max(ly, lx) ** 2 / (ly * lx)) + 4)
        r = step * np.sqrt(k / np.pi)
        pts = np.stack([r * np.sin(k * _GOLDEN_ANGLE), r * np.cos(k * _GOLDEN_ANGLE)], axis=-1)
        inside = (np.abs(pts[:, 0]) <= ly / 2) & (np.abs(pts[:, 1]) <= lx / 2)
        return pts[inside]
    if kind == "random":
        if rng is None:
            raise ValueError("a random scan needs a random generator")
        return (rng.random((n, 2)) - 0.5) * np.array([ly, lx])
    raise ValueError(f"unknown scan {kind!r}: choose one of {SCANS}")
