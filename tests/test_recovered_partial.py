"""Field QA of fieldqa8 (d09c75f): a scan recovered open after a restart, to which no producer
returns, and the wording of two refusals/docs around it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np


def _config(tmp_path: Path, **extra):
    from cryoptycho.daemon.config import ServiceConfig

    return ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                         metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                         resolution_interval_s=0, **extra)


def test_a_recovered_partial_scan_no_producer_returns_to_is_aborted_not_finished(tmp_path, monkeypatch):
    """A scan recovered open (the daemon stopped mid-scan) that no producer came back to was
    ended after recover_wait_s and reported `finished` with 18 of 36 frames — scan.finished, a
    result, a receipt saying finished — while the live path (a sender gone silent) aborts a
    partial scan, and PROTOCOL § 4.5 says a partial scan is never reported finished on its own.
    It is now stopped as the live path stops one: aborted, the reason naming the held and
    declared counts and the producer that did not return, its frames kept in the spool, and
    `finish_scan` reconstructs them on request."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import read_spool
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.messages import Result as ScanResult
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import synthetic_scan, wait_for, wait_subscribed

    scan = synthetic_scan(n_side=6, m=32)
    n = len(scan.frames)
    half = n // 2
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("part"))
            one.send_frames(scan.frames[:half])
            assert one.flush().acknowledged == half
            one.scan = None  # stopped with the daemon: its spool stays open for the next start
    finally:
        bg.stop()
    assert read_spool(tmp_path / "s" / "part.spool.h5", frames=False).status == "open"

    # what the restarted daemon publishes (recorded as posted: a subscriber could join too late)
    from cryoptycho.daemon.publisher import Outbox

    posted: list[tuple[str, object]] = []
    real_post = Outbox.post
    monkeypatch.setattr(Outbox, "post", lambda self, topic, payload: (posted.append((topic, payload)),
                                                                      real_post(self, topic, payload))[1])
    bg = BackgroundService(_config(tmp_path, recover_wait_s=0.2))
    svc = bg.service
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            summary = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "part"
                                             and s["state"] in ("finished", "aborted", "failed")), None),
                               120, "the recovered scan to stop")
            assert summary["state"] == "aborted", summary
            assert summary["recovered"] is True and summary["result_path"] is None
            assert f"after {half} of {n} frames" in summary["error"], summary
            assert "did not return after the daemon's restart" in summary["error"], summary
            assert "finish_scan" in summary["error"]
            # (posted just after the state changed, on the worker's thread: waited for)
            wait_for(lambda: any(t == "scan.aborted" and p["scan_id"] == "part" for t, p in list(posted)),
                     60, "scan.aborted")
            events = [(t, p) for t, p in list(posted) if t.startswith("scan.") and p["scan_id"] == "part"]
            assert [t for t, _ in events][-1] == "scan.aborted", events
            assert "scan.finished" not in [t for t, _ in events] and not any(t == "result" for t, _ in posted)
            assert "did not return after the daemon's restart" in events[-1][1]["reason"]
            receipt = ctl.receipt("part")
            assert receipt["state"] == "aborted", receipt  # final: it takes no more frames (§4.5 step 3)
            assert receipt["frames"]["received"] == half and receipt["expected_frames"] == n
            assert receipt["missing"][:3] == [half, half + 1, half + 2], receipt
            assert not list((tmp_path / "r").glob("part*"))
            kept = read_spool(tmp_path / "s" / "part.spool.h5")
            assert kept.status == "aborted"
            np.testing.assert_array_equal(np.sort(kept.indices), np.arange(half))
            # nothing received is lost: the operator reconstructs it on request, as a live one;
            # its result says it is partial, in the file and to subscribers
            sub = Subscriber(svc.endpoints["publish"], topics=("result", "error"), latest_only=False)
            try:
                wait_subscribed(SimpleNamespace(ingest=svc.endpoints["ingest"], log=lambda: ""), sub)
                assert ctl.finish_scan("part")["state"] != "aborted"
                result = wait_for(lambda: next((e for e in iter(lambda: sub.recv(timeout_s=0.2), None)
                                                if isinstance(e, ScanResult)), None), 120, "the finish_scan result")
            finally:
                sub.close()
            done = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "part"
                                          and s["state"] == "finished"), None), 120, "the scan to be listed finished")
        told = {k: result.metadata.get(k) for k in ("frames_received", "frames_expected", "partial")}
        assert told == {"frames_received": half, "frames_expected": n, "partial": True}, result.metadata
        assert result.metadata["end_reason"] == "finish_scan"
        with h5py.File(done["result_path"]) as f:
            assert f["raw/entry_1/data_1/data"].shape[0] == half
            extra = dict(f["extra"].attrs)
        assert (extra["frames_received"], extra["frames_expected"], bool(extra["partial"])) == (half, n, True), extra
    finally:
        bg.stop()


def test_a_scan_id_whose_result_would_be_a_live_spool_is_refused_naming_that_spool(tmp_path):
    """With spool_dir == results_dir, scan id "x.spool" writes its result to x.spool.h5: scan
    "x"'s live spool. The refusal (and the receipt's `taken`) said "already has a result
    (…, from before a restart …)" — a file that is neither a result nor from before a restart."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    one_dir = tmp_path / "d"
    bg = BackgroundService(ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*",
                                         control="tcp://127.0.0.1:*", metrics_enabled=False, spool_dir=one_dir,
                                         results_dir=one_dir, resolution_interval_s=0))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("x"))
            one.send_frames(scan.frames[:4])
            assert one.flush().acknowledged == 4
            taken = ctl.receipt("x.spool")["taken"]
            assert taken is not None and "already has a result" not in taken, taken
            assert "the spool of scan 'x' (receiving frames)" in taken and str(one_dir / "x.spool.h5") in taken
            assert "results_dir" in taken
            one.abort("test over")
            wait_for(lambda: ctl.receipt("x")["state"] == "aborted", 60, "the scan to stop")
            # kept with its (listed) scan now, still not called a result
            taken = ctl.receipt("x.spool")["taken"]
            assert "the spool of scan 'x' (kept with its scan)" in taken, taken
    finally:
        bg.stop()


def test_recover_finish_partial_reconstructs_a_recovered_partial_scan_by_itself(tmp_path):
    """Opted in (``recover_finish_partial = true`` in the daemon's config file), a scan the
    daemon was killed in, to which no producer returns, is reconstructed from what it holds
    after ``recover_wait_s``: finished, its result marked partial, no operator's `finish_scan`
    needed (before: the key did not exist, and the scan waited aborted)."""
    import signal

    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import start_daemon, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    n = len(scan.frames)
    half = n // 2
    daemon = start_daemon(tmp_path)
    try:
        with Producer(daemon.ingest, control=daemon.control) as one:
            one.start_scan(**scan.start_fields("unattended"))
            one.send_frames(scan.frames[:half])
            assert one.flush().acknowledged == half
            one.scan = None  # its producer is gone with the daemon
    finally:
        daemon.stop(signal.SIGKILL)  # a crash mid-scan: its spool stays open for the next start
    config = tmp_path / "site.toml"
    config.write_text("recover_finish_partial = true\nrecover_wait_s = 0.2\nrefine_time_budget_s = 5\n"
                      "[options]\niterations = 2\n")
    daemon = start_daemon(tmp_path, "--config", str(config))
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            summary = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "unattended"
                                             and s["state"] in ("finished", "aborted", "failed")), None),
                               120, "the recovered scan to stop", daemon)
            receipt = ctl.receipt("unattended")
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert summary["state"] == "finished" and summary["recovered"] is True, summary
    assert receipt["end_reason"] == "recover_finish_partial" and receipt["frames"]["received"] == half, receipt
    with h5py.File(summary["result_path"]) as f:
        assert f["raw/entry_1/data_1/data"].shape[0] == half
        extra = dict(f["extra"].attrs)
    assert (extra["frames_received"], extra["frames_expected"], bool(extra["partial"])) == (half, n, True), extra
    assert extra["end_reason"] == "recover_finish_partial", extra
    assert "reconstructing what the scan holds (recover_finish_partial)" in daemon.log()
