"""The scan's global (affine) error on realistic scans (gpu/MEASUREMENTS.md, "The scan's affine
error: a calibration, not a loss of quality"): what handing the engine the true affine map is
worth, what position refinement estimates of it, and how the score treats a reconstruction
that is right up to the scan's global map.

    python tests/measure/scan_affine_measure.py proteasome 100 --runs oracle,nominal,trueaffine,refined

Same frames as ``cryoptycho bench paper --realistic --seed S`` (64×64 frames, 0.8 Å, multislice,
``ExperimentErrors.realistic(S)``), 40 CG, fixed probe. Runs: ``oracle`` (true probe and
positions), ``nominal`` (nominal positions, the probe corrected by the parallax fit as the
defaults do; the fit is made once and reused by the runs below), ``trueaffine`` (the nominal
positions through the true affine map and drift, no jitter), ``refined`` (``refine_positions``),
``search`` (``scan_search``), ``pscan`` (the probe and the nominal positions corrected by the
parallax fit with ``scan=True``, the scan matrix applied whether or not its χ² gate passes; the
line ``parallax_scan`` gives the estimate, its standard errors and whether
``parallax_scan=true`` would apply it). Each is scored by ``evaluate_against_truth`` ("official":
translation registered) and after mapping the reconstruction through the affine map that takes
the positions it used to the true ones ("affine"): a reconstruction that is right up to the
scan's global map scores there as if the map had been known.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.metrics import affine_registered, fit_affine
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.probes import aberrate
from cryoptycho.gpu.reconstruct import _initial_probe, _parallax_corrected, reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model


def entries(b: np.ndarray) -> dict[str, float]:
    return {"Ayy-1": round(b[0, 0] - 1, 5), "Ayx": round(b[0, 1], 5), "Axy": round(b[1, 0], 5),
            "Axx-1": round(b[1, 1] - 1, 5)}


def score(data, state) -> dict:
    px = data.real_pixel_size
    obj, origin = to_numpy(state.object), state.geometry.origin

    def figures(o):
        ev = evaluate_against_truth(o, origin, data.truth_object, data.truth_origin, px, data.truth_positions)
        return {"phase_corr": round(ev.phase_correlation, 4), "phase_nrmse": round(ev.phase_nrmse, 4),
                "res_1bit_A": round(ev.resolutions["particle/pooled/1-bit"] * 1e10, 2),
                "res_halfbit_A": round(ev.resolutions["particle/pooled/1/2-bit"] * 1e10, 2)}

    used = np.asarray(state.positions)
    true = np.asarray(data.truth_positions)
    return {"official": figures(obj), "affine": figures(affine_registered(obj, origin, px, used, true)),
            "used_to_true": entries(fit_affine(used, true)[0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--runs", default="oracle,nominal,trueaffine,refined,search")
    ap.add_argument("--scan", default="raster", choices=["raster", "spiral", "random"],
                    help="scan pattern (the bench's is raster)")
    ap.add_argument("--reach", type=float, default=0.9,
                    help="pscan: highest object frequency of the fit, × the step's Nyquist (nyquist_fraction)")
    args = ap.parse_args()
    errors = ExperimentErrors.realistic(args.seed)
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=0.8e-10, seed=args.seed, probe_seed=args.seed, errors=errors,
                                 scan=args.scan)
    base = ReconOptions(iterations=args.iterations, refine_probe=False, parallax=False)
    probe = to_numpy(_parallax_corrected(_initial_probe(data, base, np, None), data, base.merged({"parallax": "auto"}),
                                         np.asarray(data.positions))[0])
    nominal = dataclasses.replace(data, probe=probe, probe_model=None)
    truth_map = fit_affine(np.asarray(data.positions), np.asarray(data.truth_positions))[0]
    print(json.dumps({"sample": args.sample, "dose": args.dose, "seed": args.seed, "scan": args.scan,
                      "nominal_to_true": entries(truth_map)}), flush=True)
    affine_only = dataclasses.replace(errors, jitter=0.0).true_positions(data.positions)
    pscan = None
    if "pscan" in args.runs.split(","):
        start = _initial_probe(data, base, np, None)
        t = time.perf_counter()
        fit = estimate_aberrations(data.frames, data.positions, start, data.real_pixel_size, data.energy,
                                   mask=data.mask, scan=True, nyquist_fraction=args.reach)
        e = np.eye(2) + np.asarray(fit.scan_matrix).reshape(2, 2)
        print(json.dumps({"parallax_scan": entries(e), "se": [round(v, 5) for v in fit.scan_standard_error],
                          "significance": round(fit.scan_significance, 2),
                          "gate_applies": fit.scan_rejects_nominal(0.95),
                          "coefficients_nm": {k: round(v * 1e9, 1) for k, v in fit.coefficients.items()},
                          "seconds": round(time.perf_counter() - t, 1)}), flush=True)
        probe_s = aberrate(start, data.real_pixel_size, data.energy, fit.coefficients) \
            if fit.rejects_nominal(0.95) else start
        pscan = dataclasses.replace(data, probe=to_numpy(probe_s), probe_model=None,
                                    positions=fit.scan_positions(data.positions))
    runs = {
        "oracle": (dataclasses.replace(data, positions=data.truth_positions, probe=data.truth_probe,
                                       probe_model=None), {}),
        "nominal": (nominal, {}),
        "trueaffine": (dataclasses.replace(nominal, positions=affine_only), {}),
        "refined": (nominal, {"refine_positions": True}),
        "search": (nominal, {"scan_search": True}),
        "pscan": (pscan, {}),
    }
    for name in args.runs.split(","):
        d, extra = runs[name]
        t = time.perf_counter()
        state = reconstruct(d, base.merged(extra))
        out = {"run": name, "seconds": round(time.perf_counter() - t, 1), **score(data, state)}
        if state.nominal_positions is not None:
            out["estimated"] = entries(fit_affine(np.asarray(state.nominal_positions), np.asarray(state.positions))[0])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
