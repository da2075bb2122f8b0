"""Which realistic error costs what (not a test; reproduces gpu/MEASUREMENTS.md "Realistic scans:
the gap, one error at a time"):

    python tests/measure/realistic_ablation_measure.py hemoglobin 20 [--seed 0] [--iterations 40]
        [--runs oracle,nominal,parallax,true_probe,true_positions,...] [--exact-probe] [--only TERM]
        [--out rows.jsonl]

The frames of ``cryoptycho bench paper --realistic --seed S`` (64×64 frames, 0.8 Å, multislice,
``ExperimentErrors.realistic(S)``: 20 nm defocus and 10 nm astigmatism off, 2 % / −1 % scale,
0.5° rotation, 1 % shear, 0.3 Å jitter, 1 Å drift), reconstructed with the bench's options
(``iterations`` CG, the probe fixed, the same prior) while the engine is given the truth for one
error term at a time:

* ``oracle``: true probe, true positions;
* ``nominal``: nominal probe and positions, no parallax fit;
* ``parallax``: the defaults (the parallax fit corrects the nominal probe model);
* ``true_probe``: true probe, nominal positions;
* ``true_positions``: nominal probe (no parallax fit), true positions;
* ``parallax_true_positions``: the defaults' parallax-corrected probe, true positions;
* ``true_affine``: nominal probe, the nominal positions through the true affine map (jitter and
  drift left out);
* ``true_probe_affine``: true probe, true affine (jitter and drift the only errors left);
* ``true_probe_affine_drift``: true probe, true affine and drift (jitter the only error left);
* ``refined``: ``bench paper``'s old refinement column (``refine_positions`` with the fixed
  0.5 px residual prior + ``aberration_search`` of C10, the parallax fit off);
* any other name ``NAME`` with ``--extra NAME='{"option": value}'``: the nominal scan with those
  options over the bench's; ``NAME@RUN``: over the data and options of the run ``RUN`` (e.g.
  ``pos@true_probe`` refines the positions with the true probe).

Scores (``evaluate_against_truth``): phase correlation and phase NRMSE with the official
translation-only registration, and the same two after ``metrics.affine_registered`` (the affine
map from the positions the run used to the true ones, as ``bench paper``'s extra column)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.metrics import affine_registered
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.errors import ExperimentErrors
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.sim.specimen import load_model

#: ``bench paper``'s refinement column as it was measured here: the fixed 0.5 px residual prior
#: (``position_residual_auto`` off; it is the default now, ``--extra
#: 'ra@refined={"position_residual_auto": true}'``) and the parallax fit off (the bench now runs its
#: refinement on top of the defaults)
REFINEMENT = {"refine_positions": True, "position_residual_auto": False, "aberration_search": True,
              "aberrations": ["C10"], "aberration_search_iterations": 30, "aberration_search_rounds": 2,
              "parallax": False}


#: the preset's fields that make each error term (``--only``)
TERMS = {"defocus": ("defocus",), "astigmatism": ("astigmatism", "astigmatism_angle"), "scale": ("scale",),
         "rotation": ("rotation",), "shear": ("shear",), "jitter": ("jitter",), "drift": ("drift",)}


def single_error(errors: ExperimentErrors, term: str) -> ExperimentErrors:
    """The preset with only ``term`` left (the other terms exact, the seed kept)."""
    keep = {f: getattr(errors, f) for f in TERMS[term]}
    return dataclasses.replace(ExperimentErrors(seed=errors.seed), **keep)


def position_rms(used: object, truth: object) -> float:
    """rms per axis (m) of the positions used against the true ones, the mean translation (a
    gauge) removed."""
    import numpy as np

    d = np.asarray(used, dtype=np.float64).reshape(-1, 2) - np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    d -= d.mean(axis=0)
    return float(np.sqrt(np.mean(d**2)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sample")
    ap.add_argument("dose", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--runs", default="oracle,nominal,parallax,true_probe,true_positions,true_affine,"
                                      "true_probe_affine,true_probe_affine_drift")
    ap.add_argument("--extra", action="append", default=[], help="NAME={json options} for a run NAME")
    ap.add_argument("--out", default=None, help="append each row as JSON to this file")
    ap.add_argument("--exact-probe", action="store_true",
                    help="the preset without its probe error (the nominal probe is exactly right; the scan "
                         "errors stay): the control for false parallax corrections")
    ap.add_argument("--only", default=None,
                    help="keep ONE error term of the preset (defocus, astigmatism, scale, rotation, shear, "
                         "jitter, drift), the others exact: the single-error budget")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    errors = ExperimentErrors.realistic(args.seed)
    if args.exact_probe:
        errors = dataclasses.replace(errors, defocus=0.0, astigmatism=0.0)
    if args.only:
        errors = single_error(errors, args.only)
    px = 0.8e-10
    t = time.perf_counter()
    data = simulate_ptychography(load_model(args.sample).centred(), dose=args.dose, frame_size=64,
                                 pixel_size=px, seed=args.seed, probe_seed=args.seed, errors=errors)
    print(f"# {args.sample} {args.dose:g} e/A2 seed {args.seed}: {len(data.positions)} positions, "
          f"simulated in {time.perf_counter() - t:.0f} s", flush=True)
    nominal_pos = data.positions
    no_jitter = dataclasses.replace(errors, jitter=0.0)
    affine_pos = dataclasses.replace(no_jitter, drift=(0.0, 0.0)).true_positions(nominal_pos)
    affine_drift_pos = no_jitter.true_positions(nominal_pos)

    def true_probe(d, positions):  # type: ignore[no-untyped-def]
        return dataclasses.replace(d, probe=data.truth_probe, probe_model=None, positions=positions)

    no_parallax = {"parallax": False}
    runs = {
        "oracle": (true_probe(data, data.truth_positions), no_parallax),
        "nominal": (data, no_parallax),
        "parallax": (data, {}),
        "true_probe": (true_probe(data, nominal_pos), no_parallax),
        "true_positions": (dataclasses.replace(data, positions=data.truth_positions), no_parallax),
        "parallax_true_positions": (dataclasses.replace(data, positions=data.truth_positions), {}),
        "true_affine": (dataclasses.replace(data, positions=affine_pos), no_parallax),
        "true_probe_affine": (true_probe(data, affine_pos), no_parallax),
        "true_probe_affine_drift": (true_probe(data, affine_drift_pos), no_parallax),
        "refined": (data, REFINEMENT),
    }
    for spec in args.extra:
        name, _, js = spec.partition("=")
        on = name.partition("@")[2]  # NAME@RUN: over that run's data and options
        d0, o0 = runs[on] if on else (data, {})
        runs[name] = (d0, {**o0, **json.loads(js)})
    base = ReconOptions(iterations=args.iterations, refine_probe=False)
    for name in args.runs.split(","):
        d, extra = runs[name]
        t = time.perf_counter()
        st = reconstruct(d, base.merged(extra))
        wall = time.perf_counter() - t
        obj, org = to_numpy(st.object), st.geometry.origin
        ev = evaluate_against_truth(obj, org, data.truth_object, data.truth_origin, px, data.truth_positions)
        reg = affine_registered(obj, org, px, st.positions, data.truth_positions)
        ev_aff = evaluate_against_truth(reg, org, data.truth_object, data.truth_origin, px, data.truth_positions)
        row = {"sample": args.sample, "dose": args.dose, "seed": args.seed, "run": name, "only": args.only,
               "exact_probe": args.exact_probe,
               "phase_corr": round(ev.phase_correlation, 4), "phase_nrmse": round(ev.phase_nrmse, 4),
               "res_1bit_A": round(ev.resolutions["particle/pooled/1-bit"] * 1e10, 2),
               "affine_corr": round(ev_aff.phase_correlation, 4),
               "affine_nrmse": round(ev_aff.phase_nrmse, 4), "nrmse_T": round(ev.nrmse, 4),
               "pos_rms_A": round(position_rms(st.positions, data.truth_positions) * 1e10, 3),
               "probe_estimate": {k: (round(v * 1e9, 2) if isinstance(v, float) and k.endswith("_m") else v)
                                  for k, v in (st.probe_estimate or {}).items()
                                  if isinstance(v, (int, float, str, bool))},
               "wall_s": round(wall, 1)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
