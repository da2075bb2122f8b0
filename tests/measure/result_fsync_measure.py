"""What making a result durable costs (not a test): a 65,536-frame spool's raw part copied into a
result file under a hidden name and renamed — as the daemon's finish and its waited raw copy
(``add_raw``) write it — with and without ``whole.replace_durably`` (fsync of the file before the
rename, of its directory after) and the spool directory's fsync after its unlink, alternating:

    python tests/measure/result_fsync_measure.py [--frames 65536] [--side 64] [--dose 0.1] [--rounds 4] [--dir DIR]

Printed per round and as medians: wall and process-CPU seconds of the copy, of the fsyncs alone,
and the result's size. The fsync's cost is the time to write back what the copy left dirty, so it
depends on the disk and on what other jobs write: give the load average with the figures."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.journal import fsync_path
from cryoptycho.daemon.storage.rawcopy import copy_raw
from cryoptycho.daemon.storage.spool import SpoolWriter


def _load() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def make_spool(where: Path, frames: int, side: int, dose: float) -> Path:
    spec = ScanSpec(scan_id="m", frame_shape=(side, side), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((side, side), np.complex64), expected_frames=frames)
    w = SpoolWriter.create(where, spec)
    rng = np.random.default_rng(0)
    batch = 4096
    for start in range(0, frames, batch):
        n = min(batch, frames - start)
        w.append(rng.poisson(dose, (n, side, side)).astype(np.uint16), np.arange(start, start + n),
                 rng.uniform(0, 1e-8, (n, 2)))
    w.set_status("ended")
    w.close()
    return w.path


def one(spool: Path, out: Path, durable: bool) -> tuple[float, float, float, int]:
    """(wall s, CPU s, wall s of the fsyncs alone, bytes) of one result written and its spool stand-in deleted."""
    part, path = out / ".r.h5.part", out / "r.h5"
    victim = out / "v.spool.h5"
    shutil.copyfile(spool, victim)  # the spool deleted after the result (not timed)
    fsync_path(victim)
    t0, c0 = time.perf_counter(), time.process_time()
    with h5py.File(spool, "r") as src, h5py.File(part, "w") as f:
        copy_raw(src, f.create_group("raw"))
    synced = 0.0
    if durable:
        s0 = time.perf_counter()
        fsync_path(part)
        synced += time.perf_counter() - s0
    os.replace(part, path)
    if durable:
        s0 = time.perf_counter()
        fsync_path(path.parent)
        synced += time.perf_counter() - s0
    victim.unlink()
    if durable:
        s0 = time.perf_counter()
        fsync_path(victim.parent)
        synced += time.perf_counter() - s0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = path.stat().st_size
    path.unlink()
    return wall, cpu, synced, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=65536)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--dose", type=float, default=0.1, help="mean counts per pixel (Poisson)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        (root / "s").mkdir()
        (root / "r").mkdir()
        spool = make_spool(root / "s", a.frames, a.side, a.dose)
        print(f"spool: {a.frames} frames of {a.side}x{a.side} uint16, dose {a.dose}/px, {spool.stat().st_size / 1e6:.1f} MB; "
              f"load {_load()}", flush=True)
        got: dict[bool, list[tuple[float, float, float, int]]] = {False: [], True: []}
        for r in range(a.rounds):
            for durable in ((False, True) if r % 2 == 0 else (True, False)):
                w = one(spool, root / "r", durable)
                got[durable].append(w)
                print(f"round {r} {'fsync   ' if durable else 'no fsync'}: wall {w[0]:.3f} s, CPU {w[1]:.3f} s, "
                      f"fsyncs {w[2]:.3f} s, result {w[3] / 1e6:.1f} MB", flush=True)
        for durable in (False, True):
            rows = got[durable]
            print(f"median {'fsync   ' if durable else 'no fsync'}: wall {statistics.median(x[0] for x in rows):.3f} s, "
                  f"CPU {statistics.median(x[1] for x in rows):.3f} s, fsyncs {statistics.median(x[2] for x in rows):.3f} s")
        print(f"load {_load()}")


if __name__ == "__main__":
    sys.exit(main())
