"""Cost per frame of writing a DECTRIS scan's derived binned rows when its spool closes (not a
test), the two ways side by side (interleaved, same process, same load):

    python tests/measure/spool_end_measure.py [--frames 16384] [--rounds 3] [--case dense]

Each trial builds a fresh spool as the daemon's spool thread does for a DECTRIS scan
(``SpoolWriter.append`` of 64 frames at a time: the detector's 192×192 bslz4 chunks, binned
2×2 to 96×96, the binned rows derived: spool.py DERIVED; frames as ``cryoptycho bench dectris``
makes them, 1,024 distinct ones repeated), then times ``set_status("ended")`` + ``close``:
``decoded`` (no frames held: every row decoded and binned from ``detector_frames``, as before)
against ``frame_store`` (the rows read from a frame store holding the binned frames in FFT
order, through ``ScanWorker.held_frames``, with their largest count through
``ScanWorker.held_peak``, as the daemon's worker hands them over). Printed:
median over rounds of the process's CPU µs per frame (the compression threads included) and
wall µs per frame, and the ratio."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time

import numpy as np
from cryoptycho.daemon.bench.dectris import DOSES, make_frames
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import SpoolWriter
from cryoptycho.daemon.worker import ScanWorker
from cryoptycho.gpu.framestore import FrameStore
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.sources import RawChunks

DISTINCT = 1024
BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--case", choices=sorted(DOSES), default="dense")
    args = ap.parse_args()
    n = args.frames
    det = make_frames(DISTINCT, 192, *DOSES[args.case])
    reducer = FrameReducer.build((192, 192), np.uint16, crop=192, bin=2)
    binned = reducer.reduce_batch(det)[0]
    chunks = [bslz4_compress(f) for f in det]
    m = reducer.frame_side
    spec_args = {"frame_shape": (m, m), "frame_dtype": np.dtype(reducer.out_dtype).name, "pixel_size_m": 1e-10,
                 "energy_eV": 300e3, "probe": np.ones((m, m), np.complex64), "expected_frames": n}
    store = FrameStore((m, m), reducer.out_dtype, n)
    for a in range(0, n, BATCH):
        rows = np.arange(a, a + BATCH) % DISTINCT
        store.append(binned[rows], np.zeros((BATCH, 2)))
    worker = ScanWorker.__new__(ScanWorker)  # only its hand-over: the store as the scan ended
    worker._frames_in = threading.Event()
    worker._frames_in.set()
    worker._held = (store.frames, store.n)
    worker._held_peak = int(binned.max())  # (the engine's peak_count: measured as the frames came)

    results: dict[str, dict[str, list[float]]] = {"decoded": {"cpu": [], "wall": []},
                                                   "frame_store": {"cpu": [], "wall": []}}
    with tempfile.TemporaryDirectory(prefix="spool-end-") as tmp:
        trial = 0
        for _ in range(args.rounds):
            for name in results:
                trial += 1
                w = SpoolWriter.create(tmp, ScanSpec(scan_id=f"t{trial}", **spec_args))
                for a in range(0, n, BATCH):
                    rows = np.arange(a, a + BATCH) % DISTINCT
                    w.append(binned[rows], np.arange(a, a + BATCH), np.zeros((BATCH, 2)),
                             raw=RawChunks((192, 192), np.dtype(np.uint16), [chunks[i] for i in rows]),
                             reducer=reducer)
                c0, t0 = time.process_time(), time.perf_counter()
                w.set_status("ended")
                if name == "frame_store":  # with the peak: stored in the smallest dtype holding it
                    w.close(held=worker.held_frames, peak=worker.held_peak)
                else:
                    w.close()
                c1, t1 = time.process_time(), time.perf_counter()
                assert w.derived_rows == {name if name == "frame_store" else "detector_frames": n}, w.derived_rows
                results[name]["cpu"].append(1e6 * (c1 - c0) / n)
                results[name]["wall"].append(1e6 * (t1 - t0) / n)
                w.path.unlink()
    med = {k: {m: round(statistics.median(v), 1) for m, v in r.items()} for k, r in results.items()}
    med["ratio_frame_store_over_decoded"] = {
        m: round(med["frame_store"][m] / med["decoded"][m], 3) for m in ("cpu", "wall")}
    print(json.dumps({"frames": n, "case": args.case, "binned_dtype": str(binned.dtype),
                      "us_per_frame_median": med, "all": results}, indent=1))


if __name__ == "__main__":
    main()
