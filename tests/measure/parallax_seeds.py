"""The parallax fit's accuracy over noise realisations (gpu/MEASUREMENTS.md, "Parallax estimate
of the probe aberrations"): the realistic preset's probe errors, fitted from the nominal probe
and positions, for each sample, dose and noise seed.

    python tests/measure/parallax_seeds.py hemoglobin 5,20,100 1,2,3,4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cryoptycho.gpu.parallax import estimate_aberrations
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def main(sample: str, doses: list[float], seeds: list[int]) -> None:
    errors = ExperimentErrors.realistic(0)
    truth = np.array([errors.probe_errors[k] for k in ("C10", "C12a", "C12b")]) * 1e9
    for dose in doses:
        for seed in seeds:
            d = simulate_ptychography(sample, dose=dose, frame_size=64, pixel_size=0.8e-10, seed=seed,
                                      probe_seed=0, errors=errors)
            pm = d.probe_model
            probe = make_probe(pm.kind, d.frame_shape, d.pixel_size, d.energy, pm.semiangle, pm.defocus,
                               pm.cs, 1.0, pm.zones, pm.diameter, pm.seed)
            t = time.perf_counter()
            fit = estimate_aberrations(d.frames, d.positions, probe, d.pixel_size, d.energy)
            x = np.array(list(fit.coefficients.values())) * 1e9
            print(f"{sample} {dose:g} e/A2 seed {seed}: C10/C12a/C12b {np.round(x, 1).tolist()} nm, "
                  f"error {np.linalg.norm(x - truth):.1f} nm (nominal {np.linalg.norm(truth):.1f}), "
                  f"± {[round(v * 1e9, 1) for v in fit.standard_error.values()]}, "
                  f"{time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample", help="hemoglobin, proteasome, … (proteasome needs $CRYOPTYCHO_STRUCTURES)")
    parser.add_argument("doses", help="comma-separated e⁻/Å², e.g. 5,20,100")
    parser.add_argument("seeds", help="comma-separated noise seeds, e.g. 1,2,3,4")
    args = parser.parse_args()
    main(args.sample, [float(v) for v in args.doses.split(",")], [int(v) for v in args.seeds.split(",")])
