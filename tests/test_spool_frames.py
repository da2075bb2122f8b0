"""The spool's frame writing: whole chunks compressed on threads and written as chunks, the rest
through the HDF5 filter, detector chunks as they arrived; every way gives back the frames."""

from __future__ import annotations

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
    b = RawChunks((8, 8), np.dtype(np.uint32), [bslz4_compress(f) for f in binned])
    writer = SpoolWriter.create(tmp_path, spec)
    writer.append(binned[:4], np.arange(4), np.zeros((4, 2)), binned=RawChunks(b.shape, b.dtype, b.chunks[:4]),
                  raw=RawChunks(raw.shape, raw.dtype, raw.chunks[:4]))
    writer.append(binned[4:], np.arange(4, 10), np.zeros((6, 2)), binned=RawChunks(b.shape, b.dtype, b.chunks[4:]),
                  raw=RawChunks(raw.shape, raw.dtype, raw.chunks[4:]))
    # detector frames of another shape (a source bug) are not kept, the frames still are
    writer.append(binned[:1], np.array([10]), np.zeros((1, 2)),
                  raw=RawChunks((4, 4), np.dtype(np.uint16), [bslz4_compress(detector[0, :4, :4])]))
    writer.close()
    with h5py.File(tmp_path / "chunks.spool.h5", "r") as f:
        g = f[DATA]
        assert int(g.attrs["count"]) == 11 and g["data"].chunks == (1, 8, 8)
        np.testing.assert_array_equal(g["data"][:10], binned)
        np.testing.assert_array_equal(g[DETECTOR_FRAMES][:10], detector)
        for i in range(10):
            assert g[DETECTOR_FRAMES].id.read_direct_chunk((i, 0, 0))[1] == raw.chunks[i]
            assert g["data"].id.read_direct_chunk((i, 0, 0))[1] == b.chunks[i]
        assert g[DETECTOR_FRAMES].shape[0] == 11
    assert len(read_spool(tmp_path / "chunks.spool.h5").frames) == 11
