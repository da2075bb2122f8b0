"""Simulated ptychography: dose calibration, scans, geometry, reproducibility, file round trip."""

from __future__ import annotations

import numpy as np
import pytest
from cryoptycho.daemon.storage.dataset import read_dataset, write_dataset
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.operators import exit_waves, make_batch
from cryoptycho.gpu.probes import make_probe, probe_area_mask
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.scan import disc_overlap, scan_positions, step_for_overlap
from cryoptycho.gpu.sim.specimen import AtomicModel
from sim_helpers import hemoglobin_fragment

PX = 1.6e-10
SMALL = {"frame_size": 32, "pixel_size": PX, "semiangle": 4.6e-3, "margin": 0.5e-9}


@pytest.fixture(scope="module")
def fragment() -> AtomicModel:
    return hemoglobin_fragment(1e-9)


def test_noiseless_counts_match_the_dose(fragment: AtomicModel) -> None:
    dose = 50.0
    data = simulate_ptychography(
        fragment, dose=dose, ice_thickness=0.0, noise=False, detector=None, **SMALL,
    )
    step = data.metadata["step_m"]
    target = dose * 1e20 * step**2  # e⁻ per pattern = dose × area per position (raster)
    assert data.metadata["counts_per_pattern"] == pytest.approx(target)
    assert data.frames.sum(axis=(1, 2)).mean() == pytest.approx(target, rel=0.01)


def test_ice_absorbs_and_counts_are_poisson(fragment: AtomicModel) -> None:
    kw = dict(dose=200.0, seed=3, detector="k2", **SMALL)
    expected = simulate_ptychography(fragment, noise=False, **kw)
    counts = simulate_ptychography(fragment, noise=True, **kw)
    assert counts.frames.dtype.kind == "u"
    ratio = expected.frames.sum(axis=(1, 2)).mean() / expected.metadata["counts_per_pattern"]
    assert ratio == pytest.approx(np.exp(-50e-9 / 350e-9), rel=0.01)  # e^{−t/Λ}
    # Poisson: (counts − mean)² averages to the mean
    e = expected.frames.astype(np.float64)
    resid = (counts.frames - e) ** 2
    assert resid.sum() / e.sum() == pytest.approx(1.0, rel=0.05)


def test_frames_follow_the_engine_forward_model_for_a_thin_object(fragment: AtomicModel) -> None:
    data = simulate_ptychography(fragment, dose=20.0, noise=False, multislice=False, **SMALL)
    geometry = fit_geometry(data.positions, PX, data.frame_shape)
    assert geometry.origin == pytest.approx(data.truth_origin)
    batch = make_batch(geometry.to_pixels(data.positions[:3]), geometry.object_shape, data.frame_shape)
    waves, _, _ = exit_waves(data.truth_object, data.truth_probe, batch)  # sub-pixel shifts too
    far = np.fft.fftshift(np.abs(np.fft.fft2(waves, norm="ortho")) ** 2, axes=(-2, -1))
    assert np.allclose(far, data.frames[:3], rtol=1e-3, atol=1e-3 * far.max())


def test_multislice_differs_little_from_projection_for_a_thin_particle(fragment: AtomicModel) -> None:
    a = simulate_ptychography(fragment, dose=20.0, noise=False, multislice=True, slice_thickness=0.5e-9, **SMALL)
    b = simulate_ptychography(fragment, dose=20.0, noise=False, multislice=False, **SMALL)
    assert a.metadata["n_slices"] >= 3
    rel = np.abs(a.frames - b.frames).sum() / b.frames.sum()
    assert 0 < rel < 0.05


def test_seeded_simulations_reproduce(fragment: AtomicModel) -> None:
    a = simulate_ptychography(fragment, dose=5.0, seed=1, **SMALL)
    b = simulate_ptychography(fragment, dose=5.0, seed=1, **SMALL)
    c = simulate_ptychography(fragment, dose=5.0, seed=2, **SMALL)
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_dataset_file_round_trip(tmp_path, fragment: AtomicModel) -> None:
    data = simulate_ptychography(fragment, dose=5.0, **SMALL)
    back = read_dataset(write_dataset(tmp_path / "sim.h5", data))
    assert np.array_equal(back.frames, data.frames)
    assert back.truth_origin == pytest.approx(data.truth_origin)
    assert np.allclose(back.truth_object, data.truth_object)
    assert back.probe_model is not None and back.probe_model.kind == "randomized"
    assert back.metadata["dose_e_per_A2"] == 5.0


def test_disc_overlap_and_step() -> None:
    assert disc_overlap(0.0) == pytest.approx(1.0)
    assert disc_overlap(1.0) == pytest.approx(0.0)
    probe = make_probe("defocused", (64, 64), 1e-10, semiangle=9e-3, defocus=150e-9)
    step = step_for_overlap(probe, 1e-10, 0.75)
    # the real probe-area mask shifted by that step keeps ≈ 75 % of its area
    mask = np.asarray(probe_area_mask(probe))
    shift = round(step / 1e-10)
    kept = (mask & np.roll(mask, shift, axis=1)).sum() / mask.sum()
    assert kept == pytest.approx(0.75, abs=0.05)
    with pytest.raises(ValueError, match="overlap"):
        step_for_overlap(probe, 1e-10, 1.2)


@pytest.mark.parametrize("kind", ["raster", "spiral", "random"])
def test_scans_give_one_position_per_step_squared(kind: str) -> None:
    pos = scan_positions(kind, (40e-10, 60e-10), 4e-10, np.random.default_rng(0))  # type: ignore[arg-type]
    assert len(pos) == pytest.approx(40 * 60 / 16, rel=0.1)
    assert np.all(np.abs(pos[:, 0]) <= 20e-10 + 1e-15) and np.all(np.abs(pos[:, 1]) <= 30e-10 + 1e-15)
    with pytest.raises(ValueError, match="scan"):
        scan_positions("zigzag", (1e-9, 1e-9), 1e-10)  # type: ignore[arg-type]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="dose"):
        simulate_ptychography(dose=-1)
    with pytest.raises(ValueError, match="unknown sample"):
        simulate_ptychography(sample="unobtainium")
