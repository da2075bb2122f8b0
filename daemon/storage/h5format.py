"""What every cryoptycho HDF5 file shares: the checks a reader makes, the frames' codec, the
detector geometry other tools read, the raster grid shape, and the NXcxi_ptycho raw-data entry.

Each file kind stamps its root with ``format`` (``"cryoptycho-dataset"``, ``-result``,
``-spool``) and ``format_version``; a reader must find the file, its own format and the
datasets or groups it cannot do without, and otherwise fail naming the one that is wrong.

Frames are bitshuffle-LZ4 compressed (HDF5 filter 32008). h5py reads them only once the filter
is registered: ``import hdf5plugin`` before opening the file (our own readers do). Without it
h5py says "can't read data (filter not available)" (HDF5 1.14: "can't find plugin");
:func:`explain_filter_errors` turns that
into a message saying what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
from cryoptycho.gpu.geometry import wavelength

#: h, c and e: exact in the SI since 2019 (scipy.constants holds the same values); importing
#: scipy.constants for them took ~0.3 s of every `cryoptycho replay` start, the only scipy it used
PLANCK_J_S, LIGHT_M_S, ELEMENTARY_CHARGE_C = 6.62607015e-34, 299792458.0, 1.602176634e-19

#: attribute written on every bitshuffle-LZ4 dataset, so a reader of the file sees what it needs
FILTER_NOTE = ("bitshuffle-LZ4 (HDF5 filter 32008): with h5py, `import hdf5plugin` before "
               "reading (pip install hdf5plugin)")
#: the detector distance an equivalent detector is placed at when the real one is not known
EQUIVALENT_DISTANCE_M = 1.0
#: CXI mask bit 0: the pixel is invalid (CXI 1.6 Table 7; ptychodus reads mask != 0 as bad)
CXI_PIXEL_IS_INVALID = 0x1


def compression() -> dict[str, Any]:
    """h5py dataset options for bitshuffle-LZ4 (through hdf5plugin)."""
    return dict(hdf5plugin.Bitshuffle(cname="lz4"))


@contextmanager
def explain_filter_errors(path: str | Path) -> Iterator[None]:
    """Re-raise h5py's "filter not available" as an OSError that says which filter and how to
    get it (a plain h5py without hdf5plugin, or an hdf5plugin built without bitshuffle)."""
    try:
        yield
    except OSError as exc:
        text = str(exc).lower()
        if "filter" not in text and "plugin" not in text:  # HDF5 1.14 says "can't find plugin"
            raise
        raise OSError(
            f"{path}: {exc}. The frames are {FILTER_NOTE}; our readers import it themselves, so "
            "hdf5plugin is missing or was built without the bitshuffle filter in this environment"
        ) from exc


def check_version(path: str | Path, f: h5py.Group, kind: str, version: int) -> None:
    """A file written by a newer cryoptycho (after a downgrade, or copied from another host) is
    refused by name instead of being read by rules it may no longer follow; a file without
    ``format_version`` (written by hand, as the README's dataset example without that line) is
    read as version 1."""
    found = f.attrs.get("format_version", 1)
    try:
        number = int(np.asarray(found).item())
    except (TypeError, ValueError):
        raise ValueError(f"{path}: attribute 'format_version' is {found!r}, not an integer") from None
    if number > version:
        wrote = f.attrs.get("cryoptycho_version")
        by = f" (cryoptycho {wrote})" if wrote is not None else ""
        raise ValueError(
            f"{path}: {kind} format_version {number} was written by a newer cryoptycho{by}; this "
            f"one reads {kind} files up to version {version}: read it with a cryoptycho as new as "
            "the one that wrote it")


@contextmanager
def open_checked(
    path: str | Path, fmt: str, kind: str, required: Iterable[str], version: int = 1
) -> Iterator[h5py.File]:
    """``path`` opened for reading, once it is a ``fmt`` file holding every ``required`` path.

    ``kind`` names the file in errors: FileNotFoundError when it is absent, ValueError when the
    format differs, its ``format_version`` is newer than ``version`` (the newest this code
    reads) or a required path is missing; reading compressed data without the filter is an
    OSError that names the filter (:func:`explain_filter_errors`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    with explain_filter_errors(path), h5py.File(path, "r") as f:
        found = f.attrs.get("format")
        # C, Fortran and MATLAB writers store fixed-length strings, which h5py hands back as bytes
        if (found.decode(errors="replace") if isinstance(found, bytes) else found) != fmt:
            raise ValueError(f"{path}: not a cryoptycho {kind} (attribute 'format' != {fmt!r})")
        check_version(path, f, kind, version)
        for name in required:
            if name not in f:
                raise ValueError(f"{path}: missing required '/{name}'")
        yield f


# ------------------------------------------------------------------------------ detector geometry


@dataclass(frozen=True)
class DetectorGeometry:
    """The detector other tools (ptychodus, CXI/NeXus readers) derive the sampling from:
    real-space pixel = λ · distance / (M · pixel). ``measured`` is False for an equivalent
    detector (same pixel angle, placed at :data:`EQUIVALENT_DISTANCE_M`) when the scan did not
    say which detector recorded it."""

    pixel_m: float  #: side of one frame pixel (binned detector pixels count as one)
    distance_m: float  #: sample–detector distance (the effective camera length)
    measured: bool


def detector_geometry(
    energy_eV: float, frame_side: int, pixel_size_m: float, metadata: dict[str, Any] | None = None
) -> DetectorGeometry:
    """The detector of a scan of real-space pixel ``pixel_size_m``: from the scan's metadata
    (``detector_pixel_size_m`` and/or ``camera_length_m``, as the DECTRIS path records them),
    else an equivalent one. Pixel and distance always agree with the sampling."""
    angle = wavelength(energy_eV) / (frame_side * pixel_size_m)  # one frame pixel, rad
    meta = metadata or {}
    pixel, length = _positive(meta.get("detector_pixel_size_m")), _positive(meta.get("camera_length_m"))
    if pixel is not None:
        return DetectorGeometry(pixel, pixel / angle, True)
    if length is not None:
        return DetectorGeometry(angle * length, length, True)
    return DetectorGeometry(angle * EQUIVALENT_DISTANCE_M, EQUIVALENT_DISTANCE_M, False)


def _positive(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def photon_equivalent_energy_eV(energy_eV: float) -> float:
    """Energy of a photon with the electrons' wavelength, hc/λ. X-ray tools (CXI readers,
    ptychodus) take a beam energy as a photon's: given this one they derive the right λ."""
    return float(PLANCK_J_S * LIGHT_M_S / wavelength(energy_eV) / ELEMENTARY_CHARGE_C)


# ------------------------------------------------------------------------------------ raster grid


def infer_nav_shape(positions: np.ndarray, rtol: float = 1e-3) -> tuple[tuple[int, int], bool] | None:
    """((ny, nx), serpentine) when ``positions`` (K, 2) (y, x) are an axis-aligned raster in
    row-major order (frame k = row k // nx); None otherwise (spiral, random, rotated)."""
    pos = np.asarray(positions, dtype=np.float64)
    k = len(pos)
    if pos.ndim != 2 or pos.shape[1] != 2 or k < 2:
        return None
    span = float(np.ptp(pos, axis=0).max()) or 1.0
    tol = rtol * span
    breaks = np.flatnonzero(np.abs(np.diff(pos[:, 0])) > tol)
    nx = int(breaks[0]) + 1 if breaks.size else k
    if k % nx:
        return None
    ny = k // nx
    grid = pos.reshape(ny, nx, 2)
    if np.ptp(grid[:, :, 0], axis=1).max() > tol:
        return None  # a row does not keep one y
    rows = grid[:, :, 1]
    serpentine = ny > 1 and nx > 1 and bool(np.allclose(rows[1], rows[0][::-1], atol=tol)) \
        and not np.allclose(rows[1], rows[0], atol=tol)
    canon = rows.copy()
    if serpentine:
        canon[1::2] = canon[1::2, ::-1]
    if not np.allclose(canon, canon[0], atol=tol):
        return None  # columns do not line up
    return (ny, nx), serpentine


def write_nav_shape(f: h5py.Group, nav_shape: Sequence[int] | None, serpentine: bool = False) -> None:
    """``/nav_shape`` = (ny, nx): LiberTEM's ``nav_shape``, py4DSTEM's (R_Nx, R_Ny) scan shape.
    ``frames.reshape(*nav_shape, M, M)`` is the 4D-STEM cube (odd rows reversed if serpentine)."""
    if nav_shape is None:
        return
    d = f.create_dataset("nav_shape", data=np.asarray(nav_shape, dtype=np.int64))
    d.attrs["serpentine"] = bool(serpentine)
    d.attrs["description"] = ("raster grid (rows, positions per row) of the frames, row-major: "
                              "frame k is row k // nx" + ("; odd rows run backwards" if serpentine else ""))


def read_nav_shape(f: h5py.Group) -> tuple[int, int] | None:
    if "nav_shape" not in f:
        return None
    ny, nx = (int(v) for v in f["nav_shape"][()])
    return ny, nx


def nav_shape_of(positions: np.ndarray, metadata: dict[str, Any] | None) -> tuple[tuple[int, int], bool] | None:
    """The raster grid a file should record: the scan's own declaration (``metadata['nav_shape']``,
    as the ingest path stores a declared raster) or one inferred from the positions."""
    meta = metadata or {}
    declared = meta.get("nav_shape")
    if declared is not None and len(declared) == 2:
        return (int(declared[0]), int(declared[1])), bool(meta.get("raster_serpentine", False))
    return infer_nav_shape(positions)


# ----------------------------------------------------------------------------- NXcxi_ptycho entry

#: where the frames and per-frame datasets live in an NXcxi_ptycho entry (ptychodus' CXI reader
#: takes ``entry_1/data_1/data``)
DETECTOR = "entry_1/instrument_1/detector_1"
DATA = "entry_1/data_1"
TRANSLATION = DETECTOR + "/translation"


def chunk_rows(frame_bytes: int) -> int:
    """Frames per chunk of a growing frames dataset: a power of two (producers' batches of 64
    fill whole chunks) up to 64, at most 1 MiB of frames, so that a chunk fits the chunk cache
    of HDF5 1.x (1 MiB) and a reader of one frame decompresses at most that much."""
    rows = max(1, min(64, (1 << 20) // max(1, frame_bytes)))
    return 1 << (rows.bit_length() - 1)


def _field(group: h5py.Group, name: str, value: Any, units: str | None = None, **attrs: Any) -> h5py.Dataset:
    d = group.create_dataset(name, data=value)
    if units is not None:
        d.attrs["units"] = units
    d.attrs.update(attrs)
    return d


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    g = parent.create_group(name)
    g.attrs["NX_class"] = nx_class
    return g


class NxcxiEntry:
    """The raw-data part of a spool file: an NXcxi_ptycho entry (CXI layout) that grows by
    :meth:`append`. Per-frame datasets: the frames, the producer's frame indices, (y, x)
    positions, and the CXI translation (x, y, z) with its x/y components."""

    def __init__(self, f: h5py.File) -> None:
        self.file = f
        d = f[DATA]
        self.data = d["data"]
        self.frame_index = d["frame_index"]
        self.positions_m = d["positions_m"]
        # spool files of earlier releases (recovered after an upgrade) kept the translation only
        # in sample_1/geometry_1 and had no x/y transformations: they go on in their own layout
        self.translation = f[TRANSLATION] if TRANSLATION in f else f["entry_1/sample_1/geometry_1/translation"]
        t = f.get("entry_1/sample_1/transformations")
        self.x, self.y = (t["x"], t["y"]) if t is not None else (None, None)
        #: a detector source's unbinned frames (spool.DETECTOR_FRAMES), which grow row for row
        #: too; whoever creates them sets this (a group lookup per append costs tens of µs)
        self.detector_frames: h5py.Dataset | None = d.get("detector_frames")

    def _rows(self) -> list[h5py.Dataset]:
        rows = [self.data, self.frame_index, self.positions_m, self.translation, self.x, self.y,
                self.detector_frames]
        return [ds for ds in rows if ds is not None]

    def replace_data(self, data: h5py.Dataset) -> None:
        """Make ``data`` (a new, empty frames dataset made elsewhere in the file) the entry's
        frames under every name the layout gives them."""
        old = self.data
        for group in (self.file[DETECTOR], self.file[DATA], self.file.get("entry_1/data")):
            if group is None:
                continue
            for name, item in list(group.items()):
                if isinstance(item, h5py.Dataset) and item.id == old.id:
                    del group[name]
                    group[name] = data
        self.data = data

    @classmethod
    def create(
        cls, f: h5py.File, *, title: str, frame_shape: tuple[int, int], frame_dtype: str,
        energy_eV: float, pixel_size_m: float, metadata: dict[str, Any] | None = None,
        mask: np.ndarray | None = None,
    ) -> NxcxiEntry:
        """Lay out an empty entry. ``mask`` is 1/True = valid (our convention); it is stored as
        a CXI mask (bit 0 set = invalid). The detector is :func:`detector_geometry`'s."""
        m = frame_shape
        det_geo = detector_geometry(energy_eV, m[0], pixel_size_m, metadata)
        entry = _group(f, "entry_1", "NXentry")
        entry["definition"] = "NXcxi_ptycho"
        entry["title"] = title
        if "cxi_version" not in f:
            f["cxi_version"] = 160  # CXI 1.6, as ptychodus writes it
        instrument = _group(entry, "instrument_1", "NXinstrument")
        source = _group(instrument, "source_1", "NXsource")
        source["name"] = str((metadata or {}).get("instrument", "transmission electron microscope"))
        source["probe"] = "electron"
        source["type"] = "Electron Microscope"
        _field(source, "energy", photon_equivalent_energy_eV(energy_eV) * ELEMENTARY_CHARGE_C, "J",
               description="photon energy of the electrons' wavelength (hc/λ), as CXI readers "
                           "derive λ from it; the electron energy is beam_1/incident_energy")
        beam = _group(instrument, "beam_1", "NXbeam")
        _field(beam, "energy", float(energy_eV), "eV")
        _field(beam, "incident_beam_energy", float(energy_eV), "eV")
        _field(beam, "incident_wavelength", wavelength(energy_eV), "m")
        _field(beam, "incident_energy_spread", np.nan, "eV", description="not measured")
        det = _group(instrument, "detector_1", "NXdetector")
        det.attrs["signal"] = "data"
        det.attrs["axes"] = [".", ".", "."]  # frames × detector rows × columns, no axis fields
        data = det.create_dataset(
            "data", shape=(0, *m), maxshape=(None, *m), dtype=frame_dtype,
            chunks=(chunk_rows(m[0] * m[1] * np.dtype(frame_dtype).itemsize), *m),
            **compression(),
        )
        data.attrs["units"] = "counts"
        data.attrs["compression"] = FILTER_NOTE
        data.attrs["target"] = "/" + DETECTOR + "/data"
        det["data_1"] = data
        for axis in ("x", "y"):
            _field(det, f"{axis}_pixel_size", det_geo.pixel_m, "m")
        _field(det, "distance", det_geo.distance_m, "m",
               equivalent=not det_geo.measured,
               description="effective camera length" if det_geo.measured else
               "equivalent detector: the recording detector was not described; pixel/distance "
               "give the right pixel angle")
        _field(det, "beam_center_x", (m[1] // 2) * det_geo.pixel_m, "m")
        _field(det, "beam_center_y", (m[0] // 2) * det_geo.pixel_m, "m")
        if mask is not None:
            cxi = np.where(np.asarray(mask).astype(bool), 0, CXI_PIXEL_IS_INVALID).astype(np.uint32)
            _field(det, "mask", cxi, description="CXI mask: bit 0 set = invalid pixel")
        tr = det.create_dataset("translation", shape=(0, 3), maxshape=(None, 3), dtype=np.float64,
                                chunks=(4096, 3))
        tr.attrs.update(units="m", axes="x:y:z", interpretation="probe position (x, y, z) on the sample",
                        target="/" + TRANSLATION)
        transformations = _group(det, "transformations", "NXtransformations")
        _field(transformations, "vector", np.array([0.0, 0.0, 1.0]))
        sample = _group(entry, "sample_1", "NXsample")
        st = _group(sample, "transformations", "NXtransformations")
        st.attrs["vector"] = np.array([1.0, 0.0, 0.0])
        for axis, vec in (("x", [1.0, 0.0, 0.0]), ("y", [0.0, 1.0, 0.0])):
            d = st.create_dataset(axis, shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
            d.attrs.update(units="m", transformation_type="translation", vector=np.array(vec),
                           target=f"/entry_1/sample_1/transformations/{axis}")
        geometry = _group(sample, "geometry_1", "NXcollection")
        geometry["translation"] = tr
        coll = _group(entry, "data_1", "NXcollection")
        coll.attrs["count"] = 0
        coll["data"] = data
        coll["translation"] = tr
        coll.create_dataset("frame_index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        coll.create_dataset("positions_m", shape=(0, 2), maxshape=(None, 2), dtype=np.float64,
                            chunks=(4096, 2)).attrs.update(units="m", axes="y:x")
        plot = _group(entry, "data", "NXdata")
        plot.attrs.update(signal="data", axes=[".", ".", "."])
        plot["data"] = data
        plot["x"] = st["x"]
        plot["y"] = st["y"]
        plot["x_indices"] = "0"
        plot["y_indices"] = "0"
        return cls(f)

    @property
    def count(self) -> int:
        return int(self.file[DATA].attrs.get("count", 0))

    def truncate(self, n: int) -> None:
        for ds in self._rows():
            if ds.shape[0] != n:
                ds.resize(n, axis=0)

    def append(self, frames: np.ndarray | None, indices: np.ndarray, positions_m: np.ndarray,
               write_frames: Callable[[int], None] | None = None) -> int:
        """Write rows after the committed ones, then commit them (attribute ``count`` of
        ``entry_1/data_1``, written last: a crash mid-append leaves the previous count).
        ``write_frames(first_row)`` writes the frames instead of a plain assignment (the spool's
        chunk-wise writers; ``frames`` may then be None)."""
        n, k = len(indices), self.count
        self.truncate(k + n)
        if write_frames is None:
            self.data[k:] = frames
        else:
            write_frames(k)
        self.frame_index[k:] = indices
        pos = np.asarray(positions_m, dtype=np.float64)
        self.positions_m[k:] = pos
        xyz = np.zeros((n, 3))
        xyz[:, 0], xyz[:, 1] = pos[:, 1], pos[:, 0]
        self.translation[k:] = xyz
        if self.x is not None and self.y is not None:
            self.x[k:], self.y[k:] = pos[:, 1], pos[:, 0]
        self.file[DATA].attrs["count"] = k + n
        return k + n
