"""A spool whose frames cannot be read (a kill inside an HDF5 flush where no journal repairs it:
FORMATS.md § "The journal") must not stop the daemon at start: recovery reads every frame in a child
process first, and a file whose reader crashes, hangs or fails is named in the log and kept,
untouched, while the other spools are recovered."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.storage import readcheck
from cryoptycho.daemon.storage.readcheck import check_spool_readable
from cryoptycho.protocols.control import ControlClient
from daemon_support import start_daemon, synthetic_scan, wait_for

FAST = ("--set", "options.iterations=3", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=8, m=32)


def _spool(spool_dir: Path, scan, scan_id: str) -> Path:
    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.messages import ScanStart

    writer = SpoolWriter.create(spool_dir, spec_from_scan_start(ScanStart(**scan.start_fields(scan_id))))
    n = len(scan.frames)
    writer.append(scan.frames, np.arange(n), scan.positions[:n])
    writer.set_status("ended")
    path = writer.path
    writer.close()
    return path


def _damage_first_chunk(path: Path) -> None:
    """Garbage over the LZ4 blocks of the first ``data`` chunk (its 12-byte bitshuffle header
    kept): the metadata still reads, the frames do not."""
    with h5py.File(path, "r") as f:
        info = f["entry_1/data_1/data"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 12)
        fh.write(b"\xff" * (info.size - 12))


def test_a_readable_spool_passes_and_a_damaged_chunk_is_named(tmp_path, scan):
    good = _spool(tmp_path, scan, "good")
    assert check_spool_readable(good) is None
    bad = _spool(tmp_path, scan, "bad")
    _damage_first_chunk(bad)
    before = bad.read_bytes()
    why = check_spool_readable(bad)
    assert why is not None and why.startswith("reading its frames failed (OSError: ") and "filter" in why, why
    assert why.endswith("the file is kept, untouched")
    assert bad.read_bytes() == before


def test_detector_frames_are_read_too(tmp_path):
    """A spool with a detector's frames (one whole chunk of 8 and a tail): a damaged chunk of
    ``detector_frames`` is found although ``data`` reads."""
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage.spool import DATA, DETECTOR_FRAMES, SpoolWriter
    from cryoptycho.protocols.compression import bslz4_compress
    from cryoptycho.protocols.sources import RawChunks

    assert (readcheck._DATA, readcheck._DETECTOR_FRAMES) == (DATA, DETECTOR_FRAMES)
    side, n = 192, 12
    det = np.random.default_rng(1).poisson(0.05, (n, side, side)).astype(np.uint16)
    spec = ScanSpec(scan_id="det", frame_shape=(8, 8), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((8, 8), np.complex64), expected_frames=None)
    w = SpoolWriter.create(tmp_path, spec)
    w.append(det[:, ::24, ::24].copy(), np.arange(n), np.zeros((n, 2)),
             raw=RawChunks((side, side), np.dtype(np.uint16), [bslz4_compress(f, 8192) for f in det]))
    w.set_status("ended")
    path = w.path
    w.close()
    assert check_spool_readable(path) is None
    with h5py.File(path, "r") as f:
        assert f[DATA][DETECTOR_FRAMES].id.get_num_chunks() >= 1
        info = f[DATA][DETECTOR_FRAMES].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 12)
        fh.write(b"\xff" * (info.size - 12))
    why = check_spool_readable(path)
    assert why is not None and why.startswith("reading its frames failed ("), why


def test_a_reader_killed_by_a_signal_or_hung_is_reported(tmp_path, scan, monkeypatch):
    path = _spool(tmp_path, scan, "any")
    # stand-ins for the reader: one that dies of SIGSEGV as the bitshuffle filter does on some
    # damaged chunks, one that never returns
    monkeypatch.setattr(readcheck, "_reader_command", lambda p: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert check_spool_readable(path) == "reading its frames crashed the reader (SIGSEGV); the file is kept, untouched"
    monkeypatch.setattr(readcheck, "_reader_command", lambda p: [sys.executable, "-c", "import signal; signal.pause()"])
    assert check_spool_readable(path, timeout_s=0.5) == (
        "reading its frames took more than 0.5 s (the reader was killed); the file is kept, untouched")


@pytest.mark.subprocess
def test_the_daemon_starts_names_a_spool_it_cannot_read_keeps_it_and_recovers_the_rest(tmp_path, scan):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    _spool(spool_dir, scan, "intact")
    damaged = _spool(spool_dir, scan, "damaged")
    _damage_first_chunk(damaged)
    before = damaged.read_bytes()

    daemon = start_daemon(tmp_path, *FAST)
    try:
        with ControlClient(daemon.control, timeout_s=10) as ctl:
            wait_for(lambda: {s["scan_id"]: s["state"] for s in ctl.list_scans()}.get("intact") == "finished", 90,
                     "the intact spool to be recovered and finished", daemon)
            assert "damaged" not in {s["scan_id"] for s in ctl.list_scans()}
        wait_for(lambda: "damaged.spool.h5" in daemon.log(), 30, "the damaged spool to be named in the log", daemon)
        named = [line for line in daemon.log_lines
                 if "cannot recover spool" in line and "damaged.spool.h5" in line]
        assert len(named) == 1 and "reading its frames failed" in named[0] and "kept, untouched" in named[0], daemon.log()
        assert daemon.stop() == 0
        said = [line for line in daemon.log_lines if "could not recover stay in" in line]
        assert len(said) == 1 and "damaged.spool.h5" in said[0]
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert damaged.read_bytes() == before, "the damaged spool file was changed"
