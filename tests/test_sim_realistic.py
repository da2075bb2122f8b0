"""The realistic virtual experiment: `cryoptycho simulate --realistic` and the error flags write
the nominal probe and positions, with the truth under /truth; a reconstruction with position
refinement saves refined and nominal positions in the result."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from cryoptycho.daemon.storage.dataset import read_dataset
from cryoptycho.daemon.storage.result import read_result
from cryoptycho.gpu.probes import aberrate, make_probe
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=300, check=False)


def test_true_positions_follow_the_affine_error_drift_and_jitter() -> None:
    nominal = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0), indexing="ij"), -1).reshape(-1, 2) * 1e-10
    err = ExperimentErrors(scale=(0.1, 0.0), rotation=0.0, shear=0.0)
    centre = nominal.mean(axis=0)
    got = err.true_positions(nominal)
    np.testing.assert_allclose(got[:, 0] - centre[0], 1.1 * (nominal[:, 0] - centre[0]), atol=1e-20)
    np.testing.assert_allclose(got[:, 1], nominal[:, 1], atol=1e-20)
    # rotation by 90°: (y, x) offsets → (x, −y)
    rot = ExperimentErrors(rotation=np.pi / 2).true_positions(nominal)
    np.testing.assert_allclose(rot - centre, (nominal - centre)[:, ::-1] * [1, -1], atol=1e-20)
    drift = ExperimentErrors(drift=(2e-10, -1e-10)).true_positions(nominal)
    np.testing.assert_allclose(drift[-1] - nominal[-1], [2e-10, -1e-10], atol=1e-20)
    np.testing.assert_allclose(drift[0], nominal[0], atol=1e-20)
    jitter = ExperimentErrors(jitter=0.5e-10, seed=3).true_positions(np.zeros((4000, 2)))
    assert jitter.std(axis=0) == pytest.approx([0.5e-10, 0.5e-10], rel=0.05)
    assert not ExperimentErrors(seed=4).any and ExperimentErrors.realistic().any


def test_simulation_records_the_true_probe_at_the_true_positions() -> None:
    err = ExperimentErrors(defocus=20e-9, astigmatism=10e-9, scale=(0.03, 0.0), jitter=0.2e-10)
    kw = {"sample": "hemoglobin", "dose": 20.0, "frame_size": 32, "detector": "ideal",
          "multislice": False, "seed": 1}
    data = simulate_ptychography(errors=err, **kw)
    exact = simulate_ptychography(**kw)
    np.testing.assert_array_equal(data.positions, exact.positions)  # nominal = the error-free scan
    assert data.truth_positions is not None and exact.truth_positions is None
    np.testing.assert_allclose(data.truth_positions, err.true_positions(data.positions))
    # nominal probe model as simulated without errors; the truth probe carries the aberrations
    nominal = make_probe("randomized", (32, 32), data.pixel_size, data.energy, data.probe_model.semiangle,
                         0.0, seed=data.probe_model.seed, precision="double")
    want = aberrate(nominal, data.pixel_size, data.energy, err.probe_errors)
    got = data.truth_probe / np.sqrt((np.abs(data.truth_probe) ** 2).sum())
    overlap = abs(np.vdot(want, got)) / np.linalg.norm(want)
    assert overlap > 0.999
    assert abs(np.vdot(nominal, got)) < 0.95  # and it is not the nominal probe
    assert data.metadata["errors"]["defocus"] == pytest.approx(20e-9)


def test_simulate_realistic_cli_then_reconstruct_with_position_refinement(tmp_path) -> None:
    ds = tmp_path / "real.h5"
    out = _cli("simulate", "--realistic", "--frame-size", "32", "--detector", "ideal", "--thin",
               "--dose", "200", "--overlap", "0.4", "--jitter", "0.1", "--scan-scale", "3", "0",
               "-o", str(ds))
    assert out.returncode == 0, out.stderr
    assert "truth under /truth" in out.stderr
    data = read_dataset(ds)
    with h5py.File(ds) as f:
        assert "truth/positions_m" in f and "probe" not in f and "probe_model" in f
    shift = np.linalg.norm(data.truth_positions - data.positions, axis=1)
    assert shift.max() > 0.3e-10
    assert data.metadata["errors"]["scale"] == [0.03, 0.0]
    res = tmp_path / "res.h5"
    out = _cli("reconstruct", str(ds), "-o", str(res), "-n", "12", "--no-export", "-q",
               "--set", "refine_positions=true", "--set", "position_start_iteration=4",
               "--set", "position_every=4",
               # the fixed residual prior: it moves the positions (by the noise) where the default,
               # estimated prior finds nothing the data resolve on this small sparse scan and keeps
               # them; the saved pair of position sets is what this checks
               "--set", "position_residual_auto=false")
    assert out.returncode == 0, out.stderr
    result = read_result(res)
    state = result.state
    np.testing.assert_allclose(state.nominal_positions, data.positions, rtol=0, atol=1e-16)
    assert np.abs(state.positions - data.positions).max() > 0.01e-10  # moved by the refinement
    assert state.options["refine_positions"] is True


def test_simulate_rejects_bad_error_flags(tmp_path) -> None:
    out = _cli("simulate", "--jitter", "-1", "-o", str(tmp_path / "x.h5"))
    assert out.returncode != 0 and "--jitter" in out.stderr
