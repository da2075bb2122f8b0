"""Measurements behind the dose-aware Tikhonov weight (gpu/ENGINE.md, "Dose-aware μ₀"); not a
test, run by hand:

    python tests/measure/dose_measure.py [--samples hemoglobin] [--doses 5,20,100] [--seeds 0]
        [--mu0 0.003,0.01,0.03,0.1,0.3] [--iterations 40] [--frame-size 64] [--large]

``--large``: the ribosome's geometry of ``cryoptycho bench paper --large`` (48×48 frames, 1.6 Å
pixels, 5 mrad randomized probe, thin object), a fraction of the 0.8 Å geometry's cost.

Each dataset (`simulate_ptychography`, probe seed 0, noise seed = seed) is reconstructed with
the exact probe fixed at every fixed μ₀ of the grid and with ``mu0="auto"`` (the default), and
scored by `evaluate_against_truth` inside the particle footprint: phase correlation and the
pooled 1-bit FRC resolution (Å). Prints one line per run and a markdown table; the last
columns say whether "auto" is within 5 % of the best fixed μ₀ of the grid in both scores.
Simulated datasets are cached under $TMPDIR (pickle) so that reruns skip the simulation.
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.evaluation import evaluate_against_truth
from cryoptycho.gpu.sim.ptycho import simulate_ptychography


def dataset(sample: str, dose: float, seed: int, frame_size: int, large: bool = False):  # type: ignore[no-untyped-def]
    tag = "_large" if large else ""
    cache = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / f"dose_measure_{sample}_{dose:g}_{seed}_{frame_size}{tag}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    geometry = {"pixel_size": 1.6e-10, "semiangle": 5e-3, "multislice": False} if large else {}
    data = simulate_ptychography(sample, dose=dose, seed=seed, probe_seed=0, frame_size=frame_size, **geometry)
    cache.write_bytes(pickle.dumps(data))
    return data


def run(data, mu0: float | str, iterations: int) -> tuple[float, float, float, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    state = reconstruct(data, ReconOptions(iterations=iterations, refine_probe=False, mu0=mu0, parallax=False))
    ev = evaluate_against_truth(to_numpy(state.object), state.geometry.origin, data.truth_object,
                                data.truth_origin, data.real_pixel_size, data.positions)
    used = float(state.options["mu0"])  # "auto" is saved as the value it decided
    return (ev.phase_correlation, ev.resolutions["particle/pooled/1-bit"] * 1e10, used,
            time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", default="hemoglobin")
    ap.add_argument("--doses", default="5,20,100")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--mu0", default="0.003,0.01,0.03,0.1,0.3")
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--frame-size", type=int)
    ap.add_argument("--large", action="store_true", help="bench paper --large geometry (frame size 48)")
    ap.add_argument("--no-auto", action="store_true", help="only the fixed grid")
    ap.add_argument("--only-auto", action="store_true", help="only mu0 'auto' (lines, no table)")
    args = ap.parse_args()
    if args.frame_size is None:
        args.frame_size = 48 if args.large else 64
    grid = [] if args.only_auto else [float(v) for v in args.mu0.split(",")]
    rows = []
    for sample in args.samples.split(","):
        for dose in (float(d) for d in args.doses.split(",")):
            scores: dict[str, list[tuple[float, float, float]]] = {}
            for seed in (int(s) for s in args.seeds.split(",")):
                data = dataset(sample, dose, seed, args.frame_size, args.large)
                for mu0 in [*grid] + ([] if args.no_auto else ["auto"]):
                    pc, res, used, s = run(data, mu0, args.iterations)
                    scores.setdefault(str(mu0), []).append((pc, res, used))
                    print(f"{sample} {dose:g} seed {seed} mu0 {mu0!s:>6} (used {used:.4g}): phase corr "
                          f"{pc:.3f}, pooled 1-bit {res:.1f} Å, {s:.0f} s", flush=True)
            if not grid:
                continue
            mean = {k: np.mean(np.asarray(v), axis=0) for k, v in scores.items()}
            best_pc = max(mean[str(m)][0] for m in grid)
            best_res = min(mean[str(m)][1] for m in grid)
            auto = mean.get("auto", np.full(3, np.nan))
            rows.append((sample, dose, [mean[str(m)] for m in grid], auto,
                         auto[0] >= 0.95 * best_pc, auto[1] <= 1.05 * best_res))
    print("\n| sample | dose | " + " | ".join(f"μ₀ = {m:g}" for m in grid)
          + " | auto (μ₀ used) | auto within 5 % (corr / FRC) |")
    print("|---|---|" + "---|" * (len(grid) + 2))
    for sample, dose, fixed, auto, ok_pc, ok_res in rows:
        cells = [f"{pc:.3f} / {res:.1f}" for pc, res, _ in fixed]
        print(f"| {sample} | {dose:g} | " + " | ".join(cells)
              + f" | {auto[0]:.3f} / {auto[1]:.1f} ({auto[2]:.3g}) | {'yes' if ok_pc else 'NO'} / "
              f"{'yes' if ok_res else 'NO'} |")


if __name__ == "__main__":
    main()
