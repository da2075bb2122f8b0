"""Mixed-state probe modes on partially coherent simulated scans (not a test; reproduces the
figures in gpu/ENGINE.md "Partial coherence: probe modes"):

    python tests/measure/probe_modes_measure.py [--sample hemoglobin] [--dose 100] [--source-size 1.0]

The frames are recorded with the three strongest modes of a finite (Gaussian) source; the
dataset gives the nominal coherent probe model. Reconstructions: the nominal probe fixed (the
default at this dose), the true modes fixed (oracle), one refined probe, three refined modes, and the nominal probe with the known source size
(``source_size_m``) fixed."""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from cryoptycho.gpu.probes import make_probe, mode_powers
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", default="hemoglobin")
    ap.add_argument("--dose", type=float, default=100.0)
    ap.add_argument("--source-size", type=float, default=1.0, help="rms, Å")
    ap.add_argument("--frame-size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only the named rows (substrings)")
    args = ap.parse_args()
    err = ExperimentErrors(source_size=args.source_size * 1e-10, source_modes=3, seed=args.seed)
    data = simulate_ptychography(sample=args.sample, dose=args.dose, frame_size=args.frame_size,
                                 multislice=False, seed=args.seed, errors=err)
    share = mode_powers(data.truth_probe)
    print(f"{args.sample} {args.dose:g} e/A2, source {args.source_size} A rms: true mode powers "
          f"{np.round(share / share.sum(), 3).tolist()}")
    pm = data.probe_model
    nominal = make_probe(pm.kind, data.frame_shape, data.pixel_size, data.energy, pm.semiangle,
                         pm.defocus, pm.cs, seed=pm.seed)
    runs = {
        "nominal probe, fixed": (data, {"refine_probe": False}),
        "true 3 modes, fixed": (dataclasses.replace(data, probe=data.truth_probe, probe_model=None),
                                {"refine_probe": False}),
        "1 probe, refined": (dataclasses.replace(data, probe=nominal, probe_model=None),
                             {"refine_probe": True}),
        "3 modes, refined": (dataclasses.replace(data, probe=nominal, probe_model=None),
                             {"refine_probe": True, "probe_modes": 3}),
        "source size given, fixed": (data, {"refine_probe": False,
                                            "source_size_m": args.source_size * 1e-10}),
    }
    for name, (d, opts) in runs.items():
        if args.only and not any(o in name for o in args.only):
            continue
        t = time.perf_counter()
        st = reconstruct(d, {"iterations": args.iterations, **opts})
        wall = time.perf_counter() - t
        ev = evaluate_against_truth(np.asarray(st.object), st.geometry.origin, data.truth_object,
                                    data.truth_origin, data.pixel_size, data.positions)
        res = ev.resolutions
        one_bit = res.get("particle/pooled/1-bit", float("nan"))
        print(f"{name:22s} phase corr {ev.phase_correlation:.3f}  NRMSE {ev.nrmse:.3f}  "
              f"pooled 1-bit {one_bit * 1e10:.1f} A  loss {st.loss_values[-1]:.4g}  {wall:.0f} s")


if __name__ == "__main__":
    main()
