"""The reconstruction result file (HDF5): a ptychodus product file (``ptychodus.api.io.
load_product`` reads it, checked in tests/test_interop_files.py) with cryoptycho's additions.

Layout (every dataset and attribute): daemon/storage/FORMATS.md § "Result file", the one reference;
change it there with this module.

The phase exports (MRC, PNG) beside it are written by ``storage/outputs.py: save_outputs``.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from cryoptycho.daemon.storage.h5format import (
    detector_geometry,
    nav_shape_of,
    open_checked,
    photon_equivalent_energy_eV,
    write_nav_shape,
)
from cryoptycho.daemon.storage.whole import write_whole
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
    # written under a hidden name and renamed when whole (storage/whole.py), on disk when this
    # returns: the daemon deletes the scan's spool next
    return write_whole(path, lambda part: _write(part, path.name, d, state, data, extra, raw, positions,
                                                 float(energy), px, oy, ox, ny, nx), durable=True)


def add_raw(path: str | Path, raw: RawHook) -> None:
    """Give a result written without its raw part (the daemon's finish, while another program
    held the scan's spool for writing) its ``/raw`` group, and the fields derived from it
    (ptychodus' detector distance, position indexes, nav_shape), as :func:`write_result` would
    have written them. The result is rewritten under a hidden name and renamed when whole."""
    path = Path(path)

    def rewrite(part: Path) -> None:
        shutil.copyfile(path, part)
        with h5py.File(part, "r+") as f:
            if "raw" in f:
                raise ValueError(f"{path} already holds a /raw group")
            raw(f.create_group("raw"))
            _relocate_nexus_links(f["raw"])
            for derived in ("probe_position_indexes", "nav_shape"):
                if derived in f:
                    del f[derived]
            extra = f["extra"].attrs if "extra" in f else {}
            positions = None
            if "probe_position_y_m" in f and "probe_position_x_m" in f:
                positions = np.stack([f["probe_position_y_m"][()], f["probe_position_x_m"][()]], axis=1)
            scan_id = extra.get("scan_id")
            _ptychodus_fields(f, energy=float(f.attrs["electron_energy_eV"]), frame_side=int(f["probe"].shape[-1]),
                              pixel=float(f["object"].attrs["pixel_width_m"]), positions=positions,
                              metadata=None if scan_id is None else {"scan_id": str(scan_id)})
            if "extra" in f and "raw_pending" in f["extra"].attrs:
                del f["extra"].attrs["raw_pending"]

    write_whole(path, rewrite, durable=True)  # (over the result without /raw: its frames' spool is deleted next)


def _write(part: Path, name: str, d: dict[str, Any], state: ReconState, data: PtychoData | None,
           extra: dict[str, Any] | None, raw: RawHook | None, positions: np.ndarray | None, energy: float,
           px: float, oy: float, ox: float, ny: int, nx: int) -> None:
    with h5py.File(part, "w") as f:
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
        if d.get("nominal_probe") is not None:  # the probe above was estimated from the data
            nominal_probe = f.create_dataset("nominal_probe", data=d["nominal_probe"].astype(np.complex64))
            nominal_probe.attrs.update(pixel_width_m=px, pixel_height_m=px)
        if positions is not None:
            f["probe_position_y_m"] = positions[:, 0]
            f["probe_position_x_m"] = positions[:, 1]
        nominal = d.get("nominal_positions_m")
        if nominal is not None:  # the positions above were refined from the data
            f["nominal_probe_position_y_m"] = nominal[:, 0]
            f["nominal_probe_position_x_m"] = nominal[:, 1]
        f["loss_epochs"] = d["loss_epochs"]
        f["loss_values"] = d["loss_values"]
        # the state's probe estimate is the authority on its own probe: it wins over a caller's
        # copy of the same keys (the daemon's session figures may hold an earlier fit's)
        extra = {**(extra or {}), **d.get("probe_estimate", {})}
        if extra:
            g = f.create_group("extra")
            for key, value in extra.items():
                if np.ndim(value) == 0 and not isinstance(value, np.ndarray):
                    g.attrs[key] = value
                else:
                    g[key] = np.asarray(value)
        if raw is not None:
            raw(f.create_group("raw"))
            _relocate_nexus_links(f["raw"])
        meta = {**(data.metadata if data is not None else {}), **({"scan_id": extra["scan_id"]}
                                                                    if extra and "scan_id" in extra else {})}
        if "scan_id" not in meta:
            f.attrs["name"] = name  # the file's final name, not the one it is written under
        _ptychodus_fields(f, energy=float(energy), frame_side=int(d["probe"].shape[-1]), pixel=px,
                          positions=positions, metadata=meta)


def _relocate_nexus_links(group: h5py.Group) -> None:
    """A NeXus link names its target by absolute path (attribute ``target``); the spool's
    ``/entry_1/…`` lives under ``/raw/entry_1/…`` here, so the targets move with it."""
    prefix = group.name.rstrip("/")

    def visit(_name: str, obj: Any) -> None:
        target = obj.attrs.get("target")
        if isinstance(target, bytes):
            target = target.decode()
        if isinstance(target, str) and target.startswith("/") and not target.startswith(prefix + "/"):
            obj.attrs["target"] = prefix + target

    group.visititems(visit)


def _ptychodus_fields(f: h5py.File, energy: float, frame_side: int, pixel: float,
                      positions: np.ndarray | None, metadata: dict[str, Any] | None) -> None:
    """What ptychodus' product reader needs beyond our own names: the detector distance (the
    raw part's, which is the scan's detector, else :func:`detector_geometry`'s), the photon
    energy of the electrons' wavelength, and every position's index."""
    raw_det = "raw/entry_1/instrument_1/detector_1/distance"
    if raw_det in f:
        distance = float(f[raw_det][()])
    else:
        distance = detector_geometry(energy, frame_side, pixel, metadata).distance_m
    f.attrs.update(
        electron_energy_eV=energy, photon_energy_eV=photon_equivalent_energy_eV(energy),
        detector_object_distance_m=distance,
    )
    if "name" not in f.attrs:
        f.attrs["name"] = str((metadata or {}).get("scan_id", f.filename.rsplit("/", 1)[-1]))
    if positions is None:
        return
    n = len(positions)
    indexes = np.arange(n, dtype=np.int64)
    raw_index, raw_pos = "raw/entry_1/data_1/frame_index", "raw/entry_1/data_1/positions_m"
    if raw_index in f and raw_pos in f:
        count = int(f["raw/entry_1/data_1"].attrs.get("count", f[raw_index].shape[0]))
        idx, pos = f[raw_index][:count], f[raw_pos][:count]
        # the engine's frames are the raw rows as received, or sorted by frame index (open_recorded)
        for order in (np.arange(len(idx)), np.argsort(idx, kind="stable")):
            if len(idx) == n and np.array_equal(pos[order], positions):
                indexes = idx[order].astype(np.int64)
                break
    f["probe_position_indexes"] = indexes
    grid = None
    if "raw/nav_shape" in f:
        grid = (tuple(int(v) for v in f["raw/nav_shape"][()]), bool(f["raw/nav_shape"].attrs.get("serpentine")))
    elif n > 1:
        grid = nav_shape_of(positions, metadata)
    if grid is not None and grid[0][0] * grid[0][1] == n:
        write_nav_shape(f, *grid)


def read_result(path: str | Path) -> Result:
    """Read a result file; a missing or malformed field is a ValueError naming it."""
    required = ("object", "probe", "loss_epochs", "loss_values")
    with open_checked(path, FORMAT, "result", required, FORMAT_VERSION) as f:
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
            "nominal_probe": f["nominal_probe"][()] if "nominal_probe" in f else None,
            "probe_estimate": {k: float(v) for k, v in (f["extra"].attrs.items() if "extra" in f else ())
                               if k.startswith(("parallax_", "aberration_", "search_", "source_size_")) and np.ndim(v) == 0},
            "energy_eV": float(f.attrs.get("electron_energy_eV", f.attrs["probe_energy_eV"])),
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

