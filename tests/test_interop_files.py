"""Our files as other tools read them: ptychodus' own readers (CXI and product), NeXus validation
(nxvalidate, NXcxi_ptycho), plain h5py without hdf5plugin, and every command that takes a
recorded scan taking a dataset, spool or result file."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.dataset import read_dataset, write_dataset
from cryoptycho.daemon.storage.h5format import infer_nav_shape
from cryoptycho.daemon.storage.open import identify, open_recorded
from cryoptycho.daemon.storage.result import write_result
from cryoptycho.daemon.storage.spool import SpoolWriter, spool_path
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.geometry import wavelength
from cryoptycho.gpu.state import ReconState
from daemon_support import PIXEL_M, synthetic_scan

ENERGY = 300e3


def _raster(ny: int, nx: int, step: float = 3 * PIXEL_M, serpentine: bool = False) -> np.ndarray:
    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    if serpentine:
        ix[1::2] = ix[1::2, ::-1]
    return np.stack([iy.ravel(), ix.ravel()], 1) * step


def _spool(tmp_path: Path, metadata: dict | None = None, n_side: int = 6, m: int = 32) -> Path:
    """A finished-looking spool of a small raster scan, written by the daemon's own writer."""
    scan = synthetic_scan(n_side=n_side, m=m)
    positions = _raster(n_side, n_side)
    spec = ScanSpec(
        scan_id="interop-1", frame_shape=(m, m), frame_dtype="uint16", pixel_size_m=PIXEL_M,
        energy_eV=ENERGY, probe=scan.probe, expected_frames=len(positions), positions_m=positions,
        mask=np.ones((m, m), bool), metadata={"nav_shape": [n_side, n_side], **(metadata or {})},
    )
    writer = SpoolWriter.create(tmp_path, spec)
    try:
        half = len(positions) // 2  # two appends, the second one out of order, as a network delivers
        writer.append(scan.frames[half:], np.arange(half, len(positions)), positions[half:])
        writer.append(scan.frames[:half], np.arange(half), positions[:half])
        writer.set_status("ended")
    finally:
        writer.close()
    return spool_path(tmp_path, "interop-1")


# ------------------------------------------------------------------------------- raster grid


def test_raster_grid_is_inferred_only_for_rasters():
    assert infer_nav_shape(_raster(4, 7)) == ((4, 7), False)
    assert infer_nav_shape(_raster(5, 3, serpentine=True)) == ((5, 3), True)
    assert infer_nav_shape(_raster(1, 9)) == ((1, 9), False)
    rng = np.random.default_rng(0)
    assert infer_nav_shape(rng.random((30, 2)) * 1e-9) is None
    golden = 2.399963
    k = np.arange(40)
    spiral = np.stack([np.sqrt(k) * np.sin(k * golden), np.sqrt(k) * np.cos(k * golden)], 1) * 1e-10
    assert infer_nav_shape(spiral) is None
    rotated = _raster(4, 4) @ np.array([[0.8, -0.6], [0.6, 0.8]])
    assert infer_nav_shape(rotated) is None


def test_dataset_stores_the_raster_grid_and_it_travels(tmp_path):
    scan = synthetic_scan(n_side=5, m=16)
    data = PtychoData(frames=scan.frames, positions=_raster(5, 5), energy=ENERGY, pixel_size=PIXEL_M,
                      probe=scan.probe)
    path = write_dataset(tmp_path / "d.h5", data)
    with h5py.File(path, "r") as f:
        assert list(f["nav_shape"][()]) == [5, 5] and not f["nav_shape"].attrs["serpentine"]
        assert "hdf5plugin" in f["frames"].attrs["compression"]
        cube = f["frames"][()].reshape(*f["nav_shape"][()], 16, 16)  # what a LiberTEM/py4DSTEM user does
    np.testing.assert_array_equal(cube[2, 3], scan.frames[2 * 5 + 3])
    assert read_dataset(path).metadata["nav_shape"] == [5, 5]
    # not a raster: no grid is claimed
    other = PtychoData(frames=scan.frames, positions=scan.positions, energy=ENERGY, pixel_size=PIXEL_M,
                       probe=scan.probe)
    with h5py.File(write_dataset(tmp_path / "jittered.h5", other), "r") as f:
        assert "nav_shape" not in f


def test_reading_frames_without_the_filter_names_hdf5plugin(tmp_path):
    scan = synthetic_scan(n_side=3, m=16)
    path = write_dataset(tmp_path / "d.h5", PtychoData(frames=scan.frames, positions=scan.positions,
                                                       energy=ENERGY, pixel_size=PIXEL_M, probe=scan.probe))
    # A plain h5py (the filter never registered) is what a user without hdf5plugin has; here
    # the filter is unregistered after our import registered it, in a process of its own.
    code = (
        "import sys, h5py\n"
        "from cryoptycho.daemon.storage.dataset import read_dataset\n"
        "h5py.h5z.unregister_filter(32008)\n"
        "try:\n"
        "    with h5py.File(sys.argv[1], 'r') as f: f['frames'][()]\n"
        "except OSError as exc: print('H5PY:', exc)\n"
        "try:\n"
        "    read_dataset(sys.argv[1])\n"
        "except OSError as exc: print('OURS:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "HDF5_PLUGIN_PATH": str(tmp_path)})
    plain = out.stdout.split("OURS:")[0].lower()
    assert "h5py:" in plain and ("filter" in plain or "plugin" in plain), out.stdout + out.stderr
    ours = out.stdout.split("OURS:")[1]
    assert "import hdf5plugin" in ours and "bitshuffle" in ours.lower(), ours


# ------------------------------------------------------------------------ NeXus (nxvalidate)


@pytest.mark.parametrize("where", ["spool", "result /raw"])
def test_nxcxi_ptycho_entry_passes_nexus_validation(tmp_path, where):
    validate = pytest.importorskip("nexusformat.nexus.validate")
    path = _spool(tmp_path)
    entry = "/entry_1"
    if where != "spool":
        path, entry = _result_from_spool(tmp_path, path), "/raw/entry_1"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    validate.logger.addHandler(handler)
    old = validate.logger.level
    validate.logger.setLevel(logging.WARNING)
    try:
        warnings, errors = validate.validate_application(str(path), path=entry, application="NXcxi_ptycho")
    finally:
        validate.logger.removeHandler(handler)
        validate.logger.setLevel(old)
    text = stream.getvalue()
    assert errors == 0, text
    # NXcxi_ptycho (contributed, NXDL v2026.01) declares source_1/probe and /type NX_FLOAT, while
    # the NXsource base class enumerates them as text ("electron"): the only two warnings left.
    assert warnings == 2 and text.count("not a valid NX_FLOAT") == 2, text
    assert "required" not in text, text


# ----------------------------------------------------------------------------- ptychodus


def _ptychodus_far_field_pixel(md) -> float:
    from ptychodus.api.constants import energy_eV_to_wavelength_m
    from ptychodus.api.propagate import compute_far_field_pixel_geometry

    geo = compute_far_field_pixel_geometry(
        md.detector_pixel_geometry, md.detector_extent,
        wavelength_m=energy_eV_to_wavelength_m(md.photon_energy_eV),
        propagation_distance_m=md.detector_distance_m,
    )
    return geo.width_m


#: the camera length at which a 150 µm pixel of a 32-pixel frame samples PIXEL_M at 300 keV
CAMERA_LENGTH_M = 150e-6 * 32 * PIXEL_M / wavelength(ENERGY)


@pytest.mark.parametrize("detector", [{"detector_pixel_size_m": 150e-6}, {"camera_length_m": CAMERA_LENGTH_M},
                                      {}], ids=["detector-pixel", "camera-length", "equivalent-detector"])
def test_spool_loads_in_ptychodus_cxi_reader_with_the_right_geometry(tmp_path, detector):
    pytest.importorskip("ptychodus")
    from ptychodus.plugins.cxi_file import CXIDiffractionFileReader

    path = _spool(tmp_path, metadata=detector)
    ds = CXIDiffractionFileReader().read(path)
    md = ds.get_metadata()
    assert md.num_patterns_per_array == [36] and md.detector_extent.width_px == 32
    if detector:  # the recording detector, whichever half of it the scan named
        assert md.detector_pixel_geometry.width_m == pytest.approx(150e-6)
        assert md.detector_distance_m == pytest.approx(CAMERA_LENGTH_M)
    assert md.detector_distance_m > 0
    # ptychodus derives the real-space pixel from λ, distance and detector pixel: ours
    assert _ptychodus_far_field_pixel(md) == pytest.approx(PIXEL_M, rel=1e-9)
    assert md.photon_energy_eV == pytest.approx(6.62607015e-34 * 299792458 / wavelength(ENERGY) / 1.602176634e-19)
    assert not ds.get_bad_pixels().any()  # our mask (1 = valid) became a CXI mask (0 = valid)
    patterns = next(iter(ds)).get_patterns()
    assert patterns.shape == (36, 32, 32)


def _result_from_spool(tmp_path: Path, spool: Path) -> Path:
    """A result file as the daemon writes it: engine result plus the spool copied under /raw."""
    rec = open_recorded(spool)
    state = _tiny_reconstruction(rec.data)

    def raw(group: h5py.Group) -> None:
        with h5py.File(spool, "r") as src:
            for name in ("entry_1", "scan", "nav_shape"):
                src.copy(src[name], group, name)

    return write_result(tmp_path / "interop-1.h5", state, extra={"scan_id": "interop-1"}, raw=raw)


def _tiny_reconstruction(data: PtychoData) -> ReconState:
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import reconstruct

    return reconstruct(data, ReconOptions(iterations=1, refine_probe=False))


def test_result_loads_in_ptychodus_product_reader(tmp_path):
    pytest.importorskip("ptychodus")
    from ptychodus.api.io import load_product

    result = _result_from_spool(tmp_path, _spool(tmp_path, {"detector_pixel_size_m": 150e-6}))
    product = load_product(result)
    md = product.metadata
    assert md.detector_distance_m == pytest.approx(CAMERA_LENGTH_M)
    assert md.photon_wavelength_m == pytest.approx(wavelength(ENERGY), rel=1e-12)
    positions = product.probe_positions
    assert len(positions) == 36
    np.testing.assert_array_equal(positions.get_indexes(), np.arange(36))
    np.testing.assert_allclose(positions.get_coordinates_x_m(), _raster(6, 6)[:, 1])
    geo = product.object_.get_geometry()
    assert geo.pixel_width_m == pytest.approx(PIXEL_M)
    assert product.probes.get_pixel_geometry().width_m == pytest.approx(PIXEL_M)
    assert len(product.losses) >= 1
    with h5py.File(result, "r") as f:
        assert list(f["nav_shape"][()]) == [6, 6]


def test_result_without_a_known_detector_still_loads_in_ptychodus(tmp_path):
    pytest.importorskip("ptychodus")
    from ptychodus.api.io import load_product

    scan = synthetic_scan(n_side=4, m=16)
    data = PtychoData(frames=scan.frames, positions=scan.positions, energy=ENERGY, pixel_size=PIXEL_M,
                      probe=scan.probe)
    path = write_result(tmp_path / "r.h5", _tiny_reconstruction(data), data)
    product = load_product(path)
    assert product.metadata.detector_distance_m == pytest.approx(1.0)  # the equivalent detector
    assert len(product.probe_positions) == 16


# ------------------------------------------------------------- one opener, every command


def test_open_recorded_reads_every_kind_and_says_what_it_is(tmp_path):
    spool = _spool(tmp_path)
    result = _result_from_spool(tmp_path, spool)
    dataset = write_dataset(tmp_path / "d.h5", open_recorded(spool).data)
    kinds = {identify(p): open_recorded(p) for p in (dataset, spool, result)}
    assert set(kinds) == {"dataset", "spool", "result"}
    for rec in kinds.values():
        np.testing.assert_array_equal(rec.data.frames, kinds["spool"].data.frames)
        np.testing.assert_allclose(rec.data.positions, _raster(6, 6))  # spool order was shuffled
        assert "36 frames of 32×32" in rec.describe() and "raster 6×6" in rec.describe()
    assert "cryoptycho result" in kinds["result"].describe()
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "NXroot"
    with pytest.raises(ValueError, match="not a cryoptycho dataset, spool or result file"):
        open_recorded(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        identify(tmp_path / "text.h5")
    from cryoptycho.daemon.batch import load_input
    from cryoptycho.daemon.replay import read_source

    replayed = read_source(result)
    assert replayed.start.scan_id == "interop-1" and len(replayed.frames) == 36
    assert load_input(result)[0].frames.shape == (36, 32, 32)
    bare = write_result(tmp_path / "bare.h5", kinds["dataset"] and _tiny_reconstruction(kinds["dataset"].data),
                        kinds["dataset"].data)
    with pytest.raises(ValueError, match="holds no raw frames"):
        open_recorded(bare)


@pytest.mark.subprocess
def test_reconstruct_command_takes_a_spool_and_a_result_file(tmp_path):
    spool = _spool(tmp_path)
    result = _result_from_spool(tmp_path, spool)
    for source, out in ((spool, tmp_path / "from-spool.h5"), (result, tmp_path / "from-result.h5")):
        proc = subprocess.run(
            [sys.executable, "-m", "cryoptycho.daemon.cli", "reconstruct", str(source), "-o", str(out),
             "-n", "1", "--fixed-probe", "--no-export"],
            check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert out.is_file() and "36 frames" in proc.stdout
        assert ("cryoptycho spool" if source == spool else "cryoptycho result") in proc.stdout


def test_evaluate_names_the_kind_of_a_wrong_file(tmp_path):
    from click.testing import CliRunner
    from cryoptycho.daemon.cli import main

    spool = _spool(tmp_path)
    result = _result_from_spool(tmp_path, spool)
    out = CliRunner().invoke(main, ["evaluate", str(spool), "--truth", str(spool)])
    assert out.exit_code == 2 and "RESULT" in out.output and "cryoptycho spool file" in out.output, out.output
    out = CliRunner().invoke(main, ["evaluate", str(result), "--truth", str(result)])
    assert out.exit_code == 2 and "--truth" in out.output and "ground truth" in out.output, out.output


def test_a_spool_of_the_earlier_layout_is_still_recovered(tmp_path):
    """A daemon upgraded while scans were unfinished reopens their spool files (recovery)."""
    from cryoptycho.daemon.storage.spool import read_spool

    scan = synthetic_scan(n_side=3, m=16)
    path = tmp_path / "old.spool.h5"
    spec_json = ('{"scan_id": "old", "frame_shape": [16, 16], "frame_dtype": "uint16", "pixel_size_m": 1e-10, '
                 '"energy_eV": 300000.0, "expected_frames": 9, "extent_m": null, "options": {}, "metadata": {}}')
    with h5py.File(path, "w") as f:  # the layout written before the NXcxi_ptycho entry was completed
        f.attrs.update(format="cryoptycho-spool", format_version=1, scan_id="old", status="open")
        f.create_group("scan").attrs["json"] = spec_json
        f["scan/probe"] = scan.probe
        g = f.create_group("entry_1/data_1")
        g.attrs["count"] = 0
        g.create_dataset("data", shape=(0, 16, 16), maxshape=(None, 16, 16), dtype="uint16", chunks=(4, 16, 16))
        g.create_dataset("frame_index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(64,))
        g.create_dataset("positions_m", shape=(0, 2), maxshape=(None, 2), dtype=np.float64, chunks=(64, 2))
        f.create_dataset("entry_1/sample_1/geometry_1/translation", shape=(0, 3), maxshape=(None, 3),
                         dtype=np.float64, chunks=(64, 3))
    writer = SpoolWriter.reopen(path)
    writer.append(scan.frames, np.arange(9), scan.positions)
    writer.close()
    back = read_spool(path)
    np.testing.assert_array_equal(back.frames, scan.frames)
    np.testing.assert_array_equal(back.positions_m, scan.positions)
