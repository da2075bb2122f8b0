"""The real daemon killed (SIGKILL) while it spools a stream: after a restart, every frame the
sender was told the daemon holds (its ``receipt``) is in the recovered scan's result, byte for
byte, and no row holds another frame (daemon/storage/FORMATS.md § "The journal").

Where strace can trace the daemon, the kill is injected on entry to the N-th ``pwrite64`` (HDF5's
writes: creating the spool, an append's flush, its status): wherever that falls, it is inside a
spool write, the window where HDF5's file is not one of its consistent states. Elsewhere the
daemon is killed with frames sent that it has not acknowledged yet."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
from cryoptycho.protocols.control import ControlClient, ControlTimeout
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

FAST = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=5", "--set", "preview_hz=10")
BATCH = 10  # 32×32 uint16 frames, 64 a chunk: most appends rewrite a part-full chunk
GROUP = 3  # messages sent before the sender asks for a receipt (they may join one append)
#: the journal write (one ``writev`` per record: journal.py) strace kills the daemon at, a few
#: appends into the stream; while a scan is open its spool writes only its journal (spool.py)
NTH_WRITE = 6


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    run = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], check=False, capture_output=True)
    return run.returncode == 0  # ptrace may be forbidden (containers)


def _held(ctl: ControlClient, daemon, scan_id: str, sent: int) -> int | None:
    """The frames the daemon acknowledges once it holds ``sent`` (its receipt), or None once it
    is dead without having acknowledged them."""
    deadline = time.monotonic() + 120
    while daemon.proc.poll() is None:
        assert time.monotonic() < deadline, f"no receipt for {sent} frames in 120 s\n{daemon.log()}"
        try:
            answer = ctl.receipt(scan_id)
        except ControlTimeout:
            continue  # a busy box, or the daemon is dying: poll() says which
        if answer["state"] != "unknown" and int(answer["frames"]["received"]) >= sent:
            return int(answer["frames"]["received"])
        time.sleep(0.02)  # a poll interval (the daemon has no push), as wait_for polls
    return None


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _kill_traced(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and, where it is strace, the daemon it traces first: a killed strace
    detaches its tracee, which would run on, holding the spool directory's lock (serve.py)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"the traced daemon {pids} outlived SIGKILL for 60 s"
        time.sleep(0.05)


def _recovered_result(ctl: ControlClient, daemon, scan_id: str) -> dict:
    """The recovered scan's summary once it has a result. No producer comes back: a scan that
    lacks frames is aborted after recover_wait_s with its frames kept in the spool (as a live
    scan whose sender went silent), and `finish_scan` reconstructs them, as an operator would."""
    def stopped() -> dict | None:
        return next((s for s in ctl.list_scans() if s["scan_id"] == scan_id
                     and s["state"] in ("finished", "failed", "aborted")), None)

    info = wait_for(stopped, 120, "the recovered scan to stop", daemon)
    if info["state"] == "aborted":
        assert "did not return after the daemon's restart" in info["error"], info
        ctl.finish_scan(scan_id)
        info = wait_for(lambda: (s := stopped()) is not None and s["state"] != "aborted" and s, 120,
                        "the recovered scan's finish_scan result", daemon)
    return info


def test_a_daemon_killed_while_spooling_keeps_every_acknowledged_frame(tmp_path: Path) -> None:
    scan = synthetic_scan(n_side=16, m=32)  # 256 frames
    strace = _strace_works()
    prefix = ("strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=writev",
              "-e", f"inject=writev:signal=SIGKILL:when={NTH_WRITE}") if strace else ()
    daemon = start_daemon(tmp_path, *FAST, prefix=prefix)
    acked = 0
    try:
        with ControlClient(daemon.control, timeout_s=2) as ctl, \
                Producer(daemon.ingest, control=daemon.control, confirm=False) as producer:
            producer.start_scan(**scan.start_fields("killed"))
            sent = 0
            while sent < len(scan.frames) and daemon.proc.poll() is None:
                for _ in range(GROUP):
                    producer.send_frames(scan.frames[sent:sent + BATCH])
                    sent = min(len(scan.frames), sent + BATCH)
                if not strace and sent >= len(scan.frames) // 2:
                    daemon.proc.send_signal(signal.SIGKILL)  # frames sent, not acknowledged yet
                    break
                held = _held(ctl, daemon, "killed", sent)
                if held is None:
                    break
                acked = held
            producer.scan = None  # nothing more to say to a dead daemon
        if daemon.proc.poll() is None:
            _kill_traced(daemon.proc)  # strace's N-th write never came
        daemon.proc.wait(60)
    finally:
        if daemon.proc.poll() is None:
            _kill_traced(daemon.proc)
    assert acked > 0, "the daemon died before it acknowledged any frame: kill it later"

    daemon = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=1")
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = _recovered_result(ctl, daemon, "killed")
        assert info["state"] == "finished" and info["recovered"] is True, (info, daemon.log())
        with h5py.File(info["result_path"]) as f:
            import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)

            frames = f["raw/entry_1/data_1/data"][()]
            indices = f["raw/entry_1/data_1/frame_index"][()]
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert not list((tmp_path / "spool").glob("*.journal")), "a finished scan's journal is deleted"
    # the spool was not closed: recovery rebuilt it from its journal, and said so
    assert any("killed.spool.h5 rebuilt from its journal" in line for line in daemon.log_lines), daemon.log()
    assert set(range(acked)) <= set(indices.tolist()), (acked, sorted(indices.tolist()))
    for row, index in enumerate(indices):  # every frame kept is the frame sent, acknowledged or not
        np.testing.assert_array_equal(frames[row], scan.frames[index], err_msg=f"row {row} (index {index})")


def test_a_daemon_killed_while_spooling_a_detector_scan_keeps_every_acknowledged_frame(tmp_path: Path) -> None:
    """The console script with a DECTRIS detector (``--source``, 2×2 binning): killed mid-scan,
    when its spool holds the detector's frames but none of its binned frames yet (they are
    derived from the detector frames until the scan ends). After a restart every acknowledged
    frame is in the recovered scan's result, the detector frame as the detector sent it and
    the binned frame as the scan received it."""
    from cryoptycho.daemon.commands.dectris_sim import synthetic_series
    from cryoptycho.daemon.storage.spool import load_derivation
    from daemon_support import start_dectris_sim

    # the detector sends what queued up while the daemon started at once, then 50 frames/s: it
    # is killed long before the last frame
    count, size = 4096, 64
    sent = synthetic_series(count, size, 200.0, 0).frames["threshold_1"]  # what dectris-sim sends (defaults)
    sim, url = start_dectris_sim("--frames", str(count), "--size", str(size), "--rate", "50")
    daemon = start_daemon(tmp_path, *FAST, "--source", url, "--set", "dectris.bin=2")
    acked, scan_id = 0, None
    try:
        with ControlClient(daemon.control, timeout_s=5) as ctl:
            def held() -> int:
                nonlocal scan_id
                try:
                    scan_id = scan_id or next((s["scan_id"] for s in ctl.list_scans()), None)
                    return 0 if scan_id is None else int(ctl.receipt(scan_id)["frames"]["received"])
                except ControlTimeout:
                    return 0  # a busy box: asked again

            acked = wait_for(lambda: (n := held()) >= 64 and n, 120, "64 detector frames received", daemon)
            daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(60)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        sim.kill()
        sim.wait(10)
    assert acked < count, "the scan ended before the kill: send more frames, or slower"
    # what `reconstruct`/`replay` of the killed daemon's spool read (from its journal)
    from cryoptycho.daemon.storage.open import open_recorded

    early = open_recorded(next((tmp_path / "spool").glob("*.spool.h5")))
    assert early.status == "open" and len(early.frame_indices) >= acked

    daemon = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=1")
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = _recovered_result(ctl, daemon, scan_id)
        assert info["state"] == "finished" and info["recovered"] is True, (info, daemon.log())
        with h5py.File(info["result_path"]) as f:
            import hdf5plugin  # noqa: F401  (registers the bitshuffle filter)

            raw = f["raw"]
            binned = raw["entry_1/data_1/data"][()]
            detector = raw["entry_1/data_1/detector_frames"][()]
            indices = raw["entry_1/data_1/frame_index"][()]
            reducer, pending = load_derivation(raw)
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    assert reducer is not None and reducer.bin == 2 and pending == []  # written in the result
    assert set(range(acked)) <= set(indices.tolist()), (acked, sorted(indices.tolist()))
    expected = reducer.reduce_batch(sent[indices])[0]
    np.testing.assert_array_equal(detector, sent[indices])
    # the recovered scan's worker held its frames and their largest count: stored in the
    # smallest dtype that holds it (FORMATS.md), the same counts
    assert binned.dtype.itemsize <= expected.dtype.itemsize and int(binned.max()) == int(expected.max())
    np.testing.assert_array_equal(binned, expected)
    early_expected = reducer.reduce_batch(sent[early.frame_indices])[0]
    assert early.data.frames.dtype == expected.dtype and early.data.frames.tobytes() == early_expected.tobytes()
