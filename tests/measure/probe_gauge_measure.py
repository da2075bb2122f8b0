"""Why joint probe refinement loses (gpu/MEASUREMENTS.md, "Why joint probe refinement loses"). Not a test:

    python tests/measure/probe_gauge_measure.py [--counts 1e5] [--seeds 0,1] [--iterations 100]
        [--truncation poisson-floor|none|...] [--probe-only]

The engine tests' synthetic weak-phase data (tests/engine_helpers.py, as in
tests/measure/probe_refine_measure.py), reconstructed with the probe fixed and refined, with the default
prior (μ₀ = 0.03) and without (μ₀ = 0), on Poisson and on noiseless intensities, from the exact
probe and from a 30 nm-defocused one. For each run: the final objective (data term + prior), the
phase correlation and NRMSE as scored elsewhere, the same after removing the best-fitting phase
ramp of rec/truth (an exact gauge of ptychography: T·e^{ik·r} with ψ·e^{−ik·r} gives the same
intensities), after sub-pixel registration (metrics.register_translation), the rms phase error
and its part below 0.1 cycles/px, and the probe's overlap with the truth. About 20 s.

``--probe-only``: the probe alone (cg.minimize on the probe, object held at the fixed-exact-probe
reconstruction with μ₀ = 0) from the 30 nm-defocused probe, with the default truncation rule and
without: does the probe subproblem itself find the truth? About 30 s.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # the other measure scripts
sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/: engine_helpers
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.cg import minimize
from cryoptycho.gpu.metrics import fourier_shift, register_translation
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import FullBatchObjective, _normalised, prepare, refine_full_batch
from engine_helpers import nrmse, phase_corr, scored_region, synthetic_dataset
from probe_refine_measure import defocused, overlap


def _phase(t: np.ndarray) -> np.ndarray:
    p = np.angle(t * np.exp(-1j * np.angle(t.mean())))
    return p - p.mean()


def deramped(obj: np.ndarray, truth: np.ndarray, region: tuple[slice, slice]) -> np.ndarray:
    """``obj`` times the phase ramp that best cancels the ramp of obj/truth over ``region``."""
    d = _phase(obj[region] / truth[region])
    ny, nx = d.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    a = np.stack([np.ones(d.size), yy.ravel(), xx.ravel()], 1)
    c = np.linalg.lstsq(a, d.ravel(), rcond=None)[0]
    y, x = np.mgrid[0:obj.shape[0], 0:obj.shape[1]]
    return obj * np.exp(-1j * (c[1] * (y - region[0].start) + c[2] * (x - region[1].start)))


def phase_errors(obj: np.ndarray, truth: np.ndarray, region: tuple[slice, slice]) -> tuple[float, float]:
    """rms phase error over ``region`` and its part below 0.1 cycles/px."""
    e = _phase(obj[region]) - _phase(truth[region])
    f = np.fft.fft2(e) / np.sqrt(e.size)
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(e.shape[0]), np.fft.fftfreq(e.shape[1]), indexing="ij"))
    return float(e.std()), float(np.sqrt((np.abs(f[q < 0.1]) ** 2).sum() / e.size))


def run(counts: float, seed: int, error_m: float, refine: bool, mu0: float, iterations: int,
        noiseless: bool, truncation: str = "poisson-floor") -> str:
    data = synthetic_dataset(counts, grid=8, step_px=3.0, seed=seed, radius_px=(2.5, 5.0),
                             noiseless=noiseless)
    truth_probe = np.asarray(data.truth_probe)
    probe = truth_probe if error_m == 0 else defocused(truth_probe, data.real_pixel_size, data.energy, error_m)
    opts = ReconOptions(iterations=iterations, refine_probe=refine, seed=seed, mu0=mu0, truncation=truncation)
    pb = prepare(replace(data, probe=probe), opts)
    obj, pr, losses = refine_full_batch(pb.object, pb.probe, pb.counts_fft, pb.batch, pb.mask, opts,
                                        iterations, kappa=pb.kappa, probe_power=pb.probe_power)
    obj, pr = to_numpy(obj), to_numpy(pr)
    truth = data.truth_object
    region = scored_region(truth, 12)
    fun = FullBatchObjective(pb.counts_fft, pb.batch, pb.mask, opts, pb.kappa, pb.probe_power)
    fun.want_probe = False
    at_truth = fun({"object": truth.astype(np.complex128), "probe": truth_probe.astype(np.complex128)})[0]
    flat = deramped(obj, truth, region)
    shift = register_translation(_phase(truth[region]), _phase(obj[region]))
    reg = fourier_shift(obj, shift)
    rms, low = phase_errors(obj, truth, region)
    return (f"{'clean' if noiseless else 'noisy'} {counts:.0e} seed {seed} start {error_m * 1e9:+3.0f} nm "
            f"mu0 {mu0:<5g} {'refined' if refine else 'fixed  '}  L {losses[-1]:9.1f} (truth {at_truth:9.1f})  "
            f"corr {phase_corr(obj, truth, region):.3f} deramped {phase_corr(flat, truth, region):.3f} "
            f"registered {phase_corr(reg, truth, region):.3f}  NRMSE {nrmse(obj, truth, region):.4f} "
            f"deramped {nrmse(flat, truth, region):.4f}  phase err {rms:.4f} (<0.1/px {low:.4f})  "
            f"probe overlap {overlap(pr, truth_probe):.3f}")


def probe_only(counts: float, seed: int, truncation: str, iterations: int) -> str:
    data = synthetic_dataset(counts, grid=8, step_px=3.0, seed=seed, radius_px=(2.5, 5.0))
    truth_probe = np.asarray(data.truth_probe)
    exact = ReconOptions(iterations=100, refine_probe=False, seed=seed, mu0=0.0)
    pb = prepare(data, exact)
    obj, _, _ = refine_full_batch(pb.object, pb.probe, pb.counts_fft, pb.batch, pb.mask, exact, 100,
                                  kappa=pb.kappa, probe_power=pb.probe_power)
    start = defocused(truth_probe, data.real_pixel_size, data.energy, 30e-9)
    opts = ReconOptions(refine_probe=True, seed=seed, mu0=0.0, truncation=truncation)
    pw = prepare(replace(data, probe=start), opts)
    fun = FullBatchObjective(pw.counts_fft, pw.batch, pw.mask, opts, pw.kappa, pw.probe_power)
    precond = {"probe": 1.0 / (pw.batch.size * float((abs(obj) ** 2).mean()))}
    at_truth = fun({"object": obj, "probe": truth_probe.astype(pw.probe.dtype)})[0]
    at_start = fun({"object": obj, "probe": pw.probe})[0]
    res = minimize(fun, {"object": obj, "probe": pw.probe}, iterations, None, None, lambda it: {"probe"},
                   precond)
    probe = to_numpy(_normalised(res.x["probe"], pw.probe_power)[0])
    return (f"probe only {counts:.0e} seed {seed} truncation {truncation:<13} {res.iterations:3d} it "
            f"({res.stopped}): L {at_start:.0f} -> {res.losses[-1]:.0f} (true probe {at_truth:.0f})  "
            f"probe overlap 0.667 -> {overlap(probe, truth_probe):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=float, default=1e5)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--truncation", default="poisson-floor")
    ap.add_argument("--probe-only", action="store_true")
    args = ap.parse_args()
    if args.probe_only:
        for counts in (1e5, 1e7):
            for truncation in ("poisson-floor", "none"):
                print(probe_only(counts, 0, truncation, 300), flush=True)
        return
    for noiseless in (True, False):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for error_m in ((0.0,) if noiseless else (0.0, 30e-9)):
                for mu0 in (0.03, 0.0):
                    for refine in (False, True):
                        print(run(args.counts, seed, error_m, refine, mu0, args.iterations, noiseless,
                                  args.truncation), flush=True)


if __name__ == "__main__":
    main()
