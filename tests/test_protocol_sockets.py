"""The SDK over real sockets: Producer, Subscriber, ControlClient, CURVE, replay with faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.auth
from click.testing import CliRunner
from cryoptycho.protocols.control import ControlClient, handle
from cryoptycho.protocols.errors import ControlError, ControlTimeout, ProducerTimeout, ProtocolError
from cryoptycho.protocols.faults import Faults
from cryoptycho.protocols.messages import (
    Abort,
    ErrorEvent,
    Frames,
    Metrics,
    Preview,
    RasterScan,
    Request,
    ScanEnd,
    ScanEvent,
    ScanStart,
    decode,
    encode,
)
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.security import (
    ClientCurve,
    apply_server_curve,
    generate_client_keys,
    generate_server_keys,
    start_authenticator,
)
from cryoptycho.protocols.subscriber import Subscriber
from cryoptycho.protocols.topics import encode_event
from protocol_helpers import frames, scan_fields

WAIT_MS = 30000  # generous waits for a loaded CI machine; never asserted on


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def bind(
    ctx: zmq.Context, kind: int, setup: Callable[[zmq.Socket], None] | None = None
) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(kind)
    sock.linger = 0
    if setup:
        setup(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def receive_all(
    pull: zmq.Socket, until: Callable[[Any], bool], scans: dict | None = None
) -> list[Any]:
    """Decode messages (ProtocolErrors included, in order) until ``until(msg)``."""
    out: list[Any] = []
    scans = {} if scans is None else scans
    while True:
        assert pull.poll(WAIT_MS), f"stream stalled after {len(out)} messages"
        try:
            msg = decode(pull.recv_multipart(copy=False), None, scans)
        except ProtocolError as exc:
            out.append(exc)
            continue
        if isinstance(msg, ScanStart):
            scans[msg.scan_id] = msg
        out.append(msg)
        if until(msg):
            return out


def start_fields(n: int) -> dict[str, Any]:
    """A raster scan of n frames (a multiple of 5), as ``Producer.start_scan`` takes it."""
    return scan_fields(expected_frames=n, raster=RasterScan((n // 5, 5), (1e-10, 1e-10)))


def test_producer_streams_a_scan_in_batches(ctx):
    pull, endpoint = bind(ctx, zmq.PULL)
    data = np.random.default_rng(0).poisson(0.4, (50, 16, 16)).astype(np.uint16)
    with Producer(endpoint, batch_frames=16, compression="bslz4", context=ctx, confirm=False) as p:
        p.start_scan(**start_fields(50))
        p.send_frames(data[:30])
        p.send_frames(data[30:])
        p.end_scan()
    msgs = receive_all(pull, lambda m: isinstance(m, ScanEnd))
    batches = [m for m in msgs if isinstance(m, Frames)]
    assert [len(b.indices) for b in batches] == [16, 14, 16, 4]  # split at batch_frames, per call
    got = np.concatenate([b.data for b in batches])
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(np.concatenate([b.indices for b in batches]), np.arange(50))
    assert msgs[-1].frame_count == 50 and all(b.compression == "bslz4" for b in batches)


def test_producer_checks_frames_before_sending(ctx):
    pull, endpoint = bind(ctx, zmq.PULL)
    with Producer(endpoint, context=ctx, confirm=False) as p:
        p.start_scan(**start_fields(10))
        with pytest.raises(ValueError, match="uint8"):
            p.send_frames(np.zeros((2, 16, 16), np.uint8))
        with pytest.raises(ProtocolError) as info:
            p.send_frames(np.zeros((2, 8, 8), np.uint16))
        assert info.value.rule == "frame_shape"
        with pytest.raises(ProtocolError) as info:
            p.send_frames(np.zeros((2, 16, 16), np.uint16), positions_m=np.zeros((2, 2)))
        assert info.value.rule == "declared_by_scan"
        p.end_scan(0)
    msgs = receive_all(pull, lambda m: isinstance(m, ScanEnd))
    assert [type(m) for m in msgs] == [ScanStart, ScanEnd]


def test_exception_in_block_aborts_the_scan(ctx):
    pull, endpoint = bind(ctx, zmq.PULL)
    with pytest.raises(KeyError), Producer(endpoint, context=ctx, confirm=False) as p:
        p.start_scan(**start_fields(10))
        raise KeyError("stage lost")
    msgs = receive_all(pull, lambda m: isinstance(m, Abort))
    assert "stage lost" in msgs[-1].reason


def test_send_timeout_raises_instead_of_hanging(ctx):
    # nobody listens: PUSH queues up to its high-water mark, then blocks; the timeout ends that
    dead = "tcp://127.0.0.1:9"
    p = Producer(dead, hwm=1, send_timeout_s=0.1, context=ctx, confirm=False)
    with pytest.raises(ProducerTimeout, match="took no message"):
        p.start_scan(**start_fields(10))
        for _ in range(50):
            p.send_frames(np.zeros((1, 16, 16), np.uint16), indices=[0])
    p.close(0)


def test_subscriber_gets_events_over_tcp(ctx):
    pub, endpoint = bind(ctx, zmq.PUB)
    with Subscriber(endpoint, topics=("scan.", "error"), context=ctx) as sub:
        # PUB drops what it sends before a subscription has propagated (slow joiner); each topic
        # is its own subscription message and may reach the PUB socket separately
        deadline = time.monotonic() + WAIT_MS / 1000
        warm: set[type] = set()
        while warm != {ScanEvent, ErrorEvent} and time.monotonic() < deadline:
            pub.send_multipart(encode_event(ScanEvent("s", "accepted")))
            pub.send_multipart(encode_event(ErrorEvent("warm", "none", "warm-up", "s")))
            while (ev := sub.recv(timeout_s=0.05)) is not None:
                warm.add(type(ev))
        assert warm == {ScanEvent, ErrorEvent}
        pub.send_multipart(encode_event(Metrics("s", 1, 1)))  # filtered out by topic
        pub.send_multipart(encode_event(ErrorEvent("data", "frame_shape", "16×16 expected", "s")))
        pub.send_multipart(encode_event(ScanEvent("s", "finished")))
        seen = []
        while not (seen and isinstance(seen[-1], ScanEvent) and seen[-1].event == "finished"):
            ev = sub.recv(timeout_s=WAIT_MS / 1000)
            assert ev is not None
            seen.append(ev)
        assert not any(isinstance(e, Metrics) for e in seen)
        assert any(isinstance(e, ErrorEvent) and e.rule == "frame_shape" for e in seen)


def test_subscriber_skips_stale_previews(ctx):
    # inproc delivers into the subscriber's queue before send returns: the backlog is exact
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://pub")
    sub = Subscriber("inproc://pub", rcvhwm=1000, context=ctx)
    warm = None
    while warm is None:  # until the subscription has reached the PUB socket
        pub.send_multipart(encode_event(ScanEvent("warm", "accepted")))
        warm = sub.recv(timeout_s=0.05)
    while sub.recv(timeout_s=0.05) is not None:
        pass
    img = np.zeros((4, 4), np.float32)
    for i in range(20):
        pub.send_multipart(
            encode_event(Preview("a", i, i, 1e-10, (0, 0), img + i, np.ones((2, 2), np.complex64)))
        )
        pub.send_multipart(
            encode_event(Preview("b", i, i, 1e-10, (0, 0), img, np.ones((2, 2), np.complex64)))
        )
    pub.send_multipart(encode_event(ScanEvent("a", "ended")))
    pub.send_multipart([b"metrics", b"garbage"])
    got = [sub.recv(timeout_s=1) for _ in range(3)]
    assert [(type(e).__name__, e.scan_id, getattr(e, "iteration", None)) for e in got] == [
        ("Preview", "a", 19),
        ("Preview", "b", 19),
        ("ScanEvent", "a", None),
    ]
    assert got[0].object_phase[0, 0] == 19
    with pytest.raises(ProtocolError) as info:
        sub.recv(timeout_s=1)
    assert info.value.field == "header"
    assert sub.skipped == 38 and sub.invalid == 1
    sub.close()
    pub.close(0)


class FakeDaemon:
    """A ROUTER answered by control.handle in a thread; ignores the first ``ignore`` requests."""

    def __init__(self, ctx: zmq.Context, table: dict, ignore: int = 0, setup=None) -> None:
        self.sock, self.endpoint = bind(ctx, zmq.ROUTER, setup)
        self.table, self.ignore = table, ignore
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(20):
                    continue
                parts = self.sock.recv_multipart(copy=False)
                if self.ignore:
                    self.ignore -= 1
                    continue
                self.sock.send_multipart(handle(parts, self.table), copy=False)
        except BaseException as exc:  # noqa: BLE001 (surfaced by close())
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close(0)
        if self.error:
            raise self.error


def table() -> dict:
    def snapshot(scan_id: str) -> dict:
        if scan_id != "s":
            raise KeyError(f"no scan {scan_id!r}")
        return {"preview": {"iteration": 7, "object_phase": np.full((3, 3), 0.5, np.float32)}}

    return {"ping": lambda: {"pong": True}, "snapshot": snapshot, "boom": lambda: 1 / 0}


def test_control_client_calls_and_errors(ctx):
    daemon = FakeDaemon(ctx, table())
    try:
        with ControlClient(daemon.endpoint, timeout_s=30, context=ctx) as c:
            assert c.ping() == {"pong": True}
            snap = c.snapshot("s")
            assert snap["preview"]["iteration"] == 7
            np.testing.assert_array_equal(
                snap["preview"]["object_phase"], np.full((3, 3), 0.5, np.float32)
            )
            with pytest.raises(ControlError, match="KeyError"):
                c.snapshot("zz")
            with pytest.raises(ControlError, match="ZeroDivisionError"):
                c.call("boom")
            with pytest.raises(ControlError, match="unknown method 'status'"):
                c.status()
            with pytest.raises(ControlError, match="bad params"):
                c.call("ping", verbose=True)
            assert c.ping() == {"pong": True}  # the server survived all of that
    finally:
        daemon.close()


def test_control_client_retries_then_gives_up(ctx):
    daemon = FakeDaemon(ctx, table(), ignore=2)
    try:
        # tries of 0.2 s: on a busy host the answer to the third may come after its wait, and
        # a later try is answered then (only the first two are ignored)
        with ControlClient(daemon.endpoint, timeout_s=0.2, retries=50, context=ctx) as c:
            assert c.ping() == {"pong": True}  # answered once it retried past the ignored two
    finally:
        daemon.close()
    assert daemon.ignore == 0, "the client was answered without retrying"
    with (ControlClient("tcp://127.0.0.1:9", timeout_s=0.05, retries=2, context=ctx) as c,
          pytest.raises(ControlTimeout, match="after 2 tries")):
        c.ping()


def test_control_answers_non_requests_with_an_error():
    reply_parts = handle([b"id", b"", *encode(ScanEnd("s", 1))], table())
    assert reply_parts[:2] == [b"id", b""]
    reply = decode(reply_parts[2:])
    assert not reply.success and reply.result["rule"] == "request_expected"
    reply = decode(handle([b"id", b"\x93garbage"], table())[1:])  # DEALER-style, no delimiter
    assert not reply.success and reply.result["rule"] in ("msgpack", "map")


def test_control_client_rejects_non_replies(ctx):
    router, endpoint = bind(ctx, zmq.ROUTER)

    def answer_wrongly() -> None:
        parts = router.recv_multipart()
        router.send_multipart(parts[:2] + encode(ScanEvent("s", "accepted")))

    t = threading.Thread(target=answer_wrongly)
    t.start()
    with ControlClient(endpoint, timeout_s=30, context=ctx) as c, pytest.raises(ProtocolError) as info:
        c.ping()
    t.join()
    assert info.value.rule == "reply_expected"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_server_keys(tmp_path)
    generate_client_keys(tmp_path, "alice")
    # a key pair the daemon never admitted
    (tmp_path / "rogue").mkdir()
    zmq.auth.create_certificates(str(tmp_path / "rogue"), "mallory")
    return tmp_path


def test_curve_admits_known_clients_only(ctx, keys):
    auth = start_authenticator(ctx, keys)
    try:
        pull, endpoint = bind(ctx, zmq.PULL, lambda s: apply_server_curve(s, keys))
        alice = ClientCurve.from_keys_dir(keys, "alice")
        mallory = ClientCurve(keys / "rogue" / "mallory.key_secret", keys / "server.key")
        with Producer(endpoint, curve=mallory, send_timeout_s=1, context=ctx) as p:
            p.send(ScanEnd("rogue", 0))
            assert not pull.poll(500)  # the handshake fails: nothing arrives
            p.close(0)
        with Producer(endpoint, curve=alice, context=ctx) as p:
            p.send(ScanEnd("alice-scan", 0))
            assert pull.poll(WAIT_MS)
            assert decode(pull.recv_multipart(copy=False)).scan_id == "alice-scan"
        # and the control socket: an admitted client gets replies
        daemon = FakeDaemon(ctx, table(), setup=lambda s: apply_server_curve(s, keys))
        try:
            with ControlClient(daemon.endpoint, curve=alice, timeout_s=30, context=ctx) as c:
                assert c.ping() == {"pong": True}
            with ControlClient(
                daemon.endpoint, curve=mallory, timeout_s=0.2, retries=1, context=ctx
            ) as c, pytest.raises(ControlTimeout):
                c.ping()
        finally:
            daemon.close()
    finally:
        auth.stop()


def test_keys_command(tmp_path: Path):
    from cryoptycho.daemon.commands.keys import command

    runner = CliRunner()
    result = runner.invoke(
        command, [str(tmp_path / "k"), "--client", "scope1", "--client", "viewer"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k/server.key_secret").is_file()
    assert sorted(p.name for p in (tmp_path / "k/clients").iterdir()) == [
        "scope1.key",
        "viewer.key",
    ]
    again = runner.invoke(command, [str(tmp_path / "k")])
    assert again.exit_code != 0 and "exists" in again.output


def _dataset(path: Path, n: int = 40) -> Path:
    from cryoptycho.daemon.storage.dataset import write_dataset
    from cryoptycho.gpu.data import ProbeModel, PtychoData

    rng = np.random.default_rng(3)
    data = PtychoData(
        frames=rng.poisson(0.3, (n, 16, 16)).astype(np.int64),
        positions=rng.normal(0, 1e-9, (n, 2)),
        energy=300e3,
        pixel_size=1e-10,
        probe_model=ProbeModel("defocused", 20e-3, 1e-8),
        mask=np.ones((16, 16), bool),
        metadata={"sample": "test"},
    )
    return write_dataset(path, data)


def test_replay_with_faults_delivers_what_the_hook_did_not_lose(ctx, tmp_path):
    from cryoptycho.daemon.replay import read_source, replay

    source = read_source(_dataset(tmp_path / "d.h5"), stream_positions=True)
    assert source.frames.dtype == np.uint8  # narrowest dtype that holds the counts
    pull, endpoint = bind(ctx, zmq.PULL)
    faults = Faults(drop=0.15, duplicate=0.15, reorder=0.3, corrupt=0.15, seed=5)
    with Producer(endpoint, context=ctx, hook=faults, confirm=False) as p:
        replay(source, p, rate=0, batch=2)
    msgs = receive_all(pull, lambda m: isinstance(m, ScanEnd))
    good = [m for m in msgs if isinstance(m, Frames)]
    errors = [m for m in msgs if isinstance(m, ProtocolError)]
    assert faults.stats["dropped"] and faults.stats["duplicated"] and faults.stats["reordered"]
    corrupted = sum(v for k, v in faults.stats.items() if k.startswith("corrupt_"))
    assert corrupted and len(errors) >= corrupted
    received = np.concatenate([m.indices for m in good])
    assert set(received.tolist()) == set(range(40)) - set(faults.lost_indices)
    assert len(received) > len(set(received.tolist()))  # duplicates arrived
    assert np.any(np.diff(received.astype(int)) < 0)  # and out of order
    for m in good:
        np.testing.assert_array_equal(m.data, source.frames[m.indices])
        np.testing.assert_array_equal(m.positions_m, source.positions_m[m.indices])


def test_replay_command_streams_a_file(ctx, tmp_path):
    from cryoptycho.daemon.commands.replay import command

    path = _dataset(tmp_path / "scan7.h5", n=12)
    pull, endpoint = bind(ctx, zmq.PULL)
    result = CliRunner().invoke(
        command,
        [
            str(path),
            "--ingest",
            endpoint,
            "--rate",
            "0",
            "--batch",
            "5",
            "--compression",
            "lz4",
            "--checksum",
            "--no-confirm",
        ],
    )
    assert result.exit_code == 0, result.output
    msgs = receive_all(pull, lambda m: isinstance(m, ScanEnd))
    start = msgs[0]
    assert isinstance(start, ScanStart) and start.scan_id == "scan7"
    assert start.probe_model.semiangle_rad == 20e-3 and start.positions_m.shape == (12, 2)
    assert [len(m.indices) for m in msgs if isinstance(m, Frames)] == [5, 5, 2]
    assert "12 frames" in result.output


def test_replay_refuses_other_files(tmp_path):
    import h5py
    from cryoptycho.daemon.replay import read_source

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(ValueError, match="not a cryoptycho dataset, spool or result file"):
        read_source(tmp_path / "x.h5")


def test_control_answers_when_a_result_cannot_travel():
    bad = {"listed": lambda: {"images": [np.ones(2)]}}
    reply = decode(handle([b"id", b"", *encode(Request("listed"))], bad)[2:])
    assert not reply.success and "could not be encoded" in reply.msg


@pytest.mark.parametrize(
    ("kind", "rule"),
    [
        ("header", None),
        ("truncate", "size_match"),
        ("drop_part", "part_count"),
        ("flip", "checksum"),
    ],
)
def test_each_corruption_is_caught(kind, rule):
    faults = Faults(corrupt=1.0, corruptions=(kind,), seed=2)
    msg = frames()
    (parts,) = faults.process(msg, encode(msg, checksum=True))
    with pytest.raises(ProtocolError) as info:
        decode(parts)
    if rule is None:  # random header bytes fail somewhere in the envelope checks
        assert info.value.field in ("header", "protocol", "version")
    else:
        assert info.value.rule == rule
    assert faults.lost_indices == [0, 1, 2, 3]
