"""A configured directory whose name is not UTF-8 (``--results-dir`` or ``--spool-dir`` given in
bytes: Python holds the undecodable ones as lone surrogates). msgpack refuses such a string, and
every event quoting a path under it became an ``internal_error`` "could not be published": the
scan's ``scan.finished`` (its result path), lost to subscribers. Now the path goes out with the
bytes written ``\\xff``, as ``ls -b`` shows them (protocols/wire.py ``encodable``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_encodable_writes_undecodable_bytes_as_escapes() -> None:
    from cryoptycho.protocols.wire import encodable

    raw = os.fsdecode(b"/data/r\xff\xc3\xa9/x.h5")  # (an undecodable byte, then an é)
    assert encodable(raw) == "/data/r\\xffé/x.h5"
    assert encodable({"p": [raw, 3, "plain"], raw: None}) == {"p": ["/data/r\\xffé/x.h5", 3, "plain"],
                                                              "/data/r\\xffé/x.h5": None}
    assert encodable("a\ud800b") == "a\\ud800b"  # a surrogate no byte became: escaped too


def test_a_scan_finished_under_an_undecodable_results_dir_is_published(tmp_path: Path) -> None:
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.messages import ErrorEvent, ScanEvent
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import loopback_config, synthetic_scan, wait_for

    results = tmp_path / os.fsdecode(b"r\xff")
    try:
        results.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes no undecodable bytes in a name")
    cfg = loopback_config(tmp_path, results_dir=results, refine_time_budget_s=2)
    scan = synthetic_scan(n_side=4, m=32)
    bg = BackgroundService(cfg)
    seen: list = []
    try:
        svc = bg.service
        with Subscriber(svc.endpoints["publish"], latest_only=False) as sub:
            # (a SUB socket gets nothing before its subscription reached the daemon: published
            # probes, an unreadable message's error event, until one arrives)
            import zmq

            push = zmq.Context.instance().socket(zmq.PUSH)
            push.connect(svc.endpoints["ingest"])
            try:
                def probed() -> bool:
                    push.send_multipart([b"\x00subscription probe"])
                    event = sub.recv(timeout_s=0.2)
                    return isinstance(event, ErrorEvent)

                wait_for(probed, 60, "the subscriber to receive the daemon's events")
            finally:
                push.close(linger=0)
            with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p:
                p.start_scan(**scan.start_fields("u"))
                p.send_frames(scan.frames)
                p.end_scan()

            def ended() -> bool:
                event = sub.recv(timeout_s=0.2)
                if event is not None:
                    seen.append(event)
                return any(isinstance(e, ScanEvent) and e.scan_id == "u" and e.event in ("finished", "failed")
                           for e in seen) or any(isinstance(e, ErrorEvent) and e.rule == "internal_error"
                                                 for e in seen)

            wait_for(ended, 120, "the scan's end to be published")
    finally:
        bg.stop()
    internal = [e for e in seen if isinstance(e, ErrorEvent) and e.rule == "internal_error"]
    assert not internal, internal  # before: "scan.finished could not be published: UnicodeEncodeError …"
    finished = [e for e in seen if isinstance(e, ScanEvent) and e.scan_id == "u" and e.event == "finished"]
    assert len(finished) == 1, seen
    assert finished[0].info["result_path"] == str(tmp_path / "r\\xff" / "u.h5"), finished[0].info
    assert (results / "u.h5").exists()
