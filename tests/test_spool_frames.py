"""The spool's frame writing: whole chunks compressed on threads and written as chunks, the rest
through the HDF5 filter, detector chunks as they arrived; every way gives back the frames."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with h5py)
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import DATA, DETECTOR_FRAMES, SpoolWriter, read_spool
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.sources import RawChunks


def _spec(scan_id: str, m: int = 24, dtype: str = "uint16") -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(m, m), frame_dtype=dtype, pixel_size_m=1e-10, energy_eV=300e3,
                    probe=np.ones((m, m), np.complex64), expected_frames=None)


@pytest.mark.parametrize("batches", [[5, 64, 100, 33, 256, 1], [64, 64, 128], [7]])
def test_frames_read_back_whatever_the_batches(tmp_path: Path, batches: list[int]) -> None:
    spec = _spec("batches")
    rng = np.random.default_rng(0)
    total = sum(batches)
    frames = rng.poisson(0.3, (total, 24, 24)).astype(np.uint16)
    writer = SpoolWriter.create(tmp_path, spec)
    k = 0
    for n in batches:
        writer.append(frames[k:k + n], np.arange(k, k + n), np.zeros((n, 2)))
        k += n
    chunk_rows = writer._data.chunks[0]
    writer.close()
    assert chunk_rows & (chunk_rows - 1) == 0  # a power of two, so batches of 64 fill whole chunks
    back = read_spool(tmp_path / "batches.spool.h5")
    np.testing.assert_array_equal(back.frames, frames)
    np.testing.assert_array_equal(back.indices, np.arange(total))


def test_a_source_s_chunks_are_written_as_they_are(tmp_path: Path) -> None:
    spec = _spec("chunks", m=8, dtype="uint32")
    rng = np.random.default_rng(1)
    binned = rng.poisson(2, (10, 8, 8)).astype(np.uint32)
    detector = rng.poisson(1, (10, 16, 16)).astype(np.uint16)
    raw = RawChunks((16, 16), np.dtype(np.uint16), [bslz4_compress(f) for f in detector])
    writer = SpoolWriter.create(tmp_path, spec)
    writer.append(binned[:4], np.arange(4), np.zeros((4, 2)), raw=RawChunks(raw.shape, raw.dtype, raw.chunks[:4]))
    writer.append(binned[4:], np.arange(4, 10), np.zeros((6, 2)), raw=RawChunks(raw.shape, raw.dtype, raw.chunks[4:]))
    # detector frames of another shape (a source bug) are not kept, the frames still are
    writer.append(binned[:1], np.array([10]), np.zeros((1, 2)),
                  raw=RawChunks((4, 4), np.dtype(np.uint16), [bslz4_compress(detector[0, :4, :4])]))
    writer.close()
    with h5py.File(tmp_path / "chunks.spool.h5", "r") as f:
        g = f[DATA]
        assert int(g.attrs["count"]) == 11
        np.testing.assert_array_equal(g["data"][:10], binned)
        np.testing.assert_array_equal(g[DETECTOR_FRAMES][:10], detector)
        for i in range(10):
            assert g[DETECTOR_FRAMES].id.read_direct_chunk((i, 0, 0))[1] == raw.chunks[i]
        assert g[DETECTOR_FRAMES].shape[0] == 11
    assert len(read_spool(tmp_path / "chunks.spool.h5").frames) == 11


@pytest.mark.parametrize("batches", [[5, 64, 100, 33, 256, 1], [64, 64, 128], [30, 3, 31], [7]])
def test_batches_written_as_one_append_are_the_batches_appended_one_by_one(tmp_path: Path,
                                                                           batches: list[int]) -> None:
    """append_many (what the spool thread found waiting, in one append) leaves the file that
    appending the same batches one by one leaves: the same frames, indices, positions and
    count, and the same bytes in every chunk, also where a chunk spans two batches."""
    rng = np.random.default_rng(2)
    total = sum(batches)
    frames = rng.poisson(0.3, (total, 24, 24)).astype(np.uint16)
    pos = rng.normal(size=(total, 2)) * 1e-9
    cuts = np.cumsum([0, *batches])
    parts = [(frames[a:b], np.arange(a, b), pos[a:b]) for a, b in itertools.pairwise(cuts)]
    one = SpoolWriter.create(tmp_path / "one", _spec("many"))
    for part in parts:
        one.append(*part)
    one.close()
    many = SpoolWriter.create(tmp_path / "many", _spec("many"))
    assert many.append_many(parts[:1]) == batches[0]  # then the rest at once, after a first append
    assert many.append_many(parts[1:]) == total - batches[0]
    assert many.count == total
    many.close()
    a, b = (read_spool(tmp_path / d / "many.spool.h5") for d in ("one", "many"))
    np.testing.assert_array_equal(a.frames, frames)
    np.testing.assert_array_equal(b.frames, frames)
    np.testing.assert_array_equal(b.indices, np.arange(total))
    np.testing.assert_array_equal(b.positions_m, pos)
    with h5py.File(tmp_path / "one" / "many.spool.h5") as f, h5py.File(tmp_path / "many" / "many.spool.h5") as g:
        da, db = f[DATA]["data"], g[DATA]["data"]
        assert da.chunks == db.chunks and int(g[DATA].attrs["count"]) == total
        for row in range(0, total, da.chunks[0]):
            assert da.id.read_direct_chunk((row, 0, 0)) == db.id.read_direct_chunk((row, 0, 0)), row
        for name in ("frame_index", "positions_m"):
            np.testing.assert_array_equal(f[DATA][name][:], g[DATA][name][:])


def test_an_append_that_fails_midway_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash (here: compression fails) after some rows of a many-batch append are written
    leaves the previous count; recovery drops the rows and appends after the committed ones."""
    from cryoptycho.daemon.storage import spool

    rng = np.random.default_rng(3)
    frames = rng.poisson(0.3, (200, 24, 24)).astype(np.uint16)
    writer = SpoolWriter.create(tmp_path, _spec("crash"))
    writer.append_many([(frames[:64], np.arange(64), np.zeros((64, 2)))])

    def broken(chunks: list[np.ndarray]) -> list[bytes]:
        raise OSError("disk on fire")

    monkeypatch.setattr(spool, "_compress_all", broken)
    with pytest.raises(OSError, match="disk on fire"):
        writer.append_many([(frames[64:100], np.arange(64, 100), np.zeros((36, 2))),
                            (frames[100:200], np.arange(100, 200), np.zeros((100, 2)))])
    writer.close()
    monkeypatch.undo()
    assert len(read_spool(tmp_path / "crash.spool.h5").frames) == 64
    writer = SpoolWriter.reopen(tmp_path / "crash.spool.h5")
    assert writer.count == 64
    writer.append_many([(frames[64:200], np.arange(64, 200), np.zeros((136, 2)))])
    writer.close()
    back = read_spool(tmp_path / "crash.spool.h5")
    np.testing.assert_array_equal(back.frames, frames)
    np.testing.assert_array_equal(back.indices, np.arange(200))


def test_frames_waiting_for_the_spool_thread_join_one_append_and_count_only_once_on_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the spool thread writes, the frames the manager hands it wait and then go to disk
    in ONE append; none counts as received before its append returned; an operation asked for
    in between (here a worker's start, which hands over what is on disk) splits them, so that
    the worker gets every frame exactly once and in order."""
    import threading

    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.worker import FrameBatch, ScanWorker

    monkeypatch.setattr(ScanWorker, "start", lambda self: None)  # its inbox is read below instead
    appends: list[int] = []
    entered, release = threading.Event(), threading.Event()
    real = SpoolWriter.append_many

    def slow(self: SpoolWriter, batches: list, wire: list | None = None) -> int:
        appends.append(len(batches))
        entered.set()
        assert release.wait(120)
        return real(self, batches, wire)

    monkeypatch.setattr(SpoolWriter, "append_many", slow)
    manager = ScanManager(ServiceConfig(spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                                        max_concurrent_scans=1), ServiceMetrics(), Outbox())
    try:
        spec = _spec("joined")
        spec.expected_frames = 200
        session = manager.start_scan(spec)
        rng = np.random.default_rng(4)
        frames = rng.poisson(0.3, (200, 24, 24)).astype(np.uint16)
        pos = rng.normal(size=(200, 2)) * 1e-9

        def send(a: int, b: int) -> None:
            manager.add_frames(session, frames[a:b], np.arange(a, b), pos[a:b], arrived=0.0)

        send(0, 20)
        assert entered.wait(120)  # the spool thread is inside the first append
        send(20, 50)
        send(50, 90)
        assert session.ledger.received == 0  # nothing has reached the disk yet
        manager.admit()  # the worker starts: it is handed what is on disk when its turn comes
        send(90, 140)
        send(140, 200)
        release.set()
        manager.flush_disk()
        assert appends == [1, 2, 2]
        assert session.ledger.received == 200
        worker = manager.running["joined"]
        got = []
        while not worker.inbox.empty():
            item = worker.inbox.get_nowait()
            assert isinstance(item, FrameBatch)
            got.append(item.frames)
        np.testing.assert_array_equal(np.concatenate(got), frames)  # each frame once, in order
        back = read_spool(tmp_path / "s" / "joined.spool.h5")
        np.testing.assert_array_equal(back.frames, frames)
        np.testing.assert_array_equal(back.positions_m, pos)
    finally:
        release.set()
        manager.close()


@pytest.mark.parametrize("batches", [[64, 128, 64], [100, 92, 64, 5], [30, 3, 31, 64]])
def test_a_sender_s_bslz4_bytes_are_written_as_the_spool_s_chunks(tmp_path: Path, batches: list[int],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches that arrived as bslz4 (one blob per message, as the Producer sends them): every
    whole chunk whose rows one message holds on the sender's block grid is cut from its bytes,
    not compressed again, and the file is byte for byte the one the spool compresses itself."""
    from cryoptycho.daemon.storage import spool

    rng = np.random.default_rng(4)
    total = sum(batches)
    frames = rng.poisson(0.3, (total, 24, 24)).astype(np.uint16)
    cuts = np.cumsum([0, *batches])
    parts = [(frames[a:b], np.arange(a, b), np.zeros((b - a, 2))) for a, b in itertools.pairwise(cuts)]
    wire = [memoryview(bslz4_compress(p[0])) for p in parts]
    own = SpoolWriter.create(tmp_path / "own", _spec("wire"))
    own.append_many(parts)
    assert own.take_chunk_paths() == {"not_bslz4": total // 64}
    own.close()
    compressed: list[int] = []
    real = spool._compress_all
    monkeypatch.setattr(spool, "_compress_all", lambda chunks: compressed.append(len(chunks)) or real(chunks))
    cut = SpoolWriter.create(tmp_path / "cut", _spec("wire"))
    cut.append_many(parts[:1], wire[:1])
    cut.append_many(parts[1:], wire[1:])
    paths = cut.take_chunk_paths()
    cut.close()
    # 24×24 uint16 frames: 64-frame chunks of 9 blocks; a frame starts on the block grid every 64 frames
    # whole chunks of each append (rows of a chunk two appends share go through the filter)
    starts = [a for lo, hi in ((0, batches[0]), (batches[0], total)) for a in range(-(-lo // 64) * 64, hi // 64 * 64, 64)]
    on_grid = sum(any(lo % 64 == 0 and lo <= a and a + 64 <= hi for lo, hi in itertools.pairwise(cuts))
                  for a in starts)
    assert paths["as_received"] == on_grid > 0
    assert sum(paths.values()) == len(starts) and sum(compressed) == len(starts) - paths["as_received"]
    np.testing.assert_array_equal(read_spool(tmp_path / "cut" / "wire.spool.h5").frames, frames)
    with h5py.File(tmp_path / "own" / "wire.spool.h5") as f, h5py.File(tmp_path / "cut" / "wire.spool.h5") as g:
        da, db = f[DATA]["data"], g[DATA]["data"]
        for row in range(0, total, da.chunks[0]):
            assert da.id.read_direct_chunk((row, 0, 0)) == db.id.read_direct_chunk((row, 0, 0)), row


def test_bslz4_bytes_in_another_block_size_are_compressed_again(tmp_path: Path) -> None:
    """Chunks of the spool are in bitshuffle's default block size; bytes in another one (valid,
    but not the bytes the filter would write) are decoded frames compressed by the spool."""
    frames = np.random.default_rng(5).poisson(0.3, (128, 24, 24)).astype(np.uint16)
    writer = SpoolWriter.create(tmp_path, _spec("blocks"))
    writer.append_many([(frames, np.arange(128), np.zeros((128, 2)))], [bslz4_compress(frames, block_bytes=4096)])
    assert writer.take_chunk_paths() == {"block_size": 2}
    writer.close()
    np.testing.assert_array_equal(read_spool(tmp_path / "blocks.spool.h5").frames, frames)
