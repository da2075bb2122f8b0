"""Dataset files written by other tools than h5py-from-NumPy, through the console script: MATLAB,
IDL and C writers store scalars as one-element arrays and strings as fixed-length bytes, and a
hand-written file can put a group or a value with its unit where README "Dataset file" asks for a
number. Each was a traceback or a refusal that named nothing useful."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.subprocess

M = 32


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300, check=False)


def readme_dataset(path, **override) -> None:
    """README's "Dataset file" snippet, with its values replaced by ``override`` (None drops one)."""
    rng = np.random.default_rng(0)
    yy, xx = np.meshgrid(np.arange(4) * 3e-10, np.arange(4) * 3e-10, indexing="ij")
    fields = {
        "frames": rng.poisson(3.0, (16, M, M)).astype(np.uint8),
        "positions_m": np.stack([yy.ravel(), xx.ravel()], 1) + 5e-6,  # a stage origin 5 µm away
        "energy_eV": 300e3,
        "pixel_size_m": 0.8e-10,
    }
    fields.update(override)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = override.pop("format", "cryoptycho-dataset")
        f.attrs["format_version"] = 1
        for name, value in fields.items():
            if name == "format":
                continue
            if isinstance(value, str) and value == "group":
                f.create_group(name)
            elif value is not None:
                f[name] = value
        f.create_group("probe_model").attrs.update(kind="defocused", semiangle_rad=9.2e-3, defocus_m=40e-9)


def test_scalars_as_one_element_arrays_and_a_fixed_length_format_string_reconstruct(tmp_path):
    """energy_eV = [300e3] (MATLAB's h5write, IDL) was a TypeError traceback; a format attribute
    written as a fixed-length string (C, MATLAB) was refused as "not a cryoptycho dataset"."""
    readme_dataset(tmp_path / "scan.h5", energy_eV=np.array([[300e3]]), pixel_size_m=np.array([0.8e-10]),
                   format=np.bytes_(b"cryoptycho-dataset"))
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1", "--no-export")
    assert out.returncode == 0, out.stderr
    assert "300 keV, 80 pm/px" in out.stdout, out.stdout
    with h5py.File(tmp_path / "r.h5") as f:
        assert np.isfinite(f["object"][()]).all()


@pytest.mark.parametrize(("override", "said"), [
    ({"energy_eV": "300 keV"}, "/energy_eV must hold one number (in eV), got '300 keV'"),
    ({"pixel_size_m": np.array([0.8e-10, 0.8e-10])}, "/pixel_size_m must hold one number (in m), got an array of shape (2,)"),
    ({"frames": "group"}, "/frames must be a dataset (an array), found Group"),
])
def test_a_value_that_is_not_what_the_path_holds_is_named(tmp_path, override, said):
    readme_dataset(tmp_path / "scan.h5", **override)
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1
    assert said in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_probe_model_attribute_with_its_unit_in_a_string_is_named(tmp_path):
    readme_dataset(tmp_path / "scan.h5")
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        f["probe_model"].attrs["semiangle_rad"] = "9.2 mrad"
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1
    assert "/probe_model attribute 'semiangle_rad' must be one number, got '9.2 mrad'" in out.stderr, out.stderr


def test_a_declared_field_far_from_the_origin_gets_a_canvas_of_its_own_size():
    """A live engine makes its canvas from the scan's declared extent before any frame: the
    origin (0, 0) was counted in, so positions 5 µm from it made a canvas of 62596² pixels."""
    from cryoptycho.gpu.geometry import fit_geometry

    corners = np.array([[5e-6, 5e-6], [5e-6 + 1e-9, 5e-6 + 2e-9]])
    extent = ((corners[0, 0], corners[1, 0]), (corners[0, 1], corners[1, 1]))
    declared = fit_geometry(np.zeros((0, 2)), 1e-10, (M, M), extent_m=extent)
    assert declared.object_shape == fit_geometry(corners, 1e-10, (M, M)).object_shape
    assert max(declared.object_shape) < 3 * M + 20


def test_a_scan_at_stage_coordinates_replays_into_the_daemon(tmp_path):
    """README "Dataset file": positions "in the sample frame (any origin)". Offline such a file
    reconstructed; replayed into the daemon (positions declared at scan_start) the scan failed
    with "MemoryError: Unable to allocate 29.2 GiB"."""
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, wait_for

    readme_dataset(tmp_path / "stage.h5")  # positions 5 µm from the stage origin
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=5",
                          "--set", "resolution_interval_s=0")
    try:
        out = cli("replay", str(tmp_path / "stage.h5"), "--ingest", daemon.ingest, "--control", daemon.control)
        assert out.returncode == 0, out.stderr
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            done = wait_for(lambda: (r := ctl.call("receipt", scan_id="stage"))["state"] in ("finished", "failed")
                            and r, 120, "the scan to finish", daemon)
        assert done["state"] == "finished", done
        with h5py.File(tmp_path / "results" / "stage.h5") as f:
            assert max(f["object"].shape) < 200 and np.isfinite(f["object"][()]).all()
        # README "Live service": the same replay command a second time is refused, saying how to
        # send it anyway
        again = cli("replay", str(tmp_path / "stage.h5"), "--ingest", daemon.ingest, "--control", daemon.control)
        assert again.returncode == 1 and "scan ids must be unique" in again.stderr, again.stderr
        assert "`replay --scan-id`" in again.stderr and "Traceback" not in again.stderr, again.stderr
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_a_probe_per_position_in_the_file_is_refused_as_the_daemon_refuses_it(tmp_path):
    """/probe of shape (K, M, M), one probe per position, read as K incoherent modes: the
    offline engine ran them all (10 s an iteration for 64 frames of 64²), past the option's 16."""
    readme_dataset(tmp_path / "scan.h5")
    with h5py.File(tmp_path / "scan.h5", "a") as f:
        del f["probe_model"]
        f["probe"] = np.full((20, M, M), 0.1, np.complex64)
    out = cli("reconstruct", str(tmp_path / "scan.h5"), "-o", str(tmp_path / "r.h5"), "-n", "1")
    assert out.returncode == 1, out.stderr
    assert "/probe declares 20 modes, at most 16 are run" in out.stderr and "Traceback" not in out.stderr, out.stderr
