"""CPU per frame of the DECTRIS decoding job and its parts, and of the frame store's intake,
a baseline revision against this tree (not a test), fresh processes alternating:

    python tests/measure/decode_stages_measure.py [--baseline-rev 9eb9eec] [--rounds 2]

Each child times, on the frames and series `cryoptycho bench dectris --case sparse` makes (512
images of 192×192 uint16, bslz4, binned 2×2 to 96×96 uint32), best of 7 interleaved rounds of
its process's CPU time: ``decode_job`` (the decoding workers' job, 64 images a job: CBOR split,
bslz4, binning), ``job_cbor`` (the split alone), ``job_bin`` (binning alone, 16 frames a call),
``job_bin_masked`` (the same with a pixel mask of 25 pixels) and ``frame_store`` (a new
engine's ``add_frames`` of 2,048 binned frames in the worker's 64-frame batches, one raster
row). Printed: each tree's figures per round."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trees as source_trees


def child() -> dict[str, float]:
    from cryoptycho.daemon.bench.dectris import CHANNEL, _config, make_frames, make_series
    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.stream import StreamingReconstructor
    from cryoptycho.protocols.dectris.binning import FrameReducer
    from cryoptycho.protocols.dectris.decode import decode_v2, split_v2_image
    from cryoptycho.protocols.dectris.source import SUB_BATCH, Decoder, DirectConverter
    from cryoptycho.protocols.messages import ScanStart
    from cryoptycho.protocols.sources import DetectorFrames

    frames = make_frames(512, 192, 0.5, 0.02, seed=1)
    series = make_series(frames)
    images = series[1:-1]
    conv = DirectConverter(_config(192))
    conv.feed(decode_v2(series[0]))
    dec = Decoder()
    jobs = [images[i:i + 64] for i in range(0, len(images), 64)]
    out: list = []
    for job in jobs:
        out += conv.feed_batch(dec(job, CHANNEL, conv.plan.reducer if conv.plan else None))
    reducer = conv.plan.reducer
    start = next(m for m in out if isinstance(m, ScanStart))
    direct = [m for m in out if isinstance(m, DetectorFrames)]
    spec = spec_from_scan_start(start)
    bad = np.zeros((192, 192), bool)
    bad[::37, ::41] = True
    masked = FrameReducer.build((192, 192), np.uint16, crop=192, bin=2, bad_pixels=bad)
    work = np.empty((SUB_BATCH, 96, 96), reducer.out_dtype)

    def job_bin(red: FrameReducer) -> int:
        for i in range(0, len(frames), SUB_BATCH):
            red.reduce_batch(frames[i:i + SUB_BATCH], out=work[:len(frames[i:i + SUB_BATCH])])
        return len(frames)

    def frame_store() -> int:
        engine = StreamingReconstructor(
            frame_shape=spec.frame_shape, frame_dtype=np.dtype(spec.frame_dtype), pixel_size=spec.pixel_size_m,
            probe=spec.probe, options=ReconOptions(), mask=spec.mask, extent_m=spec.extent_m,
            expected_frames=4 * len(frames), energy_eV=spec.energy_eV)
        for _ in range(4):
            for k, m in enumerate(direct):
                n = len(m.frames.data)
                engine.add_frames(m.frames.data, np.column_stack([np.zeros(n), (64 * k + np.arange(n)) * 2e-10]))
        return 4 * len(frames)

    stages = {
        "decode_job": lambda: sum(len(dec(job, CHANNEL, reducer)) for job in jobs) and len(images),
        "job_cbor": lambda: sum(1 for raw in images if split_v2_image(raw, CHANNEL)),
        "job_bin": lambda: job_bin(reducer),
        "job_bin_masked": lambda: job_bin(masked),
        "frame_store": frame_store,
    }
    best = dict.fromkeys(stages, float("inf"))
    for _ in range(7):
        for name, fn in stages.items():
            t0 = time.process_time()
            n = fn()
            best[name] = min(best[name], (time.process_time() - t0) / n * 1e6)
    return {k: round(v, 1) for k, v in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="9eb9eec")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child()))
        return
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        trees = source_trees.baseline_and_here(repo, args.baseline_rev, Path(tmp))
        for r in range(args.rounds):
            for name, shim in trees.items():
                load = os.getloadavg()[0]
                run = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, "PYTHONPATH": str(shim)},
                                     check=True, capture_output=True, text=True)
                print(f"round {r + 1} {name:<22} load {load:5.1f} {run.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
