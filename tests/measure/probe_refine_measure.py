"""Where probe refinement starts to pay: the measurement behind ``probe_refine_min_counts``
(gpu/options.py; gpu/MEASUREMENTS.md, "Probe refinement against counts per pattern"). Not a test:

    python tests/measure/probe_refine_measure.py [--data synthetic|hemoglobin] [--counts 300,1e3,...]
        [--seeds 0,1] [--defocus-errors 15e-9,30e-9] [--iterations 100]

gpu/MEASUREMENTS.md's tables: the defaults (synthetic, ≈ 2 min on 2 shared cores), and
``--data hemoglobin --seeds 0,1 --defocus-errors 20e-9`` (≈ 15 s a run, ≈ 16 min).

For each dataset, mean counts per pattern and start probe — (a) the exact probe, (b) the exact
probe defocused by each of ``--defocus-errors`` — the same reconstruction runs twice, probe fixed and probe
refined; nothing else differs (iterations, prior, seed, probe_start_iteration are the engine
defaults). Scores: phase correlation and NRMSE against the truth object, and the final probe's
overlap |⟨ψ, ψ_true⟩| / (‖ψ‖‖ψ_true‖).

Data: ``synthetic`` is the engine tests' weak-phase object (tests/engine_helpers.py: 32×32
frames, 1 Å pixels, defocused 8 mrad probe, 8×8 positions 3 Å apart); ``hemoglobin`` is the demo's
simulation (64×64 frames, randomized probe, 340 positions), its noiseless intensities scaled to
each count level, then Poisson-sampled (no detector model: the counting detector's coincidence
loss at 10⁴–10⁵ counts per pattern would confound the comparison).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

# engine_helpers sits in tests/, one level up (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent.parent))
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.data import PtychoData
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import aberration_phase
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.state import ReconState
from engine_helpers import nrmse, phase_corr, scored_region, synthetic_dataset

STEP_PX = 3.0


def defocused(probe: np.ndarray, pixel_size: float, energy: float, error_m: float) -> np.ndarray:
    """``probe`` propagated by ``error_m`` (a defocus error of the assumed probe)."""
    chi = aberration_phase(probe.shape, pixel_size, energy, error_m)
    return np.fft.ifft2(np.fft.fft2(probe) * np.exp(-1j * chi)).astype(np.complex64)


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(np.vdot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b))


class Synthetic:
    """The engine tests' weak-phase data at a given mean count per pattern."""

    name = "synthetic"

    def data(self, counts: float, seed: int) -> PtychoData:
        return synthetic_dataset(counts, grid=8, step_px=STEP_PX, seed=seed, radius_px=(2.5, 5.0))

    def score(self, state: ReconState, data: PtychoData) -> tuple[float, float]:
        region = scored_region(data.truth_object, 12)
        obj = to_numpy(state.object)
        return phase_corr(obj, data.truth_object, region), nrmse(obj, data.truth_object, region)


class Hemoglobin:
    """The demo's hemoglobin scan, noiseless intensities scaled to the count level."""

    name = "hemoglobin"

    def __init__(self) -> None:
        from cryoptycho.gpu.sim.ptycho import simulate_ptychography

        self.clean = simulate_ptychography(dose=20.0, seed=0, probe_seed=0, noise=False)

    def data(self, counts: float, seed: int) -> PtychoData:
        clean = self.clean
        expected = np.asarray(clean.frames, np.float64)
        expected *= counts / (expected.sum() / len(expected))
        frames = np.random.default_rng(seed).poisson(expected)
        dtype = np.uint16 if frames.max() < 65536 else np.uint32
        return replace(clean, frames=frames.astype(dtype), probe=np.asarray(clean.truth_probe))

    def score(self, state: ReconState, data: PtychoData) -> tuple[float, float]:
        from cryoptycho.gpu.sim.evaluation import evaluate_against_truth

        ev = evaluate_against_truth(to_numpy(state.object), state.geometry.origin, data.truth_object,
                                    data.truth_origin, data.real_pixel_size, data.positions)
        return ev.phase_correlation, ev.nrmse


def starts(data: PtychoData, errors_m: list[float]) -> dict[str, np.ndarray]:
    """The start probes: exact, and defocused by each error."""
    truth = np.asarray(data.truth_probe)
    out = {"exact": truth}
    for err in errors_m:
        out[f"{err * 1e9:+.0f} nm"] = defocused(truth, data.real_pixel_size, data.energy, err)
    return out


def measure(source: Synthetic | Hemoglobin, counts: list[float], seeds: list[int], errors_m: list[float],
            iterations: int) -> dict[tuple[float, str, bool], list[tuple[float, float, float]]]:
    """(counts, start, refined) → [(phase corr, NRMSE, probe overlap) per seed]; prints each run."""
    rows: dict[tuple[float, str, bool], list[tuple[float, float, float]]] = defaultdict(list)
    for c in counts:
        for seed in seeds:
            data = source.data(c, seed)
            truth_probe = np.asarray(data.truth_probe)
            for start, probe in starts(data, errors_m).items():
                for refine in (False, True):
                    t0 = time.perf_counter()
                    opts = ReconOptions(iterations=iterations, refine_probe=refine, seed=seed)
                    state = reconstruct(replace(data, probe=probe), opts)
                    corr, err = source.score(state, data)
                    ov = overlap(to_numpy(state.probe), truth_probe)
                    rows[(c, start, refine)].append((corr, err, ov))
                    print(f"{source.name} counts {c:8.0f} seed {seed} {start:<7} "
                          f"{'refined' if refine else 'fixed  '} {time.perf_counter() - t0:5.1f} s  "
                          f"corr {corr:.3f}  nrmse {err:.4f}  probe overlap {ov:.3f}", flush=True)
    return rows


def table(name: str, rows: dict[tuple[float, str, bool], list[tuple[float, float, float]]],
          start_overlap: dict[str, float]) -> None:
    print(f"\n### {name}: probe fixed vs refined (mean ± sd over seeds)")
    print("| counts/pattern | start probe (overlap) | phase corr. fixed | refined | NRMSE fixed | refined "
          "| probe overlap refined |")
    print("|---|---|---|---|---|---|---|")
    for c, start in sorted({(k[0], k[1]) for k in rows}, key=lambda k: (k[1] != "exact", k[1], k[0])):
        fixed = np.asarray(rows[(c, start, False)])
        refined = np.asarray(rows[(c, start, True)])

        def cell(v: np.ndarray) -> str:
            return f"{v.mean():.3f} ± {v.std():.3f}"

        print(f"| {c:.0f} | {start} ({start_overlap[start]:.2f}) | {cell(fixed[:, 0])} | {cell(refined[:, 0])} | "
              f"{cell(fixed[:, 1])} | {cell(refined[:, 1])} | {cell(refined[:, 2])} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="synthetic", help="synthetic, hemoglobin or both (comma)")
    ap.add_argument("--counts", default="300,1e3,3e3,1e4,3e4,1e5,3e5,1e6")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--defocus-errors", default="15e-9,30e-9", help="metres, comma-separated")
    ap.add_argument("--iterations", type=int, default=100)
    args = ap.parse_args()
    counts = [float(c) for c in args.counts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for kind in args.data.split(","):
        source: Synthetic | Hemoglobin = Synthetic() if kind == "synthetic" else Hemoglobin()
        errors = [float(e) for e in args.defocus_errors.split(",") if e]
        rows = measure(source, counts, seeds, errors, args.iterations)
        data = source.data(counts[0], seeds[0])
        truth = np.asarray(data.truth_probe)
        table(source.name, rows, {k: overlap(v, truth) for k, v in starts(data, errors).items()})


if __name__ == "__main__":
    main()
