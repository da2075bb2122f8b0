"""Virtual microscope physics: potentials, ice, hydrogens, detector, CTF and phase plate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.constants as sc
from cryoptycho.gpu.geometry import interaction_constant, wavelength
from cryoptycho.gpu.sim.cryoem import image_intensity, transfer_function
from cryoptycho.gpu.sim.detector import DetectorModel, record
from cryoptycho.gpu.sim.elements import POTENTIAL_PREFACTOR_V_A2, fe0
from cryoptycho.gpu.sim.potential import Grid, Specimen, projected_maps, water_mean_inner_potential
from cryoptycho.gpu.sim.specimen import AtomicModel, load_model

ENERGY = 300e3


def atoms(elements: list[str], positions_a: list[tuple[float, float, float]], h: float = 0.0) -> AtomicModel:
    n = len(elements)
    return AtomicModel(
        positions=np.asarray(positions_a, dtype=np.float64) * 1e-10,
        elements=np.asarray(elements),
        occupancy=np.ones(n),
        hydrogens=np.full(n, h),
        volume=np.full(n, 20e-30),
    )


def test_prefactor_is_h2_over_2pi_m0_e() -> None:
    assert POTENTIAL_PREFACTOR_V_A2 == pytest.approx(sc.h**2 / (2 * np.pi * sc.m_e * sc.e) * 1e20, rel=1e-6)


@pytest.mark.parametrize(("element", "fe0_published"), [("H", 0.5292), ("C", 2.5097), ("O", 2.0291), ("Fe", 7.1635)])
def test_single_atom_integrates_to_its_scattering_factor(xp, element: str, fe0_published: float) -> None:
    # f_e(0) = 2 Σ a_i of Lobato & Van Dyck (2014), Table 1 (H: the Bohr radius, 0.529 Å)
    assert fe0(element) == pytest.approx(fe0_published, rel=1e-4)
    grid = Grid((64, 64), 0.5e-10, (-16e-10, -16e-10))
    pot, _ = projected_maps(atoms([element], [(0.0, 0.3, -1.7)]), grid, xp=xp)
    integral_v_a3 = float(pot.sum()) * 1e10 * (0.5**2)  # V·m → V·Å, × pixel area Å²
    assert integral_v_a3 == pytest.approx(POTENTIAL_PREFACTOR_V_A2 * fe0_published, rel=1e-3)
    # the potential peaks at the atom (sub-pixel position honoured)
    peak = np.unravel_index(int(np.argmax(np.asarray(pot.get() if hasattr(pot, "get") else pot))), pot.shape)
    assert peak == (round((0.3 + 16) / 0.5), round((-1.7 + 16) / 0.5))


def test_riding_hydrogens_add_to_the_potential_like_hydrogen_atoms() -> None:
    grid = Grid((48, 48), 0.5e-10, (-12e-10, -12e-10))
    with_h, _ = projected_maps(atoms(["C"], [(0, 0, 0)], h=3.0), grid)
    explicit, _ = projected_maps(atoms(["C", "H", "H", "H"], [(0, 0, 0)] * 4), grid)
    assert np.allclose(with_h, explicit, rtol=1e-9, atol=1e-20)


def test_hemoglobin_hydrogens() -> None:
    model = load_model("hemoglobin")
    assert len(model) == 4558  # 4HHB without its 221 waters
    # the structures README estimates 4,502 H from the composition
    assert model.hydrogens.sum() == pytest.approx(4502, rel=0.05)
    heavy = sum(fe0(e) for e in model.elements)
    share = model.hydrogens.sum() * fe0("H") / (heavy + model.hydrogens.sum() * fe0("H"))
    assert 0.15 < share < 0.25
    assert np.all(model.hydrogens[model.elements == "Fe"] == 0)


def test_ice_layer_phase_and_absorption() -> None:
    t = 50e-9
    grid = Grid((16, 16), 1e-10, (0.0, 0.0))
    empty = AtomicModel(np.zeros((0, 3)), np.zeros(0, dtype="<U2"), np.zeros(0), np.zeros(0), np.zeros(0))
    spec = Specimen(empty, ice_thickness=t, ice_imfp=350e-9)
    trans = spec.transmission(grid, ENERGY)
    phase = interaction_constant(ENERGY) * spec.ice_mip * t
    assert np.allclose(np.angle(trans), phase, atol=1e-6)
    assert np.allclose(np.abs(trans), np.exp(-t / (2 * 350e-9)), rtol=1e-6)
    # the paper's ≈ 1.2–1.5 rad for 50 nm at 300 keV (our U is from the same neutral atoms)
    assert 1.2 < phase < 1.55
    assert water_mean_inner_potential() == pytest.approx(4.64, abs=0.05)
    with pytest.raises(ValueError, match="thinner than the particle"):
        Specimen(atoms(["C", "C"], [(0, 0, 0), (100, 0, 0)]), ice_thickness=5e-9)


def test_hemoglobin_phase_above_ice() -> None:
    model = load_model("hemoglobin").centred()
    grid = Grid((112, 112), 1e-10, (-56e-10, -56e-10))
    trans = Specimen(model).transmission(grid, ENERGY)
    ice = np.angle(trans[0, 0])
    above = np.angle(trans * np.exp(-1j * ice))
    # research notes: ≈ 0.35 rad peak at 1 Å sampling
    assert 0.25 < above.max() < 0.45


def test_detector_noise_is_poisson_and_dose_preserving() -> None:
    rng = np.random.default_rng(0)
    lam = np.full((400, 32, 32), 2.5)
    for det in (None, DetectorModel(binning=16), DetectorModel(binning=1)):
        counts = record(lam, det, rng)
        assert counts.dtype.kind in "iu"
        assert counts.mean() == pytest.approx(2.5, rel=0.01)
        assert counts.var() == pytest.approx(2.5, rel=0.03)


def test_k2_transfer_functions() -> None:
    det = DetectorModel()
    assert det.mtf(np.array(1.0)) == pytest.approx(2 / np.pi)  # sinc(π/2) at Nyquist
    assert det.dqe(np.array(0.0)) == pytest.approx(0.77)
    assert det.dqe(np.array(1.0)) == pytest.approx(0.77 * 4 / np.pi**2)
    # binned 16×, the frame's Nyquist is 1/16 of the native one: DQE within 0.4 % of DQE(0)
    assert det.dqe(np.array(2 * 0.5 / 16)) / det.dqe0 > 0.996
    with pytest.raises(ValueError, match="binning"):
        DetectorModel(binning=0)


def _grating(n: int, period_px: int, phi: float) -> np.ndarray:
    x = np.arange(n)[None, :]
    return np.exp(1j * phi * np.cos(2 * np.pi * x / period_px)) * np.ones((n, 1))


def test_ctf_zeros_at_the_analytic_frequencies() -> None:
    n, px = 128, 1e-10
    lam = wavelength(ENERGY)
    period = 8  # px → q = 1/(8 Å)
    q = 1 / (period * px)
    phi = 0.02
    # χ = πλΔf q² = π (first zero of sin χ) ↔ Δf = 1/(λ q²); χ = π/2 ↔ half that defocus
    wave = _grating(n, period, phi)
    idx = n // period
    for defocus, expected in ((1 / (lam * q * q), 0.0), (0.5 / (lam * q * q), 2 * phi)):
        img = image_intensity(wave, transfer_function((n, n), px, ENERGY, defocus, 0.0))
        amplitude = 2 * abs(np.fft.fft2(img)[0, idx]) / img.size
        assert amplitude == pytest.approx(expected, abs=2e-3 * phi + 1e-6)


def test_phase_plate_shifts_the_scattered_wave_by_a_quarter_wave() -> None:
    n, px = 64, 1e-10
    rng = np.random.default_rng(1)
    phi = 0.01 * rng.standard_normal((n, n))
    phi -= phi.mean()
    img = image_intensity(np.exp(1j * phi), transfer_function((n, n), px, ENERGY, 0.0, 0.0, phase_plate=True))
    # weak phase φ: |i + iφ|² = 1 + 2φ: the phase appears linearly in the intensity
    slope = np.polyfit(phi.ravel(), img.ravel() - img.mean(), 1)[0]
    assert slope == pytest.approx(2.0, rel=0.02)
    # without the plate, in focus, a weak phase object is invisible (to first order)
    plain = image_intensity(np.exp(1j * phi), transfer_function((n, n), px, ENERGY, 0.0, 0.0))
    assert np.std(plain) < 0.02 * np.std(img)
