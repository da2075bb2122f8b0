"""The raw part of a result file (``/raw``: the spool's NXcxi groups), copied from the closed
spool at a scan's finish — or later, when another program holds the spool open for writing then.

An operator's ``h5py.File(spool, "r+")`` (or HDFView editing it) holds HDF5's exclusive lock: the
spool cannot be read beside it without risking a half-written view, and before, the read's
refusal failed the whole scan after its reconstruction. Now the result is written without
``/raw`` (its ``/extra`` attribute ``raw_pending`` names the spool), the spool is kept with every
frame, and a marker beside it (``<spool>.raw-pending``) says whose result waits for it, so that
the copy is completed once that program lets go: by the running daemon, or by the next start
(the marker also keeps recovery from reconstructing the scan a second time).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py

from .diskspace import require_free_space
from .journal import fsync_path
from .result import add_raw
from .spool import PENDING_SUFFIX

#: how long a finish waits for another program's write handle on the spool before it writes the
#: result without /raw: a script that appends a note closes the file within it, an open HDFView
#: or notebook does not
RAW_COPY_WAIT_S = 2.0


def open_spool_for_copy(path: Path, wait_s: float = 0.0) -> h5py.File | None:
    """``path`` open for reading with HDF5's lock, or None while another program holds it open
    for writing (after ``wait_s`` of asking again)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return h5py.File(path, "r")
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)


def copy_raw(src: h5py.File, group: h5py.Group) -> None:
    """The spool's NXcxi part into ``group`` (a result's ``/raw``)."""
    src.copy(src["entry_1"], group, "entry_1")
    src.copy(src["scan"], group, "scan")
    if "nav_shape" in src:
        src.copy(src["nav_shape"], group, "nav_shape")


def pending_marker(spool_file: Path) -> Path:
    return spool_file.with_name(spool_file.name + PENDING_SUFFIX)


def mark_pending(spool_file: Path, scan_id: str, result: Path, fsync: bool = False) -> None:
    """Say beside the spool that ``result`` lacks its frames (written whole, then renamed)."""
    marker = pending_marker(spool_file)
    part = marker.with_name(f".{marker.name}.part")
    part.write_text(json.dumps({"scan_id": scan_id, "result": str(result.absolute())}))
    if fsync:
        fsync_path(part)
    os.replace(part, marker)
    if fsync:
        fsync_path(marker.parent)


def read_pending(marker: Path) -> tuple[Path, str, Path]:
    """(spool file, scan id, result file) of a marker; ValueError naming it when malformed."""
    try:
        got = json.loads(marker.read_text())
        scan_id, result = str(got["scan_id"]), Path(got["result"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{marker}: not a raw-pending marker ({type(exc).__name__}: {exc})") from exc
    return marker.with_name(marker.name[: -len(PENDING_SUFFIX)]), scan_id, result


def pending_markers(spool_dir: Path) -> list[Path]:
    return sorted(Path(spool_dir).glob(f"*{PENDING_SUFFIX}"))


def is_pending(spool_file: Path) -> bool:
    return pending_marker(spool_file).exists()


def complete_raw_copy(spool_file: Path, result: Path, reserve_bytes: int = 0) -> bool:
    """Copy the spool's frames into ``result`` now (the result rewritten under a hidden name and
    renamed, as when it was written); False while another program still holds the spool, or
    the result, for writing. OSError(ENOSPC) before anything is written where the copy would leave less than
    ``reserve_bytes`` free. True: the result holds the frames, on disk (fsynced, with its
    directory). The marker and the spool are the caller's to retire."""
    src = open_spool_for_copy(spool_file)
    if src is None:
        return False
    with src:
        try:
            f = h5py.File(result, "r")
        except BlockingIOError:
            # the result held for writing (a notebook annotating it): as for the spool, tried
            # again at the next pass, not taken for a failed copy (which waited for a restart)
            return False
        with f:
            _check_waits_for(f, src, spool_file, result)
            done = "raw" in f  # copied by an earlier pass whose retiring of the spool did not finish
        if done:
            # on disk before the caller deletes the spool: that pass may have been a release's that
            # did not fsync the result, whose data may still be in the page cache only
            fsync_path(result)
            fsync_path(result.parent)
            return True
        # HDF5 does not survive a full disk (diskspace.py): the copy of the result and the frames
        require_free_space(result.parent, result.stat().st_size + spool_file.stat().st_size, reserve_bytes,
                           f"the raw frames of {result.name}")
        add_raw(result, lambda group: copy_raw(src, group))
    return True


def _text(value: object) -> str | None:
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)


def _check_waits_for(f: h5py.File, src: h5py.File, spool_file: Path, result: Path) -> None:
    """ValueError unless ``f`` is the result of the spool's scan, still waiting for this spool's
    frames or holding them: a marker edited or copied by hand may name another scan's result,
    whose /raw read as "copied already" retired (deleted) the spool, the only copy of its frames."""
    extra = f["extra"].attrs if "extra" in f else {}
    want, got = _text(src.attrs.get("scan_id")), _text(extra.get("scan_id"))
    marker = pending_marker(spool_file)
    if want is None or got != want:
        raise ValueError(f"result {result} is not that of spool {spool_file.name} (scan_id {got!r}, the spool's "
                         f"{want!r}): its marker {marker} names the wrong result (edited or copied by hand?); the "
                         "spool and its marker are kept: correct the marker's \"result\" or remove it")
    if "raw" in f:
        return
    waits = _text(extra.get("raw_pending"))
    if waits is None or Path(waits).name != spool_file.name:
        raise ValueError(f"result {result} of scan {want!r} does not wait for the frames of spool {spool_file.name} "
                         f"(its /extra raw_pending is {waits!r}); the spool and its marker {marker} are kept")
    if Path(waits).exists() and not os.path.samefile(waits, spool_file):
        # a copy of the spool directory (a backup restored, a migration): its markers name the
        # results of the original, which waits for its own spool
        raise ValueError(f"result {result} waits for the frames of spool {waits}, not of {spool_file} (a copy of the "
                         f"spool directory?); the spool and its marker {marker} are kept: correct the marker's "
                         "\"result\" or remove it")


def remove_marker(spool_file: Path) -> None:
    pending_marker(spool_file).unlink(missing_ok=True)


__all__ = ["PENDING_SUFFIX", "RAW_COPY_WAIT_S", "complete_raw_copy", "copy_raw", "is_pending", "mark_pending",
           "open_spool_for_copy", "pending_marker", "pending_markers", "read_pending", "remove_marker"]
