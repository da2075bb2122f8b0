"""The scan broker over real sockets, with fake daemons (plain PULL sockets, fake control ROUTERs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from click.testing import CliRunner
from cryoptycho.daemon.broker import Backend, Broker, BrokerOptions, parse_backend
from cryoptycho.daemon.commands.broker import command as broker_command
from cryoptycho.protocols.control import ControlClient, handle
from cryoptycho.protocols.messages import (
    Abort,
    Frames,
    ProbeModelSpec,
    ScanEnd,
    ScanStart,
    decode,
    encode,
    peek,
)

M = 8
WAIT_S = 60.0  # upper bound for waiting on sockets (a subprocess start on a busy host); never a speed assertion


def scan_start(scan_id: str, n: int = 6) -> ScanStart:
    positions = np.stack([np.arange(n) * 1e-10, np.zeros(n)], axis=1)
    return ScanStart(scan_id=scan_id, energy_eV=300e3, frame_shape=(M, M), frame_dtype="uint16",
                     expected_frames=n, pixel_size_m=1e-10, positions_m=positions,
                     probe_model=ProbeModelSpec())


def frames(scan_id: str, first: int, count: int) -> Frames:
    data = np.full((count, M, M), first, dtype=np.uint16)
    return Frames(scan_id, np.arange(first, first + count, dtype=np.uint32), data)


class FakeDaemon:
    """A daemon's ingest as the broker sees it: a PULL socket that records what arrives."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.socket.linger = 0
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[tuple[str, str | None]] = []
        self.messages: list[Any] = []

    def collect(self, until: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; received {self.received}")
            if self.socket.poll(50):
                parts = self.socket.recv_multipart(copy=False)
                self.received.append(peek(parts))
                self.messages.append(decode(parts))

    def scans(self) -> set[str | None]:
        return {sid for _, sid in self.received}


class FakeControl:
    """A daemon's control ROUTER answering ``status`` with a settable reply, in a thread."""

    def __init__(self, ctx: zmq.Context, status: dict[str, Any]) -> None:
        self.status = status
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        table = {"status": lambda: dict(self.status)}
        while not self._stop.is_set():
            if self.socket.poll(20):
                reply = handle(self.socket.recv_multipart(copy=False), table)
                self.requests += 1
                self.socket.send_multipart(reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.socket.close(0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def start_broker(ctx: zmq.Context, backends: list[Backend], **kw: Any) -> tuple[Broker, zmq.Socket]:
    opts = BrokerOptions(ingest="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", **kw)
    broker = Broker(opts, backends, context=ctx).start()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(broker.ingest_endpoint)
    return broker, push


def send(push: zmq.Socket, msg: Any) -> None:
    push.send_multipart(encode(msg))


def wait_for(condition: Callable[[], bool], broker: Broker, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        broker.maybe_raise()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; broker status {broker.status()}")
        time.sleep(0.01)


def test_each_scan_stays_on_one_backend_and_two_scans_use_two(ctx: zmq.Context) -> None:
    d1, d2 = FakeDaemon(ctx), FakeDaemon(ctx)
    broker, push = start_broker(ctx, [Backend(d1.endpoint, slots=1), Backend(d2.endpoint, slots=1)])
    try:
        send(push, scan_start("a"))
        send(push, scan_start("b"))
        for first in (0, 2, 4):  # interleaved, as two microscopes would send
            send(push, frames("a", first, 2))
            send(push, frames("b", first, 2))
        send(push, ScanEnd("a", 6))
        send(push, ScanEnd("b", 6))
        for d in (d1, d2):
            d.collect(lambda d=d: len(d.received) == 5)
        by_scan = {d.received[0][1]: d for d in (d1, d2)}
        assert set(by_scan) == {"a", "b"}
        for sid, d in by_scan.items():
            assert d.scans() == {sid}
            assert [k for k, _ in d.received] == ["scan_start", "frames", "frames", "frames", "scan_end"]
            got = np.concatenate([m.indices for m in d.messages if isinstance(m, Frames)])
            assert got.tolist() == list(range(6))  # all frames, in order, payload intact
            assert [int(m.data[0, 0, 0]) for m in d.messages if isinstance(m, Frames)] == [0, 2, 4]
        assert broker.status()["counters"]["scans_placed"] == 2
    finally:
        broker.stop()


def test_scan_waits_for_a_free_backend_then_follows_in_order(ctx: zmq.Context) -> None:
    d = FakeDaemon(ctx)
    broker, push = start_broker(ctx, [Backend(d.endpoint, slots=1)])
    try:
        send(push, scan_start("first"))
        send(push, frames("first", 0, 3))
        send(push, scan_start("second"))
        send(push, frames("second", 0, 3))
        send(push, scan_start("given-up"))
        send(push, frames("given-up", 0, 3))
        send(push, Abort("given-up", "operator stopped"))  # never placed: no daemon hears of it
        d.collect(lambda: len(d.received) == 2)
        # "second" is also the only waiting scan before "given-up" is read: wait for the abort
        wait_for(lambda: broker.status()["counters"]["aborted_while_held"] == 1, broker,
                 "the held scan's abort")
        assert broker.status()["waiting"] == ["second"]
        assert broker.status()["held_bytes"] > 0
        assert not d.socket.poll(200), "a held scan must not reach the busy daemon"
        send(push, ScanEnd("first", 3))
        d.collect(lambda: len(d.received) == 5)
        assert d.received[2:] == [("scan_end", "first"), ("scan_start", "second"), ("frames", "second")]
        wait_for(lambda: broker.status()["held_bytes"] == 0, broker, "the held bytes to be released")
        assert not d.socket.poll(200), "the aborted held scan must not reach the daemon"
    finally:
        broker.stop()


def test_a_full_hold_budget_hands_the_held_scan_over_instead_of_deadlocking(ctx: zmq.Context) -> None:
    d = FakeDaemon(ctx)
    one_message = sum(len(memoryview(p)) for p in encode(frames("b", 0, 3)))
    broker, push = start_broker(ctx, [Backend(d.endpoint, slots=1)], hold_bytes=2 * one_message)
    try:
        send(push, scan_start("a"))
        send(push, scan_start("b"))  # no free slot: held
        for first in (0, 3, 6):
            send(push, frames("b", first, 3))  # exceeds the budget: ingest pauses
        send(push, ScanEnd("a", 0))  # only arrives if the broker did not deadlock
        d.collect(lambda: ("scan_end", "a") in d.received)
        d.collect(lambda: len(d.received) == 6)
        assert [r for r in d.received if r[1] == "b"] == [("scan_start", "b")] + [("frames", "b")] * 3
        assert broker.status()["counters"]["scans_overcommitted"] == 1
    finally:
        broker.stop()


def test_daemon_status_decides_who_is_free_and_silent_daemons_get_nothing(ctx: zmq.Context) -> None:
    busy, idle, silent = FakeDaemon(ctx), FakeDaemon(ctx), FakeDaemon(ctx)
    busy_ctl = FakeControl(ctx, {"running": ["elsewhere"], "waiting": [], "max_concurrent_scans": 1})
    idle_ctl = FakeControl(ctx, {"running": [], "waiting": [], "max_concurrent_scans": 1})
    mute = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    mute.bind("tcp://127.0.0.1:*")
    backends = [
        Backend(busy.endpoint, control=busy_ctl.endpoint),
        Backend(silent.endpoint, control=mute.getsockopt_string(zmq.LAST_ENDPOINT)),
        Backend(idle.endpoint, control=idle_ctl.endpoint),
    ]
    broker, push = start_broker(ctx, backends, poll_interval_s=0.05, dead_after_s=2.0)
    try:
        wait_for(lambda: busy_ctl.requests > 0 and idle_ctl.requests > 0, broker, "status polls")
        wait_for(lambda: all(b["last_status_age_s"] is not None
                             for b in broker.status()["backends"] if b["ingest"] != silent.endpoint),
                 broker, "status replies")
        send(push, scan_start("s"))
        send(push, frames("s", 0, 2))
        idle.collect(lambda: len(idle.received) == 2)
        assert idle.scans() == {"s"}
        summary = {b["ingest"]: b for b in broker.status()["backends"]}
        assert summary[busy.endpoint]["reported_active"] == 1
        assert summary[silent.endpoint]["available"] is False
        # the only idle daemon is now full (1 slot, reported by its status): the next scan waits
        idle_ctl.status = {"running": ["s"], "waiting": [], "max_concurrent_scans": 1}
        send(push, scan_start("t"))
        wait_for(lambda: broker.status()["waiting"] == ["t"], broker, "scan t to be held")
        busy_ctl.status = {"running": [], "waiting": [], "max_concurrent_scans": 1}
        busy.collect(lambda: len(busy.received) == 1)
        assert busy.received == [("scan_start", "t")]
        assert not silent.socket.poll(100)
    finally:
        broker.stop()
        busy_ctl.close()
        idle_ctl.close()
        mute.close(0)


def test_bad_messages_are_dropped_and_counted_and_routing_goes_on(ctx: zmq.Context) -> None:
    d = FakeDaemon(ctx)
    broker, push = start_broker(ctx, [Backend(d.endpoint, slots=1)])
    try:
        push.send_multipart([b"\xc1not msgpack"])
        send(push, frames("never-started", 0, 1))
        send(push, scan_start("ok"))
        d.collect(lambda: len(d.received) == 1)
        dropped = broker.status()["dropped"]
        assert dropped == {"msgpack": 1, "unknown_scan": 1}
        assert d.received == [("scan_start", "ok")]
    finally:
        broker.stop()


def test_daemons_register_on_the_control_socket(ctx: zmq.Context) -> None:
    d = FakeDaemon(ctx)
    broker, push = start_broker(ctx, [])
    try:
        with ControlClient(broker.control_endpoint, timeout_s=30, context=ctx) as client:
            assert client.call("ping")["pong"] is True
            with pytest.raises(Exception, match="params.ingest"):
                client.call("register", ingest="not-an-endpoint")
            client.call("register", ingest=d.endpoint, slots=1)
            send(push, scan_start("r"))
            d.collect(lambda: len(d.received) == 1)
            status = client.status()
            assert status["routes"] == {"r": d.endpoint}
            assert [b["ingest"] for b in status["backends"]] == [d.endpoint]
            with pytest.raises(Exception, match="active scans"):
                client.call("unregister", ingest=d.endpoint)  # a scan still lives there
    finally:
        broker.stop()


def test_backend_descriptions_are_validated() -> None:
    b = parse_backend("tcp://h:5600,control=tcp://h:5602,slots=2")
    assert (b.ingest, b.control, b.slots) == ("tcp://h:5600", "tcp://h:5602", 2)
    for bad, rule in [("h:5600", "params.ingest"), ("tcp://h:1,slots=0", "params.slots"),
                      ("tcp://h:1,slots=x", "slots must be an integer"), ("tcp://h:1,port=3", "expected")]:
        with pytest.raises(ValueError, match=rule):
            parse_backend(bad)
    result = CliRunner().invoke(broker_command, ["--backend", "h:5600"])
    assert result.exit_code == 2 and "params.ingest" in result.output


@pytest.mark.subprocess
def test_broker_command_notifies_systemd_routes_and_stops_on_sigterm(ctx: zmq.Context, tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(WAIT_S)
    d = FakeDaemon(ctx)
    ingest = f"ipc://{tmp_path}/broker-ingest"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "CRYOPTYCHO_BROKER_BACKENDS": d.endpoint}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryoptycho.daemon.cli", "broker", "--ingest", ingest,
         "--control", f"ipc://{tmp_path}/broker-control"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert notify.recv(4096).decode().startswith("READY=1")
        push = ctx.socket(zmq.PUSH)
        push.linger = 0
        push.connect(ingest)
        send(push, scan_start("cli"))
        d.collect(lambda: len(d.received) == 1)
        assert d.received == [("scan_start", "cli")]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
        notify.close()
    assert "scan placed" in output
