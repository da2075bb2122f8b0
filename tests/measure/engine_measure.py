"""Measurements behind the engine defaults (not a test), on synthetic weak-phase objects with
the same prior and the same iteration budget for every configuration:

    python tests/measure/engine_measure.py truncation [--doses 5,20,200] [--seeds 3] [--outliers 0]
    python tests/measure/engine_measure.py mu0 [--doses 5,20,200] [--seeds 3]
    python tests/measure/engine_measure.py prior [--doses 20] [--seeds 2]

Prints markdown tables: mean ± sd over seeds of the FRC resolution at thresholds 0.5 and 0.143
(cycles/pixel, larger = finer, pooled rings), the NRMSE and the phase correlation with the truth
inside the scored region (mean ice phase removed)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# engine_helpers sits in tests/, one level up (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/: engine_helpers
from cryoptycho.gpu.reconstruct import reconstruct
from engine_helpers import frc_resolution, nrmse, phase_corr, scored_region, synthetic_dataset

STEP_PX = 3.0


def score(state, data) -> tuple[float, float, float, float]:
    region = scored_region(data.truth_object, 12)
    return (
        frc_resolution(state.object, data.truth_object, region, 0.5)[0],
        frc_resolution(state.object, data.truth_object, region, 1 / 7)[0],
        nrmse(state.object, data.truth_object, region),
        phase_corr(state.object, data.truth_object, region),
    )


def dataset(dose: float, seed: int, grid: int, outliers: float):
    counts = dose * STEP_PX**2  # 1 Å pixels: e⁻ per pattern = dose × step area (Å²)
    data = synthetic_dataset(counts, grid=grid, step_px=STEP_PX, seed=seed, radius_px=(2.5, 5.0))
    if outliers > 0:
        # Unmasked hot pixels / X-ray hits: rare measurements with a large spurious count.
        rng = np.random.default_rng(1000 + seed)
        hit = rng.random(data.frames.shape) < outliers
        data.frames = data.frames + (hit * 20).astype(data.frames.dtype)
    return data


def table(title: str, rows: dict[str, list]) -> None:
    print(f"\n### {title}")
    print("| config | FRC@0.5 (1/px) | FRC@0.143 (1/px) | NRMSE | phase corr | s/run |")
    print("|---|---|---|---|---|---|")
    for name, vals in rows.items():
        v = np.asarray(vals)
        m, s = v.mean(axis=0), v.std(axis=0)
        print(f"| {name} | {m[0]:.3f} ± {s[0]:.3f} | {m[1]:.3f} ± {s[1]:.3f} | "
              f"{m[2]:.4f} ± {s[2]:.4f} | {m[3]:.3f} ± {s[3]:.3f} | {m[4]:.1f} |", flush=True)


def run(configs: dict[str, dict], args: argparse.Namespace, what: str) -> None:
    for dose in [float(d) for d in args.doses.split(",")]:
        rows: dict[str, list] = {name: [] for name in configs}
        for seed in range(args.seeds):
            data = dataset(dose, seed, args.grid, args.outliers)
            for name, cfg in configs.items():
                t0 = time.perf_counter()
                opts = {"iterations": args.iterations, "refine_probe": False, "seed": seed,
                        "prior": "tikhonov", "mu0": args.mu0, "truncation": "none", **cfg}
                state = reconstruct(data, opts)
                rows[name].append((*score(state, data), time.perf_counter() - t0))
        counts = dose * STEP_PX**2
        table(f"{what}: dose {dose:g} e/Å² ({counts:.0f} e/pattern, {counts / 32**2:.3f} e/pixel), "
              f"outliers {args.outliers:g}, {args.iterations} it, {args.seeds} seeds", rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["truncation", "mu0", "prior"])
    ap.add_argument("--doses", default="5,20,200")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--grid", type=int, default=12)
    ap.add_argument("--mu0", type=float, default=0.0125)
    ap.add_argument("--outliers", type=float, default=0.0)
    args = ap.parse_args()
    if args.what == "mu0":
        configs = {f"{model} mu0={mu:g}": {"noise_model": model, "mu0": mu}
                   for model in ("poisson", "amplitude") for mu in (0.000375, 0.00125, 0.00375, 0.0125, 0.0375, 0.125)}
    elif args.what == "prior":
        configs = {"tikhonov mu0=0.03": {"prior": "tikhonov", "mu0": 0.03}}
        for den in ("gaussian", "bm3d"):
            for mu1 in (0.001, 0.003, 0.01, 0.03, 0.08):
                configs[f"sparse {den} mu1={mu1:g}"] = {"prior": "sparse", "denoiser": den,
                                                       "mu1": mu1, "denoise_every": 5}
    else:
        configs = {"poisson, none": {}, "amplitude, none": {"noise_model": "amplitude"}}
        for rule, alphas in (("chen-candes", (5, 10, 25)), ("high-intensity", (5, 10)),
                             ("poisson-floor", (3, 5))):
            for a in alphas:
                configs[f"poisson, {rule} α={a}"] = {"truncation": rule, "alpha_h": float(a)}
        configs["amplitude, poisson-floor α=5"] = {"noise_model": "amplitude",
                                                   "truncation": "poisson-floor", "alpha_h": 5.0}
    run(configs, args, args.what)


if __name__ == "__main__":
    main()
