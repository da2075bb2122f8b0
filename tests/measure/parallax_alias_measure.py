"""The parallax fit alone on ``bench paper --realistic`` frames (not a test; gpu/MEASUREMENTS.md,
"The alias-aware parallax fit"):

    python tests/measure/parallax_alias_measure.py hemoglobin 100 [--seed 0] [--exact-probe]
        [--fits 0.9,1.8,1.8a]

Each fit is ``parallax_reach`` R (``R`` plain, ``Ra`` alias-aware; a further ``s``: jointly with
the scan matrix, ``parallax_scan``), with the defaults' prior,
search range and coefficients; prints the estimate, its standard errors and χ² (the gate at
0.95 with 3 coefficients is 7.81). ``--exact-probe``: the realistic preset without its probe
error (the nominal probe is right; the scan errors stay), the false-positive control."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from cryoptycho.gpu.operators import to_fft_order
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.reconstruct import _initial_probe
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-probe", action="store_true")
    ap.add_argument("--scan-errors", choices=("all", "affine", "none"), default="all",
                    help="keep the preset's scan errors (all), only its affine map (no jitter or drift: "
                         "the true positions are still a lattice), or none")
    ap.add_argument("--fits", default="0.9,1.8,1.8a")
    ap.add_argument("--out", default=None)
    ap.add_argument("--null-draws", type=int, default=0,
                    help="also the p-value under the search's null where the χ² gate opens (null_p)")
    args = ap.parse_args()
    errors = ExperimentErrors.realistic(args.seed)
    if args.exact_probe:
        errors = dataclasses.replace(errors, defocus=0.0, astigmatism=0.0)
    if args.scan_errors != "all":
        errors = dataclasses.replace(errors, jitter=0.0, drift=(0.0, 0.0))
    if args.scan_errors == "none":
        errors = dataclasses.replace(errors, scale=(0.0, 0.0), rotation=0.0, shear=0.0)
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=0.8e-10, seed=args.seed, probe_seed=args.seed, errors=errors)
    opts = ReconOptions()
    # the nominal probe as the engine hands it to the fit (reconstruct.prepare)
    counts_fft = np.ascontiguousarray(to_fft_order(np.asarray(data.frames)))
    probe = _initial_probe(data, opts, np, counts_fft)
    for spec in args.fits.split(","):
        aliases, scan = "a" in spec, "s" in spec
        reach = float(spec.rstrip("as"))
        t, cpu = time.perf_counter(), time.process_time()
        fit = estimate_aberrations(data.frames, data.positions, probe, data.real_pixel_size, data.energy,
                                   mask=data.mask, names=tuple(opts.parallax_aberrations),
                                   search_range_m=opts.parallax_range_m, nyquist_fraction=reach, aliases=aliases,
                                   scan=scan, scan_prior_rms=opts.parallax_scan_prior,
                                   null_draws=args.null_draws, null_confidence=opts.parallax_confidence)
        row = {"sample": args.sample, "dose": args.dose, "seed": args.seed, "exact_probe": args.exact_probe,
               "scan_errors": args.scan_errors, "fit": spec, "estimate_nm": {k: round(v * 1e9, 2) for k, v in fit.coefficients.items()},
               "se_nm": {k: round(v * 1e9, 2) for k, v in fit.standard_error.items()},
               "chi2": round(fit.curvature_significance, 2), "robust_chi2": round(fit.significance, 2),
               "applied": fit.rejects_nominal(opts.parallax_confidence), "null_p": fit.null_p_value,
               "cpu_s": round(time.process_time() - cpu, 1),
               "scan_pct": None if fit.scan_matrix is None else [round(v * 100, 2) for v in fit.scan_matrix],
               "scan_chi2": round(fit.scan_significance, 2), "frequencies": fit.frequencies, "wall_s": round(time.perf_counter() - t, 1)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
