"""A process killed at any write of an append keeps every frame received before it
(daemon/storage/FORMATS.md § "The journal"): HDF5 writes a flush's chunks and metadata in an
order of its own, and a file cut short part way is not one of its consistent states (a part-full
chunk of ``data`` rewritten, its old copy freed and reused before the index points at the new
one; a chunk past the end the superblock records; ``count`` on disk before the extent of
``detector_frames``). Recovery rebuilds the file from the journal, which does not depend on
that order.

What a kill leaves is the files as of some write call: every write before it done, none after.
The spool is written through a Python file object (h5py's fileobj driver: the same HDF5 calls
and allocations, the writes in Python), which copies the HDF5 file and the journal before each
write call of the append under test: each copy is what a process killed right then would leave
on disk. Then the journal's record of the append, cut short at every place that matters (a
write torn by a kill, which Linux may let end part way, or by a power loss). Every copy, reopened as
recovery reopens it (:meth:`SpoolWriter.reopen`), must hold every frame the appends before it
acknowledged, byte for byte."""

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
from cryoptycho.daemon.storage.journal import journal_path
from cryoptycho.daemon.storage.spool import SpoolWriter
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.sources import RawChunks

SIDE = 96  # 36 KiB uint32 frames: 16 frames a chunk
DET = 192  # an ARINA frame: 192×192 uint16, eight frames a chunk of detector_frames


class _Snapshots(io.FileIO):
    """A file whose content, and its journal's, is copied before every write call while ``armed``."""

    armed = False

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self.journal = journal_path(path)
        self.copies: list[tuple[bytes, bytes]] = []

    def write(self, b: Any) -> int:
        if self.armed:
            self.copies.append((os.pread(self.fileno(), os.fstat(self.fileno()).st_size, 0),
                                self.journal.read_bytes()))
        return super().write(b)


def _raw(det: np.ndarray) -> RawChunks:
    return RawChunks((DET, DET), np.dtype(np.uint16), [bslz4_compress(f, 8192) for f in det])


def _snapshotted_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       journal_only: bool) -> tuple[SpoolWriter, _Snapshots]:
    """A spool whose HDF5 file is written through a :class:`_Snapshots` file object (the one
    create opens again after writing the file and closing it as the journal's base)."""
    files: list[_Snapshots] = []
    real = h5py.File

    def through_file_object(path: Any, mode: str = "r", **kw: Any) -> h5py.File:
        fo = _Snapshots(str(path), "w+" if mode == "w" else "r+")
        files.append(fo)
        return real(fo, mode, **kw)

    monkeypatch.setattr(spool_module.h5py, "File", through_file_object)
    spec = ScanSpec(scan_id="window", frame_shape=(SIDE, SIDE), frame_dtype="uint32", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((SIDE, SIDE), np.complex64), expected_frames=None)
    w = SpoolWriter.create(tmp_path, spec, journal_only=journal_only)
    return w, files[-1]


@pytest.mark.parametrize("detector", [False, True], ids=["data", "detector_frames"])
def test_a_kill_at_any_write_of_an_append_keeps_the_frames_received_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detector: bool) -> None:
    rng = np.random.default_rng(0)
    frames = rng.poisson(1.0, (35, SIDE, SIDE)).astype(np.uint32)
    det = rng.poisson(0.05, (35, DET, DET)).astype(np.uint16)
    # (journal-only: the test below)
    w, live = _snapshotted_spool(tmp_path, monkeypatch, journal_only=False)
    rows = np.arange(35)
    if detector:
        # 20 frames: a whole chunk of data and 4 rows of the next, two whole chunks of
        # detector_frames and 4 frames in the tail; then 15 more: the part-full chunks filled
        w.append(frames[:20], rows[:20], np.zeros((20, 2)), raw=_raw(det[:20]))
        before = live.journal.read_bytes()
        live.armed = True
        w.append(frames[20:], rows[20:], np.zeros((15, 2)), raw=_raw(det[20:]))
    else:
        # 20 frames: a whole chunk and 4 rows of the next, acknowledged once append_many returns
        w.append_many([(frames[:20], rows[:20], np.zeros((20, 2)))])
        before = live.journal.read_bytes()
        live.armed = True
        # 15 more: the part-full chunk rewritten with 12 more rows, and 3 rows of a new chunk
        w.append_many([(frames[20:27], rows[20:27], np.zeros((7, 2))),
                       (frames[27:], rows[27:], np.zeros((8, 2)))])
    live.armed = False
    after_h5 = w.path.read_bytes()
    after = live.journal.read_bytes()
    w.close()
    copies = live.copies
    assert len(copies) > 2, "the append wrote nothing?"
    assert all(j == before for _, j in copies), "the journal record is written after HDF5's flush"
    record = len(after) - len(before)
    assert record > 0
    # the record torn: none of it, its length and CRC, part of its header, all but its last byte
    cuts = [(after_h5, after[:len(before) + x]) for x in (0, 1, 12, 40, record // 2, record - 1)]
    cases = [*copies, *cuts, (after_h5, after)]
    got = _recovered(tmp_path, cases, frames, det, detector)
    lost = {i: v for i, v in got.items() if isinstance(v, str) or v[0] < 20 or v[1]}
    assert not lost, f"a kill before write call i of {len(copies)} loses received frames: {lost}"
    # a kill before the record is whole: the append was never acknowledged, and is not there
    assert all(got[i][0] == 20 for i in range(len(copies) + len(cuts))), got
    assert got[len(cases) - 1][0] == 35 and got[len(cases) - 1][2] == list(range(35))  # the whole record: all


def test_a_kill_at_any_write_of_a_journal_only_spools_materialisation_keeps_every_frame(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal-only appends (the default) leave the HDF5 file to the scan's end, when closing
    the spool applies the journal's records to it (SpoolWriter._materialise). A kill before any
    write call of that keeps every frame: the journal holds them, and recovery rebuilds the file."""
    rng = np.random.default_rng(1)
    frames = rng.poisson(1.0, (35, SIDE, SIDE)).astype(np.uint32)
    det = rng.poisson(0.05, (35, DET, DET)).astype(np.uint16)
    w, live = _snapshotted_spool(tmp_path, monkeypatch, journal_only=True)
    rows = np.arange(35)
    # part-full chunks of data and detector_frames, the tail, rows through the filter
    w.append(frames[:20], rows[:20], np.zeros((20, 2)), raw=_raw(det[:20]))
    w.append_many([(frames[20:27], rows[20:27], np.zeros((7, 2)))])
    w.append(frames[27:], rows[27:], np.zeros((8, 2)), raw=_raw(det[27:]))
    det[20:27] = 0  # (rows without detector frames read zeros)
    w.set_status("ended")
    journal = live.journal.read_bytes()
    live.armed = True
    w.close()
    live.armed = False
    copies = live.copies
    assert len(copies) > 2, "closing wrote nothing?"
    assert all(j == journal for _, j in copies)
    got = _recovered(tmp_path, [*copies, (w.path.read_bytes(), live.journal.read_bytes())], frames, det, True)
    lost = {i: v for i, v in got.items() if isinstance(v, str) or v[0] != 35 or v[1] or v[2] != list(range(35))}
    assert not lost, f"a kill before write call i of {len(copies)} of the materialisation loses frames: {lost}"


def _recovered(tmp_path: Path, cases: list[tuple[bytes, bytes]], frames: np.ndarray, det: np.ndarray,
               detector: bool) -> dict[int, Any]:
    """Each (HDF5 file, journal) of ``cases`` re-opened as recovery does, in another process
    (HDF5 can crash on a damaged file): case → [frames, rows that differ, indices], or the error."""
    for i, (h5, journal) in enumerate(cases):
        (tmp_path / f"cut{i}").mkdir()
        (tmp_path / f"cut{i}" / "window.spool.h5").write_bytes(h5)
        journal_path(tmp_path / f"cut{i}" / "window.spool.h5").write_bytes(journal)
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "det.npy", det)
    # reopened and read in another process: HDF5 can crash on a damaged file
    reader = textwrap.dedent(f"""
        import json
        from pathlib import Path
        import h5py
        import numpy as np
        from cryoptycho.daemon.storage.spool import SpoolWriter, read_detector_frames, read_spool
        d = Path({str(tmp_path)!r})
        frames, det = np.load(d / "frames.npy"), np.load(d / "det.npy")
        out = {{}}
        for i in range({len(cases)}):
            path = d / f"cut{{i}}" / "window.spool.h5"
            try:
                SpoolWriter.reopen(path).close()  # as recovery does
                got = read_spool(path)
                n = len(got.frames)
                bad = [r for r in range(n) if not np.array_equal(got.frames[r], frames[r])]
                if {detector}:
                    with h5py.File(path, "r") as f:
                        back = read_detector_frames(f)
                    bad += [f"detector {{r}}" for r in range(n) if not np.array_equal(back[r], det[r])]
                out[i] = [n, bad, list(map(int, got.indices))]
            except Exception as exc:
                out[i] = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", reader], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = {int(i): v for i, v in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    return got
