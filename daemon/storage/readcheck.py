"""Whether every frame of a spool file can be read, found out in a child process.

A daemon killed inside an HDF5 flush can leave a spool whose chunks crash the reading process
(SIGSEGV in the decompression filter). Recovery rebuilds such a file from its journal first
(FORMATS.md § "The journal"); this check is the last line of defence behind it: a spool without
a journal (of an earlier release) or whose journal cannot be applied is still read here before
recovery reads it in-process, so that a crash, a hang or an error stays in a short-lived child
instead of stopping the daemon at every start.

``python -m cryoptycho.daemon.storage.readcheck SPOOL`` reads every committed row (``data`` and,
if present, the detector frames) and exits 0, or 1 with the error as the last line on stderr.
Recovery reads the rest of the file (``read_spool(path, frames=False)``) in-process before.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

#: seconds the child may take to read a spool: it reads a 4096-frame spool (268 MB of frames)
#: in under a second, so only a hung reader comes near this; a hung one costs a minute of the
#: start (systemd's TimeoutStartSec is 5 min)
READ_TIMEOUT_S = 60.0
#: rows read at a time: bounds the child's memory whatever the spool's size
_ROWS = 256
# spool.DATA and spool.DETECTOR_FRAMES (tests/test_spool_read_check.py holds them equal)
_DATA = "entry_1/data_1"
_DETECTOR_FRAMES = "detector_frames"


def _reader_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "cryoptycho.daemon.storage.readcheck", str(path)]


def check_spool_readable(path: str | Path, timeout_s: float = READ_TIMEOUT_S) -> str | None:
    """None when a child process read every frame of spool ``path``; otherwise why not (it
    crashed, timed out or raised), as a sentence that names no path. Never changes the file."""
    path = Path(path)
    try:
        run = subprocess.run(_reader_command(path), capture_output=True, text=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:  # subprocess.run has killed and reaped the child
        return f"reading its frames took more than {timeout_s:g} s (the reader was killed); the file is kept, untouched"
    if run.returncode < 0:
        try:
            name = signal.Signals(-run.returncode).name
        except ValueError:
            name = f"signal {-run.returncode}"
        return f"reading its frames crashed the reader ({name}); the file is kept, untouched"
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {run.returncode}"
        return f"reading its frames failed ({why}); the file is kept, untouched"
    return None


def read_all_frames(path: Path) -> int:
    """Read every committed frame of spool ``path`` (and its detector frames), ``_ROWS`` rows at
    a time, as recovery reads them; the number of rows. The caller has read the rest of the file
    (``read_spool(path, frames=False)``)."""
    # h5py alone: the spool module's imports (the engine's options) take ~1.5 s of the child's
    # start, paid for every unfinished spool; it is imported only for a spool with detector frames
    import h5py
    import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)

    # plain h5py.File: open_checked would blame a missing hdf5plugin for a damaged chunk
    with h5py.File(path, "r") as f:
        group = f[_DATA]
        data = group["data"]
        count = int(group.attrs["count"])
        for start in range(0, count, _ROWS):
            data[start:start + _ROWS]
        if _DETECTOR_FRAMES in group:
            from cryoptycho.daemon.storage.spool import read_detector_frames

            for start in range(0, count, _ROWS):
                read_detector_frames(f, start, start + _ROWS)
    return count


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cryoptycho.daemon.storage.readcheck SPOOL", file=sys.stderr)
        return 2
    try:
        read_all_frames(Path(argv[0]))
    except Exception as exc:  # noqa: BLE001 - any failure is the answer: the parent reports it
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
