"""Open any recorded file — dataset, spool or result — and say what it is.

Every command that takes a recorded scan (reconstruct, evaluate, replay, batch) reads it through
:func:`open_recorded`, so each of them takes each kind where it makes sense:

* a **dataset** (``cryoptycho simulate``, or written with :func:`.dataset.write_dataset`);
* a **spool** file (the daemon's ``<scan>.spool.h5``, every frame it received);
* a **result** file, through its ``/raw`` part (the spooled frames the daemon copies into it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
from cryoptycho.daemon.scan import data_from_spec
from cryoptycho.gpu.data import PtychoData

from . import dataset, result, spool
from .h5format import check_version, explain_filter_errors

Kind = Literal["dataset", "spool", "result"]
KINDS: dict[str, Kind] = {dataset.FORMAT: "dataset", spool.FORMAT: "spool", result.FORMAT: "result"}


@dataclass
class Recorded:
    """A recorded scan, whatever file it came from."""

    path: Path
    kind: Kind
    data: PtychoData  #: frames in acquisition order (sorted by frame index for spooled scans)
    options: dict[str, Any] = field(default_factory=dict)  #: the scan's own option overrides
    scan_id: str | None = None
    status: str | None = None  #: a spool's state (open, ended, finished, …)
    frame_indices: np.ndarray | None = None  #: the producer's frame indices (spooled scans)

    def describe(self) -> str:
        """One line: kind, scan, frames, geometry."""
        d = self.data
        parts = [f"{self.path}: cryoptycho {self.kind}"]
        if self.scan_id:
            parts.append(f"scan {self.scan_id}")
        if self.status:
            parts.append(f"status {self.status}")
        parts.append(f"{len(d.frames)} frames of {d.frame_shape[0]}×{d.frame_shape[1]} {d.frames.dtype}")
        parts.append(f"{d.energy / 1e3:g} keV, {d.real_pixel_size * 1e12:.4g} pm/px")
        grid = d.metadata.get("nav_shape")
        if grid:
            parts.append(f"raster {grid[0]}×{grid[1]}")
        return ", ".join(parts)


def identify(path: str | Path) -> Kind:
    """The kind of a cryoptycho file, read from its ``format`` attribute; a missing file, a
    non-HDF5 file or another format is an error naming the file and what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if spool.journal_path(path).exists():
        # a spool beside its journal (its scan open, or its daemon killed): read_spool reads it
        # through the journal. Not opened here: the running daemon holds an open scan's file for
        # writing (HDF5's lock refused this look, "not an HDF5 file"), and a file caught
        # mid-write can crash HDF5 (readcheck.py)
        return "spool"
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
    except OSError as exc:
        raise ValueError(f"{path}: not an HDF5 file ({exc})") from None
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt not in KINDS:
        raise ValueError(
            f"{path}: not a cryoptycho dataset, spool or result file (attribute 'format' is {fmt!r}; "
            f"expected one of {', '.join(sorted(KINDS))})"
        )
    return KINDS[fmt]


def open_recorded(path: str | Path) -> Recorded:
    """Read a dataset, spool or result file into a :class:`Recorded` scan. A spool without
    frames, or a result without its ``/raw`` part, is a ValueError saying so."""
    path = Path(path)
    kind = identify(path)
    if kind == "dataset":
        data = dataset.read_dataset(path)
        return Recorded(path, kind, data)
    if kind == "spool":
        return _from_spool(path, kind, spool.read_spool(path))
    with explain_filter_errors(path), h5py.File(path, "r") as f:
        # read_result checks it; the frames under /raw follow the result's format as well
        check_version(path, f, "result", result.FORMAT_VERSION)
        if "raw/scan" not in f or "raw/" + spool.DATA not in f:
            pending = f["extra"].attrs.get("raw_pending") if "extra" in f else None
            if pending is not None:  # (written while another program held its spool for writing)
                raise ValueError(
                    f"{path}: this result's raw frames are still in the spool {pending} (another program held "
                    "it open for writing when the scan finished); the daemon copies them into the result once "
                    "that program lets go — give that spool file instead, or wait for the copy"
                )
            raise ValueError(
                f"{path}: this result file holds no raw frames (no /raw part: it was not written "
                "by the daemon); give the scan's dataset or spool file instead"
            )
        contents = spool.spool_contents(path, f["raw"])
        contents.status = "finished"
    return _from_spool(path, kind, contents)


def _from_spool(path: Path, kind: Kind, contents: spool.SpoolContents) -> Recorded:
    spec = contents.spec
    if len(contents.frames) == 0:
        raise ValueError(f"{path}: the {kind} holds no frames")
    order = np.argsort(contents.indices, kind="stable")
    data = data_from_spec(spec, contents.frames[order], contents.positions_m[order],
                          {"spool_status": contents.status})
    return Recorded(path, kind, data, options=dict(spec.options), scan_id=spec.scan_id,
                    status=contents.status, frame_indices=np.asarray(contents.indices[order]))
