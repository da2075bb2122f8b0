"""Kill points swept over one scan's whole life (not a test): the real daemon under strace is
SIGKILLed on entry to the N-th call of a system call (``rename``: the spool's creation, the result
files' ``.part`` renames; ``unlink``: journals and parts deleted; ``pwrite64``: HDF5's writes;
``writev``: the journal's; ``fsync``…), for every N the scan's life makes (or ``--sample`` of them),
then restarted on the same spool directory; checked: every frame the producer was told the daemon
holds is in the scan's result byte for byte, once; the scan ends; the spool directory ends with only
its lock file; the restart succeeds.

    python tests/measure/kill_sweep.py --syscalls rename unlink pwrite64 --sample 8

strace's ``when=N`` counts per thread: the kill is at the N-th call of whichever thread makes it
first. Printed: one line per kill point, then a tally."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: daemon_support

from daemon_support import start_daemon, synthetic_scan

FAST = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=3", "--set", "resolution_interval_s=0",
        "--set", "recover_wait_s=1")


def one_life(work: Path, scan, prefix: tuple[str, ...]) -> tuple[set[int], bool]:
    """A scan sent with confirmed flushes under ``prefix``; returns (acknowledged, daemon died)."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer

    daemon = start_daemon(work, *FAST, prefix=prefix)
    acked: set[int] = set()
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=5) as p:
            try:
                p.start_scan(**scan.start_fields("swept"))
                for lo in range(0, len(scan.frames), 12):
                    hi = min(len(scan.frames), lo + 12)
                    p.send_frames(scan.frames[lo:hi], indices=range(lo, hi))
                    p.flush()
                    acked |= set(range(hi))
                p.end_scan()
            except Exception:  # noqa: BLE001 - killed: what was confirmed is kept
                p.scan = None
        with ControlClient(daemon.control, timeout_s=2) as ctl:
            deadline = time.monotonic() + 60
            while daemon.proc.poll() is None and time.monotonic() < deadline:
                try:
                    if all(s["state"] in ("finished", "failed", "aborted") for s in ctl.list_scans()):
                        break
                except Exception:  # noqa: BLE001 - dying under strace: poll() says so
                    time.sleep(0.1)
                time.sleep(0.1)
        died = daemon.proc.poll() is not None
    finally:
        if daemon.proc.poll() is None:
            # strace detaches a tracee it is killed with: kill the daemon (its child) first
            for pid in Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text().split():
                subprocess.run(["kill", "-TERM", pid], check=False)
            daemon.proc.wait(60)
    return acked, died


def verdict(work: Path, scan, acked: set[int]) -> str:
    import h5py
    import hdf5plugin  # noqa: F401
    from cryoptycho.protocols.control import ControlClient

    try:
        daemon = start_daemon(work, *FAST)
    except AssertionError as exc:
        return f"restart refused: {str(exc)[-300:]}"
    try:
        with ControlClient(daemon.control, timeout_s=5) as ctl:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                live = [s for s in ctl.list_scans() if s["state"] not in ("finished", "failed", "aborted")]
                if not live:
                    break
                time.sleep(0.2)
            else:
                return f"stuck: {live}"
        daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    left = sorted(p.name for p in (work / "spool").iterdir() if not p.name.endswith(".lock"))
    result = work / "results" / "swept.h5"
    if not result.exists() and not acked and not left:
        return "ok (nothing acknowledged, nothing left)"
    if not result.exists():
        return "no result" + (f" ({len(acked)} acknowledged)" if acked else "") + (f"; spool dir {left}" if left else "")
    with h5py.File(result) as f:
        idx = f["raw/entry_1/data_1/frame_index"][()]
        data = f["raw/entry_1/data_1/data"][()]
    problems = []
    if acked - set(idx.tolist()):
        problems.append(f"{len(acked - set(idx.tolist()))} acknowledged frames missing")
    if len(set(idx.tolist())) != len(idx):
        problems.append("duplicate indices")
    if any(not np.array_equal(data[r], scan.frames[i]) for r, i in enumerate(idx)):
        problems.append("rows differ from the frames sent")
    if left:
        problems.append(f"spool dir {left}")
    return "; ".join(problems) or "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--syscalls", nargs="+", default=["rename", "unlink"])
    parser.add_argument("--sample", type=int, default=0, help="at most this many kill points a syscall (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    scan = synthetic_scan(n_side=6, m=32)
    tally: dict[str, int] = {}
    for syscall in args.syscalls:
        work = Path(tempfile.mkdtemp(prefix="sweep-"))
        trace = work / "trace"
        one_life(work, scan, ("strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}"))
        calls = sum(1 for line in trace.read_text().splitlines() if f"{syscall}(" in line)
        shutil.rmtree(work)
        points = list(range(1, calls + 1))
        if args.sample and len(points) > args.sample:
            points = sorted(rng.sample(points, args.sample))
        print(f"{syscall}: {calls} calls in a scan's life; killing at {points}", flush=True)
        for n in points:
            work = Path(tempfile.mkdtemp(prefix="sweep-"))
            prefix = ("strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                      "-e", f"inject={syscall}:signal=SIGKILL:when={n}")
            acked, died = one_life(work, scan, prefix)
            outcome = verdict(work, scan, acked) if died else "not killed (fewer calls this time)"
            print(f"  {syscall} #{n}: {len(acked)} acknowledged, {outcome}", flush=True)
            key = outcome.split(":")[0].split(" (")[0] if not outcome.startswith("ok") else "ok"
            tally[key] = tally.get(key, 0) + 1
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(tally), Path("/proc/loadavg").read_text().split()[:3])
    return 0 if set(tally) <= {"ok", "not killed"} else 1


if __name__ == "__main__":
    sys.exit(main())
