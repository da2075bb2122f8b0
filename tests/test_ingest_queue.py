"""The ingest socket's receive queue is bounded in bytes: what the daemon has not read yet
(outside its own backpressure) is at most ``ingest_queue_bytes`` of messages the size of the
limits' largest, however large the messages are."""

from __future__ import annotations

import math
from pathlib import Path

import zmq
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import Service, ingest_hwm
from cryoptycho.protocols.limits import Limits

MiB = 2**20


def _tcp_buffer_max() -> int:
    """The most bytes the kernel's loopback buffers of one connection can hold (send + receive)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        path = Path("/proc/sys/net/ipv4") / name
        total += int(path.read_text().split()[2]) if path.exists() else 32 * MiB
    return total


def test_hwm_is_the_byte_budget_over_the_largest_message() -> None:
    assert ingest_hwm(256 * MiB, Limits()) == 4  # 512 MiB messages allowed: the floor
    assert ingest_hwm(256 * MiB, Limits(max_message_bytes=8 * MiB)) == 32
    assert ingest_hwm(MiB, Limits(max_message_bytes=8 * MiB)) == 4


def test_an_unread_ingest_socket_takes_no_more_than_its_byte_budget(tmp_path: Path) -> None:
    """The service is bound but its loop does not run, so nothing reads the ingest socket: a
    sender gets out only what the daemon's queue, its own (one message) and the TCP buffers hold.
    With the former fixed 256-message queue, every message of this test would leave."""
    size = 16 * MiB
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r",
                        ingest_queue_bytes=6 * size, limits=Limits(max_message_bytes=size))
    svc = Service(cfg)
    svc.start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        assert svc.ingest.getsockopt(zmq.RCVHWM) == 6
        push.setsockopt(zmq.SNDHWM, 1)
        push.connect(svc.endpoints["ingest"])
        # the daemon's queue, the sender's queue and the message its I/O thread writes, the
        # message the daemon's I/O thread reads, and what the TCP buffers hold
        bound = 6 + 2 + 1 + math.ceil(_tcp_buffer_max() / size)
        message = bytes(size)
        sent = 0
        # the socket is writable while the queues have room; blocked for 3 s means full once
        # the daemon's queue must be (before that, a busy host's I/O threads get 30 s)
        while sent < bound + 3 and push.poll(3000 if sent >= 6 else 30_000, zmq.POLLOUT):
            push.send(message, zmq.NOBLOCK, copy=False)
            sent += 1
        assert 6 <= sent <= bound, f"{sent} messages of {size} B left the sender (bound {bound})"
    finally:
        push.close(linger=0)
        ctx.term()
        svc.close()
