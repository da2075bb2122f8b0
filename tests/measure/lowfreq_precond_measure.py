"""Measurements behind gpu/MEASUREMENTS.md, "Low frequencies per band, and a Fourier
preconditioner" (not a test; run by hand):

    CRYOPTYCHO_STRUCTURES=/work/shared/data/structures \\
        python tests/measure/lowfreq_precond_measure.py --sample ribosome --dose 20 [--boosts 1,10,10w] [--seed 1]

The `lowfreq_measure.py` geometry (thin object, 48×48 frames, 1.6 Å pixels, 5 mrad randomized
probe, probe seed 0, noise and start seed ``--seed``), oracle probe and positions, μ₀ auto,
the same random start. For each preconditioner (``lowfreq_boost`` 1 = diagonal; a boost
written ``10w``: the first version, which boosted the whole complex gradient — amplitude
too — instead of the phase only) one CG run of
``--iterations``; the object is scored at the listed iterations of that same run (CG's
iterates do not depend on the iteration limit): phase correlation, phase NRMSE, complex NRMSE,
pooled 1-bit FRC, and per frequency band the FRC and the relative spectral error of the phase
‖F[w(φ − φ_true)]‖² / ‖F[w φ_true]‖² in the band (w: the particle's soft mask).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
from cryoptycho.gpu import reconstruct as rc
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.metrics import (
    fourier_shift,
    ice_phase_removed,
    particle_footprint,
    remove_phase_ramp,
    soft_mask,
    tukey_window,
)
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.sim.evaluation import (
    evaluate_against_truth,
    quantum_limit,
    resample,
    scanned_box,
)
from cryoptycho.gpu.sim.ptycho import simulate_ptychography

#: band edges in Å (features larger than the first edge = the lowest band)
BANDS_A = (80.0, 40.0, 20.0, 10.0, 5.0)


def band_errors(recon: np.ndarray, origin: tuple[float, float], data, ev) -> list[float]:
    """Relative spectral error of the phase per band, after the registration and phase-ramp
    removal `evaluate_against_truth` applied (its shift and ramp are reused)."""
    px = data.real_pixel_size
    sy, sx = scanned_box(data.positions, data.truth_origin, px, data.truth_object.shape)
    t = np.asarray(data.truth_object)[sy, sx].astype(np.complex128)
    box = (data.truth_origin[0] + sy.start * px, data.truth_origin[1] + sx.start * px)
    r = resample(np.asarray(recon).astype(np.complex128), origin, px, box, t.shape)
    fp = particle_footprint(ice_phase_removed(t))
    if ev.shift_px != (0.0, 0.0):
        r = fourier_shift(r, ev.shift_px)
    r = remove_phase_ramp(r, ev.ramp_rad_per_px)
    w = soft_mask(fp, 2.0) * tukey_window(t.shape, 0.05)
    err = np.abs(np.fft.fft2((ice_phase_removed(r, fp) - ice_phase_removed(t, fp)) * w)) ** 2
    ref = np.abs(np.fft.fft2(ice_phase_removed(t, fp) * w)) ** 2
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(t.shape[0], px * 1e10), np.fft.fftfreq(t.shape[1], px * 1e10),
                              indexing="ij"))
    edges = [0.0, *(1.0 / b for b in BANDS_A), np.inf]
    out = []
    for lo, hi in itertools.pairwise(edges):
        sel = (q >= lo) & (q < hi)
        out.append(float(err[sel].sum() / max(ref[sel].sum(), 1e-300)))
    return out


def band_frc(ev) -> list[float]:
    f = np.asarray(ev.frc_particle.freq) * 1e-10
    c = np.asarray(ev.frc_particle.frc)
    edges = [0.0, *(1.0 / b for b in BANDS_A), np.inf]
    return [float(np.mean(c[(f >= lo) & (f < hi) & (f > 0)])) if np.any((f >= lo) & (f < hi) & (f > 0))
            else float("nan") for lo, hi in itertools.pairwise(edges)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", default="ribosome")
    ap.add_argument("--dose", type=float, default=20.0)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--at", default="10,20,40,60")
    ap.add_argument("--boosts", default="1,10,10w")
    ap.add_argument("--seed", type=int, default=0, help="noise and random start seed (the probe's stays 0)")
    ap.add_argument("--paper-geometry", action="store_true",
                    help="bench paper's geometry: 64×64 frames, 0.8 Å pixels, its default aperture, multislice")
    ap.add_argument("--json")
    args = ap.parse_args()
    at = sorted({int(a) for a in args.at.split(",")})
    if args.paper_geometry:
        data = simulate_ptychography(args.sample, dose=args.dose, seed=args.seed, probe_seed=0)
    else:
        data = simulate_ptychography(args.sample, dose=args.dose, seed=args.seed, probe_seed=0, frame_size=48,
                                     pixel_size=1.6e-10, multislice=False, semiangle=5e-3)
    print(f"{args.sample} {args.dose:g} e⁻/Å²: {len(data.frames)} positions", flush=True)
    real_minimize = rc.minimize
    real_precond = rc.LowFrequencyPreconditioner

    def whole(diag, q_c, boost, reference=None):  # type: ignore[no-untyped-def]
        return real_precond(diag, q_c, boost)  # no reference: the whole complex gradient is filtered

    rows = []
    for token in args.boosts.split(","):
        boost = float(token.rstrip("w"))
        rc.LowFrequencyPreconditioner = whole if token.endswith("w") else real_precond
        snaps: dict[int, np.ndarray] = {}

        def spy(fun, x, n, left, callback, *a, snaps=snaps, **kw):  # type: ignore[no-untyped-def]
            def cb(i, xx, loss):  # type: ignore[no-untyped-def]
                if i + 1 in at:
                    snaps[i + 1] = to_numpy(xx["object"]).copy()
                return callback(i, xx, loss)
            return real_minimize(fun, x, n, left, cb, *a, **kw)

        rc.minimize = spy
        # the oracle: the simulation's exact probe, never corrected by the parallax fit (as bench paper)
        opts = ReconOptions(iterations=args.iterations, refine_probe=False, lowfreq_boost=boost, parallax=False,
                            seed=args.seed)
        t0 = time.perf_counter()
        p = rc.prepare(data, opts)
        counts = rc.counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)
        obj, _, losses = rc.refine_full_batch(p.object, p.probe, p.counts_fft, p.batch, p.mask,
                                              opts.with_mu0_decision(counts), args.iterations,
                                              kappa=p.kappa, probe_power=p.probe_power)
        seconds = time.perf_counter() - t0
        rc.minimize = real_minimize
        rc.LowFrequencyPreconditioner = real_precond
        snaps.setdefault(len(losses), to_numpy(obj))
        for k in sorted(snaps):
            ev = evaluate_against_truth(snaps[k], p.geometry.origin, data.truth_object, data.truth_origin,
                                        data.real_pixel_size, data.positions)
            row = {"boost": token, "seed": args.seed, "mu0": opts.with_mu0_decision(counts).mu0, "iteration": k, "phase_corr": ev.phase_correlation,
                   "phase_nrmse": ev.phase_nrmse, "nrmse": ev.nrmse,
                   "frc_1bit_pooled_A": ev.resolutions["particle/pooled/1-bit"] * 1e10,
                   "band_frc": band_frc(ev), "band_err": band_errors(snaps[k], p.geometry.origin, data, ev),
                   "loss": losses[k - 1] if k - 1 < len(losses) else float("nan"), "seconds": seconds}
            rows.append(row)
            print(f"boost {token} it {k}: corr {row['phase_corr']:.3f} phase-NRMSE {row['phase_nrmse']:.3f} "
                  f"NRMSE {row['nrmse']:.4f} 1-bit {row['frc_1bit_pooled_A']:.1f} Å loss {row['loss']:.1f} | "
                  f"band FRC {' '.join(f'{v:.2f}' for v in row['band_frc'])} | band err "
                  f"{' '.join(f'{v:.3f}' for v in row['band_err'])} ({seconds:.0f} s run)", flush=True)
    q = quantum_limit(data.truth_object, data.truth_origin, data.real_pixel_size, data.positions, args.dose)
    print(f"ideal image: corr {q.phase_correlation:.3f} phase-NRMSE {q.phase_nrmse:.3f} band FRC "
          f"{' '.join(f'{v:.2f}' for v in band_frc(q))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sample": args.sample, "dose": args.dose, "bands_A": BANDS_A, "rows": rows,
                       "ideal": {"phase_corr": q.phase_correlation, "phase_nrmse": q.phase_nrmse,
                                 "band_frc": band_frc(q)}}, f, indent=1)


if __name__ == "__main__":
    main()
