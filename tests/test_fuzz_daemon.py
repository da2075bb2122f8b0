"""No single message stops the daemon (issue 12): each class that did, against the real daemon
subprocess, then a seeded, bounded Hypothesis fuzz over ingest and control with its invariants
checked after every input (daemon/bench/fuzz.py; `cryoptycho bench fuzz` runs it longer)."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from cryoptycho.daemon.bench.fuzz import (
    OPEN_SCAN,
    FuzzDaemon,
    Harness,
    _raw,
    fuzz,
    scan_start_parts,
)
from cryoptycho.protocols.messages import (
    ErrorEvent,
    Frames,
    Metrics,
    RasterScan,
    Reply,
    Request,
    ScanEnd,
    ScanEvent,
    encode,
)
from daemon_support import wait_for

pytestmark = pytest.mark.subprocess


def _deep_list(depth: int) -> list:
    tree: list = [1]
    for _ in range(depth):
        tree = [tree]
    return tree


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    daemon = FuzzDaemon(tmp_path_factory.mktemp("fuzzd"))
    h = Harness(daemon, open_scan=False)
    yield h
    daemon.close()


def _verdict(h: Harness, sid: str) -> ScanEvent:
    return h._await_event(lambda e: isinstance(e, ScanEvent) and e.scan_id == sid
                          and e.event in ("accepted", "rejected"), f"a verdict on {sid}")


def _error_for(h: Harness, before: int, timeout: float = 120) -> None:
    """The daemon published an error event for the message, and is alive, answers ping, and
    published a named error for every rejection. The event is waited for: the ping goes through
    the control socket, which the daemon may serve before it reads the message (a busy host)."""
    wait_for(lambda: h._drain(0.05) or h.errors_seen > before, timeout, "an error event for the message")
    h.check("the last message")


@pytest.mark.parametrize("msg", [
    Request("ping"), Reply(True, "ok", {"a": np.ones(3)}), ScanEvent("s1", "accepted"),
    ErrorEvent("data", "finite", "x", "s1"), Metrics("s1", 1, 1),
], ids=["request", "reply", "scan_event", "error", "metrics"])
def test_a_message_for_another_socket_is_refused_by_name(harness, msg):
    """These used to end the daemon (AttributeError on the missing scan_id)."""
    before = harness.errors_seen
    harness.d.push.send_multipart(_raw(encode(msg)))
    _error_for(harness, before)
    assert harness.last_event.rule == "ingest_expected" and harness.last_event.field == "type"


@pytest.mark.parametrize("metadata, field, rule", [
    ({"when": msgpack.Timestamp(1_700_000_000, 5)}, "metadata.when", "no_ext_types"),
    ({"blob": b"\x00\xff"}, "metadata.blob", "no_binary"),
    ({"deep": _deep_list(40)}, None, "max_depth"),
])
def test_metadata_the_spool_cannot_store_is_refused_at_validation(harness, metadata, field, rule):
    """A Timestamp or bytes in metadata passed validation and killed the daemon in the spool's
    JSON encoder; now validation names them (and a valid scan still starts)."""
    sid = harness.fresh_id("md")
    header = msgpack.unpackb(scan_start_parts(sid)[0], raw=False)
    header["metadata"] = metadata
    before = harness.errors_seen
    harness.d.push.send_multipart([msgpack.packb(header, use_bin_type=True)])
    _error_for(harness, before)
    ev = harness.last_event
    assert ev.rule == rule and ev.scan_id == sid, ev
    if field is not None:
        assert ev.field == field


def test_scan_id_whose_file_name_is_too_long_still_scans(harness, tmp_path):
    """127 ':' escape to a 381-byte file name: the daemon died in h5py; now the stem is
    shortened with a hash and the scan runs to its result, files and all."""
    sid = "a" + ":" * 127
    harness.own.add(sid)
    pos = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2) * 2e-10
    harness.d.push.send_multipart(scan_start_parts(sid, raster=None, positions_m=pos, expected_frames=16,
                                                   options={"iterations": 3}))
    assert _verdict(harness, sid).event == "accepted"
    data = np.random.default_rng(0).poisson(50, (16, 16, 16)).astype(np.uint16)
    harness.d.push.send_multipart(_raw(encode(Frames(sid, np.arange(16, dtype=np.uint32), data))))
    harness.d.push.send_multipart(_raw(encode(ScanEnd(sid, 16))))
    results = []
    harness._await_event(lambda e: (results.append(e) if getattr(e, "type", "") == "result" else None) or (
        isinstance(e, ScanEvent) and e.scan_id == sid and e.event in ("finished", "failed")), "the result", 120)
    assert results and results[0].scan_id == sid
    files = results[0].files
    assert set(files) == {"result", "phase_mrc", "phase_png"}, files  # result.files names every file
    for path in files.values():
        assert Path(path).exists() and len(Path(path).name) < 255 and Path(path).parent.name == "results"
    harness.check("the long-id scan")


def test_set_options_naming_a_missing_backend_is_refused_before_ok(harness):
    """It answered ok, then the daemon died at its next housekeeping (CuPy absent)."""
    from cryoptycho.gpu.backend import cupy_available
    from cryoptycho.protocols.errors import ControlError

    if cupy_available():
        pytest.skip("CuPy works here: the backend is available")
    with pytest.raises(ControlError) as info:
        harness.d.control.set_options(None, {"backend": "cupy"})
    assert info.value.reply.result == {"field": "params.options.backend", "rule": "backend_available"}
    # a scan asking for it is refused by name, not fatal either
    sid = harness.fresh_id("cupy")
    harness.d.push.send_multipart(scan_start_parts(sid, options={"backend": "cupy"}))
    ev = _verdict(harness, sid)
    assert ev.event == "rejected" and ev.info == {"field": "options.backend", "rule": "backend_available"}
    harness.check("scan_start with backend cupy")
    assert harness.d.control.status()["scans"] == {} or True


def test_handler_errors_carry_field_and_rule(harness):
    from cryoptycho.protocols.errors import ControlError

    cases = [
        (lambda c: c.snapshot("nope"), "params.scan_id", "known_scan"),
        (lambda c: c.cancel("nope"), "params.scan_id", "known_scan"),
        (lambda c: c.set_options(None, {"stream": {"batch_size": 0}}), "params.options.stream.batch_size",
         "greater_than_equal"),
        (lambda c: c.set_options(None, {"no_such_option": 1}), "params.options.no_such_option", "extra_forbidden"),
        (lambda c: c.list_scans(state="exploded"), "params.state", "literal_error"),
        (lambda c: c.call("reboot"), "method", "known_method"),
        (lambda c: c.call("ping", extra=1), "params", "signature"),
    ]
    for call, field, rule in cases:
        with pytest.raises(ControlError) as info:
            call(harness.d.control)
        assert info.value.reply.result == {"field": field, "rule": rule}, info.value.msg


def test_refusing_a_scan_that_cannot_fit_builds_nothing_large():
    """Refusing 16 Mi frames blocked the manager loop for seconds (validation and the spec
    built all 16 Mi raster positions); the refusal now needs four corners. Measured as memory
    allocated on the manager's path (deterministic), not as time."""
    import tempfile

    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.metrics import ServiceMetrics
    from cryoptycho.daemon.publisher import Outbox
    from cryoptycho.daemon.scan import outline_from_scan_start
    from cryoptycho.daemon.scans import ScanManager, ScanRefused
    from cryoptycho.protocols.messages import decode

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServiceConfig(spool_dir=Path(tmp) / "s", results_dir=Path(tmp) / "r")
        manager = ScanManager(cfg, ServiceMetrics(), Outbox())
        parts = scan_start_parts("big", frame_shape=(256, 256), expected_frames=4096 * 4096,
                                 raster=RasterScan((4096, 4096), (1e-10, 1e-10)))
        tracemalloc.start()
        try:
            msg = decode(parts, None, {})
            with pytest.raises(ScanRefused) as info:
                manager.admission(outline_from_scan_start(msg))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert info.value.rule == "memory_budget"
    assert peak < 4 * 2**20, f"the refusal allocated {peak / 2**20:.0f} MiB (16 Mi positions are 256 MiB)"


@pytest.mark.parametrize("where", ["ingest", "spool"])
def test_an_unexpected_exception_fails_only_its_scan(tmp_path, monkeypatch, where):
    """The general rule: a handler's unexpected exception (here in the ingest handler, or in the
    spool thread's write) is logged, counted, published as a named error, and fails only the
    scan concerned; the loop goes on."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from cryoptycho.protocols.subscriber import Subscriber

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r")
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("disk on fire")

        if where == "ingest":
            monkeypatch.setattr(svc.scans, "add_frames", broken)
        else:
            monkeypatch.setattr(SpoolWriter, "append", broken)
            monkeypatch.setattr(SpoolWriter, "append_many", broken)  # our protocol's frames
        sub = Subscriber(svc.endpoints["publish"], latest_only=False)
        ctl = ControlClient(svc.endpoints["control"], timeout_s=10)
        with Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p:
            # the subscription joins asynchronously: wait until a refused message's error arrives
            def joined() -> bool:
                p._socket.send_multipart([msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "x"})])
                ev = sub.recv(timeout_s=0.3)
                return isinstance(ev, ErrorEvent)

            wait_for(joined, 120, "the subscription")
            p.start_scan(scan_id="hot", energy_eV=300e3, frame_shape=(16, 16), frame_dtype="uint16",
                         expected_frames=4, pixel_size_m=1e-10, probe=np.ones((16, 16), np.complex64),
                         positions_m=np.zeros((4, 2)))
            p.send_frames(np.ones((4, 16, 16), np.uint16))
            events = []
            wait_for(lambda: events.append(sub.recv(timeout_s=0.2)) or any(
                isinstance(e, ScanEvent) and e.event == "failed" for e in events), 120, "the scan to fail")
        errors = [e for e in events if isinstance(e, ErrorEvent) and e.rule == "internal_error"]
        assert errors and errors[0].scan_id == "hot" and "disk on fire" in errors[0].message
        assert errors[0].field == ("message" if where == "ingest" else "spool")
        assert ctl.ping()["pong"] is True
        assert svc.metrics.internal_errors.labels(where=where)._value.get() == 1
        assert {s["scan_id"]: s["state"] for s in ctl.list_scans()} == {"hot": "failed"}
        # a post the wire cannot carry is published as a named error, not a dead loop
        svc.outbox.post("scan.accepted", {"scan_id": "not a valid id"})
        wait_for(lambda: isinstance(e := sub.recv(timeout_s=0.2), ErrorEvent) and e.field == "publish", 120,
                 "the publish error")
        assert ctl.ping()["pong"] is True
        ctl.close()
        sub.close()
    finally:
        bg.stop()


def test_an_error_flood_is_accounted_for_on_the_publish_socket(harness):
    """20,000 bad messages gave a subscriber 18,587 error events: PUB dropped the rest. Now the
    first errors of each second go out one by one and the others in a counted summary, so the
    events account for every rejection (and they fit the subscriber's queue)."""
    def counted() -> float:
        return sum(v for k, v in harness.d.metrics().items() if k.startswith("cryoptycho_messages_rejected_total"))

    before_rejected, before_counted = harness.fig.rejected, counted()
    bad = [msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "flood"})]
    for _ in range(3000):
        harness.d.push.send_multipart(bad)
    # read them all first: a check while the daemon is still reading them (its ping is served
    # between ingest bursts) can find the events level with the rejections so far
    wait_for(lambda: counted() - before_counted >= 3000, 120, "the daemon to reject all 3000")
    harness.check("3000 bad messages")  # waits until the error events account for every rejection
    assert harness.fig.rejected - before_rejected == 3000
    assert harness.d.metrics()["cryoptycho_error_events_suppressed_total"] > 0


def test_fuzz_seeded_and_bounded(tmp_path):
    """Hypothesis inputs (seeded) against a fresh daemon; every invariant after every input and
    a valid scan that completes with every frame at the end. `cryoptycho bench fuzz` runs more."""
    t0 = time.monotonic()
    figures = fuzz(tmp_path, examples=60, seed=12, check_every=0)
    summary = figures.summary()
    print(f"fuzz: {summary} in {time.monotonic() - t0:.0f} s")
    assert summary["crashes"] == 0 and summary["valid_scans_completed"] == 1
    assert summary["inputs"] >= 60 and summary["rejected"] > 0


def test_open_scan_constant_is_a_valid_scan_id():
    import re

    from cryoptycho.protocols.schema import SCAN_ID_PATTERN

    assert re.fullmatch(SCAN_ID_PATTERN, OPEN_SCAN)


@pytest.mark.parametrize("scan_id", ["x" * 300, ":" * 137, "bad id\n"])
def test_error_events_stay_readable_whatever_scan_id_was_sent(harness, scan_id):
    """Found by the fuzz: an error event quoting a 137-character scan id broke every SDK
    subscriber (max_length). The id now moves into the message, clipped."""
    before = harness.errors_seen
    header = msgpack.unpackb(_raw(encode(ScanEnd("s1", 3)))[0], raw=False)
    header["scan_id"] = scan_id
    harness.d.push.send_multipart([msgpack.packb(header)])
    _error_for(harness, before)  # the harness's subscriber decoded it
    ev = harness.last_event
    assert ev.scan_id is None and "scan_id" in ev.message


def test_result_files_name_every_file_kept(tmp_path):
    """With keep_spool the spool file stays, and the published result lists it too."""
    daemon = FuzzDaemon(tmp_path, "--set", "keep_spool=true")
    try:
        h = Harness(daemon, open_scan=False)
        results: list = []
        original = h._on_event

        def spy(ev):
            if getattr(ev, "type", "") == "result":
                results.append(ev)
            original(ev)

        h._on_event = spy
        h.valid_scan_completes()
        files = results[0].files
        assert set(files) == {"result", "phase_mrc", "phase_png", "spool"}, files
        assert all(Path(p).is_absolute() and Path(p).exists() for p in files.values())
        assert Path(files["spool"]).parent.name == "spool"
    finally:
        daemon.close()


def test_a_probe_model_the_pixels_cannot_sample_is_refused_by_name(harness):
    """Found by the DECTRIS fuzz: a probe semi-angle beyond what the pixel size samples raised
    ValueError deep in the probe builder (an internal error); now a named refusal."""
    from cryoptycho.protocols.messages import ProbeModelSpec

    sid = harness.fresh_id("probe")
    harness.d.push.send_multipart(scan_start_parts(sid, pixel_size_m=5e-10,
                                                   probe_model=ProbeModelSpec(semiangle_rad=30e-3)))
    ev = _verdict(harness, sid)
    assert ev.event == "rejected" and ev.info == {"field": "probe_model", "rule": "probe_model"}
    assert "semi-angle" in ev.reason
    harness.check("an unsamplable probe model")  # its error event arrived, nothing internal


def test_dectris_receiver_fuzz_seeded_and_bounded(tmp_path):
    """Hostile Stream V2 series into `serve --source dectris2://` (edge header values with the
    user's pixel angle removed, arbitrary keys, mangled bytes, missing ends); the daemon lives
    and answers after each, and a valid series then finishes with every frame."""
    from cryoptycho.daemon.bench.fuzz import dectris_fuzz

    figures = dectris_fuzz(tmp_path, examples=30, seed=5)
    assert figures.crashes == 0 and figures.checks == 1 and figures.inputs == 30


class Gate:
    """Holds a daemon thread inside one method until the test opens it, so that an order of
    events a busy host produces only by chance is certain. `gated_service` opens its gates on
    the way out: a failing test leaves no thread held, and the service can stop."""

    def __init__(self, *, closed: bool) -> None:
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self.entered = threading.Event()  #: a thread has come to the gate while it was closed

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def hold(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str, *,
             when: Callable[..., bool] | None = None, after: bool = False) -> None:
        """Patch ``cls.name`` so that a call made while the gate is closed (and for which
        ``when(*args, **kwargs)`` holds, if given) waits at it: before the method runs, or
        once it has run with ``after``."""
        method = getattr(cls, name)

        def wait_here(args: tuple, kwargs: dict) -> None:
            if not self._open.is_set() and (when is None or when(*args, **kwargs)):
                self.entered.set()
                assert self._open.wait(120), "the test never opened the gate"

        def held(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if not after:
                wait_here(args, kwargs)
            result = method(obj, *args, **kwargs)
            if after:
                wait_here(args, kwargs)
            return result

        monkeypatch.setattr(cls, name, held)


class Served:
    """The in-process daemon of `gated_service` and its control client."""

    def __init__(self, svc: Any, ctl: Any) -> None:
        self.svc, self.ctl = svc, ctl
        self._dealers: list[zmq.Socket] = []
        self._ctx: zmq.Context | None = None

    @staticmethod
    def start_fields(frames: int) -> dict[str, Any]:
        """Producer.start_scan's fields (but the scan_id) of a scan of ``frames`` 16×16 frames."""
        return {"energy_eV": 300e3, "frame_shape": (16, 16), "frame_dtype": "uint16", "expected_frames": frames,
                "pixel_size_m": 1e-10, "probe": np.ones((16, 16), np.complex64),
                "positions_m": np.zeros((frames, 2))}

    def producer(self, **kwargs: Any) -> Any:
        from cryoptycho.protocols.producer import Producer

        return Producer(self.svc.endpoints["ingest"], control=self.svc.endpoints["control"], **kwargs)

    def dealer(self) -> zmq.Socket:
        """A raw control client: a request sent with `_ask` is answered whenever the daemon
        answers it, and the test sees whether it has been (ControlClient would wait)."""
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.svc.endpoints["control"])
        self._dealers.append(sock)
        return sock

    def pending(self) -> int:
        """Control requests the manager has read and holds back for the spool thread."""
        return sum(len(q) for q in list(self.svc._replies.values()))


@contextmanager
def gated_service(tmp_path: Path, *gates: Gate, **config: Any) -> Iterator[Served]:
    """A BackgroundService on loopback (no metrics port, ``config`` on top) with a control
    client; on the way out ``gates`` are opened first, so that the service can stop."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.control import ControlClient

    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r", **config)
    bg = BackgroundService(cfg)
    served = None
    try:
        served = Served(bg.service, ControlClient(bg.service.endpoints["control"], timeout_s=30, retries=1))
        yield served
    finally:
        for gate in gates:
            gate.open()
        if served is not None:
            for sock in served._dealers:
                sock.close()
            if served._ctx is not None:
                served._ctx.term()
            served.ctl.close()
        bg.stop()


def count_manager_turns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[n]``: how many times the manager has run what the spool thread handed back (a test
    waits two turns to know that what came before has been run)."""
    from cryoptycho.daemon.scans import ScanManager

    run_disk_done = ScanManager.run_disk_done
    turns = [0]

    def counted(self: ScanManager) -> None:
        run_disk_done(self)
        turns[0] += 1

    monkeypatch.setattr(ScanManager, "run_disk_done", counted)
    return turns


def _ask(sock: zmq.Socket, method: str, **params: Any) -> None:
    sock.send_multipart([b"", *_raw(encode(Request(method, params)))])


def _answer(sock: zmq.Socket) -> Any:
    from cryoptycho.protocols.messages import decode

    assert sock.poll(60_000), "no reply"
    reply = decode(sock.recv_multipart()[1:])
    assert reply.success, reply.msg
    return reply.result


def test_requests_that_wait_for_the_spool_do_not_hold_up_ping(tmp_path, monkeypatch):
    """`receipt` and `finish_scan` answer once the spool thread has written what came before
    them; they used to wait for it ON the manager thread, so a slow disk held up every other
    client's ping (issue 12: 50-160 ms under fuzzing, unbounded with a stuck disk). The spool
    thread is held here by a gate, deterministically: pings are answered while it is closed,
    the waiting replies come after it opens, with the frames counted, and the replies to one
    client stay in the order of its requests."""
    from cryoptycho.daemon.storage.spool import SpoolWriter

    gate = Gate(closed=False)
    gate.hold(monkeypatch, SpoolWriter, "append_many")  # our protocol's frames reach the spool through it
    with gated_service(tmp_path, gate) as d:
        svc, ctl = d.svc, d.ctl
        start = d.start_fields(4)
        with d.producer() as stopped, d.producer() as slow:
            stopped.start_scan(scan_id="stopped", **start)
            stopped.send_frames(np.ones((3, 16, 16), np.uint16))
            assert stopped.flush().acknowledged == 3
            ctl.cancel("stopped")
            wait_for(lambda: {s["scan_id"]: s["state"] for s in ctl.list_scans()}.get("stopped") == "aborted",
                     60, "the cancelled scan to stop")
            slow.start_scan(scan_id="slow", **start)
            gate.close()
            slow.send_frames(np.ones((4, 16, 16), np.uint16))
            assert gate.entered.wait(60), "the spool thread never took the frames"
            # the spool thread is stuck writing "slow": these two must wait for it, not the loop
            finisher, receiver, pipelined = d.dealer(), d.dealer(), d.dealer()
            _ask(finisher, "finish_scan", scan_id="stopped")
            _ask(receiver, "receipt", scan_id="slow")
            _ask(pipelined, "receipt", scan_id="slow")
            _ask(pipelined, "ping")
            wait_for(lambda: d.pending() == 4, 60, "the manager to read them all")
            for _ in range(3):
                assert ctl.ping()["pong"] is True  # another client, answered while they wait
            assert not any(c.poll(0) for c in (finisher, receiver, pipelined)), \
                "a reply came before the spool thread was done"
            gate.open()
            reopened = _answer(finisher)
            assert reopened["scan_id"] == "stopped" and reopened["frames"]["received"] == 3
            assert reopened["state"] not in ("aborted", "failed", "finished"), reopened
            held = _answer(receiver)
            assert held["scan_id"] == "slow" and held["frames"]["received"] == 4, held
            # one client's replies in the order of its requests: the receipt first, then the pong
            assert _answer(pipelined)["frames"]["received"] == 4
            assert _answer(pipelined)["pong"] is True
            assert slow.end_scan().acknowledged == 4
        assert svc.metrics.internal_errors.labels(where="control")._value.get() == 0
        assert svc.metrics.control_requests.labels(method="receipt", success="true")._value.get() >= 2


def test_worker_threads_start_off_the_manager_thread(tmp_path, monkeypatch):
    """Thread.start() waits until the new thread runs: on the manager thread it held up ping
    for 150-300 ms on a loaded host. Workers are started from a helper thread; one that cannot
    start (the OS has no thread left) fails its scan by name, and the daemon goes on."""
    from cryoptycho.daemon.worker import ScanWorker

    starters: list[str] = []

    def no_thread(self):
        starters.append(threading.current_thread().name)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(ScanWorker, "start", no_thread)
    with gated_service(tmp_path) as d:
        ctl = d.ctl
        with d.producer(confirm=False) as p:
            p.start_scan(scan_id="threadless", **d.start_fields(4))
            scan = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == "threadless"
                                          and s["state"] == "failed"), None), 60, "the scan to fail")
            assert "can't start new thread" in scan["error"], scan
            assert ctl.ping()["pong"] is True
        assert starters and all(name.startswith("worker-start") for name in starters), starters
        assert d.svc.metrics.internal_errors.labels(where="worker")._value.get() == 1


def test_a_receipt_answered_after_its_scan_stopped_says_why(tmp_path, monkeypatch):
    """A receipt asked while the spool thread is busy is answered later; if its scan stops in
    between (here a cancel; in CI it was the acquisition timeout of a killed sender), the answer
    said state "aborted" with end_reason None, taken before the stop, and no missing frames. It
    was also sent before the stop's own spool operations: a sender reading the spool on
    "aborted" found it still open. The spool thread is held by gates so that the order is
    certain."""
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, spool_path

    gate, closing = Gate(closed=False), Gate(closed=True)
    gate.hold(monkeypatch, SpoolWriter, "append_many")
    closing.hold(monkeypatch, SpoolWriter, "set_status", when=lambda status, *a, **k: status == "aborted")
    turns = count_manager_turns(monkeypatch)
    with gated_service(tmp_path, gate, closing) as d:
        sock = d.dealer()
        with d.producer() as producer:
            producer.start_scan(scan_id="held", **d.start_fields(8))
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 2
            gate.close()
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            assert gate.entered.wait(60), "the spool thread never took the frames"
            _ask(sock, "receipt", scan_id="held")
            wait_for(lambda: d.pending() == 1, 60, "the manager to read it")
            d.ctl.cancel("held")
            wait_for(lambda: {s["scan_id"]: s["state"] for s in d.ctl.list_scans()}.get("held") == "aborted",
                     60, "the cancelled scan to stop")
            assert not sock.poll(0), "the receipt was answered before the spool thread was done"
            gate.open()
            # the spool thread has counted the frames and now closes the spool (held there):
            # once the manager has run everything it handed back before that, two turns on
            assert closing.entered.wait(60), "the spool thread never closed the aborted spool"
            seen = turns[0]
            wait_for(lambda: turns[0] >= seen + 2, 60, "the manager to run what the spool thread handed back")
            assert d.pending() == 1 and not sock.poll(0), "the receipt said aborted before its spool was closed"
            closing.open()
            info = _answer(sock)
            assert info["state"] == "aborted", info
            assert info["end_reason"] is not None and "cancel" in info["end_reason"], info
            assert info["frames"]["received"] == 4, info
            assert info["missing"] == [4, 5, 6, 7] and info["frames"]["gaps"] == 4, info
            # answered after the spool was closed: it reads back as the receipt says
            spool = read_spool(spool_path(d.svc.config.spool_dir, "held"), frames=False)
            assert spool.status == "aborted" and len(spool.indices) == 4


def test_a_receipt_of_a_stopped_scan_waits_for_its_spool_s_close(tmp_path, monkeypatch):
    """A stopped scan's spool is closed on the closer thread, after the spool thread: a receipt
    asked once the scan was already aborted was answered as soon as the spool thread was done,
    while the closer still wrote the file and had yet to delete its journal. CI failed on it: a
    test read the spool on "aborted" and found the journal gone mid-read. The closer is held
    by a gate here, so the order is certain."""
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, spool_path

    closing = Gate(closed=True)
    closing.hold(monkeypatch, SpoolWriter, "close")
    turns = count_manager_turns(monkeypatch)
    with gated_service(tmp_path, closing) as d:
        sock = d.dealer()
        with d.producer() as producer:
            producer.start_scan(scan_id="shut", **d.start_fields(8))
            producer.send_frames(np.ones((4, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 4
            d.ctl.cancel("shut")
            assert closing.entered.wait(60), "the closer never closed the aborted spool"
            wait_for(lambda: {s["scan_id"]: s["state"] for s in d.ctl.list_scans()}.get("shut") == "aborted",
                     60, "the cancelled scan to stop")
            _ask(sock, "receipt", scan_id="shut")
            wait_for(lambda: d.pending() == 1 or sock.poll(0), 60, "the manager to read it")
            assert not sock.poll(0), "the receipt said aborted while its spool was still being closed"
            seen = turns[0]
            wait_for(lambda: turns[0] >= seen + 2, 60, "the manager to run what the spool thread handed back")
            assert not sock.poll(0), "the receipt said aborted while its spool was still being closed"
            closing.open()
            info = _answer(sock)
            assert info["state"] == "aborted" and info["frames"]["received"] == 4, info
            spool = read_spool(spool_path(d.svc.config.spool_dir, "shut"), frames=False)
            assert spool.status == "aborted" and len(spool.indices) == 4
            producer.scan = None  # cancelled: the daemon already said why


@pytest.mark.parametrize("how", ["cancelled", "engine_fault"])
def test_a_receipt_of_a_stopped_scan_waits_for_what_its_worker_s_exit_asks_of_the_spool(tmp_path, monkeypatch, how):
    """The spool operations of a scan's end that its worker's exit asks for (the close of a
    failed running scan's spool, the status mark of one whose worker held it) are asked for
    only once the manager has reaped that exit: a receipt asked in between said "failed" with
    the spool still open (journal there), or "aborted" before the mark, which opens the file
    for writing. The worker's exit is held by a gate."""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.storage.spool import journal_path, read_spool, spool_path
    from cryoptycho.daemon.worker import ScanWorker

    if how == "engine_fault":
        def fault(self, *args, **kwargs):
            raise RuntimeError("engine fault")

        monkeypatch.setattr(ScanWorker, "_step", fault)
    exiting = Gate(closed=True)
    exiting.hold(monkeypatch, ScanManager, "worker_exited")
    with gated_service(tmp_path, exiting) as d:
        sock = d.dealer()
        with d.producer() as producer:
            producer.start_scan(scan_id="cut", **d.start_fields(8))
            producer.send_frames(np.ones((4, 16, 16), np.uint16))
            if how == "cancelled":
                assert producer.flush().acknowledged == 4
                d.ctl.cancel("cut")
            # (an engine fault stops the worker at its first frames: a flush, which confirms
            # with receipts, would wait for the exit held here)
            assert exiting.entered.wait(60), "the worker never exited"
            _ask(sock, "receipt", scan_id="cut")
            wait_for(lambda: d.pending() == 1 or sock.poll(0), 60, "the manager to read it")
            assert not sock.poll(0), "the receipt said the scan stopped before its worker's exit was settled"
            exiting.open()
            info = _answer(sock)
            assert info["state"] == ("aborted" if how == "cancelled" else "failed"), info
            path = spool_path(d.svc.config.spool_dir, "cut")
            assert not journal_path(path).exists(), "answered before the spool was closed"
            spool = read_spool(path, frames=False)
            assert spool.status == info["state"] and len(spool.indices) == 4
            producer.scan = None  # stopped: the daemon already said why


def test_an_acquisition_timeout_counts_the_frames_the_spool_thread_has_yet_to_write(tmp_path, monkeypatch):
    """A sender that goes silent mid-scan is timed out with "after N of M frames": N counted
    only the frames already on disk, so with the spool thread behind (a busy host) the reason
    named fewer frames than the receipt and the spool held once it caught up (and a scan sent
    whole but without scan_end was aborted as partial). The spool thread is held by a gate."""
    from cryoptycho.daemon.storage.spool import SpoolWriter, read_spool, spool_path

    gate = Gate(closed=False)
    gate.hold(monkeypatch, SpoolWriter, "append_many")
    with gated_service(tmp_path, gate, resolution_interval_s=0) as d:
        svc, ctl = d.svc, d.ctl

        def summary(scan_id: str) -> dict:
            return next(s for s in ctl.list_scans() if s["scan_id"] == scan_id)

        with d.producer() as producer:
            producer.start_scan(scan_id="silent", **d.start_fields(8))
            gate.close()
            producer.send_frames(np.ones((4, 16, 16), np.uint16))
            assert gate.entered.wait(60), "the spool thread never took the frames"
            # the sender is gone; the timeout (long until the frames were read) runs out now
            svc.config.acquisition_timeout_s = 0.01
            reason = wait_for(lambda: summary("silent")["end_reason"], 60, "the acquisition timeout")
            assert "acquisition_timeout" in reason and "after 4 of 8 frames" in reason, reason
            gate.open()
            info = wait_for(lambda: (r := ctl.receipt("silent"))["state"] == "aborted" and r, 60, "the abort")
            assert info["frames"]["received"] == 4 and info["end_reason"] == reason, info
            spool = read_spool(spool_path(svc.config.spool_dir, "silent"), frames=False)
            assert spool.status == "aborted" and len(spool.indices) == 4
            producer.scan = None  # it never ends: the daemon already said why


def test_frames_for_a_scan_whose_worker_is_still_stopping_are_refused_by_name(tmp_path, monkeypatch):
    """A cancel closes the scan's spool at once, while its worker ends the scan at its next
    turn: frames read in between (a sender that has not heard yet, a busy host) found no spool,
    an internal error (KeyError) that failed the cancelled scan. The worker is held by a gate
    so that the frames arrive in between."""
    from cryoptycho.daemon.worker import ScanWorker

    gate = Gate(closed=True)
    gate.hold(monkeypatch, ScanWorker, "_abort")
    with gated_service(tmp_path, gate, resolution_interval_s=0) as d:
        ctl, m = d.ctl, d.svc.metrics

        def refused() -> float:
            return m.frames_dropped.labels(reason="scan_closed")._value.get()

        def internal() -> float:
            return m.internal_errors.labels(where="ingest")._value.get()

        with d.producer() as producer:
            producer.start_scan(scan_id="late", **d.start_fields(8))
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 2
            assert ctl.cancel("late", "operator stop")["state"] != "aborted"
            assert gate.entered.wait(60), "the worker never took the cancel"
            producer.send_frames(np.ones((2, 16, 16), np.uint16))
            wait_for(lambda: refused() + internal() > 0, 60, "the frames after the cancel to be handled")
            assert (refused(), internal()) == (2, 0)
            gate.open()
            info = wait_for(lambda: (r := ctl.receipt("late"))["state"] in ("aborted", "failed") and r, 60,
                            "the scan to stop")
            assert info["state"] == "aborted" and "operator stop" in info["end_reason"], info
            assert info["frames"]["received"] == 2, info
            producer.scan = None  # the daemon already said why it stopped


def test_finish_scan_asked_as_soon_as_a_receipt_says_aborted_reopens_it(tmp_path, monkeypatch):
    """A worker says "aborted" before it exits; a finish_scan that came in between (a sender
    acting on the receipt at once, as the killed-sender test does) was refused as "still
    stopping; ask again in a moment". It is now answered once the worker is gone. The worker
    is held by a gate between its abort and its exit."""
    from cryoptycho.daemon.worker import ScanWorker
    from cryoptycho.protocols.messages import decode

    gate = Gate(closed=True)
    gate.hold(monkeypatch, ScanWorker, "_abort", after=True)
    with gated_service(tmp_path, gate, resolution_interval_s=0, refine_time_budget_s=5) as d:
        sock = d.dealer()
        with d.producer() as producer:
            producer.start_scan(scan_id="early", **d.start_fields(8))
            producer.send_frames(np.ones((4, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 4
            d.ctl.cancel("early")
            assert gate.entered.wait(60), "the worker never aborted the scan"
            # (a receipt now waits for the worker's exit: the operator's list shows it first)
            assert next(s for s in d.ctl.list_scans() if s["scan_id"] == "early")["state"] == "aborted"
            _ask(sock, "finish_scan", scan_id="early")
            wait_for(lambda: d.pending() == 1 or sock.poll(0), 60, "the manager to read it")
            assert not sock.poll(0), f"answered while the worker was exiting: {decode(sock.recv_multipart()[1:])}"
            gate.open()
            result = _answer(sock)
            assert result["state"] in ("announced", "acquiring", "refining") and \
                result["frames"]["received"] == 4, result
            producer.scan = None


def test_list_scans_by_state_filters_on_the_state_it_lists(tmp_path, monkeypatch):
    """`list_scans(state=…)` checked each scan's state, then read its summary: a worker that
    changed the state in between (here: the summary itself is where the scan stops) had the
    reply list a scan in another state than the one asked for."""
    from cryoptycho.daemon.session import Session, State

    summary = Session.summary

    def stops_first(self):
        if self.scan_id == "moving" and not self.state.final:
            self.transition(State.ABORTED, error="stopped between the check and the summary")
        return summary(self)

    with gated_service(tmp_path, resolution_interval_s=0) as d:
        ctl = d.ctl
        with d.producer() as producer:
            producer.start_scan(scan_id="moving", **d.start_fields(8))  # no frame: it stays announced
            wait_for(lambda: "moving" in d.svc.scans.sessions, 60, "the scan to register")
            monkeypatch.setattr(Session, "summary", stops_first)
            listed = ctl.list_scans(state="announced")
            assert all(s["state"] == "announced" for s in listed), listed
            assert [s["state"] for s in ctl.list_scans(state="aborted")] == ["aborted"]
            producer.scan = None


def test_a_cancelled_scans_spool_is_not_written_again_once_its_close_said_aborted(tmp_path, monkeypatch):
    """A cancel closes a running scan's spool with status "aborted" (the spool thread, then the
    closer); once the worker exits, the daemon marked the file "aborted" again (an r+ open on the
    closer thread). A reader that acted on the receipt's "aborted" and held the file then (as a
    test reading the spool does in the same process: HDF5 opens a file once per process, here
    read-only) made that write fail: an internal error and an `error` event for a scan already
    closed, or the reader's open failed instead. The worker is held by a gate between its abort
    and its exit, so that the reader holds the file when the worker exits."""
    import h5py
    from cryoptycho.daemon.storage.spool import spool_path
    from cryoptycho.daemon.worker import ScanWorker

    gate = Gate(closed=True)
    gate.hold(monkeypatch, ScanWorker, "_abort", after=True)
    with gated_service(tmp_path, gate, resolution_interval_s=0) as d:
        scans = d.svc.scans
        with d.producer() as producer:
            producer.start_scan(scan_id="read-after-cancel", **d.start_fields(8))
            producer.send_frames(np.ones((4, 16, 16), np.uint16))
            assert producer.flush().acknowledged == 4
            d.ctl.cancel("read-after-cancel", "operator stop")
            assert gate.entered.wait(60), "the worker never aborted the scan"
            scans.flush_disk()  # the cancel's close (spool thread, then closer) is done
            path = spool_path(d.svc.config.spool_dir, "read-after-cancel")
            with h5py.File(path, "r") as reader:
                assert reader.attrs["status"] == "aborted"
                gate.open()
                wait_for(lambda: "read-after-cancel" not in scans.running, 60, "the worker to exit")
                settled = threading.Event()
                # a reap after the one that let the worker go: its settling (and any mark it
                # asked the closer for) is done; then every spool operation asked so far
                scans.after_disk(lambda: None, lambda _r, _e: settled.set())
                assert settled.wait(60), "the manager never ran what the spool thread handed back"
                scans.flush_disk()
                assert reader.attrs["status"] == "aborted"
            producer.scan = None  # the daemon already said why it stopped
        assert d.svc.metrics.internal_errors.labels(where="spool")._value.get() == 0
