"""Files from another cryoptycho release fed to the console script, as a facility meets them
after a downgrade or with files copied from a newer installation on another host."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.result import write_result
from cryoptycho.daemon.storage.spool import SpoolWriter
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from daemon_support import PIXEL_M, synthetic_scan

pytestmark = pytest.mark.subprocess


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300, check=False)


def _daemon_result(tmp_path) -> str:
    """A result file as the daemon writes it: the reconstruction plus the spool under /raw."""
    scan = synthetic_scan(n_side=3, m=16, step_px=3)
    spec = ScanSpec(scan_id="old-1", frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=PIXEL_M,
                    energy_eV=300e3, probe=scan.probe, expected_frames=9)
    writer = SpoolWriter.create(tmp_path, spec)
    writer.append(scan.frames, np.arange(9), scan.positions)
    writer.close()
    spool = next(tmp_path.glob("*.spool.h5"))
    state = reconstruct(PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=PIXEL_M,
                                   probe=scan.probe), ReconOptions(iterations=1, refine_probe=False))

    def raw(group: h5py.Group) -> None:
        with h5py.File(spool, "r") as src:
            for name in ("entry_1", "scan"):
                src.copy(src[name], group, name)

    return str(write_result(tmp_path / "old-1.h5", state, extra={"scan_id": "old-1"}, raw=raw))


def test_a_result_file_from_a_newer_release_is_refused_by_name(tmp_path):
    """`reconstruct` and `replay` read a result file's frames from its /raw part without looking
    at its format_version: a result written by a newer cryoptycho (format_version 2, whatever its
    layout then means) was reconstructed and replayed by this one's rules without a word, while a
    dataset or spool of a newer version is refused by name."""
    path = _daemon_result(tmp_path)
    ok = cli("reconstruct", path, "-o", str(tmp_path / "again.h5"), "-n", "1", "--no-export")
    assert ok.returncode == 0, ok.stderr  # as written: read
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 2
        f.attrs["cryoptycho_version"] = "9.0"
    for args in (("reconstruct", path, "-o", str(tmp_path / "newer.h5"), "-n", "1", "--no-export"),
                 ("replay", path, "--ingest", "tcp://127.0.0.1:1", "--no-confirm", "--timeout", "5")):
        run = cli(*args)
        assert run.returncode != 0, (args, run.stdout, run.stderr)
        assert "format_version 2" in run.stderr and "newer" in run.stderr, (args, run.stderr)
        assert "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "newer.h5").exists()
