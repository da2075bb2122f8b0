"""How often the parallax gate opens (not a test; gpu/MEASUREMENTS.md, "The parallax gate's noise"):

    python tests/measure/parallax_gate_measure.py hemoglobin 100 exact-all [--seed 1] [--draws 20]
        [--reaches 0.9,1.8] [--out rows.jsonl]

One noiseless ``bench paper --realistic`` simulation (64×64 frames, 0.8 Å; ``--seed``: object
placement, phase plate and jitter), then ``--draws`` independent Poisson draws of its counts,
each fitted at every reach with the defaults' prior, range and coefficients. The variant:
``exact-…`` removes the preset's probe error (the nominal probe is exactly right: every opening
is a false correction), ``real-…`` keeps it; ``…-all`` keeps every scan error, ``…-none`` none,
``…-jitteronly`` only the 0.3 Å jitter, ``…-affine`` only the affine map. Each row: the estimate,
its standard errors, ``chi2`` the curvature's significance (the gate before 7 Dec 2026),
``gate`` the gate's (sandwich) significance, against 7.81 (95 %, 3 coefficients)."""

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


def _errors(variant: str, seed: int) -> ExperimentErrors:
    errors = ExperimentErrors.realistic(seed)
    if variant.startswith("exact"):
        errors = dataclasses.replace(errors, defocus=0.0, astigmatism=0.0)
    if variant.endswith(("none", "jitteronly")):
        errors = dataclasses.replace(errors, scale=(0.0, 0.0), rotation=0.0, shear=0.0, drift=(0.0, 0.0))
    if variant.endswith("none"):
        errors = dataclasses.replace(errors, jitter=0.0)
    if variant.endswith("affine"):
        errors = dataclasses.replace(errors, jitter=0.0, drift=(0.0, 0.0))
    return errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("variant", help="exact|real - all|none|jitteronly|affine, e.g. exact-all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--reaches", default="0.9,1.8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    data = simulate_ptychography(load_model(a.sample).centred(), dose=a.dose, frame_size=64, pixel_size=0.8e-10,
                                 seed=a.seed, probe_seed=a.seed, errors=_errors(a.variant, a.seed), noise=False)
    opts = ReconOptions()
    expected = np.asarray(data.frames, dtype=np.float64)
    rng = np.random.default_rng(1000 + a.seed)
    for draw in range(a.draws):
        frames = rng.poisson(expected).astype(np.uint16)
        d = dataclasses.replace(data, frames=frames)
        probe = _initial_probe(d, opts, np, np.ascontiguousarray(to_fft_order(frames)))
        for reach in (float(x) for x in a.reaches.split(",")):
            t = time.perf_counter()
            fit = estimate_aberrations(frames, d.positions, probe, d.real_pixel_size, d.energy, mask=d.mask,
                                       names=tuple(opts.parallax_aberrations), search_range_m=opts.parallax_range_m,
                                       nyquist_fraction=reach)
            row = {"sample": a.sample, "dose": a.dose, "variant": a.variant, "seed": a.seed, "draw": draw,
                   "reach": reach, "estimate_nm": {k: round(v * 1e9, 2) for k, v in fit.coefficients.items()},
                   "se_nm": {k: round(v * 1e9, 2) for k, v in fit.standard_error.items()},
                   "chi2": round(fit.curvature_significance, 2), "gate": round(fit.significance, 2),
                   "applied": fit.rejects_nominal(opts.parallax_confidence), "wall_s": round(time.perf_counter() - t, 1)}
            print(json.dumps(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
