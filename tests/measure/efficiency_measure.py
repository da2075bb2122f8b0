"""What limits the dose efficiency of an oracle reconstruction (gpu/MEASUREMENTS.md, "Dose
efficiency: what limits it"); not a test, run by hand:

    CRYOPTYCHO_STRUCTURES=/work/shared/data/structures \\
        python tests/measure/efficiency_measure.py [--sample proteasome] [--dose 20] [--iterations 60]
        [--runs defaults,mu0/3,mu0x3,mu0=0,truncation-none,2x-iterations,from-truth]

One dataset (`simulate_ptychography`, the geometry of `cryoptycho bench paper`: 64×64 frames,
0.8 Å pixels, randomized probe, multislice, K2; noise and probe seed 0), reconstructed with the
exact probe fixed under controlled changes, everything else equal — the same data, the same
CG budget (except ``2x-iterations``, which tests the budget itself):

* ``defaults``: μ₀ auto, ``poisson-floor`` truncation, random start;
* ``mu0/3``, ``mu0x3``, ``mu0=0``: the prior's weight (the κ/μ₀ trade-off);
* ``truncation-none``: every count kept (the truncation rule drops data);
* ``2x-iterations``: twice the CG budget;
* ``from-truth``: the defaults started from the true object (the MAP point vs the optimiser).

``--frame-size 128`` changes the experiment instead (the randomized probe's speckle spans half
the window: 51 Å instead of 26 Å, at the same dose and overlap).

Each run is scored by `evaluate_against_truth` in the particle footprint (phase correlation,
phase NRMSE, 1-bit / ½-bit FRC) and `dose_efficiency` (particle mask, and the whole scanned area
as a check of the mask). The per-ring *spectral dose efficiency* η(q) = SNR_recon(q) / SNR_ideal(q)
with SNR = FRC² / (1 − FRC²) against the truth (pooled rings) says where the electrons are lost:
the ideal phase-contrast image's SNR is proportional to the dose, so η(q) is the fraction of
the dose the reconstruction uses at that frequency (Dwyer & Paganin: ≈ ½ unbiased).
Simulated datasets are cached under $TMPDIR (pickle).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
from cryoptycho.gpu import reconstruct as rc
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.sim.evaluation import dose_efficiency, evaluate_against_truth, quantum_limit
from cryoptycho.gpu.sim.ptycho import simulate_ptychography

RUNS = ("defaults", "mu0/3", "mu0x3", "mu0=0", "truncation-none", "2x-iterations", "from-truth")


def dataset(sample: str, dose: float, frame_size: int = 64):  # type: ignore[no-untyped-def]
    tag = "" if frame_size == 64 else f"_{frame_size}"
    cache = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"efficiency_measure_{sample}_{dose:g}{tag}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    data = simulate_ptychography(sample, dose=dose, seed=0, probe_seed=0, frame_size=frame_size)
    cache.write_bytes(pickle.dumps(data))
    return data


def snr(frc_values: np.ndarray) -> np.ndarray:
    f = np.clip(np.asarray(frc_values, dtype=np.float64), 0.0, 0.999)
    return f * f / (1.0 - f * f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", default="proteasome")
    ap.add_argument("--dose", type=float, default=20.0)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--frame-size", type=int, default=64,
                    help="frame (window) size; the randomized probe's speckle spans half of it")
    args = ap.parse_args()
    data = dataset(args.sample, args.dose, args.frame_size)
    px = data.real_pixel_size
    truth = (data.truth_object, data.truth_origin, px, data.positions)
    auto = ReconOptions(refine_probe=False).with_mu0_decision(
        rc.counts_per_object_pixel(*_counts_args(data))).mu0
    print(f"{args.sample} at {args.dose:g} e⁻/Å²: {len(data.positions)} positions, μ₀ auto = {auto:.4g}", flush=True)
    variants = {
        "defaults": ({}, args.iterations, False),
        "mu0/3": ({"mu0": auto / 3}, args.iterations, False),
        "mu0x3": ({"mu0": auto * 3}, args.iterations, False),
        "mu0=0": ({"mu0": 0.0}, args.iterations, False),
        "truncation-none": ({"truncation": "none"}, args.iterations, False),
        "2x-iterations": ({}, 2 * args.iterations, False),
        "from-truth": ({}, args.iterations, True),
    }
    ideal = quantum_limit(*truth, args.dose, pool=3)
    rows = []
    for name in args.runs.split(","):
        extra, iterations, from_truth = variants[name]
        opts = ReconOptions(iterations=iterations, refine_probe=False, parallax=False, **extra)
        t0 = time.perf_counter()
        if from_truth:
            p = rc.prepare(data, opts)
            off = np.round((np.asarray(p.geometry.origin) - np.asarray(data.truth_origin)) / px).astype(int)
            ny, nx = p.object.shape
            start = data.truth_object[off[0]:off[0] + ny, off[1]:off[1] + nx].astype(p.object.dtype)
            counts = rc.counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)
            obj, _, _ = rc.refine_full_batch(start, p.probe, p.counts_fft, p.batch, p.mask,
                                             opts.with_mu0_decision(counts), iterations,
                                             kappa=p.kappa, probe_power=p.probe_power)
            origin = p.geometry.origin
        else:
            state = rc.reconstruct(data, opts)
            obj, origin = state.object, state.geometry.origin
        seconds = time.perf_counter() - t0
        ev = evaluate_against_truth(to_numpy(obj), origin, *truth)
        eff = dose_efficiency(ev.resolutions["particle/pooled/1-bit"], *truth, args.dose)
        eff_area = dose_efficiency(ev.resolutions["area/pooled/1-bit"], *truth, args.dose, key="area/pooled/1-bit")
        eta = snr(ev.frc_particle.pooled(3).frc) / np.maximum(snr(ideal.frc_particle.pooled(3).frc), 1e-12)
        rows.append((name, ev, eff, eff_area, eta, seconds))
        r = ev.resolutions
        print(f"{name}: phase corr {ev.phase_correlation:.3f}, phase NRMSE {ev.phase_nrmse:.3f}, 1-bit raw / pooled "
              f"{r['particle/raw/1-bit'] * 1e10:.1f} / {r['particle/pooled/1-bit'] * 1e10:.1f} Å, ½-bit pooled "
              f"{r['particle/pooled/1/2-bit'] * 1e10:.1f} Å, dose eff. {eff:.2f} (area {eff_area:.2f}), "
              f"{seconds:.0f} s", flush=True)
    r = ideal.resolutions
    print(f"ideal image at {args.dose:g}: phase corr {ideal.phase_correlation:.3f}, phase NRMSE "
          f"{ideal.phase_nrmse:.3f}, 1-bit raw / pooled {r['particle/raw/1-bit'] * 1e10:.1f} / "
          f"{r['particle/pooled/1-bit'] * 1e10:.1f} Å")
    freq = np.asarray(ideal.frc_particle.pooled(3).freq) * 1e-10
    rings = slice(1, min(len(freq), 25), 2)
    print("\nη(q) = SNR_recon / SNR_ideal per pooled ring (cycles/Å); last rows: FRC of the ideal image and of defaults\n")
    print("| run | " + " | ".join(f"{f:.3f}" for f in freq[rings]) + " |")
    print("|---|" + "---|" * len(freq[rings]))
    for name, _, _, _, eta, _ in rows:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in eta[rings]) + " |")
    print("| FRC ideal | " + " | ".join(f"{v:.2f}" for v in np.asarray(ideal.frc_particle.pooled(3).frc)[rings]) + " |")
    for name, ev, *_ in rows[:1]:
        print(f"| FRC {name} | " + " | ".join(f"{v:.2f}" for v in np.asarray(ev.frc_particle.pooled(3).frc)[rings]) + " |")
    print("| 1-bit threshold | " + " | ".join(
        f"{v:.2f}" for v in np.asarray(ideal.frc_particle.pooled(3).threshold("1-bit"))[rings]) + " |")


def _counts_args(data):  # type: ignore[no-untyped-def]
    p = rc.prepare(data, ReconOptions(refine_probe=False, iterations=0))
    return p.counts_fft, p.mask, p.probe, p.batch


if __name__ == "__main__":
    main()
