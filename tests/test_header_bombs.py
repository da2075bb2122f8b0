"""No peer stalls the daemon's manager loop with a header bomb: a 1 MiB header of a million tiny
values (within ``max_header_bytes``) cost the loop 1.1–1.6 s of CPU per message — msgpack
building and freeing a million objects, read once to decode it and twice more to account for it
(is it a scan_start? how many frames?), and on the control socket once more to log its method —
during which no other peer was served (decoding on another thread would not help: msgpack holds
the interpreter lock throughout). Each header is now read once, and refused by its count of
values (``max_header_values``)."""

from __future__ import annotations

import msgpack
import pytest
import zmq
from cryoptycho.protocols.control import ControlClient
from daemon_support import loopback_config, wait_for

N = (1 << 20) - 256


def _bomb(kind: str, nested: bool) -> bytes:
    values = [[[] for _ in range(1000)] for _ in range(N // 1004)] if nested else [[] for _ in range(N)]
    head = {"protocol": "cryoptycho", "version": 1, "type": kind, "arrays": []}
    head.update({"scan_id": "bomb", "metadata": {"x": values}} if kind == "scan_start"
                else {"method": "ping", "params": {"x": values}})
    return msgpack.packb(head)


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """An in-process daemon whose readings of headers over 512 kB are counted; every manager
    step is described in the slow-step log (as a slow one is)."""
    from cryoptycho.daemon import service as service_module
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols import codec, wire

    reads: list[int] = []
    read = wire.read_header

    def counting(parts, limits):
        if wire.byte_view(parts[0]).nbytes > 512 * 1024:
            reads.append(1)
        return read(parts, limits)

    for module in (wire, codec, service_module):
        monkeypatch.setattr(module, "read_header", counting)
    monkeypatch.setattr(service_module, "SLOW_STEP_S", 0.0)
    bg = BackgroundService(loopback_config(tmp_path))
    try:
        yield bg.service, reads
    finally:
        bg.stop()


@pytest.mark.parametrize("nested", [False, True], ids=["one list", "nested lists"])
def test_an_ingest_header_bomb_is_read_once_and_its_scan_refused(counted, nested):
    svc, reads = counted
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(svc.endpoints["ingest"])
    try:
        push.send(_bomb("scan_start", nested))
        rejected = svc.metrics.messages_rejected.labels(rule="max_header_values")
        wait_for(lambda: rejected._value.get() == 1, 60, "the bomb to be refused")
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            receipt = ctl.receipt("bomb")
    finally:
        push.close()
    assert reads == [1], f"the bomb's header was read {len(reads)} times"
    if nested:  # its scan id was read: its producer's receipt says why its scan was refused
        assert receipt["state"] == "refused" and "max_header_values" in receipt["error"], receipt


def test_a_control_header_bomb_is_read_once_and_answered(counted):
    svc, reads = counted
    with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(svc.endpoints["control"])
        try:
            dealer.send_multipart([b"", _bomb("request", nested=True)])
            assert dealer.poll(30_000), "the bomb was not answered"
            reply = msgpack.unpackb(dealer.recv_multipart()[-1])
        finally:
            dealer.close()
        assert ctl.ping()["pong"] is True
    assert not reply["success"] and reply["result"]["rule"] == "max_header_values", reply
    # before: read again to name its method in the slow-step log
    assert reads == [1], f"the bomb's header was read {len(reads)} times"


@pytest.mark.parametrize("socket_name", ["ingest", "control"])
def test_a_burst_of_costly_messages_ends_when_its_cpu_budget_is_spent(tmp_path, monkeypatch, socket_name):
    """The manager reads up to 64 messages of a socket before the other socket and publishing
    get their turn: 64 headers of 65,536 values (~0.1 s each to read and refuse) held every other
    peer for 7 s. A burst now ends once it has used ``BURST_CPU_S`` of the manager thread's CPU,
    after at least one message (0 here: exactly one a turn). The socket is replaced by an inproc
    one, which holds every message sent before the burst starts."""
    from cryoptycho.daemon import service as service_module
    from cryoptycho.daemon.service import Service

    monkeypatch.setattr(service_module, "BURST_CPU_S", 0.0, raising=False)
    svc = Service(loopback_config(tmp_path))
    svc.start()
    peer = None
    try:
        kind = zmq.PULL if socket_name == "ingest" else zmq.ROUTER
        inproc = svc._ctx.socket(kind)
        inproc.bind(f"inproc://{socket_name}")
        getattr(svc, socket_name).close()
        setattr(svc, socket_name, inproc)
        peer = svc._ctx.socket(zmq.PUSH if socket_name == "ingest" else zmq.DEALER)
        peer.connect(f"inproc://{socket_name}")
        request = msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "request", "method": "ping",
                                 "params": {}, "arrays": []})
        for _ in range(3):
            if socket_name == "ingest":
                peer.send(b"\xc1")  # not msgpack: refused
            else:
                peer.send_multipart([b"", request])
        read = svc._read_ingest if socket_name == "ingest" else svc._read_control
        replies = 0

        def served() -> int:
            nonlocal replies
            if socket_name == "ingest":
                return int(svc.metrics.messages_rejected.labels(rule="msgpack")._value.get())
            while peer.poll(0):  # inproc: a reply sent is in the peer's queue at once
                peer.recv_multipart()
                replies += 1
            return replies

        counts = []
        for _ in range(3):
            read()
            counts.append(served())
        assert counts == [1, 2, 3], f"messages served after each burst: {counts} (before: 3 in the first)"
    finally:
        if peer is not None:
            peer.close(0)  # else the context's term() in close() waits for it
        svc.request_stop()
        svc.close()
