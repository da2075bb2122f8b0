"""The reconstruction result file (HDF5), ptychodus-compatible names with unit suffixes.

Layout:

    /                      attrs: format = "cryoptycho-result", format_version = 1,
                           probe_energy_eV, iteration, frames_used, options (JSON string),
                           cryoptycho_version, backend, created_utc, host
    /object                (Ny, Nx) complex64 transmission function; attrs pixel_width_m,
                           pixel_height_m, center_x_m, center_y_m (of the array centre),
                           origin_m = (y, x) of pixel (0, 0)
    /probe                 (M, M) complex64 sample-plane probe, Σ|ψ|² = counts per pattern;
                           attrs pixel_width_m, pixel_height_m
    /probe_position_x_m, /probe_position_y_m   (K,) probe centres of the frames used
    /nominal_probe_position_x_m, /nominal_probe_position_y_m   (K,) the nominal centres, present
                           when the positions above were refined from the data
    /loss_epochs, /loss_values                 (n,) iteration number and objective value
    /extra                 optional: caller's arrays (datasets) and scalars (attrs)
    /raw                   optional: written by the caller's ``raw`` hook (e.g. NXcxi_ptycho)

Phase exports (:func:`export_phase`): MRC (float32, voxel size in Å) and 8-bit PNG of the phase
with the mean (ice) phase removed.
"""

from __future__ import annotations

import datetime as _dt
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from cryoptycho.daemon.storage.h5format import open_checked
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.state import ReconState

FORMAT = "cryoptycho-result"
FORMAT_VERSION = 1

RawHook = Callable[[h5py.Group], None]


@dataclass
class Result:
    state: ReconState
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _package_version() -> str:
    try:
        return version("cryoptycho")
    except PackageNotFoundError:
        return "unknown"


def write_result(
    path: str | Path,
    state: ReconState,
    data: PtychoData | None = None,
    extra: dict[str, Any] | None = None,
    raw: RawHook | None = None,
) -> Path:
    """Write ``state`` to ``path`` (overwriting). ``data`` supplies positions and energy when
    the state lacks them; ``extra`` adds arrays/scalars under /extra; ``raw(group)`` may fill
    the /raw group (the daemon's raw-frames writer)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = state.to_dict()
    positions = d.get("positions_m")
    if positions is None and data is not None:
        positions = np.asarray(data.positions, dtype=np.float64)
    energy = d.get("energy_eV", data.energy if data is not None else None)
    if energy is None:
        raise ValueError("write_result: the beam energy is unknown (state.energy and data are None)")
    px = d["pixel_size_m"]
    oy, ox = (float(v) for v in d["origin_m"])
    ny, nx = d["object"].shape
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format=FORMAT, format_version=FORMAT_VERSION, probe_energy_eV=float(energy),
            iteration=d["iteration"], frames_used=d["frames_used"],
            options=json.dumps(d["options"], sort_keys=True),
            cryoptycho_version=_package_version(), backend=state.backend,
            created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            host=socket.gethostname(),
        )
        obj = f.create_dataset("object", data=d["object"].astype(np.complex64))
        obj.attrs.update(
            pixel_width_m=px, pixel_height_m=px,
            center_x_m=ox + 0.5 * (nx - 1) * px, center_y_m=oy + 0.5 * (ny - 1) * px,
            origin_m=np.asarray([oy, ox]),
        )
        probe = f.create_dataset("probe", data=d["probe"].astype(np.complex64))
        probe.attrs.update(pixel_width_m=px, pixel_height_m=px)
        if positions is not None:
            f["probe_position_y_m"] = positions[:, 0]
            f["probe_position_x_m"] = positions[:, 1]
        nominal = d.get("nominal_positions_m")
        if nominal is not None:  # the positions above were refined from the data
            f["nominal_probe_position_y_m"] = nominal[:, 0]
            f["nominal_probe_position_x_m"] = nominal[:, 1]
        f["loss_epochs"] = d["loss_epochs"]
        f["loss_values"] = d["loss_values"]
        if extra:
            g = f.create_group("extra")
            for key, value in extra.items():
                if np.ndim(value) == 0 and not isinstance(value, np.ndarray):
                    g.attrs[key] = value
                else:
                    g[key] = np.asarray(value)
        if raw is not None:
            raw(f.create_group("raw"))
    return path


def read_result(path: str | Path) -> Result:
    """Read a result file; a missing or malformed field is a ValueError naming it."""
    required = ("object", "probe", "loss_epochs", "loss_values")
    with open_checked(path, FORMAT, "result", required) as f:
        a = f["object"].attrs
        positions = None
        if "probe_position_x_m" in f and "probe_position_y_m" in f:
            positions = np.stack([f["probe_position_y_m"][()], f["probe_position_x_m"][()]], axis=1)
        nominal = None
        if "nominal_probe_position_x_m" in f and "nominal_probe_position_y_m" in f:
            nominal = np.stack([f["nominal_probe_position_y_m"][()],
                                f["nominal_probe_position_x_m"][()]], axis=1)
        state = ReconState.from_dict({
            "object": f["object"][()],
            "probe": f["probe"][()],
            "pixel_size_m": float(a["pixel_width_m"]),
            "origin_m": np.asarray(a["origin_m"]),
            "iteration": int(f.attrs.get("iteration", 0)),
            "loss_epochs": f["loss_epochs"][()],
            "loss_values": f["loss_values"][()],
            "options": json.loads(f.attrs.get("options", "{}")),
            "frames_used": int(f.attrs.get("frames_used", 0)),
            "positions_m": positions,
            "nominal_positions_m": nominal,
            "energy_eV": float(f.attrs["probe_energy_eV"]),
        })
        provenance = {
            k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()
            if k in ("cryoptycho_version", "backend", "created_utc", "host", "format_version")
        }
        extra: dict[str, Any] = {}
        if "extra" in f:
            extra.update({k: v for k, v in f["extra"].attrs.items()})
            extra.update({k: f["extra"][k][()] for k in f["extra"]})
    return Result(state=state, provenance=provenance, extra=extra)


def centred_phase(obj: Any) -> np.ndarray:
    """Phase of the object with its mean (ice) phase rotated out, float32."""
    t = np.asarray(obj)
    return np.angle(t * np.exp(-1j * np.angle(t.mean()))).astype(np.float32)


def export_phase(state: ReconState, stem: str | Path) -> list[Path]:
    """Write ``stem``.mrc (phase in rad, voxel size in Å) and ``stem``.png (8-bit, 0.5–99.5 %
    percentile stretch) of the mean-removed phase; returns the paths."""
    import mrcfile  # only the exports need it: keep the module import light
    from PIL import Image

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    phase = centred_phase(state.snapshot().object)
    mrc_path = Path(f"{stem}.mrc")
    with mrcfile.new(mrc_path, overwrite=True) as mrc:
        mrc.set_data(phase)
        mrc.voxel_size = state.geometry.pixel_size * 1e10
    lo, hi = np.percentile(phase, [0.5, 99.5])
    scaled = np.clip((phase - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    png_path = Path(f"{stem}.png")
    Image.fromarray((scaled * 255).round().astype(np.uint8)).save(png_path)
    return [mrc_path, png_path]
