"""CPU cost per frame of the live engine's ``add_frames`` (not a test), this tree against an
earlier revision, side by side in one run:

    python tests/measure/add_frames_measure.py [--baseline-rev HEAD~2] [--rounds 3] [--batches 16] [--batch 256]

The baseline revision's gpu/, protocols/ and daemon/ are exported with ``git archive`` into a
temporary folder; each round runs one child process per tree (alternating, so both see the
same load), and each child times, with default ``ReconOptions``, 256-frame uint16 batches of
64×64 and 96×96 frames into a store whose memory is already touched, on the canvas of a
128 × 128-position scan, for three layouts of the
positions: a raster (step M/32 px, 64 positions a row: every batch is four scan rows), all at one position
(as ``cryoptycho bench protocol`` sends them) and scattered (uniform random, no two windows
on one row). Printed: median CPU µs per frame (process time: the engine's thread, BLAS held to
one thread, so a loaded box's preemption does not count) of ``add_frames`` and of the batch's
illumination (``StreamingReconstructor._illumination``) alone, over batches and rounds, and the
best (least disturbed by other jobs' use of the caches) with the ratio of the best."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trees as source_trees

BATCH = 256
LAYOUTS = ("raster", "one-position", "scattered")
SIZES = (64, 96)


def _positions(layout: str, m: int, n: int, pixel: float, rng) -> tuple:
    import numpy as np

    side = 64  # scan positions per row
    step = m / 32
    if layout == "raster":
        r, c = np.divmod(np.arange(n), side)
        pos = np.stack([r * step, c * step], axis=-1)
    elif layout == "one-position":
        pos = np.zeros((n, 2))
    else:
        pos = rng.uniform(0, side * step, size=(n, 2))
    # the canvas of a whole 128 × 128-position scan (as a service gets it from the scan's
    # extent), of which the timed batches fill the first rows
    extent = ((0.0, 2 * side * step * pixel), (0.0, 2 * side * step * pixel))
    return pos * pixel, extent


def child(batches: int, size: int = BATCH) -> dict:
    """Run in a child process: time every (size, layout) with the tree on PYTHONPATH."""
    import numpy as np
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.stream import StreamingReconstructor

    pixel = 1e-10
    out = {}
    for m in SIZES:
        yy, xx = np.mgrid[:m, :m] - m / 2
        probe = np.exp(-(yy**2 + xx**2) / (2 * (m / 6) ** 2)).astype(np.complex64)
        rng = np.random.default_rng(0)
        frames = rng.poisson(2.0, size=(size, m, m)).astype(np.uint16)
        n = size * batches
        for layout in LAYOUTS:
            pos, extent = _positions(layout, m, n, pixel, rng)
            engine = StreamingReconstructor(
                frame_shape=(m, m), frame_dtype=np.uint16, pixel_size=pixel, probe=probe,
                options=ReconOptions(), expected_frames=n, extent_m=extent)
            engine.frame_store.frames.fill(0)  # memory touched, as in a running service
            add, illum = [], []
            for b in range(batches):
                part = slice(b * size, (b + 1) * size)
                t0 = time.process_time()
                engine.add_frames(frames, pos[part])
                add.append((time.process_time() - t0) / size * 1e6)
                batch = engine._batch(np.arange(part.start, part.stop))
                t0 = time.process_time()
                engine._illumination(batch)
                illum.append((time.process_time() - t0) / size * 1e6)
            out[f"{m}/{layout}"] = {"add_frames": add, "illumination": illum}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="HEAD~2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch", type=int, default=BATCH, help="frames per add_frames call")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.batches, args.batch)))
        return
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        trees = source_trees.baseline_and_here(repo, args.baseline_rev, Path(tmp))
        results: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in trees}
        for _ in range(args.rounds):
            for name, shim in trees.items():
                env = {**os.environ, "PYTHONPATH": str(shim)}
                run = subprocess.run([sys.executable, __file__, "--child", "--batches",
                                      str(args.batches), "--batch", str(args.batch)], env=env, check=True,
                                     capture_output=True, text=True)
                for key, val in json.loads(run.stdout.strip().splitlines()[-1]).items():
                    slot = results[name].setdefault(key, {"add_frames": [], "illumination": []})
                    for what in slot:
                        slot[what] += val[what]
    names = list(trees)
    print(f"CPU µs per frame over {args.rounds} rounds × {args.batches} batches of {args.batch}, "
          f"median [best]; {names[0]} → {names[1]}")
    print(f"{'case':<18} {'add_frames':>32} {'illumination':>32}")
    for key in results[names[0]]:
        cells = []
        for what in ("add_frames", "illumination"):
            a, b = (statistics.median(results[n][key][what]) for n in names)
            la, lb = (min(results[n][key][what]) for n in names)
            cells.append(f"{a:5.1f} → {b:4.1f} [{la:4.1f} → {lb:4.1f}] ({la / lb:3.1f}×)")
        print(f"{key:<18} {cells[0]:>32} {cells[1]:>32}")


if __name__ == "__main__":
    main()
