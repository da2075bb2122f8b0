"""The spool's journal (daemon/storage/FORMATS.md § "The journal"): what it holds, when it goes,
and recovery from it when the HDF5 file lost what the journal holds — for spools it was created
with, spools of earlier releases (no journal) re-opened, and a journal cut short twice."""

from __future__ import annotations

import errno
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.journal import MAGIC, iter_records, journal_path, scan_records
from cryoptycho.daemon.storage.spool import (
    DATA,
    DERIVED,
    FftOrder,
    SpoolWriter,
    read_spool,
    repair_spool,
    unfinished_spools,
)
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.sources import RawChunks

SIDE = 24  # uint16: 64 frames a chunk


def _spec(scan_id: str) -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(SIDE, SIDE), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((SIDE, SIDE), np.complex64), expected_frames=None)


@pytest.fixture
def frames() -> np.ndarray:
    return np.random.default_rng(5).poisson(0.5, (300, SIDE, SIDE)).astype(np.uint16)


def _append(w: SpoolWriter, frames: np.ndarray, a: int, b: int) -> None:
    w.append_many([(frames[a:b], np.arange(a, b), np.full((b - a, 2), a * 1e-10))])


def _assert_holds(path: Path, frames: np.ndarray, n: int) -> None:
    got = read_spool(path)
    assert len(got.frames) == n
    np.testing.assert_array_equal(got.frames, frames[:n])
    np.testing.assert_array_equal(got.indices, np.arange(n))


def test_the_journal_records_every_append_and_goes_when_the_scan_is_final(tmp_path: Path, frames: np.ndarray) -> None:
    w = SpoolWriter.create(tmp_path, _spec("j"))
    jpath = journal_path(w.path)
    assert jpath.name == "j.spool.journal" and jpath.read_bytes().startswith(MAGIC)
    for a, b in ((0, 5), (5, 70), (70, 71)):
        _append(w, frames, a, b)
    ops = [r.header["op"] for r in iter_records(jpath)]
    assert ops == ["base", "append", "append", "append"]
    w.set_status("ended")
    w.close()
    scan = scan_records(jpath)
    assert scan.last == {"op": "closed"} and scan.why is None
    assert repair_spool(w.path) is None  # closed: the file is consistent, nothing to rebuild
    assert unfinished_spools(tmp_path) == [w.path]
    w = SpoolWriter.reopen(w.path)
    w.set_status("aborted")
    w.close()
    assert not jpath.exists() and unfinished_spools(tmp_path) == []
    _assert_holds(w.path, frames, 71)


def test_a_file_that_lost_its_last_writes_is_rebuilt_and_a_torn_record_dropped(tmp_path: Path,
                                                                               frames: np.ndarray) -> None:
    """The HDF5 file as it was after its creation (every later write lost), and a journal whose
    last record was cut short (never acknowledged): rebuilt, it holds every acknowledged frame;
    recovery then goes on appending after them, the torn bytes cut off first, and a second crash
    loses nothing either."""
    w = SpoolWriter.create(tmp_path, _spec("torn"))
    empty = w.path.read_bytes()
    for a, b in ((0, 10), (10, 100)):
        _append(w, frames, a, b)
    jpath = journal_path(w.path)
    acked = jpath.read_bytes()
    _append(w, frames, 100, 130)
    torn = jpath.read_bytes()[:len(acked) + 37]
    w.close()
    w.path.write_bytes(empty)
    jpath.write_bytes(torn)
    assert "a record cut short" in (scan_records(jpath).why or "")
    w = SpoolWriter.reopen(w.path)  # rebuilds, then appends after the whole records
    assert w.count == 100
    _append(w, frames, 100, 150)
    w._f.flush()
    kept = jpath.read_bytes()
    w.close()
    w.path.write_bytes(empty)  # crashed again, the HDF5 file as good as lost
    jpath.write_bytes(kept)
    done = repair_spool(w.path)
    assert done is not None and "150 frames" in done
    _assert_holds(w.path, frames, 150)


def test_a_rebuild_that_might_not_fit_the_disk_is_refused_before_hdf5_writes(tmp_path: Path, frames: np.ndarray,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon killed mid-scan on a nearly full spool disk crashed at every restart (SIGSEGV or
    SIGBUS: HDF5 wrote the rebuilt spool until ENOSPC, then h5py's deallocation failed; found on
    an 8 MiB tmpfs with 1.1 MiB free), so systemd restarted it into the same crash. The rebuild
    is refused first, naming the space it needs; the spool and its journal stay as they were for
    a start with room. (It may use disk_reserve_bytes beyond a margin: tests/test_disk_full.py
    recovers a spool onto a disk below the reserve.)"""
    w = SpoolWriter.create(tmp_path, _spec("tight"))
    empty = w.path.read_bytes()
    _append(w, frames, 0, 120)
    jpath = journal_path(w.path)
    journal = jpath.read_bytes()
    w.close()
    w.path.write_bytes(empty)  # killed: the HDF5 file lost every write, the journal holds them
    jpath.write_bytes(journal)
    real = shutil.disk_usage

    def nearly_full(where):  # as on the tmpfs: more free than the journal's size, less than a rebuild needs
        return real(where)._replace(free=len(journal) * 3 // 2)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    for attempt in (lambda: SpoolWriter.reopen(w.path, reserve_bytes=2**20),
                    lambda: repair_spool(w.path, 0)):
        with pytest.raises(OSError, match=r"no space to rebuild spool tight\.spool\.h5 from its journal") as info:
            attempt()
        assert info.value.errno == errno.ENOSPC
        assert w.path.read_bytes() == empty and jpath.read_bytes() == journal
        assert not list(tmp_path.glob("*.rebuild"))
    monkeypatch.undo()
    assert "120 frames" in (repair_spool(w.path, 0) or "")  # with room, as before
    _assert_holds(w.path, frames, 120)


def test_a_spool_without_a_journal_reopens_reads_and_is_rebuilt_on_its_own_base(tmp_path: Path,
                                                                                frames: np.ndarray) -> None:
    """A spool of an earlier release has no journal: it reads and re-opens as before; the journal
    made then starts from the file as it is, so frames appended after are recovered even when
    the file loses them."""
    w = SpoolWriter.create(tmp_path, _spec("old"))
    _append(w, frames, 0, 40)
    w.close()
    journal_path(w.path).unlink()  # as spool files of earlier releases are
    _assert_holds(w.path, frames, 40)
    assert unfinished_spools(tmp_path) == [w.path]
    w = SpoolWriter.reopen(w.path)
    first = next(iter_records(journal_path(w.path)))
    # its count, and the part-full chunk the next append writes again, as it was
    assert first.header == {"op": "base", "image": False, "count": 40, "w": [["data", 0, len(first.body)]]}
    reopened = tmp_path / "as-reopened.h5"
    shutil.copyfile(w.path, reopened)
    _append(w, frames, 40, 90)
    _append(w, frames, 90, 95)
    journal = journal_path(w.path).read_bytes()
    w.close()
    # its appends lost, and the chunk they rewrote damaged (HDF5 reused its space)
    with h5py.File(reopened, "r") as f:
        info = f["entry_1/data_1/data"].id.get_chunk_info_by_coord((0, 0, 0))
    damaged = bytearray(reopened.read_bytes())
    damaged[info.byte_offset:info.byte_offset + info.size] = np.random.default_rng(1).bytes(info.size)
    w.path.write_bytes(bytes(damaged))
    journal_path(w.path).write_bytes(journal)
    assert "95 frames" in (repair_spool(w.path) or "")
    _assert_holds(w.path, frames, 95)


def test_a_journal_that_does_not_match_its_file_is_refused_by_name(tmp_path: Path, frames: np.ndarray) -> None:
    w = SpoolWriter.create(tmp_path, _spec("odd"))
    _append(w, frames, 0, 10)
    w.close()
    w = SpoolWriter.reopen(w.path)
    _append(w, frames, 10, 20)
    w.close()
    jpath = journal_path(w.path)
    data = jpath.read_bytes()
    records = list(iter_records(jpath))
    assert [r.header["op"] for r in records] == ["base", "append", "closed", "opened", "append", "closed"]
    # the base, then the append of rows 10..20 (the one of rows 0..10 lost): it cannot follow
    jpath.write_bytes(data[:records[0].end] + data[records[3].end:records[4].end])
    before = w.path.read_bytes()
    with pytest.raises(ValueError, match="appends rows from 10 to a file of 0 rows"):
        repair_spool(w.path)
    assert w.path.read_bytes() == before and not list(tmp_path.glob("*.rebuild"))  # untouched


def test_a_record_length_damaged_to_exabytes_ends_the_journal_without_reading_it(tmp_path: Path,
                                                                                 frames: np.ndarray) -> None:
    """A length field garbled on disk (a bit flip, a torn sector) claims more bytes than the file
    holds: the journal ends there, named, instead of asking the allocator for them (a
    MemoryError at every daemon start); the records before it still count."""
    w = SpoolWriter.create(tmp_path, _spec("garbled"))
    _append(w, frames, 0, 10)
    jpath = journal_path(w.path)
    whole = scan_records(jpath)
    _append(w, frames, 10, 20)
    w.close()
    data = bytearray(jpath.read_bytes())
    data[whole.end:whole.end + 8] = (2**62).to_bytes(8, "little")
    jpath.write_bytes(bytes(data))
    found = scan_records(jpath)
    assert found.records == whole.records and found.end == whole.end
    assert "cut short" in (found.why or "")


def test_a_killed_daemons_spool_reads_whole_before_any_daemon_repaired_it(tmp_path: Path,
                                                                         frames: np.ndarray) -> None:
    """`reconstruct`/`replay` of a spool whose daemon was killed (no daemon started since) read
    every acknowledged frame, from the journal, and leave the file and the journal as they
    were: repairing them is the daemon's (the scan may still be open)."""
    from cryoptycho.daemon.storage.open import open_recorded

    w = SpoolWriter.create(tmp_path, _spec("killed"))
    empty = w.path.read_bytes()
    _append(w, frames, 0, 10)
    _append(w, frames, 10, 100)
    jpath = journal_path(w.path)
    acked = jpath.read_bytes()
    w.close()
    w.path.write_bytes(empty)  # as if every HDF5 write after the creation was lost
    jpath.write_bytes(acked + b"\x07" * 23)  # and the next record torn
    rec = open_recorded(w.path)
    assert rec.kind == "spool" and rec.status == "open"
    np.testing.assert_array_equal(rec.data.frames, frames[:100])
    np.testing.assert_array_equal(rec.frame_indices, np.arange(100))
    assert w.path.read_bytes() == empty and jpath.read_bytes() == acked + b"\x07" * 23
    assert len(read_spool(w.path, frames=False).indices) == 100


# ----------------------------------------------------------- binned frames derived (DERIVED)

DET = 64  # detector frames 64×64 uint16: one 8 KiB bitshuffle block each, 64 a chunk


def _detector_scan(n: int) -> tuple[FrameReducer, np.ndarray, np.ndarray]:
    """A reducer with all it can hold (a crop off the detector's centre, a bad-pixel mask, a
    saturation value), detector frames with saturated pixels, and their binned frames."""
    bad = np.zeros((DET, DET), bool)
    bad[5, 7] = bad[40, 41] = True
    reducer = FrameReducer.build((DET, DET), np.uint16, beam_center_px=(30.0, 34.5), crop=48, bin=2,
                                 bad_pixels=bad, saturation_value=900)
    rng = np.random.default_rng(9)
    det = rng.poisson(3, (n, DET, DET)).astype(np.uint16)
    det[::7, 30, 30] = 1000  # saturated, in the window
    det[3, 5, 7] = 60000  # masked
    return reducer, det, reducer.reduce_batch(det)[0]


def _derived_spec(scan_id: str, reducer: FrameReducer) -> ScanSpec:
    m = reducer.frame_side
    return ScanSpec(scan_id=scan_id, frame_shape=(m, m), frame_dtype=reducer.out_dtype.name, pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((m, m), np.complex64), expected_frames=None)


def _append_detector(w: SpoolWriter, reducer: FrameReducer, det: np.ndarray, binned: np.ndarray,
                     a: int, b: int, raw: bool = True) -> None:
    chunks = RawChunks((DET, DET), np.dtype(np.uint16), [bslz4_compress(f) for f in det[a:b]]) if raw else None
    w.append(binned[a:b], np.arange(a, b), np.full((b - a, 2), a * 1e-10), raw=chunks,
             reducer=reducer if raw else None)


def test_a_detector_scans_binned_frames_are_derived_while_it_is_open_and_written_when_it_ends(
        tmp_path: Path) -> None:
    """While the scan is open its binned frames are not written (only the detector's), every
    reader derives them from the detector frames — the writer, `read_spool` through the journal,
    a spool rebuilt after a kill — and when it ends they are written once: h5py alone (any
    reader of earlier releases) then reads them, byte for byte what the scan received and what
    the derivation gave. Rows without detector frames are written as they come."""
    reducer, det, binned = _detector_scan(150)
    assert reducer.out_dtype == np.uint16 and not reducer.all_valid
    w = SpoolWriter.create(tmp_path, _derived_spec("derived", reducer))
    for a, b, raw in ((0, 1, True), (1, 70, True), (70, 75, False), (75, 130, True)):
        _append_detector(w, reducer, det, binned, a, b, raw)
    frames = w.read()[0]  # (the writer's own read brings the file up to its journal)
    np.testing.assert_array_equal(frames, binned[:130])
    with h5py.File(w.path, "r") as f:  # another reader, mid-scan
        g = f[DATA]
        assert f.attrs["format_version"] == 2
        assert g[DERIVED].attrs["pending_rows"].tolist() == [[0, 70], [75, 130]]
        assert not g["data"][:70].any()  # not written: only the detector frames are
        np.testing.assert_array_equal(g["data"][70:75], binned[70:75])
    open_read = read_spool(w.path).frames  # through the journal: the scan is open
    assert open_read.dtype == binned.dtype and open_read.tobytes() == binned[:130].tobytes()
    # a kill here: the HDF5 file as it was created, the journal whole
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copyfile(w.path, killed / w.path.name)
    shutil.copyfile(journal_path(w.path), journal_path(killed / w.path.name))
    with h5py.File(killed / w.path.name, "r+") as f:
        f[DATA].attrs["count"] = 0  # (lost its appends)
    assert "130 frames" in (repair_spool(killed / w.path.name) or "")
    rebuilt = read_spool(killed / w.path.name)
    assert rebuilt.frames.tobytes() == binned[:130].tobytes()
    # the same scan whose end finds its binned frames in memory (the worker's frame store):
    # written from them, not decoded, to the same bytes
    held = SpoolWriter.create(tmp_path, _derived_spec("held", reducer))
    for a, b, raw in ((0, 1, True), (1, 70, True), (70, 75, False), (75, 150, True)):
        _append_detector(held, reducer, det, binned, a, b, raw)
    asked: list[tuple[int, int]] = []
    held.set_status("ended")
    held.close(held=lambda a, b: asked.append((a, b)) or binned[a:b].copy())
    assert held.derived_rows == {"frame_store": 145}  # rows 70..75 were written as they came
    assert asked == [(0, 64), (64, 70), (75, 150)]  # a whole chunk, then part-full ones
    _append_detector(w, reducer, det, binned, 130, 150)
    w.set_status("ended")
    w.close()
    assert w.derived_rows == {"detector_frames": 145}
    with h5py.File(w.path, "r") as f, h5py.File(held.path, "r") as h:
        g = f[DATA]
        assert "pending_rows" not in g[DERIVED].attrs  # written: nothing left to derive
        assert "pending_rows" not in h[DATA][DERIVED].attrs
        written, from_memory = g["data"][:], h[DATA]["data"][:]
    assert written.tobytes() == binned.tobytes() == read_spool(w.path).frames.tobytes()
    assert from_memory.tobytes() == written.tobytes()
    # the killed daemon's spool recovered by the next daemon: re-opened, ended, closed
    w = SpoolWriter.reopen(killed / w.path.name)
    np.testing.assert_array_equal(w.read()[0], binned[:130])
    w.set_status("aborted")
    w.close()
    assert not journal_path(w.path).exists()
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"][:].tobytes() == binned[:130].tobytes()


def _shifted(binned: np.ndarray) -> Any:
    extra = np.concatenate([binned, binned[:1]])
    return lambda a, b: extra[a + 1:b + 1]  # a store that missed a frame: each row is the next's


def _raises(a: int, b: int) -> np.ndarray:
    raise RuntimeError("the device went away")


@pytest.mark.parametrize("kind", ["missing", "shifted", "fft_shifted", "dtype", "shape", "raises"])
def test_a_scans_binned_frames_that_are_not_its_detector_frames_are_decoded_instead(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """The frames a scan holds at its end are written only where they are its detector frames
    binned: rows the scan does not hold, or that are not those (a missed frame shifts them,
    another dtype or shape), or that cannot be read, are decoded from the detector frames, and
    the spool holds the same bytes."""
    reducer, det, binned = _detector_scan(150)
    w = SpoolWriter.create(tmp_path, _derived_spec(kind, reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    fft = np.fft.ifftshift(np.concatenate([binned, binned[:1]]), axes=(1, 2))  # (in the store's order)
    held = {"missing": lambda a, b: None, "shifted": _shifted(binned),
            "fft_shifted": lambda a, b: FftOrder(fft[a + 1:b + 1]),
            "dtype": lambda a, b: binned[a:b].astype(np.int32),
            "shape": lambda a, b: binned[a:b - 1], "raises": _raises}[kind]
    w.set_status("ended")
    with caplog.at_level(logging.WARNING, "cryoptycho.spool"):
        w.close(held=held)
    assert w.derived_rows == {"detector_frames": 150}
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"][:].tobytes() == binned.tobytes()
    if kind != "missing":  # (a scan that holds none says so by None)
        assert f"{kind}.spool.h5" in caplog.text and "decoded" in caplog.text


def test_a_spool_with_derived_rows_is_refused_by_a_reader_that_cannot_derive_them(tmp_path: Path) -> None:
    """format_version 2: an earlier release would read zeros for the rows it does not know are
    derived, so it refuses the file by name; spools without derived rows stay version 1."""
    from cryoptycho.daemon.storage.h5format import check_version

    reducer, det, binned = _detector_scan(8)
    w = SpoolWriter.create(tmp_path, _derived_spec("v2", reducer))
    plain = SpoolWriter.create(tmp_path, _spec("v1"))
    _append_detector(w, reducer, det, binned, 0, 8)
    plain.append(np.zeros((2, SIDE, SIDE), np.uint16), np.arange(2), np.zeros((2, 2)))
    for writer in (w, plain):
        writer.set_status("aborted")
        writer.close()
    with h5py.File(w.path, "r") as f, pytest.raises(ValueError, match="format_version 2 was written by a newer"):
        check_version(w.path, f, "spool", 1)
    with h5py.File(plain.path, "r") as f:
        assert f.attrs["format_version"] == 1


def test_detector_frames_without_a_position_are_kept_and_rebuilt_from_the_journal(tmp_path: Path) -> None:
    """Detector images past the scan's positions (a DECTRIS series with more images than the
    scan) are kept as the detector sent them with their image ids, between the scan's appends,
    and a spool rebuilt from its journal after a kill (HDF5 file as created) holds them too."""
    from cryoptycho.daemon.storage.spool import UNPOSITIONED, UNPOSITIONED_IDS

    reducer, det, binned = _detector_scan(40)
    w = SpoolWriter.create(tmp_path, _derived_spec("extra", reducer))
    empty = w.path.read_bytes()
    _append_detector(w, reducer, det, binned, 0, 20)

    def keep(a: int, b: int) -> None:
        w.append_unpositioned(np.arange(a, b) + 100, RawChunks((DET, DET), np.dtype(np.uint16),
                                                               [bslz4_compress(f) for f in det[a:b]]))

    keep(20, 30)
    _append_detector(w, reducer, det, binned, 30, 35)
    keep(35, 40)
    assert w.unpositioned == 15
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / w.path.name).write_bytes(empty)  # every HDF5 write after the creation lost
    shutil.copyfile(journal_path(w.path), journal_path(killed / w.path.name))
    w.close()
    assert "25 frames" in (repair_spool(killed / w.path.name) or "")
    extra = np.r_[20:30, 35:40]
    for path in (w.path, killed / w.path.name):
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(f[DATA][UNPOSITIONED_IDS][()], extra + 100)
            assert f[DATA][UNPOSITIONED][()].tobytes() == det[extra].tobytes()
        assert read_spool(path).frames.tobytes() == binned[np.r_[0:20, 30:35]].tobytes()


def test_detector_frames_without_a_position_sent_again_after_a_restart_are_kept_once(tmp_path: Path) -> None:
    """A DECTRIS series resumed after a daemon restart may send again images past the scan's
    positions that the spool kept before it: the reopened spool knows their ids (from the file)
    and keeps each once, as it does an id twice in one call; the count it returns leaves them
    out (the daemon counts them as duplicates)."""
    from cryoptycho.daemon.storage.spool import UNPOSITIONED, UNPOSITIONED_IDS

    reducer, det, binned = _detector_scan(30)

    def raw(ids: list[int]) -> RawChunks:
        return RawChunks((DET, DET), np.dtype(np.uint16), [bslz4_compress(det[i - 100]) for i in ids])

    w = SpoolWriter.create(tmp_path, _derived_spec("again", reducer))
    _append_detector(w, reducer, det, binned, 0, 20)
    assert w.append_unpositioned(np.array([120, 121, 122, 121]), raw([120, 121, 122, 121])) == 3
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copyfile(w.path, killed / w.path.name)  # the daemon killed mid-series: file and journal
    shutil.copyfile(journal_path(w.path), journal_path(killed / w.path.name))
    w.close()
    w = SpoolWriter.reopen(killed / w.path.name)
    assert w.append_unpositioned(np.array([121, 122]), raw([121, 122])) == 0
    assert w.append_unpositioned(np.array([122, 123, 124, 123]), raw([122, 123, 124, 123])) == 2
    assert w.unpositioned == 5
    w.close()
    with h5py.File(w.path, "r") as f:
        np.testing.assert_array_equal(f[DATA][UNPOSITIONED_IDS][()], np.arange(120, 125))
        assert f[DATA][UNPOSITIONED][()].tobytes() == det[20:25].tobytes()


# ------------------------------------------------- journal-only appends while a scan is open

def _datasets(path: Path) -> dict[str, Any]:
    """What a reader of a closed spool sees: its rows and attributes (the tail's extent aside:
    rows past ``count`` are never read)."""
    with h5py.File(path, "r") as f:
        g = f[DATA]
        out: dict[str, Any] = {"status": f.attrs["status"], "version": int(f.attrs["format_version"]),
                               "count": int(g.attrs["count"])}
        for name in ("data", "frame_index", "positions_m", "detector_frames"):
            out[name] = g[name][:].tobytes()
            out[name + " chunks"] = g[name].chunks
        out["pending"] = "pending_rows" in g[DERIVED].attrs if DERIVED in g else None
        out["translation"] = f["entry_1/sample_1/geometry_1/translation"][:].tobytes()
    return out


def test_a_journal_only_spool_writes_only_its_journal_while_open_and_the_same_file_when_closed(
        tmp_path: Path, frames: np.ndarray) -> None:
    """Journal-only appends (the default): while the scan is open the HDF5 file stays as it
    was created and every append is one journal record; a reader of the open spool reads every
    frame through the journal, a kill then loses none (the file rebuilt from the journal), and
    closing the spool writes the file a writer that writes through (``journal_only=False``)
    writes, row for row — binned rows derived from detector frames, rows written as they came,
    part-full chunks, the last detector chunk closed at the scan's end."""
    reducer, det, binned = _detector_scan(150)
    spans = ((0, 1, True), (1, 70, True), (70, 75, False), (75, 130, True), (130, 150, True))
    written: dict[bool, dict[str, Any]] = {}
    for journal_only in (False, True):
        d = tmp_path / ("journal_only" if journal_only else "through")
        w = SpoolWriter.create(d, _derived_spec("scan", reducer), journal_only=journal_only)
        for i, (a, b, raw) in enumerate(spans[:-1]):
            _append_detector(w, reducer, det, binned, a, b, raw)
            if i == 0:  # (its layout: the derivation and detector_frames, made in the file at once)
                created = w.path.read_bytes()
        assert w.count == 130
        if journal_only:
            assert w.path.read_bytes() == created  # nothing but the journal was written
            assert int(w._f[DATA].attrs["count"]) == 0
            ops = [r.header["op"] for r in iter_records(journal_path(w.path))]
            assert ops == ["base", "detector", "derive", "append", "append", "append", "append"]
            open_read = read_spool(w.path)  # a reader of the open spool: through its journal
            assert open_read.frames.tobytes() == binned[:130].tobytes()
            np.testing.assert_array_equal(open_read.indices, np.arange(130))
            killed = tmp_path / "killed"  # a kill here: the file as created, the journal whole
            killed.mkdir()
            shutil.copyfile(w.path, killed / w.path.name)
            shutil.copyfile(journal_path(w.path), journal_path(killed / w.path.name))
            assert "130 frames" in (repair_spool(killed / w.path.name) or "")
            assert read_spool(killed / w.path.name).frames.tobytes() == binned[:130].tobytes()
        _append_detector(w, reducer, det, binned, 130, 150)
        w.set_status("ended")
        if journal_only:
            assert w.path.read_bytes() == created  # the status too: the file is written when it closes
        w.close()
        assert not journal_path(w.path).exists() or scan_records(journal_path(w.path)).last["op"] == "closed"
        written[journal_only] = _datasets(w.path)
    assert written[True]["data"] == binned.tobytes() and written[True]["count"] == 150
    assert written[True] == written[False]


def test_a_journal_only_spool_read_by_its_writer_mid_scan_goes_on_journal_only(tmp_path: Path,
                                                                              frames: np.ndarray) -> None:
    """The writer's own read (the worker's start) brings the file up to the journal; appends
    after it are journal-only again, and the file closes with all of them; a spool re-opened
    for recovery appends journal-only too."""
    w = SpoolWriter.create(tmp_path, _spec("mid"))
    created = w.path.read_bytes()
    for a, b in ((0, 5), (5, 70)):
        _append(w, frames, a, b)
    assert w.path.read_bytes() == created
    np.testing.assert_array_equal(w.read()[0], frames[:70])
    with h5py.File(w.path, "r") as f:
        assert int(f[DATA].attrs["count"]) == 70
    caught_up = w.path.read_bytes()
    _append(w, frames, 70, 100)
    assert w.path.read_bytes() == caught_up
    w.close()  # (open: the journal ends "closed")
    w = SpoolWriter.reopen(w.path)
    reopened = w.path.read_bytes()
    _append(w, frames, 100, 140)
    assert w.path.read_bytes() == reopened
    # frames of another dtype (HDF5 converts them): written through, after the appends before them
    wide = frames.astype(np.uint32)
    w.append_many([(wide[140:150], np.arange(140, 150), np.full((10, 2), 140e-10))])
    with h5py.File(w.path, "r") as f:
        assert int(f[DATA].attrs["count"]) == 150
    _append(w, frames, 150, 160)
    _assert_holds(w.path, frames, 160)  # through the journal
    w.set_status("finished")
    w.close()
    assert not journal_path(w.path).exists()
    with h5py.File(w.path, "r") as f:
        np.testing.assert_array_equal(f[DATA]["data"][:], frames[:160])


def test_a_journal_only_spool_counts_what_its_file_is_owed_and_refuses_a_full_disk(
        tmp_path: Path, frames: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each append's free-space check counts the bytes journal-only appends before it still owe
    the HDF5 file; bringing the file up on a disk without room for them is refused before HDF5
    writes (the file untouched, every frame in the journal), and goes through once there is."""
    from cryoptycho.daemon.storage import diskspace

    asked: list[int] = []
    real = diskspace.require_free_space

    def recording(directory: Any, nbytes: int, reserve: int, what: str) -> None:
        asked.append(nbytes)
        real(directory, nbytes, reserve, what)

    monkeypatch.setattr("cryoptycho.daemon.storage.spool.require_free_space", recording)
    w = SpoolWriter.create(tmp_path, _spec("owed"))
    for a, b in ((0, 64), (64, 128), (128, 192)):
        _append(w, frames, a, b)
    raw = 2 * frames[:64].nbytes  # the append's own bound
    owed = [n - raw for n in asked[1:]]
    assert owed[0] == 0 and 0 < owed[1] < owed[2]  # the records before it, not yet in the file
    before = w.path.read_bytes()
    disk_usage = diskspace.shutil.disk_usage
    usage = disk_usage(tmp_path)
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda _: usage._replace(free=owed[2]))
    with pytest.raises(OSError, match="no space for the spool file owed.spool.h5"):
        w.read()
    assert w.path.read_bytes() == before
    _assert_holds(w.path, frames, 192)  # through the journal
    monkeypatch.setattr(diskspace.shutil, "disk_usage", disk_usage)  # room again
    np.testing.assert_array_equal(w.read()[0], frames[:192])
    asked.clear()
    _append(w, frames, 192, 256)
    assert asked == [raw]  # nothing owed after it
    w.close()
    _assert_holds(w.path, frames, 256)


def test_writing_an_ended_scans_derived_rows_keeps_none_of_their_chunks(tmp_path: Path) -> None:
    """The derived binned rows written at a scan's end are not journaled (a function of what the
    journal holds), yet each chunk written was kept in memory for a journal record never written,
    until the end of the whole derivation: a scan's compressed binned frames held at once, on
    the closer thread while the next series is being received."""
    reducer, det, binned = _detector_scan(150)
    w = SpoolWriter.create(tmp_path, _derived_spec("kept", reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    w.set_status("ended")
    held_back: list[int] = []

    def held(a: int, b: int) -> np.ndarray:
        held_back.append(len(w._writes) + len(w._rows))  # chunks kept for a record, so far
        return binned[a:b].copy()

    w.close(held=held)
    assert w.derived_rows == {"frame_store": 150}
    assert len(held_back) > 1 and max(held_back) == 0, held_back
    assert read_spool(w.path).frames.tobytes() == binned.tobytes()


def test_an_ended_scans_derived_rows_are_refused_a_full_disk_before_hdf5_writes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The binned rows derived at a scan's end are not journaled, so no append's free-space
    check counted them, and the close wrote them with no check (HDF5 does not survive a full
    disk: diskspace.py). The disk has room for the journal's appends alone: the close is refused
    before HDF5 writes a derived row, and every frame stays readable through the journal."""
    import errno

    from cryoptycho.daemon.storage import diskspace

    reducer, det, binned = _detector_scan(150)
    w = SpoolWriter.create(tmp_path, _derived_spec("fullend", reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    w.set_status("ended")
    owed = w._journal.end - w._applied  # what bringing the file up to its journal writes
    usage = diskspace.shutil.disk_usage(tmp_path)
    asked: list[int] = []

    def disk_usage(_: object) -> object:  # room for those appends, which then fill the disk
        asked.append(1)
        return usage._replace(free=owed if len(asked) == 1 else 0)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", disk_usage)
    with pytest.raises(OSError) as info:
        w.close(held=lambda a, b: binned[a:b].copy())
    assert info.value.errno == errno.ENOSPC and "binned rows" in str(info.value), info.value
    with h5py.File(w.path, "r") as f:  # (the writer's handle is still open: same process)
        assert not f[DATA]["data"][:].any()  # no derived row written
    assert read_spool(w.path).frames.tobytes() == binned.tobytes()


@pytest.mark.parametrize("journal_only", [True, False])
def test_a_scans_options_changed_while_it_waits_are_journaled_and_read_back(tmp_path: Path, frames: np.ndarray,
                                                                           journal_only: bool) -> None:
    """SpoolWriter.set_options (control `set_options` on a queued scan): the header's options
    change, recorded like an append, read through the journal while the file lags it (and after
    a kill), and in the file once closed; appends before and after it keep every frame."""
    w = SpoolWriter.create(tmp_path, _spec("opt"), journal_only=journal_only)
    _append(w, frames, 0, 5)
    w.set_options({"seed": 7, "stream": {"batch_size": 16}})
    _append(w, frames, 5, 9)
    assert [r.header["op"] for r in iter_records(journal_path(w.path))][-3:] == ["append", "options", "append"]
    got = read_spool(w.path)  # its journal is open: read from a rebuilt copy, as after a kill
    assert got.spec.options == {"seed": 7, "stream": {"batch_size": 16}} and len(got.indices) == 9
    w.set_status("ended")
    w.close()
    with h5py.File(w.path) as f:  # closed: the file itself has them
        assert '"seed": 7' in f["scan"].attrs["json"]
    assert read_spool(w.path).spec.options == {"seed": 7, "stream": {"batch_size": 16}}
    _assert_holds(w.path, frames, 9)
    again = SpoolWriter.reopen(w.path)
    with pytest.raises(TypeError):  # what the header cannot keep is refused before the journal has it
        again.set_options({"seed": object()})
    assert [r.header["op"] for r in iter_records(journal_path(w.path))][-1] == "opened"
    again.close()


# ------------------------------------ derived rows stored in the smallest dtype (spool HeldPeak)


def _peaked_scan(n: int, peak: int, saturation: int | None = None) -> tuple[FrameReducer, np.ndarray, np.ndarray]:
    """A reducer with a bad-pixel mask (binned frames uint32 without a saturation value: 2×2
    sums of uint16; uint16 with ``saturation``), saturated pixels (flagged invalid) where
    ``peak`` allows them, and frame 10's largest binned count ``peak`` (one 2×2 block)."""
    bad = np.zeros((DET, DET), bool)
    bad[5, 7] = bad[40, 41] = True
    reducer = FrameReducer.build((DET, DET), np.uint16, beam_center_px=(30.0, 34.5), crop=48, bin=2,
                                 bad_pixels=bad, saturation_value=saturation)
    rng = np.random.default_rng(11)
    det = rng.poisson(3, (n, DET, DET)).astype(np.uint16)
    det[::7, 30:32, 30:32] = 0  # a block of the window with one saturated pixel, counted as the
    if saturation is not None or peak >= 65534:  # saturation value (65534 when none is declared)
        det[::7, 30, 30] = 65535 if saturation is None else saturation + 1
    det[3, 5, 7] = det[4, 40, 41] = 65000  # masked
    y, x = reducer.corner[0] + 2 * 10, reducer.corner[1] + 2 * 10  # another block of the window
    det[10, y:y + 2, x:x + 2] = (np.arange(4) < peak % 4).reshape(2, 2) + peak // 4
    binned = reducer.reduce_batch(det)[0]
    assert int(binned.max()) == peak
    return reducer, det, binned


@pytest.mark.parametrize(("peak", "saturation", "dtype"), [(255, 100, np.uint8), (256, 100, np.uint16),
                                                           (255, None, np.uint8), (256, None, np.uint16),
                                                           (65535, None, np.uint16), (65536, None, np.uint32)])
@pytest.mark.parametrize("source", ["frame_store", "fft_order", "detector_frames"])
def test_an_ended_scans_derived_rows_are_stored_in_the_smallest_dtype_that_holds_its_largest_count(
        tmp_path: Path, peak: int, saturation: int | None, dtype: type, source: str) -> None:
    """The binned frames written at a scan's end take a quarter (uint8) or half (uint16) of the
    bytes of the reducer's uint32 to bitshuffle and compress where the scan's largest count
    allows: the dataset is made at the close in that dtype. Every reader gets the counts the
    scan received (h5py alone, read_spool), at the dtypes' boundaries, with masked and
    saturated pixels; for rows from the frame store (in detector order, or in its FFT order, put
    in detector order with the cast) and rows decoded again (an aborted scan)."""
    reducer, det, binned = _peaked_scan(150, peak, saturation)
    assert reducer.out_dtype == (np.uint32 if saturation is None else np.uint16)
    w = SpoolWriter.create(tmp_path, _derived_spec("small", reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    w.set_status("finished")
    store = np.fft.ifftshift(binned, axes=(1, 2))  # a frame store's order (ScanWorker.held_frames)
    held = {"frame_store": lambda a, b: binned[a:b].copy(), "fft_order": lambda a, b: FftOrder(store[a:b]),
            "detector_frames": None}[source]
    w.close(held=held, peak=lambda: peak)
    assert w.derived_rows == {"fft_order": {"frame_store": 150}}.get(source, {source: 150})
    with h5py.File(w.path, "r") as f:
        g = f[DATA]
        data = g["data"]
        assert data.dtype == dtype and data.chunks == (64, 24, 24)
        assert "pending_rows" not in g[DERIVED].attrs
        assert f["entry_1/instrument_1/detector_1/data"].id == data.id  # every name of the frames
        assert data.attrs["units"] == "counts"
        stored = data[:]
    np.testing.assert_array_equal(stored, binned)
    assert stored.max() == peak
    got = read_spool(w.path).frames
    np.testing.assert_array_equal(got, binned)


def test_a_count_beyond_the_given_peak_has_the_rows_written_in_the_reducers_dtype(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A peak that is too small (a frame store that missed the brightest frame) never wraps a
    count around: the rows are written again as uint32, and the warning says why."""
    reducer, det, binned = _peaked_scan(150, 300)
    w = SpoolWriter.create(tmp_path, _derived_spec("low", reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    w.set_status("finished")
    with caplog.at_level(logging.WARNING, "cryoptycho.spool"):
        w.close(held=lambda a, b: binned[a:b].copy(), peak=lambda: 255)
    assert "count of 300 does not fit uint8" in caplog.text
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"].dtype == np.uint32
        assert f[DATA]["data"][:].tobytes() == binned.tobytes()


@pytest.mark.parametrize("status", ["ended", "aborted"])
def test_a_spool_stored_small_and_reopened_derives_its_rows_in_the_reducers_dtype_again(
        tmp_path: Path, status: str) -> None:
    """Frames that come after the scan ended and closed its spool (re-opened with its journal,
    ended, or without one, final): readers get the rows stored as uint8 until frames are
    appended; then they are derived again (the dataset in the reducer's dtype, every row
    pending), and the next close stores all of them in the new largest count's dtype. A kill
    after the appends: the spool rebuilt from its journal holds every frame."""
    reducer, det, binned = _peaked_scan(200, 255)
    det[170, 30:32, 30:32] = 250  # a brighter frame among the later ones: 1000 binned
    binned = reducer.reduce_batch(det)[0]
    w = SpoolWriter.create(tmp_path, _derived_spec("again", reducer))
    _append_detector(w, reducer, det, binned, 0, 150)
    w.set_status(status)
    w.close(held=None, peak=lambda: 255)
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"].dtype == np.uint8
    w = SpoolWriter.reopen(w.path)
    np.testing.assert_array_equal(w.read()[0], binned[:150])
    _append_detector(w, reducer, det, binned, 150, 200)
    np.testing.assert_array_equal(w.read()[0], binned)
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"].dtype == np.uint32
        assert f[DATA][DERIVED].attrs["pending_rows"].tolist() == [[0, 200]]
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copyfile(w.path, killed / w.path.name)
    shutil.copyfile(journal_path(w.path), journal_path(killed / w.path.name))
    assert repair_spool(killed / w.path.name)
    np.testing.assert_array_equal(read_spool(killed / w.path.name).frames, binned)
    w.set_status(status)
    w.close(peak=lambda: 1000)
    with h5py.File(w.path, "r") as f:
        assert f[DATA]["data"].dtype == np.uint16
        np.testing.assert_array_equal(f[DATA]["data"][:], binned)


def test_the_rows_of_a_scan_without_a_peak_stay_in_the_reducers_dtype(tmp_path: Path) -> None:
    """A scan whose peak is not known (an engine that did not measure it: ScanWorker.held_peak)
    keeps the reducer's dtype."""
    reducer, det, binned = _peaked_scan(80, 255)
    for status, peak in (("ended", None), ("finished", lambda: None)):
        w = SpoolWriter.create(tmp_path, _derived_spec(f"wide{len(list(tmp_path.iterdir()))}", reducer))
        _append_detector(w, reducer, det, binned, 0, 80)
        w.set_status(status)
        w.close(held=lambda a, b: binned[a:b].copy(), peak=peak)
        with h5py.File(w.path, "r") as f:
            assert f[DATA]["data"].dtype == np.uint32, (status, peak)
            assert f[DATA]["data"][:].tobytes() == binned.tobytes()


@pytest.mark.parametrize("closes_while", ["rebuilding", "scanning"])
def test_a_reader_racing_the_spool_s_close_reads_the_closed_file(tmp_path: Path, frames: np.ndarray,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 closes_while: str) -> None:
    """A reader that found the journal of an open spool, then lost it to the daemon's close (the
    journal goes once the file is whole) failed: "its journal ... could not be applied
    (FileNotFoundError ...)". Seen in CI, a reader on a stopped scan's receipt racing the close
    thread; here the writer closes at the moment the reader turns to the journal."""
    from cryoptycho.daemon.storage import spool as spool_module

    w = SpoolWriter.create(tmp_path, _spec("racing"))
    w.append(frames[:100], np.arange(100), np.zeros((100, 2)))
    w.set_status("aborted")
    name = "_rebuild" if closes_while == "rebuilding" else "scan_records"
    original = getattr(spool_module, name)

    def close_first(*args: Any, **kwargs: Any) -> Any:
        if w._f.id.valid:
            w.close()
        return original(*args, **kwargs)

    monkeypatch.setattr(spool_module, name, close_first)
    got = read_spool(tmp_path / "racing.spool.h5")
    assert got.status == "aborted"
    np.testing.assert_array_equal(got.frames, frames[:100])
    np.testing.assert_array_equal(got.indices, np.arange(100))


@pytest.mark.parametrize("impl", ["zlib", "isal"])
def test_the_journals_checksum_is_zlibs_crc32_whichever_library_computes_it(tmp_path: Path, impl: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal takes ISA-L's CRC-32 where python-isal is installed (the [isal] extra), else
    zlib's: the same checksum, so that a journal written by either is read by either; pieces of
    every kind a spool appends (bytes, memoryviews, arrays) are summed as their bytes, and a
    flipped byte still ends the journal there."""
    import zlib

    from cryoptycho.daemon.storage import journal

    crc32 = zlib.crc32 if impl == "zlib" else pytest.importorskip("isal.isal_zlib").crc32
    monkeypatch.setattr(journal, "_crc32", crc32)
    rows = np.arange(3 * 4096, dtype=np.uint16).reshape(3, 64, 64)
    body = [b"detector chunk", memoryview(b"\x00\x01" * 4000), rows, memoryview(rows[1])]
    path = tmp_path / "crc.journal"
    j = journal.Journal.create(path, fsync=False)
    j.write({"op": "append", "n": 1}, body)
    j.write({"op": "status", "status": "ended"})
    j.close()
    raw = path.read_bytes()
    pos = len(MAGIC)
    sums = []
    while pos < len(raw):  # each record's CRC checked with zlib, whatever wrote it
        size, crc = struct.unpack_from("<QI", raw, pos)
        payload = raw[pos + 12:pos + 12 + size]
        assert crc == zlib.crc32(payload)
        sums.append(crc)
        pos += 12 + size
    assert len(sums) == 2
    records = [r for r in iter_records(path)]
    assert [r.header["op"] for r in records] == ["append", "status"]  # type: ignore[union-attr]
    assert bytes(records[0].body).endswith(rows.tobytes() + rows[1].tobytes())  # type: ignore[union-attr]
    damaged = bytearray(raw)
    damaged[len(MAGIC) + 12 + 40] ^= 0x10  # a byte of the first record's body
    path.write_bytes(bytes(damaged))
    assert [type(r) for r in iter_records(path)] == [str]  # its CRC fails: the journal ends there
