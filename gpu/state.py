"""The reconstruction state: what a publisher snapshots and a result file stores."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import array_module, asarray, backend_name, to_numpy
from .geometry import ScanGeometry


@dataclass
class ReconState:
    object: Any  #: (Ny, Nx) complex transmission function (device or host array)
    probe: Any  #: (M, M) complex sample-plane probe, Σ|ψ|² = counts per pattern
    geometry: ScanGeometry
    iteration: int = 0
    loss_epochs: list[int] = field(default_factory=list)  #: iteration number of each loss
    loss_values: list[float] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  #: ReconOptions.to_dict()
    frames_used: int = 0
    positions: Any | None = None  #: (K, 2) m, (y, x) probe centres of the frames used
    energy: float | None = None  #: eV
    #: (K, 2) m, the nominal positions when ``positions`` were refined from the data
    nominal_positions: Any | None = None
    #: the probe the engine started from (its model's or the dataset's, at the used probe's
    #: power) when the engine estimated the probe from the data (the parallax fit)
    nominal_probe: Any | None = None
    #: scalars of that estimate (``ParallaxFit.record``: coefficients, significance, applied)
    probe_estimate: dict[str, float] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return backend_name(array_module(self.object))

    def record_loss(self, iteration: int, loss: float) -> None:
        self.loss_epochs.append(int(iteration))
        self.loss_values.append(float(loss))

    def snapshot(self) -> ReconState:
        """A host (NumPy) copy, safe to hand to another thread while the engine goes on."""
        return ReconState(
            object=np.array(to_numpy(self.object), copy=True),
            probe=np.array(to_numpy(self.probe), copy=True),
            geometry=self.geometry,
            iteration=self.iteration,
            loss_epochs=list(self.loss_epochs),
            loss_values=list(self.loss_values),
            options=copy.deepcopy(self.options),
            frames_used=self.frames_used,
            positions=None if self.positions is None else np.array(to_numpy(self.positions)),
            energy=self.energy,
            nominal_positions=None if self.nominal_positions is None
            else np.array(to_numpy(self.nominal_positions)),
            nominal_probe=None if self.nominal_probe is None else np.array(to_numpy(self.nominal_probe)),
            probe_estimate=dict(self.probe_estimate),
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of host arrays and scalars (the file writer's input)."""
        g = self.geometry
        out: dict[str, Any] = {
            "object": np.asarray(to_numpy(self.object)),
            "probe": np.asarray(to_numpy(self.probe)),
            "pixel_size_m": float(g.pixel_size),
            "origin_m": np.asarray(g.origin, dtype=np.float64),
            "object_shape": np.asarray(g.object_shape, dtype=np.int64),
            "probe_shape": np.asarray(g.probe_shape, dtype=np.int64),
            "iteration": int(self.iteration),
            "loss_epochs": np.asarray(self.loss_epochs, dtype=np.int64),
            "loss_values": np.asarray(self.loss_values, dtype=np.float64),
            "options": copy.deepcopy(self.options),
            "frames_used": int(self.frames_used),
        }
        if self.positions is not None:
            out["positions_m"] = np.asarray(to_numpy(self.positions), dtype=np.float64)
        if self.energy is not None:
            out["energy_eV"] = float(self.energy)
        if self.nominal_positions is not None:
            out["nominal_positions_m"] = np.asarray(to_numpy(self.nominal_positions), dtype=np.float64)
        if self.nominal_probe is not None:
            out["nominal_probe"] = np.asarray(to_numpy(self.nominal_probe))
        if self.probe_estimate:
            out["probe_estimate"] = dict(self.probe_estimate)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], xp: Any = np) -> ReconState:
        missing = [k for k in ("object", "probe", "pixel_size_m", "origin_m") if k not in d]
        if missing:
            raise ValueError(f"state dict lacks {', '.join(missing)}")
        obj = asarray(d["object"], xp)
        probe = asarray(d["probe"], xp)
        geometry = ScanGeometry(
            pixel_size=float(d["pixel_size_m"]),
            origin=tuple(float(v) for v in np.asarray(d["origin_m"]).ravel()[:2]),  # type: ignore[arg-type]
            object_shape=tuple(int(v) for v in obj.shape),  # type: ignore[arg-type]
            probe_shape=tuple(int(v) for v in probe.shape[-2:]),  # type: ignore[arg-type]
        )
        positions = d.get("positions_m")
        nominal = d.get("nominal_positions_m")
        return cls(
            object=obj,
            probe=probe,
            geometry=geometry,
            iteration=int(d.get("iteration", 0)),
            loss_epochs=[int(v) for v in np.asarray(d.get("loss_epochs", [])).ravel()],
            loss_values=[float(v) for v in np.asarray(d.get("loss_values", [])).ravel()],
            options=dict(d.get("options", {})),
            frames_used=int(d.get("frames_used", 0)),
            positions=None if positions is None else np.asarray(positions, dtype=np.float64),
            energy=None if d.get("energy_eV") is None else float(d["energy_eV"]),
            nominal_positions=None if nominal is None else np.asarray(nominal, dtype=np.float64),
            nominal_probe=None if d.get("nominal_probe") is None else asarray(d["nominal_probe"], xp),
            probe_estimate={str(k): float(v) for k, v in dict(d.get("probe_estimate", {})).items()},
        )
