"""Measurements behind the live position correction (gpu/MEASUREMENTS.md, "Live position
correction"); not a test, run by hand from the repository root:

    python tests/measure/live_positions_measure.py synthetic [--seeds 0,1,2]
    python tests/measure/live_positions_measure.py cost DATASET.h5 [--steps 40]

``synthetic``: the speckle-probe scan of tests/test_stream_positions.py (known affine error and
jitter) streamed in 4 parts through the StreamingReconstructor with no position refinement,
refinement after scan end only, and live + after; the object NRMSE (and position rms error)
at scan end and after ``refine(40)``. ``cost``: a profile of mini-batch steps with live
position refinement on a dataset file (e.g. `cryoptycho simulate --realistic`): the share of
the step time spent measuring positions and refitting the scan model.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_helpers import ENERGY, PIXEL, nrmse, weak_phase_object
from test_stream_positions import M, _distorted_scan, _rms_px


def synthetic(seeds: list[int]) -> None:
    from cryoptycho.gpu.geometry import fit_geometry
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.sim.evaluation import resample
    from cryoptycho.gpu.stream import StreamingReconstructor

    for seed in seeds:
        nominal, true, frames, probe = _distorted_scan(seed=seed)
        geo = fit_geometry(np.vstack([nominal, true]), PIXEL, (M, M))
        truth = weak_phase_object(geo.object_shape, seed)
        margin = M // 2 + 3
        shape = (geo.object_shape[0] - 2 * margin, geo.object_shape[1] - 2 * margin)
        origin = (geo.origin[0] + margin * PIXEL, geo.origin[1] + margin * PIXEL)
        target = truth[margin:margin + shape[0], margin:margin + shape[1]]
        whole = (slice(None), slice(None))
        print(f"seed {seed}: nominal {_rms_px(nominal, true):.2f} px")
        for name, live, refine in (("none", False, False), ("end only", False, True), ("live + end", True, True)):
            opts = ReconOptions(mu0=1e-3, refine_positions=refine, position_start_iteration=5,
                                stream={"batch_size": 16, "refine_positions": live})
            engine = StreamingReconstructor(frame_shape=(M, M), frame_dtype=np.uint16, pixel_size=PIXEL,
                                            probe=probe, options=opts, energy_eV=ENERGY)
            n = len(frames)
            for part in range(4):
                sl = slice(part * n // 4, (part + 1) * n // 4)
                engine.add_frames(frames[sl], nominal[sl])
                for i in range(50):
                    engine.step()
                    if i % 5 == 4:
                        engine.flush_losses()
            engine.flush_losses()

            s = engine.snapshot()
            end = nrmse(resample(s.object, s.geometry.origin, PIXEL, origin, shape), target, whole)
            end_px = _rms_px(engine.positions(), true)
            engine.refine(40)
            s = engine.snapshot()
            final = nrmse(resample(s.object, s.geometry.origin, PIXEL, origin, shape), target, whole)
            print(f"  {name:11s} scan end {end:.4f} ({end_px:.2f} px), after refine(40) "
                  f"{final:.4f} ({_rms_px(engine.positions(), true):.2f} px)")


def cost(dataset: str, steps: int) -> None:
    from cryoptycho.daemon.storage.dataset import read_dataset
    from cryoptycho.gpu.backend import to_numpy
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.reconstruct import prepare
    from cryoptycho.gpu.stream import StreamingReconstructor

    data = read_dataset(dataset)
    probe = to_numpy(prepare(data, ReconOptions()).probe)
    opts = ReconOptions(refine_positions=True, stream={"refine_positions": True})
    engine = StreamingReconstructor(frame_shape=data.frame_shape, frame_dtype=data.frames.dtype,
                                    pixel_size=data.pixel_size, probe=probe, options=opts, energy_eV=data.energy)
    engine.add_frames(data.frames, data.positions)
    for _ in range(30):  # past the warm-up: every batch frame is measured
        engine.step()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        engine.step()
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    total = {f[2]: v[3] for f, v in stats.items()}
    step = total["step"]
    for name in ("_measure_positions", "_update_positions", "data_term"):
        print(f"{name}: {total.get(name, 0.0) / step:.0%} of the step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("synthetic")
    p.add_argument("--seeds", default="0,1,2")
    p = sub.add_parser("cost")
    p.add_argument("dataset")
    p.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    if args.what == "synthetic":
        synthetic([int(s) for s in args.seeds.split(",")])
    else:
        cost(args.dataset, args.steps)


if __name__ == "__main__":
    main()
