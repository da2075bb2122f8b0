"""The outputs of one reconstruction, saved in one place with one naming scheme.

Every producer of a result — the live daemon (``scans.py``), ``cryoptycho reconstruct`` and
``cryoptycho batch`` (jobs and the average) — calls :func:`save_outputs`, so a new output format
is added here once and appears everywhere. Names, for a stem ``S``:

    S.h5          the result file (:func:`cryoptycho.daemon.storage.result.write_result`)
    S.phase.mrc   phase with the mean (ice) phase removed, float32 rad, voxel size in Å
    S.phase.png   the same phase, 8-bit, 0.5–99.5 % percentile stretch

The daemon's stem is ``<results_dir>/<file_stem(scan_id)>``; offline, it is the ``--output``
path without its ``.h5`` suffix. Which formats are written is configuration
(``output_formats`` of the service, ``--formats`` or ``--export/--no-export`` of the
``reconstruct`` and ``batch`` commands); the HDF5
result is always written, because it is the record the others are views of (``batch --average``,
``view``, ``evaluate`` and recovery read it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
from cryoptycho.daemon.storage.whole import write_whole

if TYPE_CHECKING:  # the configuration imports this module: keep it free of h5py and the engine
    from cryoptycho.daemon.storage.result import RawHook
    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.state import ReconState

OutputFormat = Literal["h5", "mrc", "png"]
#: every format, in the order they are written
ALL_FORMATS: tuple[OutputFormat, ...] = get_args(OutputFormat)
#: the kind a format is listed under in a published result's ``files``
KINDS: dict[str, str] = {"h5": "result", "mrc": "phase_mrc", "png": "phase_png"}
SUFFIXES: dict[str, str] = {"h5": ".h5", "mrc": ".phase.mrc", "png": ".phase.png"}


def check_formats(formats: Iterable[str]) -> tuple[OutputFormat, ...]:
    """The formats as a tuple, or ValueError naming what is wrong with them."""
    given = tuple(formats)
    unknown = [f for f in given if f not in ALL_FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}: choose from {list(ALL_FORMATS)}")
    if "h5" not in given:
        raise ValueError(f"output formats {list(given)} lack 'h5': the HDF5 result is always written "
                         "(the phase exports are views of it)")
    if len(set(given)) != len(given):
        raise ValueError(f"output formats {list(given)} name a format twice")
    return given  # type: ignore[return-value]  # checked against ALL_FORMATS above


def parse_formats(text: str) -> tuple[OutputFormat, ...]:
    """``"h5,mrc"`` (a command-line value) → checked formats."""
    return check_formats(f.strip() for f in text.split(",") if f.strip())


def formats_for(formats: str | None, export: bool | None, export_default: bool) -> tuple[OutputFormat, ...]:
    """The formats a command writes: ``--formats LIST``, or ``--export`` (all) / ``--no-export``
    (the HDF5 result only); giving both is an error (ValueError)."""
    if formats is not None:
        if export is not None:
            raise ValueError("give --formats or --export/--no-export, not both")
        return parse_formats(formats)
    return ALL_FORMATS if (export_default if export is None else export) else ("h5",)


def stem_of(result_path: str | Path) -> Path:
    """The stem of a result path: the path without a trailing ``.h5`` (only that suffix: a scan
    id such as ``a.b`` keeps its ``.b``)."""
    path = Path(result_path)
    return path.with_suffix("") if path.suffix == ".h5" else path


def output_paths(stem: str | Path, formats: Iterable[str] = ALL_FORMATS) -> dict[str, Path]:
    """kind → path of each output of ``stem`` (not a ``with_suffix``: stems may contain dots)."""
    return {KINDS[f]: Path(f"{stem}{SUFFIXES[f]}") for f in check_formats(formats)}


def save_outputs(
    stem: str | Path,
    state: ReconState,
    data: PtychoData | None = None,
    *,
    formats: Iterable[str] = ALL_FORMATS,
    extra: dict[str, Any] | None = None,
    raw: RawHook | None = None,
) -> dict[str, Path]:
    """Write the outputs of one reconstruction; returns every file written, kind → path.

    ``data``, ``extra`` and ``raw`` go to the result file (see ``write_result``)."""
    from cryoptycho.daemon.storage.result import centred_phase, write_result

    paths = output_paths(stem, formats)
    written = {"result": write_result(paths["result"], state, data, extra=extra, raw=raw)}
    if "phase_mrc" in paths or "phase_png" in paths:
        phase = centred_phase(state.snapshot().object)
        if "phase_mrc" in paths:
            written["phase_mrc"] = _write_mrc(paths["phase_mrc"], phase, state.geometry.pixel_size)
        if "phase_png" in paths:
            written["phase_png"] = _write_png(paths["phase_png"], phase)
    return written


def _write_mrc(path: Path, phase: np.ndarray, pixel_size_m: float) -> Path:
    import mrcfile  # only the exports need it: keep the module import light

    def write(part: Path) -> None:
        with mrcfile.new(part, overwrite=True) as mrc:
            mrc.set_data(phase)
            mrc.voxel_size = pixel_size_m * 1e10

    return write_whole(path, write)


def _write_png(path: Path, phase: np.ndarray) -> Path:
    from PIL import Image

    lo, hi = np.percentile(phase, [0.5, 99.5])
    scaled = np.clip((phase - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    image = Image.fromarray((scaled * 255).round().astype(np.uint8))
    return write_whole(path, lambda part: image.save(part, format="PNG"))
