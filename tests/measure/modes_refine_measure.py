"""Mixed-state probe modes combined with position and aberration refinement on realistic,
partially coherent scans (not a test; reproduces gpu/MEASUREMENTS.md "Partial coherence:
probe modes", the table "modes with refinement on realistic scans"):

    python tests/measure/modes_refine_measure.py hemoglobin 20 [--seed 0] [--source-size 1.0]

The frames of ``cryoptycho bench paper --realistic --seed S`` (64×64 frames, 0.8 Å, multislice,
``ExperimentErrors.realistic(S)``: 20 nm defocus and 10 nm astigmatism off, 2 % / −1 % scale,
0.5° rotation, 1 % shear, 0.3 Å jitter, 1 Å drift) recorded with a finite source as well
(``--source-size`` Å rms, three modes, as ``cryoptycho simulate --realistic --source-size``).
The dataset gives the nominal probe model and positions. Runs, each with the defaults otherwise
(probe fixed, μ₀ "auto", the parallax fit of the nominal probe under "auto"):

* ``oracle``: the true three modes at the true positions;
* ``nominal``: the nominal probe and positions;
* ``refined``: ``refine_positions`` and ``refine_aberrations`` with one coherent probe;
* ``modes``: ``source_size_m`` (the known source size) without refinement;
* ``modes+refined``: both.

Scores: ``evaluate_against_truth`` at the true positions (translation registered, phase ramp
removed): phase correlation and phase NRMSE in the particle, pooled 1-bit resolution; and the
mean position error. One JSON line per run, then a table."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.probes import mode_powers
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model

REFINE: dict = {"refine_positions": True, "refine_aberrations": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source-size", type=float, default=1.0, help="rms at the sample, Å")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--runs", default="oracle,nominal,refined,modes,modes+refined")
    ap.add_argument("--aberrations", default="", help="refine only these (comma-separated; default: all)")
    ap.add_argument("--refine", default="positions,aberrations",
                    help="what the refined runs refine (comma-separated: positions, aberrations)")
    ap.add_argument("-v", "--verbose", action="store_true", help="the engine's log (position and aberration updates)")
    args = ap.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.aberrations:
        REFINE["aberrations"] = args.aberrations.split(",")
    REFINE["refine_positions"] = "positions" in args.refine
    REFINE["refine_aberrations"] = "aberrations" in args.refine
    source = args.source_size * 1e-10
    errors = dataclasses.replace(ExperimentErrors.realistic(args.seed), source_size=source, source_modes=3)
    t = time.perf_counter()
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=0.8e-10, seed=args.seed, probe_seed=args.seed, errors=errors)
    share = mode_powers(data.truth_probe)
    print(f"# {args.sample} {args.dose:g} e/A2 seed {args.seed}: {len(data.positions)} positions, "
          f"true mode powers {np.round(share / share.sum(), 3).tolist()}, simulated in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    oracle = dataclasses.replace(data, probe=data.truth_probe, probe_model=None, positions=data.truth_positions)
    runs = {
        "oracle": (oracle, {}),
        "nominal": (data, {}),
        "refined": (data, REFINE),
        "modes": (data, {"source_size_m": source}),
        "modes+refined": (data, {"source_size_m": source, **REFINE}),
    }
    rows = []
    for name in args.runs.split(","):
        d, opts = runs[name]
        t = time.perf_counter()
        st = reconstruct(d, {"iterations": args.iterations, **opts})
        wall = time.perf_counter() - t
        ev = evaluate_against_truth(to_numpy(st.object), st.geometry.origin, data.truth_object,
                                    data.truth_origin, data.real_pixel_size, data.truth_positions)
        shift = (np.asarray(st.positions) - data.truth_positions).mean(axis=0)  # a common shift is a gauge
        pos_err_gauge = np.linalg.norm(np.asarray(st.positions) - shift - data.truth_positions, axis=1)
        row = {
            "run": name, "phase_corr": round(ev.phase_correlation, 4), "phase_nrmse": round(ev.phase_nrmse, 4),
            "res_1bit_A": round(ev.resolutions["particle/pooled/1-bit"] * 1e10, 2),
            "position_error_A": round(float(pos_err_gauge.mean()) * 1e10, 3),
            "estimate": {k: round(v * 1e9, 2) for k, v in st.probe_estimate.items()
                         if k.endswith("_m") and not k.endswith("_se_m")},
            "wall_s": round(wall, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| run | phase corr. | phase NRMSE | pooled 1-bit (Å) | position error (Å) | wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['phase_corr']:.3f} | {r['phase_nrmse']:.3f} | {r['res_1bit_A']:.1f} | "
              f"{r['position_error_A']:.2f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
