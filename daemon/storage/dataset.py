"""The cryoptycho dataset file (HDF5). Its layout (every path, units, what is optional) has one
reference, daemon/storage/FORMATS.md § "Dataset file": change it there with this module.

Reading /frames with plain h5py needs ``import hdf5plugin`` first (the bitshuffle-LZ4 filter).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from cryoptycho.daemon.storage.h5format import (
    FILTER_NOTE,
    compression,
    nav_shape_of,
    open_checked,
    read_nav_shape,
    write_nav_shape,
)
from cryoptycho.gpu.data import ProbeModel, PtychoData

FORMAT = "cryoptycho-dataset"
FORMAT_VERSION = 1


__all__ = ["FORMAT", "FORMAT_VERSION", "compression", "read_dataset", "write_dataset"]


def write_dataset(path: str | Path, data: PtychoData) -> Path:
    """Write ``data`` to ``path`` (overwriting)."""
    data.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        m = data.frame_shape
        frames = f.create_dataset("frames", data=data.frames, chunks=(min(64, len(data.frames)), *m),
                                  **compression())
        frames.attrs["compression"] = FILTER_NOTE
        grid = nav_shape_of(np.asarray(data.positions), data.metadata)
        if grid is not None:
            write_nav_shape(f, *grid)
        f.create_dataset("positions_m", data=np.asarray(data.positions, dtype=np.float64))
        f["energy_eV"] = float(data.energy)
        if data.pixel_size is not None:
            f["pixel_size_m"] = float(data.pixel_size)
        else:
            f["detector_pixel_angle_rad"] = float(data.detector_pixel_angle)  # type: ignore[arg-type]
        if data.mask is not None:
            f["mask"] = np.asarray(data.mask, dtype=np.uint8)
        if data.probe is not None:
            f["probe"] = np.asarray(data.probe, dtype=np.complex64)
        if data.probe_model is not None:
            g = f.create_group("probe_model")
            pm = data.probe_model
            g.attrs.update(
                kind=pm.kind, semiangle_rad=pm.semiangle, cs_m=pm.cs, zones=pm.zones, seed=pm.seed
            )
            if pm.defocus is not None:
                g.attrs["defocus_m"] = pm.defocus
            if pm.diameter is not None:
                g.attrs["diameter_m"] = pm.diameter
            if pm.source_size is not None:
                g.attrs["source_size_m"] = pm.source_size
        if data.truth_object is not None:
            d = f.create_dataset("truth/object", data=np.asarray(data.truth_object, np.complex64))
            if data.truth_origin is not None:
                d.attrs["origin_m"] = np.asarray(data.truth_origin, dtype=np.float64)
        if data.truth_probe is not None:
            f["truth/probe"] = np.asarray(data.truth_probe, dtype=np.complex64)
        if data.truth_positions is not None:
            f["truth/positions_m"] = np.asarray(data.truth_positions, dtype=np.float64)
        f.create_group("metadata").attrs["json"] = json.dumps(data.metadata)
    return path


#: the attributes of a dataset's ``/probe_model`` group (FORMATS.md)
PROBE_MODEL_ATTRS = ("kind", "semiangle_rad", "defocus_m", "cs_m", "zones", "diameter_m", "seed",
                     "source_size_m")


def read_dataset(path: str | Path) -> PtychoData:
    """Read a dataset file; a missing or malformed field is a ValueError naming it."""
    with open_checked(path, FORMAT, "dataset", ("frames", "positions_m", "energy_eV"), FORMAT_VERSION) as f:
        probe_model = None
        if "probe_model" in f:
            a = f["probe_model"].attrs
            # a misspelt attribute was a KeyError traceback, or silently the design's default
            unknown = sorted(set(a) - set(PROBE_MODEL_ATTRS))
            if unknown:
                raise ValueError(f"/probe_model: unknown attribute {unknown[0]!r} "
                                 f"(known: {', '.join(PROBE_MODEL_ATTRS)})")
            for key in ("kind", "semiangle_rad"):
                if key not in a:
                    raise ValueError(f"/probe_model: attribute {key!r} is required")
            kind = a["kind"]
            probe_model = ProbeModel(
                kind=kind.decode(errors="replace") if isinstance(kind, bytes) else str(kind),
                semiangle=_attr_number(a, "semiangle_rad"),
                defocus=_attr_number(a, "defocus_m") if "defocus_m" in a else None,
                cs=_attr_number(a, "cs_m") if "cs_m" in a else 0.0,
                zones=int(_attr_number(a, "zones")) if "zones" in a else 8,
                diameter=_attr_number(a, "diameter_m") if "diameter_m" in a else None,
                seed=int(_attr_number(a, "seed")) if "seed" in a else 0,
                source_size=_attr_number(a, "source_size_m") if "source_size_m" in a else None,
            )
            size = probe_model.source_size
            if size is not None and not (np.isfinite(size) and size >= 0):
                raise ValueError(f"/probe_model attribute 'source_size_m' must be a length ≥ 0 in metres, "
                                 f"got {size!r}")
        truth_origin = None
        if "truth/object" in f and "origin_m" in f["truth/object"].attrs:
            truth_origin = tuple(float(v) for v in f["truth/object"].attrs["origin_m"])
        meta = json.loads(f["metadata"].attrs["json"]) if "metadata" in f else {}
        grid = read_nav_shape(f)
        if grid is not None:  # travels on with the scan (replay, spool, result)
            meta.setdefault("nav_shape", list(grid))
            meta.setdefault("raster_serpentine", bool(f["nav_shape"].attrs.get("serpentine", False)))
        return PtychoData(
            frames=_array(f, "frames"),
            positions=_array(f, "positions_m"),
            energy=_number(f, "energy_eV"),
            pixel_size=_number(f, "pixel_size_m") if "pixel_size_m" in f else None,
            detector_pixel_angle=(
                _number(f, "detector_pixel_angle_rad") if "detector_pixel_angle_rad" in f else None
            ),
            probe=_array(f, "probe") if "probe" in f else None,
            probe_model=probe_model,
            mask=_array(f, "mask").astype(bool) if "mask" in f else None,
            truth_object=f["truth/object"][()] if "truth/object" in f else None,
            truth_probe=f["truth/probe"][()] if "truth/probe" in f else None,
            truth_origin=truth_origin,  # type: ignore[arg-type]
            truth_positions=f["truth/positions_m"][()] if "truth/positions_m" in f else None,
            metadata=meta,
        )


def _array(f: h5py.File, name: str) -> np.ndarray:
    """``/name``'s array; a group or link where a dataset belongs is named, not an h5py TypeError."""
    node = f.get(name)
    if not isinstance(node, h5py.Dataset):  # a fault of the file's content, as every reader's ValueError
        raise ValueError(f"/{name} must be a dataset (an array), found {type(node).__name__}")  # noqa: TRY004
    return node[()]


def _number(f: h5py.File, name: str) -> float:
    """``/name`` as one number. Tools that write every value as an array (MATLAB, IDL, many C
    writers) store a scalar as shape (1,) or (1, 1): that is one number too. Anything else, a
    string with a unit ("300 keV") or several values, is refused naming the path and the unit
    its name carries."""
    value = np.asarray(_array(f, name))
    if value.size != 1 or value.dtype.kind not in "biuf":
        unit = name.rsplit("_", 1)[-1]
        raise ValueError(f"/{name} must hold one number (in {unit}), got {_shown(value)}")
    return float(value.reshape(()))


def _attr_number(attrs: h5py.AttributeManager, key: str) -> float:
    """One numeric attribute of ``/probe_model``, by the same rule as :func:`_number`."""
    value = np.asarray(attrs[key])
    if value.size != 1 or value.dtype.kind not in "biuf":
        raise ValueError(f"/probe_model attribute {key!r} must be one number, got {_shown(value)}")
    return float(value.reshape(()))


def _shown(value: np.ndarray) -> str:
    if value.size != 1:
        return f"an array of shape {value.shape}"
    item = value.reshape(()).item()
    return repr(item.decode(errors="replace") if isinstance(item, bytes) else item)
