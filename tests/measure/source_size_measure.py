"""The source size estimate (gpu/coherence.py) and the defaults that use it, on realistic
partially coherent scans (not a test; reproduces gpu/MEASUREMENTS.md "The source size: stated
or estimated"):

    python tests/measure/source_size_measure.py hemoglobin 100 --source-size 1 [--seed 0]
        [--runs estimate,oracle,nominal,stated,default]

The frames of ``cryoptycho bench paper --realistic --seed S`` (64×64 frames, 0.8 Å, multislice,
``ExperimentErrors.realistic(S)``) recorded through a Gaussian source of ``--source-size`` Å rms
(three modes; 0: a point source). Runs (60 CG, defaults otherwise: probe fixed, μ₀ "auto", the
parallax fit "auto"):

* ``estimate``: ``estimate_source_size`` alone on the nominal (parallax-corrected) probe: the
  held-out data term at each trial size, the size it picks and whether it is confident;
* ``oracle``: the true modes at the true positions;
* ``nominal``: the nominal probe, source size 0 (no modes: the defaults before this change);
* ``stated``: the dataset states the true source size (or ``--stated``) in its probe model
  (defaults);
* ``default``: the dataset states none (the defaults);
* ``estimated``: the dataset states none, ``source_estimate`` on (the estimate decides; its
  record printed).

Scores: ``evaluate_against_truth`` (phase correlation, phase NRMSE, pooled 1-bit FRC)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.coherence import estimate_source_size
from cryoptycho.gpu.reconstruct import prepare, reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source-size", type=float, default=1.0, help="true rms at the sample, Å")
    ap.add_argument("--stated", type=float, default=None,
                    help="the size the probe model states for the stated run, Å (default: the true size)")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--estimate-iterations", type=int, default=10)
    ap.add_argument("--runs", default="estimate,oracle,nominal,stated,default")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    source = args.source_size * 1e-10
    errors = dataclasses.replace(ExperimentErrors.realistic(args.seed), source_size=source, source_modes=3)
    t = time.perf_counter()
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=0.8e-10, seed=args.seed, probe_seed=args.seed, errors=errors)
    print(f"# {args.sample} {args.dose:g} e/A2 seed {args.seed} source {args.source_size:g} A: "
          f"{len(data.positions)} positions, simulated in {time.perf_counter() - t:.0f} s", flush=True)
    pm = data.probe_model
    unstated = dataclasses.replace(data, probe_model=dataclasses.replace(pm, source_size=None))
    said = source if args.stated is None else args.stated * 1e-10
    stated = dataclasses.replace(data, probe_model=dataclasses.replace(pm, source_size=said))
    oracle = dataclasses.replace(data, probe=data.truth_probe, probe_model=None, positions=data.truth_positions)
    runs = {"oracle": (oracle, {}), "nominal": (unstated, {"source_size_m": 0.0}),
            "stated": (stated, {}), "default": (unstated, {}),
            "estimated": (unstated, {"source_estimate": True,
                                     "source_estimate_iterations": args.estimate_iterations})}
    rows = []
    for name in args.runs.split(","):
        t = time.perf_counter()
        if name == "estimate":
            problem = prepare(unstated, {"source_size_m": 0.0})
            est = estimate_source_size(problem.object, problem.probe, problem.counts_fft, problem.batch,
                                       problem.mask, problem.options, data.real_pixel_size,
                                       problem.probe_power, iterations=args.estimate_iterations,
                                       seed=args.seed)
            zero = est.scores[0.0]
            row = {"run": name, "best_A": est.best_m * 1e10, "estimate_A": round(est.estimate_m * 1e10, 3),
                   "confident": est.confident,
                   "delta_vs_0": {f"{s * 1e10:g}": [round(v[0] - zero[0], 2), round(v[1] - zero[1], 2)]
                                  for s, v in est.scores.items()},
                   "wall_s": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        d, opts = runs[name]
        st = reconstruct(d, {"iterations": args.iterations, **opts})
        wall = time.perf_counter() - t
        ev = evaluate_against_truth(to_numpy(st.object), st.geometry.origin, data.truth_object,
                                    data.truth_origin, data.real_pixel_size, data.truth_positions)
        row = {"run": name, "phase_corr": round(ev.phase_correlation, 4), "phase_nrmse": round(ev.phase_nrmse, 4),
               "res_1bit_A": round(ev.resolutions["particle/pooled/1-bit"] * 1e10, 2),
               "source_size_A": round(float(st.options["source_size_m"]) * 1e10, 3),
               "estimate": {k: round(v * 1e10, 3) if k.endswith("_m") else round(v, 1)
                            for k, v in st.probe_estimate.items() if k.startswith("source")},
               "wall_s": round(wall, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
