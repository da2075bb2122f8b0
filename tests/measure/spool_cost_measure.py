"""Cost per frame of the spool write (not a test), this tree against an earlier revision, side by
side in one run:

    python tests/measure/spool_cost_measure.py [--baseline-rev 92bbafb] [--rounds 3] [--frames 8192]

Each round runs one child process per tree (alternating, so both see the same load); each child
appends ``--frames`` 96×96 uint16 frames (Poisson 0.1 counts, as ``cryoptycho bench protocol``
sends them) to a fresh spool with ``SpoolWriter.append_many``, as the daemon's spool thread does,
in several ways: messages of 64 frames one per append, eight per append, eight per append sent
as bslz4 (chunks as received), messages of 5 frames one per append (every append rewrites a
part-full chunk), and the last again with ``fsync``; and a DECTRIS scan's spool: 192×192 uint16
detector frames sent bslz4 (Poisson 0.05 counts), 64 an append with ``SpoolWriter.append`` as
the DECTRIS source does (``raw``: kept in ``detector_frames``; ``reducer``: the 96×96 binned rows
derived from them), with and without ``fsync``. Printed: median over rounds of the spool
thread's CPU µs per frame (its own thread), the compression pool's (the rest of the process's
CPU), and wall µs per frame, while the scan is open; then the scan's end, ``set_status("ended")``
+ ``close()``: CPU µs per frame of the status and of bringing a journal-only spool's HDF5 file up
to its journal (``SpoolWriter._materialise``; the baseline has none), of the whole end (a DECTRIS
scan's binned rows derived, decoded, in ``close``), and the wall ms in all; ratio this tree ÷
baseline."""

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

CASES = {  # name: (frames a message, messages an append, bslz4 sent, fsync)
    "64-frame messages, 1 per append": (64, 1, False, False),
    "64-frame messages, 8 per append": (64, 8, False, False),
    "64-frame messages, 8 per append, bslz4 sent": (64, 8, True, False),
    "5-frame messages, 1 per append": (5, 1, False, False),
    "5-frame messages, 1 per append, fsync": (5, 1, False, True),
    "DECTRIS 192x192 bslz4, 64 per append": (64, 1, "dectris", False),
    "DECTRIS 192x192 bslz4, 64 per append, fsync": (64, 1, "dectris", True),
}


def child(total: int) -> dict[str, list[float]]:
    import numpy as np
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.compression import bslz4_compress
    from cryoptycho.protocols.dectris.binning import FrameReducer
    from cryoptycho.protocols.sources import RawChunks

    out: dict[str, list[float]] = {}
    for name, (batch, per_append, bslz4, fsync) in CASES.items():
        dectris = bslz4 == "dectris"
        n = total if not fsync or dectris else min(total, 1024)  # an fsync per 5 frames: fewer frames
        data = np.random.default_rng(3).poisson(0.1, (batch, 96, 96)).astype(np.uint16)
        wire = memoryview(bslz4_compress(data)) if bslz4 is True else None
        if dectris:
            reducer = FrameReducer.build((192, 192), np.uint16, bin=2)
            det = np.random.default_rng(3).poisson(0.05, (batch, 192, 192)).astype(np.uint16)
            raw = RawChunks((192, 192), np.dtype(np.uint16), [bslz4_compress(f) for f in det])
            data = reducer.reduce_batch(det)[0]
        spec = ScanSpec(scan_id="cost", frame_shape=(96, 96), frame_dtype=data.dtype.name, pixel_size_m=1e-10,
                        energy_eV=300e3, probe=np.ones((96, 96), np.complex64), expected_frames=None)
        with tempfile.TemporaryDirectory(prefix="spool-cost-", dir=os.environ.get("SPOOL_COST_DIR")) as tmp:
            w = SpoolWriter.create(Path(tmp), spec, fsync=fsync)
            pos = np.zeros((batch, 2))
            messages = n // batch
            c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
            for i in range(0, messages, per_append):
                js = range(i, min(i + per_append, messages))
                if dectris:
                    w.append(data, np.arange(i * batch, (i + 1) * batch), pos, raw=raw, reducer=reducer)
                else:
                    w.append_many([(data, np.arange(j * batch, (j + 1) * batch), pos) for j in js],
                                  [wire for _ in js])
            wall = time.perf_counter() - w0
            own = time.thread_time() - t0
            pool = time.process_time() - c0 - own
            c1, w1 = time.process_time(), time.perf_counter()
            w.set_status("ended")
            getattr(w, "_materialise", lambda: None)()  # (journal-only: the HDF5 file written here)
            c2 = time.process_time()
            w.close()
            end_cpu, end_wall = time.process_time() - c1, time.perf_counter() - w1
        frames = messages * batch
        out[name] = [1e6 * own / frames, 1e6 * pool / frames, 1e6 * wall / frames, 1e6 * (c2 - c1) / frames,
                     1e6 * end_cpu / frames, 1e3 * end_wall]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="92bbafb")
    parser.add_argument("--tree-rev", default=None, help="measure this revision instead of the working tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8192)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.frames)))
        return
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        trees = {f"baseline ({args.baseline_rev})": source_trees.shim(source_trees.export(repo, args.baseline_rev, tmp / "base"), tmp / "sb"),
                 f"this tree ({args.tree_rev or 'working tree'})":
                     source_trees.shim(source_trees.export(repo, args.tree_rev, tmp / "here") if args.tree_rev else repo, tmp / "sh")}
        results: dict[str, dict[str, list[list[float]]]] = {name: {} for name in trees}
        for _ in range(args.rounds):
            for name, shim in trees.items():
                env = {**os.environ, "PYTHONPATH": str(shim)}
                run = subprocess.run([sys.executable, __file__, "--child", "--frames", str(args.frames)],
                                     env=env, check=True, capture_output=True, text=True)
                for case, val in json.loads(run.stdout.strip().splitlines()[-1]).items():
                    results[name].setdefault(case, []).append(val)
    base, here = list(trees)
    print(f"median of {args.rounds} rounds: open scan µs per frame: spool thread CPU / pool CPU / wall; "
          f"scan end: CPU µs per frame of the status and the HDF5 file brought up to the journal / "
          f"of the whole end (close included: a DECTRIS scan's binned rows) / wall ms in all; {base} → {here}")
    for case in CASES:
        cells = []
        for name in trees:
            med = [statistics.median(r[i] for r in results[name][case]) for i in range(6)]
            cells.append(med)
        ratio = [h / b if b else float("nan") for b, h in zip(*cells)]
        print(f"{case:<46} " + "  →  ".join(" / ".join(f"{v:6.2f}" for v in c[:3]) + " | " +
                                           " / ".join(f"{v:6.1f}" for v in c[3:]) for c in cells)
              + "   (× " + " / ".join(f"{r:.2f}" for r in ratio) + ")")


if __name__ == "__main__":
    main()
