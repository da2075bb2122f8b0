"""Does a probe refinement after the parallax fit gain? (gpu/MEASUREMENTS.md, "Parallax estimate
of the probe aberrations", issue 14 item 3): the frames of ``bench paper --realistic`` (seed 0,
64×64 frames, 0.8 Å pixels, multislice) reconstructed with the oracle (true probe and positions),
the nominal probe, the defaults (parallax "auto"), the parallax probe refined by
``refine_aberrations`` and by ``aberration_search`` (C10, 30 CG per trial, 2 rounds, as bench
paper's "refined" column but without positions), side by side, scored as bench paper does.

    python tests/measure/parallax_refine_measure.py proteasome 20,100 [--iterations 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model

RUNS = {
    "oracle": None,
    "nominal": {"parallax": False},
    "parallax": {},
    "parallax+refine": {"refine_aberrations": True, "aberrations": ["C10", "C12a", "C12b"]},
    "parallax+refine(C10)": {"refine_aberrations": True, "aberrations": ["C10"]},
    "parallax+search": {"aberration_search": True, "aberrations": ["C10"],
                        "aberration_search_iterations": 30, "aberration_search_rounds": 2},
    #: the search on an exact probe (true probe and positions): does it move a right probe?
    "oracle+search": {"parallax": False, "aberration_search": True, "aberrations": ["C10"],
                      "aberration_search_iterations": 30, "aberration_search_rounds": 2},
}


def main(sample: str, doses: list[float], iterations: int, runs: list[str], out: str | None,
         seed: int = 0) -> None:
    model = load_model(sample).centred()
    errors = ExperimentErrors.realistic(seed)  # as bench paper --realistic --seed
    base = ReconOptions(iterations=iterations, refine_probe=False)
    table = []
    for dose in doses:
        nominal = simulate_ptychography(model, dose=dose, frame_size=64, pixel_size=0.8e-10, seed=seed,
                                        probe_seed=seed, errors=errors)
        oracle = dataclasses.replace(nominal, positions=nominal.truth_positions,
                                     probe=nominal.truth_probe, probe_model=None)
        for name in runs:
            extra = RUNS[name]
            data = oracle if extra is None or name.startswith("oracle") else nominal
            opts = base.merged({"parallax": False} if extra is None else extra)
            t = time.perf_counter()
            state = reconstruct(data, opts)
            seconds = time.perf_counter() - t
            ev = evaluate_against_truth(to_numpy(state.object), state.geometry.origin, nominal.truth_object,
                                        nominal.truth_origin, 0.8e-10, nominal.positions)
            s = ev.summary()
            row = {"sample": sample, "dose": dose, "seed": seed, "run": name, "seconds": round(seconds, 1),
                   "phase_corr": round(s["phase_correlation"], 3), "nrmse": round(s["nrmse"], 4),
                   "pooled_1bit_A": ev.resolutions["particle/pooled/1-bit"] * 1e10,
                   "summary": s}
            table.append(row)
            print(f"{sample} {dose:g} seed {seed} {name:22s} phase corr {row['phase_corr']} NRMSE {row['nrmse']} "
                  f"pooled 1-bit {row['pooled_1bit_A']:.1f} Å  {seconds:.0f} s", flush=True)
            if out:
                with open(out, "w") as f:
                    json.dump(table, f, indent=1, default=float)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sample")
    parser.add_argument("doses", help="comma-separated e⁻/Å²")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS))
    parser.add_argument("--json", dest="out")
    parser.add_argument("--seed", type=int, default=0, help="noise, probe and error seed (bench paper's --seed)")
    a = parser.parse_args()
    main(a.sample, [float(d) for d in a.doses.split(",")], a.iterations, a.runs.split(","), a.out, a.seed)
