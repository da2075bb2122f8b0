"""The bright-field (parallax) aberration fit (gpu/parallax.py): it recovers a known defocus and
two-fold astigmatism from the data alone — noiseless and with counting noise, on a synthetic
object and on the realistic hemoglobin simulation — stays at the nominal probe when there is
nothing to find, runs on the strict device backend, and corrects the nominal probe before a
reconstruction (``parallax="auto"``) only when the dataset's probe is a probe model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.parallax import BrightFieldModel, estimate_aberrations
from cryoptycho.gpu.probes import aberrate, make_probe
from cryoptycho.gpu.reconstruct import prepare
from engine_helpers import ENERGY, PIXEL, aberrated_dataset

M = 32
SEMIANGLE = 8e-3
NOMINAL_DEFOCUS = 60e-9
ERRORS = {"C10": 15e-9, "C12a": 6e-9, "C12b": -4e-9}


def _dataset(counts: float | None, errors: dict[str, float], seed: int = 0, grid: int = 10) -> PtychoData:
    """Frames recorded with the nominal defocused probe aberrated by ``errors`` (noiseless when
    ``counts`` is None, else Poisson at ``counts`` per pattern); the dataset gives the nominal
    probe model."""
    return aberrated_dataset(counts, errors, seed, grid, m=M, semiangle=SEMIANGLE, nominal_defocus=NOMINAL_DEFOCUS)


def _nominal(xp=np):
    return make_probe("defocused", (M, M), PIXEL, ENERGY, SEMIANGLE, NOMINAL_DEFOCUS, xp=xp)


def _errors_nm(fit, truth: dict[str, float]) -> dict[str, float]:
    return {k: abs(fit.coefficients[k] - truth.get(k, 0.0)) * 1e9 for k in fit.coefficients}


def test_noiseless_synthetic_recovers_defocus_and_astigmatism() -> None:
    data = _dataset(None, ERRORS)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, prior_rms_m=None)
    err = _errors_nm(fit, ERRORS)
    assert max(err.values()) < 2.0, (fit.coefficients, err)  # the first-order model's bias
    assert fit.explained > fit.explained_nominal and fit.log_likelihood_gain > 0


def test_counting_noise_recovers_within_a_few_nm(xp) -> None:
    """10⁵ counts per pattern on 14 × 14 positions, on the backend under test (the strict one
    forbids implicit device → host conversions)."""
    data = _dataset(1e5, ERRORS, seed=1, grid=14)
    # host frames (the engine's case) on NumPy; frames already on the device otherwise
    frames = data.frames if xp is np else xp.asarray(data.frames)
    fit = estimate_aberrations(frames, data.positions, _nominal(xp), PIXEL, ENERGY)
    err = _errors_nm(fit, ERRORS)
    assert max(err.values()) < 3.0, (fit.coefficients, err)


def test_no_aberration_error_leaves_the_nominal_probe() -> None:
    """Frames recorded with the nominal probe itself: the fit stays within 2 nm of it."""
    data = _dataset(1e5, {}, seed=2, grid=14)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY)
    assert max(abs(v) for v in fit.coefficients.values()) < 2e-9, fit.coefficients


def test_sign_convention_matches_make_probe_defocus() -> None:
    """Frames of a probe made with 20 nm more defocus are read as C10 = +20 nm (the
    probes.aberration_basis sign, Δf > 0 underfocus), not −20 nm."""
    data = _dataset(None, {})
    more = make_probe("defocused", (M, M), PIXEL, ENERGY, SEMIANGLE, NOMINAL_DEFOCUS - 20e-9,
                      precision="double")
    fit = estimate_aberrations(data.frames, data.positions, more, PIXEL, ENERGY, names=("C10",),
                               prior_rms_m=None)
    assert abs(fit.coefficients["C10"] - 20e-9) < 2e-9, fit.coefficients


def test_realistic_hemoglobin_noiseless_recovers_the_preset() -> None:
    """The realistic preset (randomized phase-plate probe, 20 nm defocus and 10 nm astigmatism
    off, affine scan error, jitter, drift), hemoglobin, the expected intensities: the fit
    finds the probe errors within 2 nm from the nominal positions."""
    from cryoptycho.gpu.sim.errors import ExperimentErrors
    from cryoptycho.gpu.sim.ptycho import simulate_ptychography

    errors = ExperimentErrors.realistic(0)
    data = simulate_ptychography("hemoglobin", dose=20, frame_size=64, pixel_size=0.8e-10, seed=0,
                                 errors=errors, noise=False)
    pm = data.probe_model
    nominal = make_probe(pm.kind, data.frame_shape, data.pixel_size, data.energy, pm.semiangle, pm.defocus,
                         seed=pm.seed)
    fit = estimate_aberrations(data.frames, data.positions, nominal, data.pixel_size, data.energy)
    err = _errors_nm(fit, errors.probe_errors)
    assert max(err.values()) < 2.0, (fit.coefficients, err)


def test_bad_input_is_refused_with_a_clear_error() -> None:
    data = _dataset(None, {})
    with pytest.raises(ValueError, match="do not match the probe"):
        estimate_aberrations(data.frames[:, :16, :16], data.positions, _nominal(), PIXEL, ENERGY)
    with pytest.raises(ValueError, match="positions for"):
        estimate_aberrations(data.frames, data.positions[:5], _nominal(), PIXEL, ENERGY)
    with pytest.raises(ValueError, match="at least 9 positions"):
        estimate_aberrations(data.frames[:4], data.positions[:4], _nominal(), PIXEL, ENERGY)
    with pytest.raises(ValueError, match="one \\(M, M\\) probe"):
        BrightFieldModel(data.frames, data.positions, np.stack([_nominal()] * 2), PIXEL, ENERGY)
    with pytest.raises(ValueError, match="at least one aberration"):
        estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, names=())


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    a, b = to_numpy(a).ravel(), to_numpy(b).ravel()
    return float(abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_prepare_corrects_a_probe_model_but_not_a_given_probe() -> None:
    data = _dataset(1e5, ERRORS, seed=3, grid=14)
    nominal = _nominal()
    corrected = prepare(data, {"iterations": 1}).probe
    off = prepare(data, {"iterations": 1, "parallax": False}).probe
    assert _overlap(off, data.truth_probe) == pytest.approx(_overlap(nominal, data.truth_probe), abs=1e-4)
    assert _overlap(corrected, data.truth_probe) > 0.99 > _overlap(off, data.truth_probe)
    # a measured probe in the file is taken as it is, unless parallax is asked for
    given = dataclasses.replace(data, probe=nominal.astype(np.complex64), probe_model=None)
    assert _overlap(prepare(given, {"iterations": 1}).probe, nominal) > 0.9999
    forced = prepare(given, {"iterations": 1, "parallax": True}).probe
    assert _overlap(forced, data.truth_probe) > 0.99


def test_cli_reconstruct_corrects_the_nominal_probe_of_a_simulated_scan(tmp_path) -> None:
    """Through the console: `cryoptycho simulate` with 30 nm of defocus and 10 nm of
    astigmatism off (high dose, so the fit is sharp), then `cryoptycho reconstruct` with the
    defaults saves a probe much closer to /truth/probe than the nominal one; with
    ``--set parallax=false`` the nominal probe stays."""
    import os
    import subprocess
    import sys

    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.daemon.storage.result import read_result

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True,
                              text=True, env=os.environ.copy(), timeout=300, check=False)

    ds = tmp_path / "scan.h5"
    out = cli("simulate", "--frame-size", "48", "--detector", "ideal", "--thin", "--dose", "2000",
              "--defocus-error", "30", "--astigmatism", "10", "-o", str(ds))
    assert out.returncode == 0, out.stderr
    data = read_dataset(ds)
    overlaps = {}
    for name, extra in (("default", []), ("off", ["--set", "parallax=false"])):
        res = tmp_path / f"{name}.h5"
        out = cli("reconstruct", str(ds), "-o", str(res), "-n", "1", "--no-export", "-q", *extra)
        assert out.returncode == 0, out.stderr
        overlaps[name] = _overlap(read_result(res).state.probe, data.truth_probe)
    assert overlaps["off"] < 0.9 and overlaps["default"] > 0.98, overlaps


def test_a_scan_too_small_for_the_fit_keeps_the_nominal_probe_under_auto(caplog) -> None:
    data = _dataset(1e5, ERRORS, seed=4, grid=2)  # 4 positions
    with caplog.at_level("WARNING", logger="cryoptycho.gpu.reconstruct"):
        probe = prepare(data, {"iterations": 1}).probe
    assert "parallax fit skipped" in caplog.text and "at least 9 positions" in caplog.text
    assert _overlap(probe, _nominal()) > 0.9999
    with pytest.raises(ValueError, match="parallax: .*at least 9 positions"):
        prepare(data, {"iterations": 1, "parallax": True})


def test_auto_keeps_an_exact_nominal_probe_when_the_fit_is_not_significant() -> None:
    """Frames recorded with the nominal probe itself at a cryo dose: the fit moves a few nm by
    noise alone; "auto" keeps the nominal probe (the data do not reject it at
    ``parallax_confidence``), confidence 0 applies the noisy fit."""
    data = _dataset(300, {}, seed=5, grid=14)
    fit = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY)
    assert max(abs(v) for v in fit.coefficients.values()) > 2e-9  # noise moved it
    assert not fit.rejects_nominal(0.95) and fit.rejects_nominal(0.0)
    kept = prepare(data, {"iterations": 1}).probe
    applied = prepare(data, {"iterations": 1, "parallax_confidence": 0.0}).probe
    assert _overlap(kept, _nominal()) > 0.99999
    assert _overlap(applied, _nominal()) < _overlap(kept, _nominal()) - 1e-4


@pytest.mark.subprocess
def test_reconstruct_result_file_records_the_probe_estimate(tmp_path) -> None:
    """Through the console scripts: ``simulate --realistic`` (a probe model 40 nm off in
    defocus) → ``reconstruct`` → the result file holds the fit's coefficients, their errors,
    its significance against the threshold, whether it was applied, and the nominal probe
    beside the used one; with ``parallax=false`` none of it."""
    import subprocess

    import h5py
    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.daemon.storage.result import read_result

    def cli(*args: str) -> None:
        out = subprocess.run(["cryoptycho", *args], capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr

    ds = tmp_path / "real.h5"
    cli("simulate", "--realistic", "--frame-size", "32", "--detector", "ideal", "--thin", "--dose", "200",
        "--overlap", "0.4", "--defocus-error", "40", "--astigmatism", "0", "-o", str(ds))
    data = read_dataset(ds)
    pm = data.probe_model
    nominal = make_probe(pm.kind, data.frame_shape, data.real_pixel_size, data.energy, pm.semiangle, pm.defocus,
                         pm.cs, 1.0, pm.zones, pm.diameter, pm.seed, precision="double")
    res = tmp_path / "res.h5"
    cli("reconstruct", str(ds), "-o", str(res), "-n", "2", "--no-export", "-q")
    with h5py.File(res) as f:
        extra = dict(f["extra"].attrs)
        saved_nominal, used = f["nominal_probe"][()], f["probe"][()]
    found = {k: extra[f"parallax_{k}_m"] for k in ("C10", "C12a", "C12b")}
    assert abs(found["C10"] - 40e-9) < 15e-9, found  # the defocus error, found from the data
    assert all(extra[f"parallax_{k}_se_m"] > 0 for k in found)
    assert extra["parallax_applied"] == 1
    assert extra["parallax_significance"] > extra["parallax_threshold"] > 0
    assert extra["parallax_frames"] == len(data.positions)
    # the nominal probe is the probe model's; the used one is it corrected by the coefficients
    assert _overlap(saved_nominal, nominal) == pytest.approx(1.0, abs=1e-5)
    corrected = aberrate(nominal, data.real_pixel_size, data.energy, found)
    assert _overlap(used, corrected) == pytest.approx(1.0, abs=1e-5)
    assert _overlap(used, nominal) < 0.9
    assert np.sum(np.abs(saved_nominal) ** 2) == pytest.approx(np.sum(np.abs(used) ** 2), rel=1e-4)
    state = read_result(res).state  # the reader gives them back
    assert state.probe_estimate["parallax_C10_m"] == pytest.approx(found["C10"])
    assert state.nominal_probe.shape == used.shape

    off = tmp_path / "off.h5"
    cli("reconstruct", str(ds), "-o", str(off), "-n", "2", "--no-export", "-q", "--set", "parallax=false")
    with h5py.File(off) as f:
        assert "nominal_probe" not in f
        assert not any(k.startswith("parallax_") for k in (f["extra"].attrs if "extra" in f else {}))


def test_a_cancelled_fit_stops() -> None:
    import threading

    from cryoptycho.gpu.parallax import FitCancelled

    data = _dataset(300.0, ERRORS)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(FitCancelled):
        estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, cancel=cancel)


def test_a_warm_start_finds_the_cold_fit_with_fewer_trials() -> None:
    """``start`` (an earlier, rougher estimate, as the live engine's early fit gives the refit)
    skips the grids: the same estimate from fewer trial probes."""
    data = _dataset(3000.0, ERRORS, seed=2)
    cold = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY)
    rough = {k: v + 6e-9 for k, v in cold.coefficients.items()}
    warm = estimate_aberrations(data.frames, data.positions, _nominal(), PIXEL, ENERGY, start=rough)
    for k in ERRORS:
        assert warm.coefficients[k] == pytest.approx(cold.coefficients[k], abs=1e-9), k
    assert warm.evaluations < 0.75 * cold.evaluations
