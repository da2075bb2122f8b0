"""A randomized kill -9 campaign against the real daemon (not a test): what the daemon
acknowledged survives any number of kills and restarts, and every scan ends.

    python tests/measure/kill_campaign.py --cycles 20 --seed 1 [--dectris-every 4] [--busy-from 10 --busy-to 15]

Each cycle starts ``cryoptycho serve`` (the console script, this tree's code) on the same
spool directory, runs a mixed workload — SDK producers with confirmation (several scans at once,
more than ``max_concurrent_scans``: some queue), ``set_options`` on running and queued scans,
cancels, scans left open (``finish_scan`` later), and every ``--dectris-every``-th cycle a
``dectris-sim`` series through ``serve --source`` — and kills the daemon (SIGKILL) at a moment
drawn at random: uniformly in time, or at one of the scan's phases (just after a ``scan_start``
was sent, mid-stream after a confirmed flush, just after ``end_scan`` was confirmed, while a scan
refines, while its spool closes — the journal of an ended scan about to disappear — or while a
result is written — a ``.part`` file in the results directory). After the last cycle a daemon
runs without a kill, open scans are finished (``finish_scan``) and the campaign waits until no
scan is left. Checked for every scan: every frame the producer was told the daemon holds (a
confirmed ``flush``/``end_scan``) or the daemon counted (a DECTRIS ``receipt``) is in its result
(or, for a cancelled scan, its aborted spool), byte for byte, no frame index twice, no row
holding another frame; no scan left running; the spool directory ends with its lock file (and
the aborted spools of cancelled scans); every start of the daemon succeeds. Failures are printed
with the seed, the cycle and the kill moment; ``--keep DIR`` keeps the work directory."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: daemon_support

from daemon_support import Daemon, start_daemon, start_dectris_sim

M = 32
FAST = ("--set", "options.iterations=3", "--set", "refine_time_budget_s=4", "--set", "preview_hz=4",
        "--set", "resolution_interval_s=0", "--set", "recover_wait_s=2", "--max-concurrent-scans", "2",
        "--set", "max_queued_scans=3")
PHASES = ("uniform", "start", "mid-stream", "after-end", "refining", "spool-close", "result-write")
DET_COUNT, DET_SIZE = 256, 64


@dataclass
class ScanRecord:
    scan_id: str
    kind: str  # "proto" | "dectris"
    n: int
    seed: int
    plan: str = "end"  # end | abandon | cancel
    acked: set[int] = field(default_factory=set)
    end_confirmed: bool = False
    start_sent: bool = False
    cancel_tried: bool = False
    refused: bool = False
    notes: list[str] = field(default_factory=list)


def frames_of(rec: ScanRecord) -> np.ndarray:
    if rec.kind == "dectris":
        from cryoptycho.daemon.commands.dectris_sim import synthetic_series
        return synthetic_series(DET_COUNT, DET_SIZE, 200.0, 0).frames["threshold_1"]
    rng = np.random.default_rng(rec.seed)
    return rng.poisson(3.0, (rec.n, M, M)).astype(np.uint16)


def start_fields(rec: ScanRecord, options: dict | None) -> dict:
    from cryoptycho.gpu.probes import make_probe

    side = round(float(np.sqrt(rec.n)))
    iy, ix = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([iy.ravel(), ix.ravel()], 1) * 3e-10
    probe = make_probe("defocused", (M, M), 1e-10, semiangle=8e-3, defocus=60e-9).astype(np.complex64)
    fields = {"scan_id": rec.scan_id, "energy_eV": 300e3, "frame_shape": (M, M), "frame_dtype": "uint16",
              "expected_frames": rec.n, "pixel_size_m": 1e-10, "probe": probe, "positions_m": pos}
    if options:
        fields["options"] = options
    return fields


class Cycle:
    """One daemon's life: the workload, the kill at the chosen moment."""

    def __init__(self, camp: Campaign, daemon: Daemon, rng: random.Random, phase: str) -> None:
        self.camp, self.daemon, self.rng, self.phase = camp, daemon, rng, phase
        self.trigger = threading.Event()
        self.dead = threading.Event()
        self.threads: list[threading.Thread] = []
        self.kill_note = ""

    def fire(self, what: str) -> None:
        if not self.trigger.is_set():
            self.kill_note = what
            self.trigger.set()

    def producer(self, rec: ScanRecord, delay: float) -> None:
        from cryoptycho.protocols.producer import Producer

        time.sleep(delay)
        if self.dead.is_set():
            return
        frames = frames_of(rec)
        opts = self.rng.choice([None, {"iterations": 2}, {"seed": 7}])
        try:
            with Producer(self.daemon.ingest, control=self.daemon.control, send_timeout_s=6, batch_frames=16) as p:
                try:
                    p.start_scan(**start_fields(rec, opts))
                    rec.start_sent = True
                    if self.phase == "start":
                        self.fire(f"start of {rec.scan_id}")
                    lo, given = 0, 0
                    stop_at = rec.n if rec.plan != "abandon" else self.rng.randrange(1, rec.n)
                    while lo < stop_at and not self.dead.is_set():
                        hi = min(stop_at, lo + self.rng.choice([4, 8, 16, 24]))
                        p.send_frames(frames[lo:hi], indices=range(lo, hi))
                        given = hi
                        lo = hi
                        if self.rng.random() < 0.35:
                            p.flush()
                            rec.acked |= set(range(given))
                            if self.phase == "mid-stream" and lo < stop_at:
                                self.fire(f"mid-stream of {rec.scan_id} ({given} confirmed)")
                        time.sleep(self.rng.uniform(0, 0.08))
                    if self.dead.is_set():
                        p.scan = None
                        return
                    if rec.plan == "abandon":
                        p.flush()
                        rec.acked |= set(range(given))
                        p.scan = None  # the producer goes away: no scan_end, no abort
                        return
                    receipt = p.end_scan()
                    rec.acked |= set(range(rec.n))
                    rec.end_confirmed = True
                    rec.notes.append(f"end confirmed ({receipt.acknowledged})")
                    if self.phase == "after-end":
                        self.fire(f"after end of {rec.scan_id}")
                except Exception as exc:  # noqa: BLE001 - the daemon died, or refused: recorded
                    p.scan = None
                    msg = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if "refused" in msg and not self.dead.is_set():
                        rec.refused = True
                    rec.notes.append(msg)
        except Exception as exc:  # noqa: BLE001
            rec.notes.append(f"producer close: {type(exc).__name__}: {exc}")

    def controller(self) -> None:
        """set_options on running/queued scans, cancels, phase watching."""
        from cryoptycho.protocols.control import ControlClient

        spool, results = self.camp.spool, self.camp.results
        with ControlClient(self.daemon.control, timeout_s=3) as ctl:
            last_ctl = 0.0
            journals_seen: set[str] = set()
            while not self.dead.is_set():
                if self.phase == "result-write" and any(e.name.endswith(".part") for e in os.scandir(results)):
                    self.fire("result .part present")
                if self.phase == "spool-close":
                    names = {e.name for e in os.scandir(spool)}
                    for j in journals_seen - names:
                        self.fire(f"journal {j} gone (spool closed)")
                    journals_seen |= {n for n in names if n.endswith(".journal")}
                    journals_seen &= names | journals_seen
                now = time.monotonic()
                if now - last_ctl > 0.15:
                    last_ctl = now
                    try:
                        st = ctl.status()
                        scans = st.get("scans", {})
                        if self.phase == "refining" and any(s.get("state") == "refining" for s in scans.values()):
                            self.fire("a scan refining")
                        live = [sid for sid, s in scans.items() if s.get("state") in ("announced", "acquiring", "refining")]
                        if live and self.rng.random() < 0.25:
                            sid = self.rng.choice(live)
                            ctl.set_options(sid, self.rng.choice([{"seed": self.rng.randrange(100)},
                                                                   {"iterations": self.rng.choice([2, 3])},
                                                                   {"stream": {"batch_size": 16}}]))
                        for sid in live:
                            rec = self.camp.scans.get(sid)
                            if rec and rec.plan == "cancel" and not rec.cancel_tried and self.rng.random() < 0.3:
                                rec.cancel_tried = True
                                ctl.cancel(sid, "chaos cancel")
                                rec.notes.append("cancel answered")
                    except Exception as exc:  # noqa: BLE001 - a dying daemon, or a refused change
                        if "Timeout" not in type(exc).__name__:
                            self.camp.log(f"  control: {type(exc).__name__}: {str(exc)[:160]}")
                time.sleep(0.003)


class Campaign:
    def __init__(self, work: Path, seed: int) -> None:
        self.work, self.seed = work, seed
        self.spool, self.results = work / "spool", work / "results"
        self.scans: dict[str, ScanRecord] = {}
        self.failures: list[str] = []
        self.cycle_log: list[str] = []
        self.counter = 0
        self.sim: subprocess.Popen | None = None
        self.sim_url: str | None = None
        self.sim_series = 2
        self.keep_sim = False  #: the detector streams on while daemons without --source run

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def fail(self, msg: str) -> None:
        self.failures.append(msg)
        self.log("FAILURE: " + msg)

    def start(self, extra: tuple[str, ...] = ()) -> Daemon | None:
        try:
            return start_daemon(self.work, *FAST, *extra, timeout=120)
        except AssertionError as exc:
            self.fail(f"daemon refused to start: {str(exc)[-2000:]}")
            return None

    def run_cycle(self, k: int, rng: random.Random, dectris: bool) -> None:
        phase = rng.choice(PHASES)
        extra: tuple[str, ...] = ()
        if dectris:
            if self.sim is None or self.sim.poll() is not None:
                self.sim, self.sim_url = start_dectris_sim("--frames", str(DET_COUNT), "--size", str(DET_SIZE),
                                                           "--rate", "150", "--series", str(self.sim_series),
                                                           "--series-id", str(1000 + k * 10))
            extra = ("--source", self.sim_url, "--set", "dectris.bin=2")
        elif self.sim is not None and not self.keep_sim:
            self.sim.kill()
            self.sim.wait(10)
            self.sim = None
        daemon = self.start(extra)
        if daemon is None:
            return
        cyc = Cycle(self, daemon, rng, phase)
        ctl_thread = threading.Thread(target=cyc.controller, daemon=True)
        ctl_thread.start()
        for i in range(rng.randint(2, 4)):
            self.counter += 1
            sid = f"c{k:03d}s{i}"
            rec = ScanRecord(sid, "proto", rng.choice([36, 64, 100]), seed=self.seed * 100000 + self.counter,
                             plan=rng.choices(["end", "abandon", "cancel"], [0.7, 0.15, 0.15])[0])
            self.scans[sid] = rec
            t = threading.Thread(target=cyc.producer, args=(rec, rng.uniform(0, 1.5)), daemon=True)
            t.start()
            cyc.threads.append(t)
        det_thread = None
        if dectris:
            det_thread = threading.Thread(target=self.watch_dectris, args=(cyc,), daemon=True)
            det_thread.start()
        limit = rng.uniform(0.2, 9.0) if phase == "uniform" else 25.0
        t0 = time.monotonic()
        cyc.trigger.wait(limit)
        if phase == "after-end":  # from the end's receipt through the spool's close
            time.sleep(rng.uniform(0, 0.4))
        elif phase != "uniform":
            time.sleep(rng.uniform(0, 0.05))
        note = cyc.kill_note or (f"uniform t={limit:.2f}s" if phase == "uniform" else f"{phase} not seen in 25 s")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(30)
        cyc.dead.set()
        at = time.monotonic() - t0
        self.cycle_log.append(f"cycle {k} seed {self.seed} phase {phase}: kill at {at:.2f}s ({note})")
        self.log(self.cycle_log[-1])
        for t in cyc.threads:
            t.join(30)
        ctl_thread.join(10)
        if det_thread:
            det_thread.join(10)

    def watch_dectris(self, cyc: Cycle) -> None:
        """The daemon's count of each detector scan's frames, as long as it lives: what it
        acknowledged (a detector is not told; the daemon's receipt is the promise)."""
        from cryoptycho.protocols.control import ControlClient

        with ControlClient(cyc.daemon.control, timeout_s=2) as ctl:
            while not cyc.dead.is_set():
                try:
                    for s in ctl.list_scans():
                        sid = s["scan_id"]
                        if sid in self.scans and self.scans[sid].kind == "proto":
                            continue
                        r = ctl.receipt(sid)
                        if cyc.dead.is_set():
                            break  # an answer racing the kill is still an answer given: keep it
                        rec = self.scans.setdefault(sid, ScanRecord(sid, "dectris", DET_COUNT, 0))
                        got = int(r["frames"]["received"])
                        # frames arrive in order from the simulator: the count is a prefix
                        if got > len(rec.acked) and r["frames"].get("gaps", 0) in (0, None):
                            rec.acked = set(range(got))
                        if cyc.phase == "mid-stream" and got > 0:
                            cyc.fire(f"mid-stream of detector {sid} ({got} counted)")
                except Exception:  # noqa: BLE001 - the daemon is dying: asked again while it lives
                    time.sleep(0.05)
                time.sleep(0.05)

    def finish(self) -> None:
        """A last daemon, not killed: everything left open is finished, then all is checked."""
        from cryoptycho.protocols.control import ControlClient

        if self.sim is not None:
            self.sim.kill()
            self.sim.wait(10)
        daemon = self.start()
        if daemon is None:
            return
        try:
            with ControlClient(daemon.control, timeout_s=20) as ctl:
                deadline = time.monotonic() + 240
                asked: set[str] = set()
                while time.monotonic() < deadline:
                    scans = ctl.list_scans()
                    live = [s for s in scans if s["state"] in ("announced", "acquiring", "refining")]
                    for s in scans:  # left open by their producer, or aborted with frames kept
                        if s["state"] in ("acquiring", "aborted") and s["scan_id"] not in asked:
                            rec = self.scans.get(s["scan_id"])
                            if rec is not None and rec.cancel_tried and s["state"] == "aborted":
                                continue
                            asked.add(s["scan_id"])
                            try:
                                ctl.finish_scan(s["scan_id"])
                            except Exception as exc:  # noqa: BLE001
                                self.log(f"  finish_scan {s['scan_id']}: {type(exc).__name__}: {str(exc)[:160]}")
                    left = [p.name for p in self.spool.iterdir() if p.name.endswith((".spool.h5", ".journal"))
                            and not self._cancelled_spool(p) and not self._empty_failed(p)]
                    if not live and not left:
                        break
                    time.sleep(0.5)
                else:
                    self.fail(f"not everything ended in 240 s: live {[(s['scan_id'], s['state']) for s in live]}, "
                              f"spool dir {sorted(p.name for p in self.spool.iterdir())}")
                self.final_list = ctl.list_scans()
            if daemon.stop() != 0:
                self.fail("the last daemon's stop failed")
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
            self.daemon_log = daemon.log()

    def _empty_failed(self, path: Path) -> bool:
        try:
            import h5py
            with h5py.File(path, "r", locking=False) as f:  # no lock: a lock of ours fails the daemon's writes
                return str(f.attrs.get("status")) == "failed" and int(f["entry_1/data_1"].attrs.get("count", 0)) == 0
        except Exception:  # noqa: BLE001
            return False

    def _cancelled_spool(self, path: Path) -> bool:
        sid = path.name.split(".spool")[0]
        rec = self.scans.get(sid)
        if rec is None or not rec.cancel_tried or not path.name.endswith(".spool.h5"):
            return False
        try:
            import h5py
            with h5py.File(path, "r", locking=False) as f:  # no lock: a lock of ours fails the daemon's writes
                return str(f.attrs.get("status", "")) == "aborted" or "aborted" in str(dict(f.attrs))
        except Exception:  # noqa: BLE001
            return False

    def check(self) -> None:
        import h5py
        import hdf5plugin  # noqa: F401

        leftovers = sorted(p.name for p in self.spool.iterdir() if not self._cancelled_spool(p)
                           and not p.name.endswith(".lock"))
        empty = [n for n in leftovers if self._empty_failed(self.spool / n)]
        if empty:  # a scan recovered before its first frame fails ("without a single frame"): kept
            self.log(f"spool dir keeps {len(empty)} failed spools of scans without a frame: {empty}")
        if set(leftovers) - set(empty):
            self.fail(f"spool dir not empty: {sorted(set(leftovers) - set(empty))}")
        result_files = {p.name[:-3]: p for p in self.results.rglob("*.h5") if not p.name.startswith(".")}
        checked = 0
        for sid, rec in sorted(self.scans.items()):
            path = result_files.get(sid)
            source = "result"
            if path is None and rec.cancel_tried:
                path = self.spool / f"{sid}.spool.h5"
                source = "aborted spool"
                if not path.exists():
                    path = None
            if path is None:
                if rec.acked or rec.end_confirmed:
                    self.fail(f"{sid} ({rec.kind}, plan {rec.plan}): {len(rec.acked)} acknowledged frames, "
                              f"no result, notes {rec.notes}")
                continue
            try:
                with h5py.File(path, "r", locking=False) as f:  # no lock: a lock of ours fails the daemon's writes
                    g = f["raw/entry_1/data_1"] if source == "result" else f["entry_1/data_1"]
                    idx = g["frame_index"][()]
                    if rec.kind == "dectris":
                        data = g["detector_frames"][()]
                    else:
                        data = g["data"][()] if source == "result" else f["entry_1/data/data"][()]
                    count = int(g.attrs.get("count", len(idx))) if source != "result" else len(idx)
            except Exception as exc:  # noqa: BLE001
                self.fail(f"{sid}: {source} {path} unreadable: {type(exc).__name__}: {exc}")
                continue
            idx, data = idx[:count], data[:count]
            checked += 1
            if len(set(idx.tolist())) != len(idx):
                self.fail(f"{sid}: duplicate frame indices in its {source}")
            missing = rec.acked - set(idx.tolist())
            if missing:
                self.fail(f"{sid} ({rec.kind}, plan {rec.plan}): {len(missing)} acknowledged frames missing from "
                          f"its {source} (first {sorted(missing)[:8]}), notes {rec.notes}")
            sent = frames_of(rec)
            bad = [int(i) for r, i in enumerate(idx) if not np.array_equal(data[r], sent[i])]
            if bad:
                self.fail(f"{sid}: {len(bad)} rows differ from the frames sent (indices {bad[:8]})")
        self.log(f"checked {checked} scans with data ({len(result_files)} results); {len(self.scans)} scans in all "
                 f"({sum(r.kind == 'dectris' for r in self.scans.values())} detector series), "
                 f"{sum(len(r.acked) for r in self.scans.values())} acknowledged frames, "
                 f"{sum(r.end_confirmed for r in self.scans.values())} ends confirmed")


def busy(on: bool, procs: list[subprocess.Popen]) -> None:
    if on and not procs:
        procs += [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)]
    if not on:
        for p in procs:
            p.kill()
            p.wait()
        procs.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dectris-every", type=int, default=4, help="every N-th cycle with a DECTRIS source (0: none)")
    parser.add_argument("--busy-from", type=int, default=-1, help="two `yes` loops from this cycle …")
    parser.add_argument("--busy-to", type=int, default=-1, help="… to this one (exclusive)")
    parser.add_argument("--sim-series", type=int, default=2, help="series each dectris-sim sends")
    parser.add_argument("--keep-sim", action="store_true", help="the sim runs on through cycles without --source")
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    camp = Campaign(work, args.seed)
    camp.sim_series, camp.keep_sim = args.sim_series, args.keep_sim
    yes: list[subprocess.Popen] = []
    try:
        for k in range(args.cycles):
            busy(args.busy_from <= k < args.busy_to, yes)
            dectris = args.dectris_every > 0 and k % args.dectris_every == args.dectris_every - 1
            try:
                camp.run_cycle(k, rng, dectris)
            except Exception:  # noqa: BLE001
                camp.fail(f"cycle {k}: campaign error {traceback.format_exc()[-1500:]}")
        busy(False, yes)
        camp.finish()
        camp.check()
    finally:
        busy(False, yes)
        if camp.sim is not None and camp.sim.poll() is None:
            camp.sim.kill()
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"seed": args.seed, "cycles": args.cycles, "failures": camp.failures,
                      "load": Path("/proc/loadavg").read_text().split()[:3]}, indent=1))
    if camp.failures and hasattr(camp, "daemon_log"):
        (Path(tempfile.gettempdir()) / f"chaos-seed{args.seed}-lastdaemon.log").write_text(camp.daemon_log)
    return 1 if camp.failures else 0


if __name__ == "__main__":
    sys.exit(main())
