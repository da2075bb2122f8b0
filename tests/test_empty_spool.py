"""A scan whose spool never got a frame (the daemon killed just after its scan_start, then no
producer came back; a cancel or timeout before the first frame) leaves nothing on disk: its
spool held no data, yet it was kept for ever with status failed/aborted and blocked its id."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.service import BackgroundService
from cryoptycho.daemon.storage.spool import SpoolWriter, journal_path, spool_path
from daemon_support import start_daemon, synthetic_scan, wait_for


def _scan_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.iterdir() if not p.name.startswith("."))


def test_a_scan_killed_before_its_first_frame_leaves_no_spool_once_it_ends(tmp_path: Path) -> None:
    """kill -9 of the real daemon once a scan_start is accepted and its spool made, before any
    frame: the next start recovers the scan (a producer may come back), nothing comes, it is
    aborted as a live scan whose sender went silent is (0 of 16 frames; until d09c75f it was
    ended and failed, "ended without a single frame"), and its spool — no frame in it — is removed, logged; a
    third start finds nothing. Before: the failed empty spool stayed in the directory for ever."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer

    scan = synthetic_scan(n_side=4, m=32)
    spool_dir = tmp_path / "spool"
    quick = ("--set", "recover_wait_s=0.5", "--set", "resolution_interval_s=0")
    daemon = start_daemon(tmp_path, *quick)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as p:
            p.start_scan(**scan.start_fields("nothing"))
            p.flush()
            wait_for(lambda: any(s["scan_id"] == "nothing" for s in ctl.list_scans()), 60, "the scan", daemon)
        # the spool and its journal's base record are made before the scan is accepted
        assert journal_path(spool_path(spool_dir, "nothing")).exists()
    finally:
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert _scan_files(spool_dir) == ["nothing.spool.h5", "nothing.spool.journal"]

    daemon = start_daemon(tmp_path, *quick)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "nothing"
                                          and s["state"] in ("finished", "failed", "aborted")), None),
                            60, "the recovered scan to end", daemon)
            assert info["state"] == "aborted" and info["recovered"], info
            assert info["frames"]["received"] == 0 and "after 0 of 16 frames" in info["error"], info
            # removed on the daemon's closer thread after the abort: wait for it
            wait_for(lambda: _scan_files(spool_dir) == [], 60, "the empty spool to be removed", daemon)
    finally:
        assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log_lines if line.startswith("{")]
    assert any(rec.get("scan_id") == "nothing" and rec["msg"].startswith("removed spool nothing.spool.h5")
               for rec in lines), daemon.log()

    daemon = start_daemon(tmp_path, *quick)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            assert not any(s["scan_id"] == "nothing" for s in ctl.list_scans())
    finally:
        assert daemon.stop() == 0
    assert _scan_files(spool_dir) == []


def _spec(scan_id: str) -> ScanSpec:
    return ScanSpec(scan_id=scan_id, frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=4)


def test_a_start_removes_the_empty_final_spools_earlier_releases_kept_and_keeps_every_other(tmp_path: Path) -> None:
    """Spools left by a release that kept them: failed and aborted with no frame go at the
    start (logged); a failed one with frames, and one whose frames were never closed into the
    file (its journal kept), stay."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    for scan_id, status, frames in (("empty-failed", "failed", 0), ("empty-aborted", "aborted", 0),
                                    ("kept", "failed", 2)):
        w = SpoolWriter.create(spool_dir, _spec(scan_id))
        if frames:
            w.append(np.ones((frames, 16, 16), np.uint16), np.arange(frames), np.zeros((frames, 2)))
        w.set_status(status)
        w.close()
    assert _scan_files(spool_dir) == ["empty-aborted.spool.h5", "empty-failed.spool.h5", "kept.spool.h5"]
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=spool_dir, results_dir=tmp_path / "results",
                        resolution_interval_s=0)
    bg = BackgroundService(cfg)
    bg.stop()
    assert _scan_files(spool_dir) == ["kept.spool.h5"]


def test_a_scan_cancelled_before_its_first_frame_leaves_no_spool(tmp_path: Path) -> None:
    """The same without a kill: a scan cancelled before any frame ends aborted, its empty
    spool removed (its id free again)."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer

    scan = synthetic_scan(n_side=4, m=32)
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                        resolution_interval_s=0)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields("never"))
            p.flush()
            wait_for(lambda: any(s["scan_id"] == "never" for s in ctl.list_scans()), 60, "the scan")
            ctl.cancel("never", reason="wrong grid square")
            wait_for(lambda: _scan_files(tmp_path / "spool") == [], 60, "the empty spool to be removed")
            assert next(s for s in ctl.list_scans() if s["scan_id"] == "never")["state"] == "aborted"
            reply = ctl.request("finish_scan", scan_id="never")  # nothing to reconstruct, said so
            assert not reply.success and reply.result["rule"] == "spool_kept" and "held no frame" in reply.msg
    finally:
        bg.stop()


def test_a_spool_holding_only_detector_frames_without_positions_is_kept(tmp_path: Path) -> None:
    """Detector images past the scan's positions are kept apart (unpositioned_detector_frames,
    not in the frame count): a series whose positioned images never came but whose later ones
    did, then cancelled, was taken for empty and deleted — detector data lost (review)."""
    from cryoptycho.daemon.storage.spool import empty_final_spools, remove_if_empty
    from cryoptycho.protocols.compression import bslz4_compress
    from cryoptycho.protocols.sources import RawChunks

    spec = ScanSpec(scan_id="extra", frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=8)
    w = SpoolWriter.create(tmp_path, spec)
    detector = np.random.default_rng(3).poisson(2, (5, 32, 32)).astype(np.uint16)
    kept = w.append_unpositioned(np.arange(100, 105), RawChunks((32, 32), np.dtype(np.uint16),
                                                                [bslz4_compress(f) for f in detector]))
    assert kept == 5
    w.set_status("aborted")
    w.close()
    assert empty_final_spools(tmp_path) == []
    assert remove_if_empty(w.path) is None and w.path.exists()
