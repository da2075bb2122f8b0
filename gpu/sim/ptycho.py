"""Simulated low-dose ptychography: specimen → multislice exit waves → detector counts.

Defaults are chosen for a fast demo on 2 CPU cores (hemoglobin, 64×64 frames, ≈ 300
positions, well under a minute): 300 keV, α = 9.2 mrad probes (paper), real-space pixel 0.8 Å
(the aperture then fills 75 % of the detector half-width, leaving room for the scattered
signal), 75 % probe-area overlap, 50 nm of vitreous ice, K2-class detector binned 16×.

Geometry: the particle is centred at the origin; positions are probe centres (y, x) in metres
covering the particle plus ``margin`` on every side. The ground-truth object is the projected
(thin-object) transmission on a canvas that holds every probe window (``fit_geometry``), and
the truth probe is the probe in the particle's middle plane — the plane a single-slice
reconstruction sees. Multislice propagates the probe from the particle's entrance to its exit
through slices of ``slice_thickness``; far-field intensities do not depend on the plane the
exit wave is referred to, so frames are consistent with that truth.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import array_module, complex_dtype, fft2, get_xp, ifft2, to_numpy
from ..data import ProbeModel, PtychoData
from ..geometry import ScanGeometry, fit_geometry, wavelength
from ..operators import extract, from_fft_order, make_batch, shifted_probes
from ..probes import make_probe
from .detector import DetectorModel, get_detector, record
from .errors import ExperimentErrors
from .potential import Grid, SlicedSpecimen, Specimen
from .scan import ScanKind, scan_positions, step_for_overlap
from .specimen import AtomicModel, load_model

DEFAULT_PIXEL_SIZE = 0.8e-10
DEFAULT_SEMIANGLE = 9.2e-3
_BATCH = 128


def fresnel_propagator(shape: tuple[int, int], pixel_size: float, energy: float, dz: float, xp: ModuleType) -> Any:
    """exp(−iπλΔz q²) on the FFT-ordered grid, band-limited to the inscribed Nyquist circle
    (frequencies in the corners alias under the transmission products)."""
    lam = wavelength(energy)
    qy = xp.fft.fftfreq(shape[0], pixel_size)[:, None]
    qx = xp.fft.fftfreq(shape[1], pixel_size)[None, :]
    q2 = qy * qy + qx * qx
    limit = (0.5 / pixel_size) ** 2
    return xp.exp(-1j * np.pi * lam * dz * q2) * (q2 <= limit)


def exit_wave_intensities(
    sliced: SlicedSpecimen,
    probe: Any,
    geometry: ScanGeometry,
    positions: np.ndarray,
    energy: float,
    multislice: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Expected far-field intensities (K, M, M), *FFT order*, for each position. A probe of
    incoherent modes (P, M, M) gives the sum of the modes' intensities."""
    if probe.ndim == 3:
        total = None
        for i in range(probe.shape[0]):
            part = exit_wave_intensities(sliced, probe[i], geometry, positions, energy, multislice,
                                         progress if i == probe.shape[0] - 1 else None)
            total = part if total is None else total + part
        return total
    xp = array_module(probe)
    m = probe.shape
    pix = geometry.to_pixels(positions)
    n_slices = sliced.slices.shape[0]
    dz = sliced.thickness
    thin = sliced.projected() if not multislice or n_slices == 1 else None
    if thin is None:
        prop = fresnel_propagator(m, geometry.pixel_size, energy, dz, xp).astype(probe.dtype)
        # the probe is given in the middle plane of the particle: start half a slab earlier
        back = fresnel_propagator(m, geometry.pixel_size, energy, -0.5 * dz * (n_slices - 1), xp)
        probe = ifft2(fft2(probe) * back.astype(probe.dtype)) * sliced.ice_factor
    out = xp.empty((len(positions),) + m, dtype=np.float32)
    for start in range(0, len(positions), _BATCH):
        stop = min(start + _BATCH, len(positions))
        batch = make_batch(xp.asarray(pix[start:stop]), geometry.object_shape, m)
        probes = shifted_probes(probe, batch)
        wave = probes[batch.group] if probes.shape[0] > 1 else xp.broadcast_to(probes, (batch.size,) + m)
        if thin is not None:
            wave = wave * extract(thin, batch)
        else:
            for s in range(n_slices):
                wave = wave * extract(sliced.slices[s], batch)
                if s < n_slices - 1:
                    wave = ifft2(fft2(wave) * prop)
        out[start:stop] = xp.abs(fft2(wave)) ** 2
        if progress is not None:
            progress(stop - start)
    return out


def fitting_defocus(probe: str, frame_size: int, pixel_size: float, semiangle: float) -> float:
    """The paper's defocus (400 nm defocused, 600 nm FZP), reduced where needed so that the
    defocused disc (diameter 2αΔf) spans at most half the window and does not wrap around it."""
    paper = {"defocused": 400e-9, "fzp": 600e-9}[probe]
    return float(min(paper, 0.5 * frame_size * pixel_size / (2.0 * semiangle)))


def simulate_ptychography(
    sample: str | os.PathLike[str] | AtomicModel = "hemoglobin",
    dose: float = 20.0,
    probe: str = "randomized",
    frame_size: int = 64,
    pixel_size: float = DEFAULT_PIXEL_SIZE,
    overlap: float = 0.75,
    scan: ScanKind = "raster",
    ice_thickness: float = 50e-9,
    energy: float = 300e3,
    detector: str | DetectorModel | None = "k2",
    seed: int = 0,
    semiangle: float = DEFAULT_SEMIANGLE,
    defocus: float | None = None,
    multislice: bool = True,
    slice_thickness: float = 2e-9,
    margin: float = 1e-9,
    random_orientation: bool = False,
    hydrogens: bool = True,
    noise: bool = True,
    backend: str = "numpy",
    probe_seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    errors: ExperimentErrors | None = None,
) -> PtychoData:
    """Simulate one ptychographic scan of ``sample`` at ``dose`` e⁻/Å².

    ``sample``: a name (hemoglobin, proteasome, ribosome30s, ribosome), a PDB/mmCIF path or an
    :class:`AtomicModel`. ``probe``: defocused | fzp | randomized. ``noise=False`` returns the
    expected intensities (float32) instead of counts. ``seed`` drives the noise, a random scan
    and orientation, and (unless ``probe_seed`` is given) the randomized probe's phase plate.
    ``progress(done, total)`` is called as positions are simulated. ``errors``: a realistic
    experiment (gpu/sim/errors.py) — frames are recorded with the aberrated true probe at the
    distorted true positions, while the dataset's ``probe_model`` and ``positions`` stay the
    nominal ones; the truth is in ``truth_probe`` and ``truth_positions``."""
    if not dose > 0 or not np.isfinite(dose):
        raise ValueError(f"dose must be a positive number of e⁻/Å², got {dose!r}")
    if frame_size < 8:
        raise ValueError(f"frame_size must be ≥ 8 pixels, got {frame_size!r}")
    xp = get_xp(backend)
    rng = np.random.default_rng(seed)
    model = sample if isinstance(sample, AtomicModel) else load_model(sample, hydrogens=hydrogens)
    model = model.centred()
    if random_orientation:
        model = model.randomly_oriented(rng).centred()
    specimen = Specimen(model, ice_thickness=ice_thickness)
    det = get_detector(detector)
    p_seed = seed if probe_seed is None else probe_seed

    shape = (frame_size, frame_size)
    if defocus is None and probe in ("defocused", "fzp"):
        defocus = fitting_defocus(probe, frame_size, pixel_size, semiangle)
    unit_probe = make_probe(
        probe, shape, pixel_size, energy, semiangle=semiangle, defocus=defocus, seed=p_seed,  # type: ignore[arg-type]
        xp=xp, precision="double",
    )
    step = step_for_overlap(unit_probe, pixel_size, overlap)
    extent = np.maximum(model.extent[1:], 0.0) + 2.0 * margin
    positions = scan_positions(scan, (float(extent[0]), float(extent[1])), step, rng)
    true_positions = positions
    if errors is not None and errors.any:
        true_positions = errors.true_positions(positions)
        unit_true = errors.true_modes(unit_probe, pixel_size, energy)
    else:
        unit_true = unit_probe
    area_per_position = float(extent[0] * extent[1]) / len(positions)
    if scan == "raster":
        area_per_position = step * step
    counts_per_pattern = dose * 1e20 * area_per_position
    truth_probe = unit_true * np.sqrt(counts_per_pattern)

    geometry = fit_geometry(np.vstack([positions, true_positions]), pixel_size, shape, margin_px=2)
    # the canvas holds the particle plus margin plus half a window on every side, so the
    # periodic potential never wraps an atom across it
    grid = Grid(geometry.object_shape, pixel_size, geometry.origin)
    sliced = specimen.sliced(grid, energy, slice_thickness, xp=xp, precision="single")
    total = len(positions)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    expected = exit_wave_intensities(
        sliced, truth_probe.astype(complex_dtype("single")), geometry, true_positions, energy,
        multislice, tick,
    )
    frames_fft = expected if not noise else record(expected, det, rng)
    frames = to_numpy(from_fft_order(frames_fft))
    if noise:
        frames = frames.astype(np.uint16 if frames.max() < 2**16 else np.uint32)
    meta = {
        "simulated": True,
        "sample": model.name,
        "dose_e_per_A2": dose,
        "probe": probe,
        "overlap": overlap,
        "scan": scan,
        "step_m": step,
        "counts_per_pattern": counts_per_pattern,
        "ice_thickness_m": ice_thickness,
        "ice_mip_V": specimen.ice_mip,
        "ice_imfp_m": specimen.ice_imfp,
        "detector": getattr(det, "name", "ideal"),
        "detector_binning": getattr(det, "binning", 1),
        "multislice": multislice,
        "slice_thickness_m": slice_thickness,
        "n_slices": int(sliced.slices.shape[0]),
        "hydrogens": hydrogens,
        "random_orientation": random_orientation,
        "noise": noise,
        "seed": seed,
    }
    if errors is not None and errors.any:
        meta["errors"] = errors.to_dict()
    return PtychoData(
        frames=frames,
        positions=positions,
        energy=energy,
        pixel_size=pixel_size,
        probe_model=ProbeModel(kind=probe, semiangle=semiangle, defocus=defocus, seed=p_seed),
        truth_object=to_numpy(sliced.projected()).astype(np.complex64),
        truth_probe=to_numpy(truth_probe).astype(np.complex64),
        truth_origin=geometry.origin,
        truth_positions=None if true_positions is positions else true_positions,
        metadata=meta,
    )
