"""Live resolution without ground truth: the half-set (binomial-thinning) FRC.

Every frame a scan receives is thinned into two independent half-dose frames
(:func:`cryoptycho.gpu.metrics.binomial_split`); two small streaming reconstructions follow the
halves, and the FRC of their phases (:func:`half_set_resolution`) estimates the resolution of the
full-dose reconstruction conservatively (each half has half the dose). The halves take a bounded
share of the worker's compute (``resolution_share``) so they cannot starve the main model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from cryoptycho.gpu.engines import LiveEngine
from cryoptycho.gpu.metrics import binomial_split, half_set_resolution


class HalfSetEstimator:
    """Two half-dose streaming reconstructions stepped at a bounded share of the main one's time."""

    def __init__(self, make_engine: Callable[[], LiveEngine], pixel_size: float, share: float, seed: int = 0) -> None:
        self._a = make_engine()
        self._b = make_engine()
        self._rng = np.random.default_rng(seed)
        self.pixel_size = pixel_size
        self.share = share
        self._spent = 0.0  #: seconds spent on the halves
        self._main = 0.0  #: seconds spent on the main model
        self.resolution_m: float | None = None
        self.enabled = True

    def add_frames(self, frames: np.ndarray, positions_m: np.ndarray) -> None:
        if frames.dtype.kind == "f":
            # float frames are not counts of electrons: thinning is undefined, so no estimate
            self.enabled = False
        if not self.enabled:
            return
        a, b = binomial_split(frames, self._rng)
        self._a.add_frames(a, positions_m)
        self._b.add_frames(b, positions_m)

    def account_main(self, seconds: float) -> None:
        self._main += seconds

    def maybe_step(self) -> bool:
        """Step both halves once if they are within their compute share; True if stepped."""
        if not self.enabled or self._a.n_frames == 0:
            return False
        if self._spent > self.share * (self._spent + self._main):
            return False
        t0 = time.perf_counter()
        self._a.step()
        self._b.step()
        self._spent += time.perf_counter() - t0
        return True

    def refine(self, iterations: int, time_budget_s: float,
               clock: Callable[[], float] = time.perf_counter) -> None:
        """Full-batch refinement of both halves after scan end, within ``time_budget_s`` in all
        (the estimate describes the refined result only if the halves are refined too): each
        gets half, and the second at most what the first left (a first half that overran takes
        from the second, not from the operator's budget)."""
        if not self.enabled or self._a.n_frames == 0:
            return
        t0 = clock()
        self._a.refine(iterations, time_budget_s=time_budget_s / 2)
        left = time_budget_s - (clock() - t0)
        self._b.refine(iterations, time_budget_s=max(0.0, min(time_budget_s / 2, left)))

    def estimate(self) -> float | None:
        """FRC resolution (m) of the two halves' current phases, restricted to the scanned area."""
        if not self.enabled or self._a.n_frames == 0:
            return None
        sa, sb = self._a.snapshot(), self._b.snapshot()
        cov = np.asarray(self._a.coverage())
        obj_a, obj_b = np.asarray(sa.object), np.asarray(sb.object)
        if obj_a.shape != obj_b.shape and sa.geometry is not None and sb.geometry is not None:
            # each half's canvas grows where its own refined positions run out of it
            obj_a, obj_b, cov = _common_region(obj_a, sa.geometry.origin, obj_b, sb.geometry.origin,
                                               self.pixel_size, cov)
        mask = cov > 0.1 * cov.max() if cov.size and cov.max() > 0 else None
        self.resolution_m = float(half_set_resolution(obj_a, obj_b, self.pixel_size, mask=mask))
        return self.resolution_m


def _common_region(a: np.ndarray, origin_a: tuple[float, float], b: np.ndarray,
                   origin_b: tuple[float, float], pixel_size: float,
                   cov_a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``a`` (and its coverage) and ``b`` cut to the region both canvases hold (same pixel size,
    origins in metres)."""
    off = np.rint((np.asarray(origin_b) - np.asarray(origin_a)) / pixel_size).astype(int)
    lo = np.maximum(0, off)  # in a's pixels
    hi = np.minimum(np.asarray(a.shape), off + np.asarray(b.shape))
    sa = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    sb = (slice(lo[0] - off[0], hi[0] - off[0]), slice(lo[1] - off[1], hi[1] - off[1]))
    return a[sa], b[sb], cov_a[sa]
