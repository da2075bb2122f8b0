"""A detector's bslz4 frames in the spool, several frames a chunk: their blocks joined (no
compression), part-full chunks kept in the tail until whole, nothing received lost to a crash,
and the bytes HDF5's own filter would write (read with h5py + hdf5plugin)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import (
    DATA,
    DETECTOR_FRAMES,
    DETECTOR_TAIL,
    SpoolWriter,
    read_detector_frames,
    read_spool,
)
from cryoptycho.protocols.compression import bslz4_compress, bslz4_concat
from cryoptycho.protocols.sources import RawChunks

SIDE = 192  # an ARINA frame: 192×192 uint16 is nine 8 KiB bitshuffle blocks, eight frames a chunk


def _spec(scan_id: str) -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(8, 8), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((8, 8), np.complex64), expected_frames=None)


def _detector(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.poisson(0.05, (n, SIDE, SIDE)) * rng.integers(1, 3, (n, 1, 1))).astype(np.uint16)


def _append(w: SpoolWriter, det: np.ndarray, k: int, n: int, raw: bool = True, block: int = 8192) -> None:
    binned = det[k:k + n, ::24, ::24].copy()
    chunks = RawChunks((SIDE, SIDE), np.dtype(np.uint16), [bslz4_compress(f, block) for f in det[k:k + n]])
    w.append(binned, np.arange(k, k + n), np.zeros((n, 2)), raw=chunks if raw else None)


def test_bslz4_blobs_of_whole_blocks_join_into_the_blob_of_their_elements() -> None:
    frames = _detector(3, 0)
    blobs = [bslz4_compress(f) for f in frames]
    assert bslz4_concat(blobs, 2) == bslz4_compress(frames)  # byte for byte, no recompression
    assert bslz4_concat([bslz4_compress(f[:100]) for f in frames], 2) is None  # a short last block
    assert bslz4_concat([blobs[0], bslz4_compress(frames[1], 4096)], 2) is None  # two block sizes
    assert bslz4_concat([], 2) is None


def test_detector_frames_are_joined_into_chunks_that_h5py_reads(tmp_path: Path) -> None:
    """Appends that end on and off the chunk grid, some rows without detector frames (zeros),
    some through append_many: the frames read back, mid-scan (chunks and tail) and after the
    scan ended (the dataset alone, as h5py + hdf5plugin read it), and each chunk holds the
    bytes HDF5's bitshuffle filter writes for the same frames."""
    det = _detector(60, 1)
    expected = det.copy()
    w = SpoolWriter.create(tmp_path, _spec("join"))
    k = 0
    for n, raw in ((8, True), (5, True), (3, True), (16, True), (1, True), (4, False), (7, True), (9, True)):
        _append(w, det, k, n, raw)
        if not raw:
            expected[k:k + n] = 0
        k += n
    w.append_many([(det[k:k + 2, ::24, ::24].copy(), np.arange(k, k + 2), np.zeros((2, 2)))])
    expected[k:k + 2] = 0
    k += 2
    _append(w, det, k, 5)
    k += 5
    paths = w.take_chunk_paths()
    np.testing.assert_array_equal(w.read_detector_frames(), expected[:k])  # the last chunk is part full
    assert paths["detector_as_received"] == k // 8 and paths["detector_tail"] > 0, paths
    w.set_status("ended")
    w.close()
    with h5py.File(tmp_path / "join.spool.h5", "r") as f:
        ds = f[DATA][DETECTOR_FRAMES]
        assert ds.chunks == (8, SIDE, SIDE) and ds.shape[0] == k == int(f[DATA].attrs["count"])
        np.testing.assert_array_equal(ds[:], expected[:k])  # plain h5py + hdf5plugin, no tail
        np.testing.assert_array_equal(read_detector_frames(f), expected[:k])
        with h5py.File(tmp_path / "filter.h5", "w") as g:
            ref = g.create_dataset("d", data=expected[:k], chunks=(8, SIDE, SIDE),
                                   **hdf5plugin.Bitshuffle(cname="lz4"))
            for row in range(0, k - 8, 8):  # the whole chunks
                assert ds.id.read_direct_chunk((row, 0, 0)) == ref.id.read_direct_chunk((row, 0, 0)), row
    assert len(read_spool(tmp_path / "join.spool.h5").frames) == k


def test_frames_of_another_block_size_are_compressed_into_their_chunk(tmp_path: Path) -> None:
    det = _detector(16, 2)
    w = SpoolWriter.create(tmp_path, _spec("blocks"))
    _append(w, det, 0, 4)
    _append(w, det, 4, 4, block=4096)  # the chunk's other frames have 8 KiB blocks
    _append(w, det, 8, 8, block=4096)  # a chunk of its own: joined in its block size
    paths = w.take_chunk_paths()
    assert paths["detector_recompressed"] == 1 and paths["detector_as_received"] == 1, paths
    w.close()
    with h5py.File(tmp_path / "blocks.spool.h5", "r") as f:
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], det)


def test_a_spool_of_an_earlier_release_with_one_frame_a_chunk_reads_and_grows(tmp_path: Path) -> None:
    det = _detector(10, 3)
    w = SpoolWriter.create(tmp_path, _spec("old"))
    _append(w, det, 0, 3, raw=False)
    # the layout earlier releases wrote: one frame a chunk, no tail
    old = w._f[DATA].create_dataset(DETECTOR_FRAMES, shape=(3, SIDE, SIDE), maxshape=(None, SIDE, SIDE),
                                    dtype=np.uint16, chunks=(1, SIDE, SIDE), **hdf5plugin.Bitshuffle(cname="lz4"))
    for i in range(3):
        old.id.write_direct_chunk((i, 0, 0), bslz4_compress(det[i]))
    w.close()
    w = SpoolWriter.reopen(tmp_path / "old.spool.h5")
    _append(w, det, 3, 7)
    assert w.take_chunk_paths()["detector_per_frame"] == 7
    w.close()
    with h5py.File(tmp_path / "old.spool.h5", "r") as f:
        assert DETECTOR_TAIL not in f[DATA] and f[DATA][DETECTOR_FRAMES].chunks == (1, SIDE, SIDE)
        np.testing.assert_array_equal(read_detector_frames(f), det)
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], det)


def test_the_last_chunk_is_written_when_the_scan_ends_and_again_for_frames_after(tmp_path: Path) -> None:
    det = _detector(12, 5)
    w = SpoolWriter.create(tmp_path, _spec("late"), journal_only=False)  # (the file as it is written)
    _append(w, det, 0, 5)
    w.set_status("ended")
    with h5py.File(tmp_path / "late.spool.h5", "r") as f:  # the dataset alone has them now
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], det[:5])
    _append(w, det, 5, 2)  # frames after the scan's end: the closed chunk is written again
    w.set_status("finished")
    assert w.take_chunk_paths()["detector_rewritten"] == 1
    w.close()
    with h5py.File(tmp_path / "late.spool.h5", "r") as f:
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], det[:7])
        np.testing.assert_array_equal(read_detector_frames(f, 2, 6), det[2:6])


@pytest.mark.parametrize("cut", [2, 3])
def test_frames_of_a_part_full_chunk_survive_a_crash_and_recovery_goes_on(tmp_path: Path, cut: int) -> None:
    """The writing process dies (os._exit, nothing closed or flushed) before the flush of an
    append that fills a chunk whose first frames were received, and leaves another part full:
    the frames counted before are all there; recovery reopens the file and appends after them."""
    det = _detector(40, 4)
    np.save(tmp_path / "det.npy", det)
    child = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_spool_detector_chunks import _append, _spec
        from cryoptycho.daemon.storage.spool import SpoolWriter
        d = Path({str(tmp_path)!r})
        det = np.load(d / "det.npy")
        w = SpoolWriter.create(d, _spec("crash"), journal_only=False)
        flushes, flush = [0], w._flush
        def dying_flush(*record):
            flushes[0] += 1
            if flushes[0] == {cut}:
                os._exit(9)
            flush(*record)
        w._flush = dying_flush
        k = 0
        for n in (5, 6, 13, 9):
            _append(w, det, k, n)
            k += n
    """)
    run = subprocess.run([sys.executable, "-c", child], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 9, run.stderr
    committed = {2: 5, 3: 11}[cut]  # the appends before the one that died
    back = read_spool(tmp_path / "crash.spool.h5")
    assert len(back.frames) == committed
    with h5py.File(tmp_path / "crash.spool.h5", "r") as f:
        np.testing.assert_array_equal(read_detector_frames(f), det[:committed])
    w = SpoolWriter.reopen(tmp_path / "crash.spool.h5")
    _append(w, det, committed, 40 - committed)
    w.set_status("ended")
    w.close()
    with h5py.File(tmp_path / "crash.spool.h5", "r") as f:
        np.testing.assert_array_equal(f[DATA][DETECTOR_FRAMES][:], det)
        np.testing.assert_array_equal(read_detector_frames(f), det)
