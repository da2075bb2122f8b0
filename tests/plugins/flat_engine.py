"""A second reconstruction algorithm, as a separate package would ship it (tests/test_engine_plugins.py).

"flat" reconstructs nothing: its object is the flat transmission 1 on the canvas the scan's
positions need and its probe the one it was given — so a result made by it is recognisable
beyond doubt, and a daemon that built anything but the engine the options name would fail the
test. It implements the whole :class:`cryoptycho.gpu.engines.LiveEngine` interface with public
names only. Installed by an entry point (group ``cryoptycho.engines``) that names ``ALGORITHM``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryoptycho.gpu.engines import Algorithm, EngineSpec, MemoryEstimate
from cryoptycho.gpu.geometry import ScanGeometry, fit_geometry
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.state import ReconState


@dataclass(frozen=True)
class Step:
    iteration: int
    n_frames: int
    fresh: int


class FlatEngine:
    def __init__(self, spec: EngineSpec, options: ReconOptions) -> None:
        self.spec, self.options = spec, options
        self.probe = np.asarray(spec.probe, np.complex64).copy()
        self._positions = np.zeros((0, 2))
        self._fresh = 0
        self._iteration = 0
        self._losses: list[float] = []
        self.geometry: ScanGeometry | None = None

    @property
    def n_frames(self) -> int:
        return len(self._positions)

    @property
    def iteration(self) -> int:
        return self._iteration

    def add_frames(self, frames: Any, positions_m: Any) -> None:
        self._positions = np.concatenate([self._positions, np.asarray(positions_m, np.float64)])
        self._fresh += len(frames)
        self.geometry = fit_geometry(self._positions, self.spec.pixel_size_m, self.spec.frame_shape,
                                     extent_m=self.spec.extent_m)

    def step(self) -> Step:
        self._iteration += 1
        fresh, self._fresh = self._fresh, 0
        self._losses.append(1.0)
        return Step(self._iteration, self.n_frames, fresh)

    def flush_losses(self) -> list[float]:
        losses, self._losses = self._losses, []
        return losses

    def refine(self, iterations: int, time_budget_s: float | None = None,
               callback: Callable[[int, int, float], None] | None = None) -> list[float]:
        for i in range(1, iterations + 1):
            self._iteration += 1
            if callback is not None:
                callback(i, iterations, float(self.n_frames))
        return [1.0] * iterations

    def snapshot(self) -> ReconState:
        assert self.geometry is not None
        return ReconState(
            object=np.ones(self.geometry.object_shape, np.complex64), probe=self.probe.copy(),
            geometry=self.geometry, iteration=self._iteration, options=self.options.to_dict(),
            frames_used=self.n_frames, positions=self.positions(), energy=self.spec.energy_eV,
        )

    def restore(self, state: ReconState) -> None:
        self.probe = np.asarray(state.probe, np.complex64).copy()

    def positions(self) -> np.ndarray:
        return self._positions.copy()

    def coverage(self) -> np.ndarray:
        assert self.geometry is not None
        return np.ones(self.geometry.object_shape, np.float32)


def memory(options: ReconOptions, *, frame_shape: tuple[int, int], frame_dtype: np.dtype,
           n_frames: int, field_px: tuple[int, int]) -> MemoryEstimate:
    """Positions and one canvas; the frames are not kept."""
    canvas = int(field_px[0]) * int(field_px[1]) * 8
    return MemoryEstimate(total=16 * n_frames + canvas, parts={"positions": 16 * n_frames, "object": canvas})


ALGORITHM = Algorithm(live=FlatEngine, memory_estimate=memory, description="flat object (a test plug-in)")


class DivergingEngine(FlatEngine):
    """"flat" whose loss turns NaN once, at the first losses read after a snapshot — and whose
    probe is doubled at that moment: the daemon must roll the engine back (``restore``) to the
    last snapshot, so the probe in its result is the one given."""

    def __init__(self, spec: EngineSpec, options: ReconOptions) -> None:
        super().__init__(spec, options)
        self._snapshots = 0
        self.diverged = False

    def snapshot(self) -> ReconState:
        self._snapshots += 1
        return super().snapshot()

    def flush_losses(self) -> list[float]:
        losses = super().flush_losses()
        if losses and self._snapshots and not self.diverged:
            self.diverged = True
            self.probe = 2 * self.probe
            losses[-1] = float("nan")
        return losses


DIVERGING = Algorithm(live=DivergingEngine, memory_estimate=memory, description="diverges once (a test plug-in)")
