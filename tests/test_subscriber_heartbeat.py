"""The SDK ``Subscriber`` against a PUB socket set up as the daemon's (send HWM, ZMTP heartbeats,
scaled down 20x so that a test takes seconds): a slow reader stays connected and gets the final
event; a stopped process is still dropped; a backlog over its cap, and a reader that fails, are
told to the caller."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from cryoptycho.daemon import service
from cryoptycho.protocols.messages import Preview, Result, ScanEvent
from cryoptycho.protocols.subscriber import EventsDropped, Subscriber, SubscriberFailed
from cryoptycho.protocols.topics import encode_event
from daemon_support import wait_for
from zmq.utils.monitor import recv_monitor_message

SCALE = 20
HEARTBEAT_IVL_MS = service.PUB_HEARTBEAT_IVL_MS // SCALE  # 100 ms
HEARTBEAT_TIMEOUT_MS = service.PUB_HEARTBEAT_TIMEOUT_MS // SCALE  # 500 ms
#: the caller's own work on each event: three heartbeat timeouts (the daemon's: 30 s, a figure
#: saved, a result written, a breakpoint), longer than its receive queue (32 previews) takes to
#: fill, so a socket read only when the caller asked kept the PING behind queued previews
READ_EVERY_S = 3 * HEARTBEAT_TIMEOUT_MS / 1000
#: 20 previews per heartbeat timeout (the daemon's 5 Hz, with metrics, fill 32 in a few seconds)
PUBLISH_EVERY_S = HEARTBEAT_TIMEOUT_MS / 20_000


class DaemonLikePub:
    """A PUB socket with the daemon's send HWM and (scaled) heartbeats, and its monitor."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, service.PUB_HWM)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.accepted = 0
        self.disconnected = 0

    def poll_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            self.accepted += event == zmq.EVENT_ACCEPTED
            self.disconnected += event == zmq.EVENT_DISCONNECTED

    def send(self, event) -> None:
        self.sock.send_multipart(encode_event(event), zmq.NOBLOCK)  # PUB drops, never blocks

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


def _preview(i: int) -> Preview:
    # 1 MB of phase: a canvas of about 512 x 512
    return Preview("a", i, i, 1e-10, (0.0, 0.0), np.full((512, 512), i, np.float32),
                   np.ones((2, 2), np.complex64))


def test_a_slow_reader_stays_connected_and_gets_the_final_result():
    """A viewer script that spent a while on some events (saving a figure, say) was
    disconnected by the daemon's heartbeats although alive: its socket, read only when it
    asked for the next event, held the daemon's PING behind megabytes of queued previews, so
    the PONG came after the timeout. What was in flight and what the daemon published until it
    reconnected was lost, the scan's result included. The reader thread drains the socket."""
    ctx = zmq.Context()
    pub = DaemonLikePub(ctx)
    sub = Subscriber(pub.endpoint, context=ctx)
    got: list = []
    failure: list[BaseException] = []
    done = threading.Event()

    def slow_reader() -> None:
        try:
            while not done.is_set():
                event = sub.recv(timeout_s=0.2)
                if event is None:
                    continue
                got.append(event)
                if isinstance(event, Result):
                    return
                time.sleep(READ_EVERY_S)  # the caller's own work on each event
        except BaseException as exc:  # noqa: BLE001 — asserted on in the test's thread
            failure.append(exc)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    try:
        while not got:  # until the subscription has reached the PUB socket
            pub.send(ScanEvent("a", "acquiring"))
            time.sleep(0.05)
        previews = lambda: sum(isinstance(e, Preview) for e in got)
        seen = previews()
        i = 0
        # for 3 of the caller's slow reads (9 heartbeat timeouts at least): before, the PUB
        # dropped it after about 3 timeouts (and libzmq once aborted the reader's process)
        while previews() < seen + 3 and not failure:
            pub.send(_preview(i))
            i += 1
            pub.poll_monitor()
            if pub.disconnected:
                break
            time.sleep(PUBLISH_EVERY_S)
        pub.send(ScanEvent("a", "finished"))
        pub.send(Result("a", i, 1e-10, (0.0, 0.0), np.ones((64, 64), np.complex64),
                        np.ones((2, 2), np.complex64), np.zeros((4, 2))))
        reader.join(60)  # the result arrives within a few reads; before, it never came
        done.set()
        reader.join(10)
        pub.poll_monitor()
        assert not failure, failure
        assert isinstance(got[-1], Result), (
            f"no result after {i} previews; PUB monitor: {pub.accepted} connection(s), "
            f"{pub.disconnected} disconnection(s)")
        assert isinstance(got[-2], ScanEvent) and got[-2].event == "finished"
        assert (pub.accepted, pub.disconnected) == (1, 0), "a live, reading subscriber was dropped"
        assert sub.connections == 1  # told by the subscriber too
        assert sub.dropped == 0
        assert sub.skipped > 0  # it was slow: stale previews were skipped, not queued
    finally:
        done.set()
        sub.close()
        pub.close()
        ctx.term()


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="suspends a process with SIGSTOP")
def test_a_stopped_subscriber_process_is_still_disconnected():
    """Ctrl-Z on a `watch` must still let the daemon drop it and free what it queued (the
    reader thread stops with the process)."""
    ctx = zmq.Context()
    pub = DaemonLikePub(ctx)
    code = ("import sys\n"
            "from cryoptycho.protocols.subscriber import Subscriber\n"
            "sub = Subscriber(sys.argv[1])\n"
            "print('up', flush=True)\n"
            "while True: sub.recv()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, pub.endpoint], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"

        def connected() -> bool:
            pub.poll_monitor()
            pub.send(ScanEvent("a", "acquiring"))
            return pub.accepted == 1

        wait_for(connected, 60, "the subscriber to connect")
        proc.send_signal(signal.SIGSTOP)

        def dropped() -> bool:
            pub.send(_preview(0))  # what a stopped subscriber would hold in the daemon
            pub.poll_monitor()
            return pub.disconnected == 1

        wait_for(dropped, 60, "the PUB to drop the stopped subscriber")
        proc.send_signal(signal.SIGCONT)
        def reconnected() -> bool:
            pub.poll_monitor()
            return pub.accepted == 2

        wait_for(reconnected, 60, "the subscriber to reconnect once resumed")
    finally:
        proc.kill()
        proc.wait(30)
        pub.close()
        ctx.term()


def test_a_backlog_over_its_cap_is_told_once_and_the_newest_events_kept():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://capped")  # inproc delivers before send returns: the backlog is exact
    sub = Subscriber("inproc://capped", context=ctx, rcvhwm=1000, max_backlog=5)
    try:
        while sub.recv(timeout_s=0.05) is None:
            pub.send_multipart(encode_event(ScanEvent("warm", "accepted")))
        while sub.recv(timeout_s=0.05) is not None:
            pass
        for i in range(8):
            pub.send_multipart(encode_event(ScanEvent(f"s{i}", "finished")))
            pub.send_multipart(encode_event(_preview(i)))  # conflated: not part of the cap
        with pytest.raises(EventsDropped) as info:
            sub.recv(timeout_s=5)
        assert info.value.count == 3 and sub.dropped == 3
        got = [sub.recv(timeout_s=5) for _ in range(6)]
        assert [e.scan_id for e in got[:5]] == ["s3", "s4", "s5", "s6", "s7"]
        assert isinstance(got[5], Preview) and got[5].iteration == 7
        assert sub.recv(timeout_s=0.05) is None
    finally:
        sub.close()
        pub.close(0)
        ctx.term()


def test_a_backlog_over_its_byte_cap_keeps_the_newest_previews_when_all_are_wanted():
    """With ``latest_only=False`` every preview is kept: a caller that stopped reading must
    not take the host's memory (before, its receive HWM bounded what waited, and the daemon
    dropped the rest)."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://bytes")
    size = len(b"".join(bytes(p) for p in encode_event(_preview(0))))
    sub = Subscriber("inproc://bytes", context=ctx, rcvhwm=1000, latest_only=False,
                     max_backlog_bytes=int(2.5 * size))
    try:
        while sub.recv(timeout_s=0.05) is None:
            pub.send_multipart(encode_event(ScanEvent("warm", "accepted")))
        while sub.recv(timeout_s=0.05) is not None:
            pass
        for i in range(6):
            pub.send_multipart(encode_event(_preview(i)))
        with pytest.raises(EventsDropped) as info:
            sub.recv(timeout_s=5)
        assert info.value.count == 4
        assert [sub.recv(timeout_s=5).iteration for _ in range(2)] == [4, 5]
        assert sub.recv(timeout_s=0.05) is None
    finally:
        sub.close()
        pub.close(0)
        ctx.term()


def test_a_failed_reader_thread_is_raised_to_the_caller():
    ctx = zmq.Context()
    sub = Subscriber("inproc://nobody", context=ctx)
    ctx.term()  # returns once the reader, woken by the termination, has closed its socket
    with pytest.raises(SubscriberFailed) as info:
        sub.recv(timeout_s=1)
    assert isinstance(info.value.__cause__, zmq.ContextTerminated)
    sub.close()


def test_a_closed_subscriber_refuses_to_receive():
    ctx = zmq.Context()
    sub = Subscriber("inproc://nobody", context=ctx)
    sub.close()
    sub.close()  # closing twice is harmless
    with pytest.raises(zmq.ZMQError):
        sub.recv(timeout_s=0)
    ctx.term()  # the reader closed its socket: term does not hang
