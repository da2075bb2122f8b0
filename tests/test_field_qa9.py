"""Field QA of fieldqa9 (main ec52969): `finish_scan` of a stopped scan whose spool the daemon
kept, asked after a restart of the daemon; `worker_processes` with a Stream V1 source."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest


def _config(tmp_path: Path, **extra):
    from cryoptycho.daemon.config import ServiceConfig

    return ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                         metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                         resolution_interval_s=0, refine_time_budget_s=2, **extra)


def test_finish_scan_after_a_restart_reconstructs_a_kept_aborted_spool(tmp_path):
    """A scan stopped without a result (here cancelled; a sender that went silent, a recovered
    scan whose producer did not return alike) is aborted with the reason "the frames are kept in
    the spool: control `finish_scan` reconstructs them". After a restart of the daemon —
    planned or not — `finish_scan` of it was refused as `unknown scan` (rule known_scan): aborted
    spools are not recovered at start, and the handler looked only at the scans in memory. It
    now re-opens the kept spool and reconstructs it, its result marked partial; a kept spool of
    another status, and an id with no spool, are refused by name."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import read_spool
    from cryoptycho.protocols.control import ControlClient, ControlError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    n, half = len(scan.frames), len(scan.frames) // 2
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("part"))
            one.send_frames(scan.frames[:half])
            assert one.flush().acknowledged == half
            ctl.cancel("part", reason="beam lost")
            wait_for(lambda: ctl.receipt("part")["state"] == "aborted", 60, "the scan to be aborted")
            one.scan = None  # stopped: nothing more to send
    finally:
        bg.stop()
    assert read_spool(tmp_path / "s" / "part.spool.h5", frames=False).status == "aborted"

    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=30, retries=1) as ctl:
            assert [s["scan_id"] for s in ctl.list_scans()] == []  # not recovered at start
            reply = ctl.finish_scan("part")
            assert reply["scan_id"] == "part" and reply["frames"]["received"] == half, reply
            done = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "part"
                                          and s["state"] in ("finished", "failed")), None), 120, "the scan to finish")
            assert done["state"] == "finished" and done["recovered"] is True, done
            assert ctl.receipt("part")["end_reason"] == "finish_scan"
            with h5py.File(done["result_path"]) as f:
                extra = dict(f["extra"].attrs)
                assert f["raw/entry_1/data_1/data"].shape[0] == half
            assert (extra["frames_received"], extra["frames_expected"], bool(extra["partial"])) == (half, n, True)
            # no spool: refused as before, naming what is missing
            with pytest.raises(ControlError) as missing:
                ctl.finish_scan("never-seen")
            assert missing.value.reply.result["rule"] == "known_scan" and "no spool file never-seen.spool.h5" in str(missing.value)
            with pytest.raises(ControlError) as too_long:  # no file system look for a name no scan can have
                ctl.finish_scan("x" * 5000)
            assert too_long.value.reply.result["rule"] == "known_scan", too_long.value
    finally:
        bg.stop()


def test_finish_scan_refuses_a_kept_spool_that_is_not_a_stopped_scans(tmp_path):
    """A finished scan's spool (keep_spool) the daemon no longer holds is not re-opened."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import mark_status
    from cryoptycho.protocols.control import ControlClient, ControlError
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for

    scan = synthetic_scan(n_side=6, m=32)
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("held"))
            one.send_frames(scan.frames[:4])
            assert one.flush().acknowledged == 4
            ctl.cancel("held")
            wait_for(lambda: ctl.receipt("held")["state"] == "aborted", 60, "the scan to be aborted")
            one.scan = None
    finally:
        bg.stop()
    mark_status(tmp_path / "s" / "held.spool.h5", "finished")  # as keep_spool leaves a finished scan's
    bg = BackgroundService(_config(tmp_path))
    svc = bg.service
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=30, retries=1) as ctl:
            with pytest.raises(ControlError) as refused:
                ctl.finish_scan("held")
            assert refused.value.reply.result["rule"] == "stopped_scan" and "'finished'" in str(refused.value), refused.value
    finally:
        bg.stop()


def test_worker_processes_for_a_stream_v1_source_is_said_to_be_ignored(caplog):
    """`[dectris] worker_processes = true` with `--source dectris1://…` decoded on threads (V1
    images are decoded by the receiver) and the daemon's log said nothing of it: an operator
    who set it for a V1 detector could not tell it had no effect."""
    import logging

    from cryoptycho.protocols.dectris.source import DectrisSource

    with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
        v1 = DectrisSource("dectris1://127.0.0.1:9999", {"worker_processes": True})
    assert v1.processes is False
    assert any("worker_processes = true applies to Stream V2 only" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cryoptycho.protocols.dectris.source"):
        v2 = DectrisSource("dectris2://127.0.0.1:31001", {"worker_processes": True})
    assert v2.processes is True and not caplog.records
