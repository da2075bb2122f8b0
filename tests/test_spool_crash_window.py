"""Known limit (daemon/storage/FORMATS.md § "Known limits: a kill inside the flush"): a process
killed while HDF5 flushes an append that rewrote a part-full chunk of ``data`` can lose frames
of that chunk that were already received.

What a kill leaves is the file as of some write call: every write before it done, none after.
The spool is written through a Python file object (h5py's fileobj driver: the same HDF5 calls
and allocations, the writes in Python), which copies the file before each write call of the
append under test: each copy is what a process killed right then would leave on disk. Every
copy must hold every frame the appends before it acknowledged."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage import spool as spool_module
from cryoptycho.daemon.storage.spool import SpoolWriter

SIDE = 96  # 36 KiB uint32 frames: 16 frames a chunk


class _Snapshots(io.FileIO):
    """A file whose content is copied before every write call while ``armed``."""

    armed = False

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self.copies: list[bytes] = []

    def write(self, b: Any) -> int:
        if self.armed:
            self.copies.append(os.pread(self.fileno(), os.fstat(self.fileno()).st_size, 0))
        return super().write(b)


# not strict: the loss depends on HDF5's order of writes inside a flush (measured with h5py 3.16 /
# HDF5 2.0.0); another HDF5 may order them otherwise, and that must not turn a fresh install red
@pytest.mark.xfail(strict=False, reason="known limit: HDF5 frees a rewritten part-full chunk of data and "
                   "reuses its space, or moves it past the end the superblock records, before the flush "
                   "has written the index: a kill inside the flush loses that chunk's received frames")
def test_every_write_of_a_flush_keeps_the_frames_received_before(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    frames = np.random.default_rng(0).poisson(1.0, (35, SIDE, SIDE)).astype(np.uint32)
    files: list[_Snapshots] = []
    real = h5py.File

    def through_file_object(path: Any, mode: str = "r", **kw: Any) -> h5py.File:
        fo = _Snapshots(str(path), "w+" if mode == "w" else "r+")
        files.append(fo)
        return real(fo, mode, **kw)

    monkeypatch.setattr(spool_module.h5py, "File", through_file_object)
    spec = ScanSpec(scan_id="window", frame_shape=(SIDE, SIDE), frame_dtype="uint32", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((SIDE, SIDE), np.complex64), expected_frames=None)
    w = SpoolWriter.create(tmp_path, spec)
    rows = np.arange(35)
    # 20 frames: a whole chunk and 4 rows of the next, acknowledged once append_many returns
    w.append_many([(frames[:20], rows[:20], np.zeros((20, 2)))])
    files[0].armed = True
    # 15 more: the part-full chunk rewritten with 12 more rows, and 3 rows of a new chunk
    w.append_many([(frames[20:27], rows[20:27], np.zeros((7, 2))),
                   (frames[27:], rows[27:], np.zeros((8, 2)))])
    files[0].armed = False
    w.close()
    copies = files[0].copies
    assert len(copies) > 2, "the append wrote nothing?"
    for i, data in enumerate(copies):
        (tmp_path / f"cut{i}.h5").write_bytes(data)
    np.save(tmp_path / "frames.npy", frames[:20])
    # read in another process: HDF5 can crash on a damaged file
    reader = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import numpy as np
        from cryoptycho.daemon.storage.spool import read_spool
        d = Path({str(tmp_path)!r})
        want = np.load(d / "frames.npy")
        lost = {{}}
        for i in range({len(copies)}):
            try:
                got = read_spool(d / f"cut{{i}}.h5")
                if len(got.frames) < len(want):
                    lost[i] = f"count {{len(got.frames)}}"
                else:
                    bad = [r for r in range(len(want)) if not np.array_equal(got.frames[r], want[r])]
                    if bad:
                        lost[i] = f"rows {{bad}} hold other frames"
            except Exception as exc:
                lost[i] = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps(lost))
    """)
    run = subprocess.run([sys.executable, "-c", reader], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lost = json.loads(run.stdout.strip().splitlines()[-1])
    assert not lost, f"a kill before write call i of {len(copies)} loses received frames: {lost}"
