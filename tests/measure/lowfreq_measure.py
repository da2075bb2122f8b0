"""Measurements behind gpu/ENGINE.md, "Large particles: why CG stopped" (not a test; run by hand):

    CRYOPTYCHO_STRUCTURES=/work/shared/data/structures \\
        python tests/measure/lowfreq_measure.py [--sample ribosome] [--iterations 120] [--figure out.png]

A large particle at 20 e⁻/Å², kept small for 2 CPU cores: thin object, 48×48 frames, 1.6 Å
pixels, 5 mrad randomized probe (noise and probe seed 0). Runs, each scored inside the particle
footprint (`evaluate_against_truth`) beside the ideal phase-contrast image (`quantum_limit`):

* ``before``: the old defaults, μ₀ = 0.03 fixed, CG stopping at its first "no descent";
* ``auto, no widening``: μ₀ "auto", CG stopping at its first "no descent";
* ``after``: the defaults now (μ₀ "auto", α_h widened when the truncation rule stalls CG);
* ``truncation none`` and ``from the truth`` (the defaults started from the true object):
  where CG would end without the rule's discontinuities, and the MAP point itself.

Prints the CG iterations and why CG stopped, phase correlation, pooled 1-bit FRC and the FRC per
ring; ``--figure`` saves phase images and FRC curves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cryoptycho.gpu import cg
from cryoptycho.gpu import reconstruct as rc
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.metrics import ice_phase_removed
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth, quantum_limit
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", default="ribosome")
    ap.add_argument("--iterations", type=int, default=120)
    ap.add_argument("--figure")
    args = ap.parse_args()
    data = simulate_ptychography(args.sample, dose=20, seed=0, probe_seed=0, frame_size=48, pixel_size=1.6e-10,
                                 multislice=False, semiangle=5e-3)
    stops: list[str] = []
    real_minimize = cg.minimize

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        res = real_minimize(*a, **kw)
        stops.append(f"{res.iterations} ({res.stopped})")
        return res

    rc.minimize = spy
    runs = {
        "before: μ₀ = 0.03, no widening": ({"mu0": 0.03}, 0, False),
        "μ₀ auto, no widening": ({}, 0, False),
        "after: defaults (μ₀ auto, α_h widening)": ({}, rc.TRUNCATION_RELAXATIONS, False),
        "truncation none": ({"truncation": "none"}, 0, False),
        "defaults, started from the truth": ({}, rc.TRUNCATION_RELAXATIONS, True),
    }
    results = {}
    widenings = rc.TRUNCATION_RELAXATIONS
    for name, (extra, relax, from_truth) in runs.items():
        stops.clear()
        rc.TRUNCATION_RELAXATIONS = relax
        opts = ReconOptions(iterations=args.iterations, refine_probe=False, **extra)
        t0 = time.perf_counter()
        if from_truth:
            p = rc.prepare(data, opts)
            off = np.round((np.asarray(p.geometry.origin) - np.asarray(data.truth_origin))
                           / data.real_pixel_size).astype(int)
            ny, nx = p.object.shape
            start = data.truth_object[off[0]:off[0] + ny, off[1]:off[1] + nx].astype(p.object.dtype)
            counts = rc.counts_per_object_pixel(p.counts_fft, p.mask, p.probe, p.batch)
            obj, _, _ = rc.refine_full_batch(start, p.probe, p.counts_fft, p.batch, p.mask,
                                             opts.with_mu0_decision(counts), args.iterations,
                                             kappa=p.kappa, probe_power=p.probe_power)
            origin = p.geometry.origin
        else:
            state = rc.reconstruct(data, opts)
            obj, origin = state.object, state.geometry.origin
        obj = to_numpy(obj)
        ev = evaluate_against_truth(obj, origin, data.truth_object, data.truth_origin, data.real_pixel_size,
                                    data.positions)
        results[name] = (obj, ev)
        print(f"{name}: CG {' + '.join(stops)}, phase corr {ev.phase_correlation:.3f}, pooled 1-bit "
              f"{ev.resolutions['particle/pooled/1-bit'] * 1e10:.1f} Å, {time.perf_counter() - t0:.0f} s",
              flush=True)
    rc.TRUNCATION_RELAXATIONS = widenings
    q = quantum_limit(data.truth_object, data.truth_origin, data.real_pixel_size, data.positions, 20.0)
    print(f"quantum limit: phase corr {q.phase_correlation:.3f}, pooled 1-bit "
          f"{q.resolutions['particle/pooled/1-bit'] * 1e10:.1f} Å")
    freq = np.asarray(q.frc_particle.freq) * 1e-10
    rings = slice(1, 16)
    print("\n| run | " + " | ".join(f"{f:.3f}" for f in freq[rings]) + " |")
    print("|---|" + "---|" * len(freq[rings]))
    for name, ev in [*((n, e) for n, (_, e) in results.items()), ("quantum limit", q)]:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in np.asarray(ev.frc_particle.frc)[rings]) + " |")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shown = ["before: μ₀ = 0.03, no widening", "after: defaults (μ₀ auto, α_h widening)"]
        fig, ax = plt.subplots(1, 4, figsize=(16, 4))
        truth_phase = ice_phase_removed(data.truth_object)
        ax[0].imshow(truth_phase, cmap="gray")
        ax[0].set_title("truth (phase)")
        for a, name in zip(ax[1:3], shown):
            obj, ev = results[name]
            a.imshow(ice_phase_removed(obj), cmap="gray")
            a.set_title(f"{name.split(':')[0]}: corr {ev.phase_correlation:.2f}")
        for name, ev in [*((n, results[n][1]) for n in shown), ("quantum limit", q)]:
            ax[3].plot(np.asarray(ev.frc_particle.freq) * 1e-10, ev.frc_particle.frc, label=name.split(":")[0])
        ax[3].set_xlabel("spatial frequency (1/Å)")
        ax[3].set_ylabel("FRC with the truth (particle)")
        ax[3].legend()
        for a in ax[:3]:
            a.axis("off")
        fig.tight_layout()
        fig.savefig(args.figure, dpi=60)


if __name__ == "__main__":
    main()
