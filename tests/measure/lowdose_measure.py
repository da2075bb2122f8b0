"""Measurements behind gpu/MEASUREMENTS.md, "Low-dose quality at 20 e⁻/Å²" (not a test: run by hand).

    python tests/measure/lowdose_measure.py [--seeds 0,1,2] [--dose 20] [--only quantum,fixed,refined,stream]

The demo's dataset (hemoglobin, 50 nm ice, randomized probe, 64×64 frames, 0.8 Å; noise seed
varies, probe seed 0) reconstructed in the ways the demo and `bench paper` do, each scored by
`evaluate_against_truth`, beside the quantum limit (ideal phase-contrast image, same dose):

* ``fixed-N``: offline CG, N iterations, the exact probe fixed (`bench paper`);
* ``refined-100``: offline with the engine defaults (probe refined from iteration 10);
* ``stream-refined`` / ``stream-fixed``: the daemon's path — mini-batch steps while 16-frame
  chunks arrive (4 steps per chunk, as the demo's worker manages), then ``refine(100)``.
Prints one line per run and a mean ± sd table (markdown).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.reconstruct import reconstruct
from cryoptycho.gpu.sim.evaluation import Evaluation, evaluate_against_truth, quantum_limit
from cryoptycho.gpu.sim.ptycho import simulate_ptychography
from cryoptycho.gpu.stream import StreamingReconstructor

KEYS = ("phase_correlation", "raw", "pooled", "nrmse", "probe_overlap")


def _scores(ev: Evaluation, probe: np.ndarray | None, truth_probe: np.ndarray) -> dict[str, float]:
    overlap = float("nan")
    if probe is not None:
        overlap = abs(np.vdot(probe, truth_probe)) / np.linalg.norm(probe) / np.linalg.norm(truth_probe)
    return {"phase_correlation": ev.phase_correlation, "raw": ev.resolutions["particle/raw/1-bit"] * 1e10,
            "pooled": ev.resolutions["particle/pooled/1-bit"] * 1e10, "nrmse": ev.nrmse,
            "probe_overlap": float(overlap)}


def _streamed(data, refine_probe: bool):  # type: ignore[no-untyped-def]
    from cryoptycho.gpu.probes import make_probe, scale_probe

    pm = data.probe_model
    probe = make_probe(pm.kind, data.frame_shape, data.real_pixel_size, data.energy, pm.semiangle, pm.defocus,
                       pm.cs, 1.0, pm.zones, pm.diameter, pm.seed)
    probe = scale_probe(np.asarray(probe, np.complex64), data.frames[:16], None)
    pos = np.asarray(data.positions)
    extent = ((pos[:, 0].min(), pos[:, 0].max()), (pos[:, 1].min(), pos[:, 1].max()))
    engine = StreamingReconstructor(
        frame_shape=data.frame_shape, frame_dtype=data.frames.dtype, pixel_size=data.real_pixel_size,
        probe=probe, options=ReconOptions(refine_probe=refine_probe), extent_m=extent,
        expected_frames=len(pos), energy_eV=data.energy,
    )
    for i in range(0, len(pos), 16):
        engine.add_frames(data.frames[i:i + 16], pos[i:i + 16])
        for _ in range(4):
            engine.step()
    engine.refine(100)
    return engine.snapshot()


def measure_seed(seed: int, dose: float, only: set[str], table: dict[str, list[dict[str, float]]]) -> None:
    """Every requested run on the dataset of noise seed ``seed``; rows appended to ``table``."""
    data = simulate_ptychography(dose=dose, seed=seed, probe_seed=0)
    px, tp = data.real_pixel_size, data.truth_probe
    if "quantum" in only:
        row = _scores(quantum_limit(data.truth_object, data.truth_origin, px, data.positions, dose, seed=seed),
                      None, tp)
        table["quantum-limit"].append(row)
        print(f"seed {seed} quantum-limit  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    runs: list[tuple[str, Callable[[], Any]]] = []
    if "fixed" in only:
        runs += [(f"fixed-{n}", partial(reconstruct, data, ReconOptions(iterations=n, refine_probe=False)))
                 for n in (20, 40, 100)]
    if "refined" in only:
        runs.append(("refined-100", partial(reconstruct, data, ReconOptions(iterations=100))))
    if "stream" in only:
        runs += [("stream-refined", partial(_streamed, data, True)), ("stream-fixed", partial(_streamed, data, False))]
    for name, run in runs:
        t0 = time.perf_counter()
        state = run()
        ev = evaluate_against_truth(to_numpy(state.object), state.geometry.origin, data.truth_object,
                                    data.truth_origin, px, data.positions)
        row = _scores(ev, to_numpy(state.probe), tp)
        table[name].append(row)
        print(f"seed {seed} {name:<15} {time.perf_counter() - t0:5.1f} s  "
              + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dose", type=float, default=20.0)
    ap.add_argument("--only", default="quantum,fixed,refined,stream")
    args = ap.parse_args()
    table: dict[str, list[dict[str, float]]] = defaultdict(list)
    for seed in (int(s) for s in args.seeds.split(",")):
        measure_seed(seed, args.dose, set(args.only.split(",")), table)
    print("\n| run | phase corr. | FRC 1-bit raw (Å) | FRC 1-bit pooled (Å) | NRMSE | probe overlap |")
    print("|---|---|---|---|---|---|")
    for name, rows in table.items():
        cells = []
        for k in KEYS:
            v = np.array([r[k] for r in rows])
            cells.append("–" if np.all(np.isnan(v)) else
                         "n/r" if np.any(np.isinf(v)) else f"{v.mean():.3g} ± {v.std():.2g}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
