"""Refuse a write that would fill its file system, before HDF5 starts it.

HDF5 does not survive running out of space: a write that fails with ENOSPC can leave the file's
superblock pointing past its end (every frame already in it unreadable, 2026-12-06: a 3 MiB tmpfs
spool), and closing a file whose write failed can crash the process (h5py issue #914: the daemon
died with SIGSEGV writing a result onto a full disk). So the daemon checks the free space
first and fails only the scan concerned, with the file intact and a message that names the
directory.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

MiB = 2**20


def require_free_space(directory: str | Path, nbytes: int, reserve_bytes: int, what: str) -> None:
    """Raise ``OSError(ENOSPC)`` unless ``directory``'s file system keeps ``reserve_bytes`` free
    after ``nbytes`` more are written. ``what`` names the write in the message."""
    if reserve_bytes <= 0 and nbytes <= 0:
        return
    free = shutil.disk_usage(directory).free
    if free - nbytes >= reserve_bytes:
        return
    raise OSError(
        errno.ENOSPC,
        f"no space for {what}: {directory} has {free / MiB:.1f} MiB free, the write needs "
        f"{nbytes / MiB:.1f} MiB and disk_reserve_bytes keeps {reserve_bytes / MiB:.1f} MiB free "
        "(free disk space, or lower disk_reserve_bytes)",
    )
