"""Files that appear under their name only once whole: written under a hidden ``.name.part``
beside it, removed when the write fails, renamed over ``path`` when done. A tool that watches
the results directory (or a crash, or a failing writer) never sees half a file under the name
of a finished one; a failing write never leaves a hidden copy behind (FORMATS.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryoptycho.daemon.storage.journal import fsync_path


def part_path(path: Path) -> Path:
    """The hidden name ``path`` is written under until whole."""
    return path.with_name(f".{path.name}.part")


def write_whole(path: Path, write: Callable[[Path], None], durable: bool = False) -> Path:
    """``write(part)`` the file, then rename it to ``path``; the part removed where ``write``
    raises. ``durable``: on disk when this returns (:func:`replace_durably`) — for a file that
    stands in for the only other copy of its data (the result file: the scan's spool is deleted
    next); the phase exports, made again from the result, are not worth two fsyncs each."""
    part = part_path(path)
    try:
        write(part)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if durable:
        replace_durably(part, path)
    else:
        os.replace(part, path)
    return path


def replace_durably(part: Path, path: Path) -> None:
    """Rename the whole file ``part`` to ``path``, on disk when this returns: the file's data
    fsynced before the rename (else a power loss may leave ``path`` naming an empty or partial
    file: ext4's delayed allocation, XFS), its directory after (else the rename itself may be
    lost). The daemon deletes a scan's spool — the only other copy of its frames — right after
    its result is written: the page cache alone is not a copy (h5py's ``flush`` reaches only the
    OS, and HDF5's sec2 driver never fsyncs, hence the fsync of the closed file by its path)."""
    try:
        fsync_path(part)
    except BaseException:
        # (EIO, ENOSPC on a thin volume): the write fails, and leaves no hidden copy of a
        # result's size behind
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)
    fsync_path(path.parent)
