"""Real SIGKILLs of a spool writer (not a test): how many runs lose frames that were
acknowledged, this tree against an earlier revision, side by side:

    python tests/measure/spool_kill_measure.py [--baseline-rev 92bbafb] [--tree-rev HEAD] [--seeds 10] [--runs 3]

A writer process appends frames to a spool (``SpoolWriter.create``, then appends of 1–23
frames, one or several batches each) and prints the number of frames acknowledged each time an
append returns. ``strace`` kills it (fault injection: SIGKILL on entry to the N-th ``pwrite64``
— HDF5's writes — or the N-th ``writev`` — the journal's), N drawn uniformly over the writes a
whole run makes. Then, in another process (HDF5 can crash on a damaged file), the spool is
recovered as the daemon recovers it (``SpoolWriter.reopen``, then every frame read) and every
acknowledged frame compared byte for byte. Layouts: ``data`` (96×96 uint32, 16 frames a chunk),
``small`` (24×24 uint16, 64 a chunk), ``detector`` (binned 8×8 frames with their 192×192
detector frames, eight a chunk, in ``detector_frames``). Printed per tree: runs, runs that lost
acknowledged frames (wrong, fewer, unreadable, or the reader crashed)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import trees as source_trees

LAYOUTS = ("data", "small", "detector")
TOTAL = 160  # frames a whole run writes


def _frames(layout: str, seed: int) -> tuple:
    import numpy as np

    rng = np.random.default_rng(seed)
    side, dtype = {"data": (96, np.uint32), "small": (24, np.uint16), "detector": (8, np.uint16)}[layout]
    frames = rng.poisson(1.0, (TOTAL, side, side)).astype(dtype)
    det = rng.poisson(0.05, (TOTAL, 192, 192)).astype(np.uint16) if layout == "detector" else None
    cuts, k = [], 0
    while k < TOTAL:
        n = int(rng.integers(1, 24))
        cuts.append((k, min(TOTAL, k + n)))
        k += n
    return frames, det, cuts


def writer(directory: str, layout: str, seed: int) -> None:
    import numpy as np
    from cryoptycho.daemon.scan import ScanSpec
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.compression import bslz4_compress
    from cryoptycho.protocols.sources import RawChunks

    frames, det, cuts = _frames(layout, seed)
    m = frames.shape[1]
    spec = ScanSpec(scan_id="kill", frame_shape=(m, m), frame_dtype=frames.dtype.name, pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((m, m), np.complex64), expected_frames=None)
    w = SpoolWriter.create(Path(directory), spec)
    for a, b in cuts:
        rows, pos = np.arange(a, b), np.zeros((b - a, 2))
        if det is not None:
            raw = RawChunks((192, 192), np.dtype(np.uint16), [bslz4_compress(f, 8192) for f in det[a:b]])
            w.append(frames[a:b], rows, pos, raw=raw)
        elif (b - a) > 2:  # several messages joined into one append, as the spool thread does
            h = a + (b - a) // 2
            w.append_many([(frames[a:h], rows[:h - a], pos[:h - a]), (frames[h:b], rows[h - a:], pos[h - a:])])
        else:
            w.append_many([(frames[a:b], rows, pos)])
        print(b, flush=True)  # acknowledged
    w.set_status("ended")
    w.close()


def check(directory: str, layout: str, seed: int, acked: int) -> None:
    import h5py
    import numpy as np
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_detector_frames, read_spool

    frames, det, _ = _frames(layout, seed)
    path = Path(directory) / "kill.spool.h5"
    if not path.exists():
        print(json.dumps("ok" if acked == 0 else "no file"))
        return
    if acked == 0:  # killed before any append returned (e.g. while HDF5 wrote the new file)
        print(json.dumps("ok"))
        return
    try:
        SpoolWriter.reopen(path).close()  # as recovery does
        got = read_spool(path)
        if len(got.frames) < acked:
            print(json.dumps(f"fewer ({len(got.frames)} of {acked})"))
            return
        bad = [r for r in range(acked) if not np.array_equal(got.frames[r], frames[r])]
        bad += [f"index {r}" for r in range(acked) if got.indices[r] != r]
        if det is not None:
            with h5py.File(path, "r") as f:
                back = read_detector_frames(f, 0, acked)
            bad += [f"detector {r}" for r in range(acked) if not np.array_equal(back[r], det[r])]
        print(json.dumps("ok" if not bad else f"wrong (rows {bad[:6]} of {acked})"))
    except Exception as exc:  # noqa: BLE001 - the answer is the failure
        print(json.dumps(f"unreadable: {type(exc).__name__}"))


def _writes(env: dict, layout: str, seed: int, syscall: str, tmp: Path) -> int:
    """The number of ``syscall`` calls a whole run makes."""
    d = tempfile.mkdtemp(dir=tmp)
    trace = Path(d) / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}", sys.executable, __file__,
                    "--writer", d, layout, str(seed)], env=env, check=True, capture_output=True)
    return sum(1 for line in trace.read_text().splitlines() if f"{syscall}(" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="92bbafb")
    parser.add_argument("--tree-rev", default=None, help="measure this revision instead of the working tree")
    parser.add_argument("--only", choices=("baseline", "tree"), default=None, help="measure one of the two")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3, help="kills per seed, layout and tree")
    parser.add_argument("--writer", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--check", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.writer[0], args.writer[1], int(args.writer[2]))
        return
    if args.check:
        check(args.check[0], args.check[1], int(args.check[2]), int(args.check[3]))
        return
    import numpy as np

    repo = Path(__file__).resolve().parents[2]
    results: dict[str, Counter[str]] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        trees = {f"baseline ({args.baseline_rev})": source_trees.shim(source_trees.export(repo, args.baseline_rev, tmp / "base"), tmp / "shim-base"),
                 f"this tree ({args.tree_rev or 'working tree'})":
                     source_trees.shim(source_trees.export(repo, args.tree_rev, tmp / "here") if args.tree_rev else repo, tmp / "shim-here")}
        if args.only:
            trees = dict([list(trees.items())[args.only == "tree"]])
        rng = np.random.default_rng(2026)
        for name, shim in trees.items():
            env = {**os.environ, "PYTHONPATH": str(shim)}
            tally: Counter[str] = Counter()
            for layout in args.layouts:
                for seed in range(args.seeds):
                    writes = {s: _writes(env, layout, seed, s, tmp) for s in ("pwrite64", "writev")}
                    for _ in range(args.runs):
                        # HDF5's writes four times in five, the journal's (if any) else
                        syscall = "writev" if writes["writev"] and rng.random() < 0.2 else "pwrite64"
                        when = int(rng.integers(1, writes[syscall] + 1))
                        d = tempfile.mkdtemp(dir=tmp)
                        run = subprocess.run(
                            ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                             "-e", f"inject={syscall}:signal=SIGKILL:when={when}",
                             sys.executable, __file__, "--writer", d, layout, str(seed)],
                            env=env, check=False, capture_output=True, text=True)
                        lines = run.stdout.split()
                        acked = int(lines[-1]) if lines else 0
                        verdict = subprocess.run([sys.executable, __file__, "--check", d, layout, str(seed), str(acked)],
                                                 env=env, check=False, capture_output=True, text=True)
                        if verdict.returncode < 0:
                            outcome = f"reader crashed (signal {-verdict.returncode})"
                        elif verdict.returncode:
                            outcome = "reader failed: " + (verdict.stderr.strip().splitlines() or ["?"])[-1][:80]
                        else:
                            outcome = json.loads(verdict.stdout.strip().splitlines()[-1])
                        if outcome != "ok":
                            print(f"  {name} {layout} seed {seed}: SIGKILL at {syscall} #{when}, {acked} acknowledged:",
                                  outcome, flush=True)
                            outcome = outcome.split(" (")[0]
                        tally[f"{layout}: {outcome}"] += 1
                        tally["runs"] += 1
                        tally["lost acknowledged frames"] += outcome != "ok"
            results[name] = tally
            print(name, json.dumps(dict(sorted(tally.items())), indent=1), flush=True)
    for name, tally in results.items():
        print(f"{name}: {tally['runs']} SIGKILL runs, {tally['lost acknowledged frames']} lost acknowledged frames")


if __name__ == "__main__":
    main()
