"""A DEALER control client pipelines requests behind one whose reply is made later (a receipt
whose look at the spool and results directories hangs: a hung network file system, blocked here
as in tests/test_svc10_file_checks_flood.py) and reads none of the replies. Replies keep request
order, so before, the daemon held a reply per request for as long as the first waited, without
bound. Now past ``control_pending_replies`` a request is answered ``control_busy`` unhandled, and
what the daemon holds for the client stays bounded."""

from __future__ import annotations

import threading

import pytest
import zmq
from daemon_support import loopback_config, wait_for

MOST = 8
PINGS = 200


@pytest.fixture
def hung(tmp_path, monkeypatch):
    """An in-process daemon whose look at the files of ids starting ``slow`` blocks."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage import outputs

    entered, release = threading.Event(), threading.Event()
    paths = outputs.output_paths

    def blocking(stem, formats=outputs.ALL_FORMATS):
        if str(stem).rsplit("/", 1)[-1].startswith("slow"):
            entered.set()
            release.wait(120)
        return paths(stem, formats)

    monkeypatch.setattr(outputs, "output_paths", blocking)
    bg = BackgroundService(loopback_config(tmp_path, control_pending_replies=MOST))
    try:
        yield bg.service, entered, release
    finally:
        release.set()
        bg.stop()



def _dealer(svc) -> zmq.Socket:
    """A DEALER control client that pipelines without reading (timeouts only against a hang)."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 120_000)
    dealer.setsockopt(zmq.SNDTIMEO, 60_000)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(svc.endpoints["control"])
    return dealer

def test_requests_pipelined_behind_a_delayed_reply_are_bounded(hung, caplog) -> None:
    """... and the episode is logged once for the client (it was logged nowhere: an operator
    could not tell why a client's requests went unanswered), not once per refused request."""
    import logging

    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.messages import Reply, Request, decode, encode

    svc, entered, release = hung
    caplog.set_level(logging.WARNING, logger="cryoptycho.service")
    dealer = _dealer(svc)
    try:
        dealer.send_multipart([b"", *encode(Request("receipt", {"scan_id": "slow-first"}))])
        assert entered.wait(60), "the files were not looked for"
        for _ in range(PINGS):
            dealer.send_multipart([b"", *encode(Request("ping", {}))])
        refused = svc.metrics.control_requests.labels(method="ping", success="false")
        wait_for(lambda: refused._value.get() >= PINGS - (MOST - 1), 60, "the pings past the bound to be refused")
        # what the daemon holds for the client: the delayed reply's slot, MOST - 1 pings' replies
        # and one entry counting the refusals (before: PINGS + 1 replies held)
        held = svc.control_replies_held()
        assert held == {"clients": 1, "entries": MOST + 1}, held
        with ControlClient(svc.endpoints["control"], timeout_s=30) as other:  # another client is not held
            assert other.ping()["pong"] is True
        release.set()
        replies = [decode(dealer.recv_multipart()[1:]) for _ in range(PINGS + 1)]
        dealer.send_multipart([b"", *encode(Request("ping", {}))])  # answered again once read
        after = decode(dealer.recv_multipart()[1:])
    finally:
        release.set()
        dealer.close(linger=0)
    assert all(isinstance(r, Reply) for r in replies)
    assert replies[0].success and replies[0].result["state"] == "unknown", replies[0]
    kept, busy = replies[1:MOST], replies[MOST:]
    assert all(r.success and r.result["pong"] is True for r in kept), kept[:2]
    assert len(busy) == PINGS - (MOST - 1)
    assert all(not r.success and r.result == {"field": "control", "rule": "control_busy"} for r in busy), busy[:2]
    assert "control_pending_replies" in busy[0].msg and f"at most {MOST}" in busy[0].msg, busy[0].msg
    assert after.success and after.result["pong"] is True
    assert svc.control_replies_held() == {"clients": 0, "entries": 0}
    said = [r.getMessage() for r in caplog.records if "control_busy" in r.getMessage()]
    assert len(said) == 1 and "control_pending_replies" in said[0] and f"{MOST} replies waiting" in said[0], said


def test_refusals_in_a_row_are_sent_at_most_a_send_queue_of_them(hung, monkeypatch) -> None:
    """A client pipelining past ZeroMQ's send queue without reading: the refusals were counted
    without bound and all sent in one loop of the manager thread when the delayed reply came
    (6.8 µs each, most dropped by the router unsent). Now at most REFUSALS_SENT_MAX are sent; the
    rest are counted refused, and the client is answered again once it has read."""
    from cryoptycho.daemon import service as service_module
    from cryoptycho.protocols.messages import Request, decode, encode

    most_sent = 50
    monkeypatch.setattr(service_module, "REFUSALS_SENT_MAX", most_sent)
    svc, entered, release = hung
    dealer = _dealer(svc)
    try:
        dealer.send_multipart([b"", *encode(Request("receipt", {"scan_id": "slow-first"}))])
        assert entered.wait(60), "the files were not looked for"
        for _ in range(PINGS):
            dealer.send_multipart([b"", *encode(Request("ping", {}))])
        refused = svc.metrics.control_requests.labels(method="ping", success="false")
        wait_for(lambda: refused._value.get() >= PINGS - (MOST - 1), 60, "the pings past the bound to be refused")
        release.set()
        replies = [decode(dealer.recv_multipart()[1:]) for _ in range(1 + (MOST - 1) + most_sent)]
        dealer.send_multipart([b"", *encode(Request("ping", {}))])
        after = decode(dealer.recv_multipart()[1:])  # the next reply is this ping's: nothing more was sent
    finally:
        release.set()
        dealer.close(linger=0)
    busy = replies[MOST:]
    assert all(not r.success and r.result["rule"] == "control_busy" for r in busy), busy[:2]
    assert after.success and after.result.get("pong") is True, after
    assert refused._value.get() == PINGS - (MOST - 1)
