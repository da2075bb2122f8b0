"""Admission after a cancelled scan: the memory its worker keeps for the spool's close.

A cancelled scan's worker hands the frames its frame store holds to the spool's close
(ScanWorker.keep_held_for_close) and exits; its reservation ended with it, while the close
(≈ 0.5 s for a large scan) still held the store, so a scan admitted then could over-commit the
memory budget. The frames are now counted by ``ScanManager.reserved()`` until the close lets
go of them.
"""

from __future__ import annotations

import threading
from pathlib import Path

from daemon_support import loopback_config, synthetic_scan, wait_for


def test_a_cancelled_scans_frames_stay_reserved_until_its_spool_close_lets_go_of_them(tmp_path: Path,
                                                                                         monkeypatch) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer

    gate, closing = threading.Event(), threading.Event()
    real_close = SpoolWriter.close

    def held_close(self: SpoolWriter, *args, **kwargs) -> None:
        if self.path.name.startswith("held") and not gate.is_set():
            closing.set()
            assert gate.wait(300), "the gate was never opened"
        real_close(self, *args, **kwargs)

    monkeypatch.setattr(SpoolWriter, "close", held_close)
    scan = synthetic_scan(n_side=8, m=64)
    bg = BackgroundService(loopback_config(tmp_path, drain_timeout_s=0))
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("held"))
            one.send_frames(scan.frames)
            session = wait_for(lambda: svc.scans.sessions.get("held"), 60, "the scan to start")
            reservation = session.reserved_bytes["host"]
            worker = wait_for(lambda: svc.scans.running.get("held"), 60, "the scan's worker")
            wait_for(lambda: worker.engine is not None and worker.engine.n_frames == len(scan.frames), 60,
                     "every frame in the frame store")
            one.abort("operator")
            one.scan = None
            assert closing.wait(60), "the cancelled scan's spool close never started"
            wait_for(lambda: "held" not in svc.scans.running, 60, "the cancelled scan's worker to exit")
            # the rows the close takes (the store itself may be larger: room for more frames)
            rows = worker.held_frames(0, len(scan.frames))
            assert rows is not None, "the cancelled scan's worker kept no frames for the close"
            held = rows.rows.nbytes
            # (reap runs on the manager thread: read it there, after the worker's exit was settled)
            seen: list[dict[str, int]] = []
            done = threading.Event()
            svc.scans.after_disk(lambda: None, lambda _r, _e: (seen.append(svc.scans.reserved()), done.set()))
            assert done.wait(60)
            assert seen[0]["host"] >= held > 0, "the close's frames are not counted after their worker exited"

            # a scan that fits beside the running ones but not beside the close's frames waits
            svc.config.host_memory_budget_bytes = reservation + held // 2
            one.start_scan(**scan.start_fields("next"))
            wait_for(lambda: ctl.receipt("next")["state"] != "unknown", 60, "the next scan's start to be read")
            assert "next" not in svc.scans.running and "next" in svc.scans.waiting

            gate.set()  # the close lets go of the frames: the next scan starts
            wait_for(lambda: "next" in svc.scans.running or svc.scans.sessions["next"].state.final, 60,
                     "the next scan to start once the close let go of the frames")
            one.send_frames(scan.frames)
            one.end_scan(timeout_s=60)
    finally:
        gate.set()
        bg.stop()
