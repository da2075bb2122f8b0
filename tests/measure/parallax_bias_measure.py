"""The parallax fit's bias and spread per experimental error (gpu/MEASUREMENTS.md, "Parallax
estimate: bias per error"): each configuration adds one error of the realistic preset to a
20 nm defocus error (or none), the fit reads the frames with the nominal probe and positions,
noiseless (the model's bias) and at each dose over noise seeds (bias and spread).

    python tests/measure/parallax_bias_measure.py hemoglobin --doses 20,100 --seeds 1,2,3 \
        --configs D,D+src,D+scale,D+affine,D+jd,D+astig,full,full+src [--prior 20] [--noiseless] [--scan]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography

PRESET = ExperimentErrors.realistic(0)
D = ExperimentErrors(defocus=20e-9)
CONFIGS = {
    "none": ExperimentErrors(),
    "D": D,
    "D+astig": dataclasses.replace(D, astigmatism=PRESET.astigmatism, astigmatism_angle=PRESET.astigmatism_angle),
    "D+src": dataclasses.replace(D, source_size=1e-10),
    "D+scale": dataclasses.replace(D, scale=PRESET.scale),
    "D+affine": dataclasses.replace(D, scale=PRESET.scale, rotation=PRESET.rotation, shear=PRESET.shear),
    "D+jd": dataclasses.replace(D, jitter=PRESET.jitter, drift=PRESET.drift),
    "src": ExperimentErrors(source_size=1e-10),
    "scale": ExperimentErrors(scale=PRESET.scale),
    "full": PRESET,
    "full+src": dataclasses.replace(PRESET, source_size=1e-10),
}


def fit_once(sample: str, errors: ExperimentErrors, dose: float, seed: int, noise: bool,
             prior: float | None, names: tuple[str, ...], scan: bool = False, jitter_seed: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray, float, float]:
    errors = dataclasses.replace(errors, seed=seed if jitter_seed is None else jitter_seed)
    d = simulate_ptychography(sample, dose=dose, frame_size=64, pixel_size=0.8e-10, seed=seed, probe_seed=0,
                              errors=errors, noise=noise)
    pm = d.probe_model
    probe = make_probe(pm.kind, d.frame_shape, d.pixel_size, d.energy, pm.semiangle, pm.defocus, pm.cs, 1.0,
                       pm.zones, pm.diameter, pm.seed)
    t = time.perf_counter()
    fit = estimate_aberrations(d.frames, d.positions, probe, d.pixel_size, d.energy, names=names,
                               prior_rms_m=None if prior is None else prior * 1e-9, scan=scan)
    x = np.array([fit.coefficients[k] for k in names]) * 1e9
    se = np.array([fit.standard_error.get(k, np.nan) for k in names]) * 1e9
    return x, se, fit.significance, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample")
    parser.add_argument("--doses", default="20,100")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--prior", type=float, default=20.0, help="prior rms, nm; 0: none")
    parser.add_argument("--noiseless", action="store_true", help="also the noiseless fit (dose 100)")
    parser.add_argument("--names", default="C10,C12a,C12b")
    parser.add_argument("--scan", action="store_true", help="fit the scan matrix jointly (parallax_scan)")
    parser.add_argument("--jitter-seed", type=int, default=None,
                        help="one jitter realisation for every noise seed (default: the noise seed's)")
    args = parser.parse_args()
    prior = args.prior or None
    names = tuple(args.names.split(","))
    for cname in args.configs.split(","):
        errors = CONFIGS[cname]
        truth = np.array([errors.probe_errors.get(k, 0.0) for k in names]) * 1e9
        runs = [("noiseless", 100.0, 1, False)] if args.noiseless else []
        runs += [(f"{float(dose):g}", float(dose), int(s), True) for dose in args.doses.split(",")
                 for s in args.seeds.split(",") if args.doses]
        by_dose: dict[str, list[np.ndarray]] = {}
        for label, dose, seed, noise in runs:
            x, se, sig, dt = fit_once(args.sample, errors, dose, seed, noise, prior, names, args.scan,
                                     args.jitter_seed)
            by_dose.setdefault(label, []).append(x)
            print(f"{cname:9s} {label:>9s} seed {seed}: {np.round(x, 1).tolist()} nm (truth {np.round(truth, 1).tolist()}), "
                  f"± {np.round(se, 1).tolist()}, χ² {sig:.1f}, {dt:.0f} s", flush=True)
        for label, xs in by_dose.items():
            arr = np.array(xs)
            print(f"  {cname} {label}: bias {np.round(arr.mean(0) - truth, 1).tolist()} nm, "
                  f"spread {np.round(arr.std(0, ddof=1) if len(arr) > 1 else arr[0] * 0, 1).tolist()} nm (n={len(arr)})",
                  flush=True)


if __name__ == "__main__":
    main()
