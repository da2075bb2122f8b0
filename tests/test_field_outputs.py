"""Result files as downstream tools meet them: a pipeline that watches the results directory
opens each new `<scan>.h5` / `.phase.mrc` / `.phase.png` as soon as the name appears."""

from __future__ import annotations

from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
from cryoptycho.daemon.storage.outputs import save_outputs
from cryoptycho.daemon.storage.result import read_result
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from daemon_support import PIXEL_M, synthetic_scan
from PIL import Image


@pytest.fixture(scope="module")
def state():
    scan = synthetic_scan(n_side=4, m=16, step_px=3)
    data = PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3, pixel_size=PIXEL_M,
                      probe=scan.probe)
    return reconstruct(data, ReconOptions(iterations=1, refine_probe=False))


def test_no_output_is_visible_under_its_name_before_it_is_whole(tmp_path, state):
    """save_outputs (the daemon, reconstruct and batch) wrote each file in place: a watcher of
    the results directory saw `scan.h5` appear while the daemon was still copying the spool's
    frames into it, and opened a truncated HDF5 file; a write that failed half way (a spool
    read error in the raw hook, a full disk) left the half file under the finished name. Each
    file now appears only when whole."""
    stem = tmp_path / "scan-7"
    seen: list[list[str]] = []

    def raw(group: h5py.Group) -> None:  # runs while the result file is being written
        seen.append(sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")))
        group["frames"] = np.zeros((2, 4, 4), np.uint16)

    written = save_outputs(stem, state, raw=raw)
    assert seen == [[]], seen  # nothing under a final name while the result was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan-7.h5", "scan-7.phase.mrc", "scan-7.phase.png"]
    assert read_result(written["result"]).state.object.shape == state.object.shape
    with h5py.File(written["result"], "r") as f:
        assert f.attrs["name"] == "scan-7.h5"  # the final name, not the one it was written under
    with mrcfile.open(written["phase_mrc"]) as mrc:
        assert mrc.voxel_size.x == pytest.approx(PIXEL_M * 1e10)
    assert Image.open(written["phase_png"]).format == "PNG"

    def failing(group: h5py.Group) -> None:
        raise OSError(5, "Input/output error reading the spool")

    with pytest.raises(OSError, match="Input/output"):
        save_outputs(tmp_path / "scan-8", state, raw=failing)
    assert not any(p.name.startswith("scan-8") or ".part" in p.name for p in tmp_path.iterdir()), \
        sorted(p.name for p in Path(tmp_path).iterdir())
