"""A client floods ``receipt`` requests of scans the daemon does not hold while the look at the
spool and results directories hangs (a hung network file system; blocked here as in
tests/test_file_checks_off_manager.py). Before, each request queued a stat job of its own on the
file-checks thread, without bound. Now requests of one scan id wait for one look, and past
FILE_CHECKS_QUEUED distinct looks waiting a receipt is answered ``file_checks_busy`` at once,
which the SDK's Producer asks again as it does a receipt that is not answered."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import zmq
from daemon_support import loopback_config, synthetic_scan, wait_for

SAME, DISTINCT = 300, 300


@pytest.fixture
def hung(tmp_path, monkeypatch):
    """An in-process daemon whose look at the files of ids starting ``slow`` blocks; the looks
    made, counted by id."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage import outputs

    entered, release = threading.Event(), threading.Event()
    looks: Counter[str] = Counter()
    paths = outputs.output_paths

    def blocking(stem, formats=outputs.ALL_FORMATS):
        name = str(stem).rsplit("/", 1)[-1]
        looks[name] += 1
        if name.startswith("slow"):
            entered.set()
            release.wait(120)
        return paths(stem, formats)

    monkeypatch.setattr(outputs, "output_paths", blocking)
    # one DEALER pipelines all its receipts: its replies wait, in order, past the default bound
    bg = BackgroundService(loopback_config(tmp_path, control_pending_replies=2 * (SAME + DISTINCT)))
    try:
        yield bg.service, entered, release, looks
    finally:
        release.set()
        bg.stop()


def test_a_flood_of_receipts_while_the_look_hangs_is_bounded(hung) -> None:
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.errors import ProducerTimeout
    from cryoptycho.protocols.messages import Reply, Request, decode, encode
    from cryoptycho.protocols.producer import Producer

    svc, entered, release, looks = hung
    first = ControlClient(svc.endpoints["control"], timeout_s=120)
    answered: dict = {}
    thread = threading.Thread(target=lambda: answered.update(first.receipt("slow-first")), daemon=True)
    thread.start()
    assert entered.wait(60), "the files were not looked for"
    ids = ["slow-same"] * SAME + [f"slow-d{i}" for i in range(DISTINCT)]
    flood = zmq.Context.instance().socket(zmq.DEALER)
    flood.setsockopt(zmq.SNDTIMEO, 60_000)
    flood.setsockopt(zmq.RCVTIMEO, 120_000)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(svc.endpoints["control"])
    try:
        for scan_id in ids:
            flood.send_multipart([b"", *encode(Request("receipt", {"scan_id": scan_id}))])
        busy = svc.metrics.control_requests.labels(method="receipt", success="false")
        # one look in flight (slow-first), then slow-same's and 255 distinct ones wait: the
        # others are answered busy as they are read (before: none was, and 600 looks queued)
        limit = 256
        wait_for(lambda: busy._value.get() >= DISTINCT - (limit - 1), 60, "the receipts past the bound to be refused")
        # (3 s: at least one busy answer must come back within it on a loaded box)
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], send_timeout_s=3.0) as producer:
            # the SDK asks again, as when no answer comes, and its timeout names the daemon's
            # answer (before: DeliveryError "cannot acknowledge" at the first busy reply)
            scan = synthetic_scan(n_side=4, m=32)
            with pytest.raises(ProducerTimeout, match="ask again later"):
                producer.start_scan(**scan.start_fields("slow-sdk"))
        release.set()
        replies = []
        for _ in ids:
            parts = flood.recv_multipart()
            replies.append(decode(parts[1:]))
    finally:
        release.set()
        flood.close(linger=0)
        thread.join(60)
        first.close()
    assert answered.get("state") == "unknown", answered
    assert all(isinstance(r, Reply) for r in replies)
    same = replies[:SAME]
    assert all(r.success and r.result["state"] == "unknown" and r.result["taken"] is None for r in same), same[:3]
    assert looks["slow-same"] == 1, looks["slow-same"]  # one look answered all 300 (before: 300)
    distinct = replies[SAME:]
    kept = [r for r in distinct if r.success]
    refused = [r for r in distinct if not r.success]
    assert len(kept) == limit - 1 and all(r.result["state"] == "unknown" for r in kept), len(kept)
    assert refused and all(r.result == {"field": "scan_id", "rule": "file_checks_busy"} for r in refused), refused[:2]
    assert "256" in refused[0].msg and "ask again later" in refused[0].msg, refused[0].msg
    assert distinct[-1] in refused  # the later ones: answered in request order
    with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:  # the bound frees as looks end
        assert ctl.receipt("slow-after")["state"] == "unknown"
