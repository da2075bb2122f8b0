"""A buggy or hostile DECTRIS sender against a running daemon (``serve --source dectris2://…``,
wired in process as ``serve`` wires it): crafted messages pushed raw on port 0. Each is refused
with an error event naming what was wrong (rule ``dectris_message_undecodable``); the daemon
and its source go on, and a series sent after arrives whole (protocols/dectris/bounds.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from cryoptycho.daemon.commands import serve
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v1_messages, v2_messages
from daemon_support import wait_for

CHANNEL = "threshold_1"
SIDE = 64
ANGLE = 5e-4
MAGIC = b"\xd9\xd9\xf7"


def _frames(n: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE // 2
    lam = np.where(yy**2 + xx**2 <= (SIDE / 5) ** 2, 3.0, 0.05)
    return np.random.default_rng(seed).poisson(lam, (n, SIDE, SIDE)).astype(np.uint16)


def _series(frames: np.ndarray, scan_id: str, version: int = 2) -> list[Any]:
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, len(frames)], "step_m": [2e-10, 2e-10]},
                           "detector_pixel_angle_rad": ANGLE, "scan_id": scan_id}}
    series = SimSeries(frames, compression="bslz4", user_data=user)
    return list(v2_messages(series) if version == 2 else v1_messages(series))


class _Daemon:
    """A daemon reading a simulated detector; the error events it publishes are recorded."""

    def __init__(self, tmp_path: Path, sender: SimSender, channel: str | None = CHANNEL) -> None:
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                            metrics_enabled=False, spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                            resolution_interval_s=0, drain_timeout_s=0, source=sender.url,
                            dectris={"channel": channel, "crop": SIDE, "bin": 2, "energy_eV": 300e3})
        cfg.options = cfg.options.model_copy(update={"parallax": False, "iterations": 1})
        self.bg = BackgroundService(cfg)
        self.events: list[Any] = []
        self._lock = threading.Lock()
        real = self.bg.service.publish_error

        def record(event: Any) -> None:
            with self._lock:
                self.events.append(event)
            real(event)

        self.bg.service.publish_error = record  # type: ignore[method-assign]
        self.thread = serve._start_source(cfg, threading.Event(), self.bg.service)

    def errors(self, rule: str) -> list[str]:
        with self._lock:
            return [e.message for e in self.events if e.rule == rule]

    def scan(self, scan_id: str, state: str = "finished") -> Any:
        def done() -> Any:
            s = self.bg.service.scans.sessions.get(scan_id)
            return s if s is not None and s.state.value == state else None
        return wait_for(done, 120, f"scan {scan_id} {state}")

    def running(self) -> bool:
        return self.thread.is_alive() and not self.bg.service._stop.is_set()

    def stop(self) -> None:
        self.bg.stop()


@pytest.fixture
def v2() -> Iterator[SimSender]:
    with SimSender(2) as s:
        yield s


def _values_bomb(n: int) -> bytes:
    """A start message whose user_data is an array of ``n`` zeros (one byte each)."""
    head = cbor2.dumps({"type": "start", "series_id": 7, "series_unique_id": "bomb", "channels": [CHANNEL]})
    return MAGIC + bytes([head[0] + 1]) + head[1:] + cbor2.dumps("user_data") + b"\x9a" + n.to_bytes(4, "big") \
        + b"\x00" * n


def _nested(depth: int) -> bytes:
    head = cbor2.dumps({"type": "start", "series_id": 8, "series_unique_id": "deep", "channels": [CHANNEL]})
    return MAGIC + bytes([head[0] + 1]) + head[1:] + cbor2.dumps("user_data") + b"\x81" * depth + b"\x00"


def test_hostile_v2_messages_are_refused_by_name_and_the_next_series_arrives_whole(tmp_path, v2) -> None:
    """A start of 200,000 values (cbor2 built every one on the receiving thread: 0.3 s here, minutes
    at the 512 MiB a message may have), a start nested 300 deep (taken whole into the scan's
    metadata), a multipart message whose first part is JSON nested 2,000 deep (the V1 check of
    a multipart message raised RecursionError out of the receiving thread: the source failed
    and stopped the daemon), an image of 2³¹ × 2³¹ pixels (a ValueError that failed its whole
    decoding job): each is an error event naming the limit, and a series sent after them
    arrives whole, its 12 frames in its scan."""
    daemon = _Daemon(tmp_path, v2)
    try:
        v2.send_raw(_values_bomb(200_000))
        v2.send_raw(_nested(300))
        v2.send_raw([b'{"htype": ' + b"[" * 2000 + b"]" * 2000 + b"}", b"x"])  # (under 4096 bytes: read)
        for m in _series(_frames(12, seed=1), "after"):
            v2.send_raw(m)
        session = daemon.scan("after-series1")
        assert session.ledger.received == 12, session.ledger.received
        assert daemon.running()
        said = daemon.errors("dectris_message_undecodable")
        assert any("more than 65536 values" in m and "max_header_values" in m for m in said), said
        assert any("deeper than 32 levels" in m and "max_depth" in m for m in said), said
        assert any("multipart message on a Stream V2 socket" in m for m in said), said
    finally:
        daemon.stop()


def test_a_huge_image_fails_alone_not_its_job(tmp_path, v2) -> None:
    """An image claiming 2³¹ × 2³¹ pixels as a series' first (decoded alone, unbinned: it would
    build the series' binning): NumPy's ValueError failed its decoding job as a bug, and the
    series' scan with it. Now it is an error of that image alone; the series' 12 images arrive."""
    daemon = _Daemon(tmp_path, v2)
    try:
        messages = _series(_frames(12, seed=2), "huge")
        msg = cbor2.loads(messages[1][3:])
        typed = msg["data"][CHANNEL].value[1]
        msg["data"][CHANNEL] = cbor2.CBORTag(40, [[1 << 31, 1 << 31], typed])
        for m in messages[:1] + [MAGIC + cbor2.dumps(msg)] + messages[1:]:  # (image 0 twice: refused first)
            v2.send_raw(m)
        session = daemon.scan("huge-series1")
        assert session.ledger.received == 12, session.ledger.received
        assert daemon.running()
    finally:
        daemon.stop()


def test_a_v1_header_nested_too_deep_is_refused_and_the_source_goes_on(tmp_path) -> None:
    """A Stream V1 header (dheader-1.0) whose JSON nests 3,000 deep: the JSON decoder's
    RecursionError left the receiving thread and the source failed, stopping the daemon. Now
    the part is no header (skipped and counted), and the series after it arrives whole."""
    with SimSender(1) as v1:
        daemon = _Daemon(tmp_path, v1, channel=None)  # (V1 has one channel, unnamed)
        try:
            v1.send_raw([b'{"htype": "dheader-1.0", "series": 3, "header_detail": "none", "x": '
                         + b"[" * 3000 + b"]" * 3000 + b"}"])
            for m in _series(_frames(8, seed=3), "v1-after", version=1):
                v1.send_raw(m)
            session = daemon.scan("v1-after-series1")
            assert session.ledger.received == 8, session.ledger.received
            assert daemon.running()
        finally:
            daemon.stop()


def test_a_sender_that_vanishes_mid_series_keeps_what_it_sent(tmp_path) -> None:
    """The detector's sender goes away after 8 of a series' 16 images, and another comes up on
    the same port with the next series: the first scan is aborted with its 8 frames kept in the
    spool (finish_scan reconstructs them), the next arrives whole, the daemon runs on."""
    with SimSender(2) as first:
        port = first.port
        daemon = _Daemon(tmp_path, first)
        for m in _series(_frames(16, seed=4), "vanished")[:1 + 8]:
            first.send_raw(m)
        wait_for(lambda: (s := daemon.bg.service.scans.sessions.get("vanished-series1")) is not None
                 and s.ledger.received == 8, 120, "the first 8 images")
    try:
        with SimSender(2, port=port) as second:
            for m in _series(_frames(8, seed=5), "next"):
                second.send_raw(m)
            assert daemon.scan("next-series1").ledger.received == 8
        aborted = daemon.scan("vanished-series1", "aborted")
        assert aborted.ledger.received == 8
        assert daemon.running()
    finally:
        daemon.stop()


def test_the_header_walk_counts_values_and_depth_as_cbor2_builds_them() -> None:
    """check_cbor against cbor2 itself: a message at the limits passes and decodes, one value or
    one level more is refused by name; indefinite-length items, tags, floats and byte strings of
    any size (one value each) are walked, and a malformed item is left for cbor2 to name."""
    from cryoptycho.protocols.dectris.bounds import check_cbor
    from cryoptycho.protocols.dectris.schema import DecodeError

    def values(obj: Any) -> int:
        if isinstance(obj, cbor2.CBORTag):
            return 1 + values(obj.value)
        if isinstance(obj, dict):
            return 1 + sum(values(k) + values(v) for k, v in obj.items())
        if isinstance(obj, list):
            return 1 + sum(values(v) for v in obj)
        return 1

    msg = {"type": "start", "mask": cbor2.CBORTag(40, [[2, 2], cbor2.CBORTag(69, b"\0" * 1_000_000)]),
           "f": [1.5, -2, None, True, "text", 2**70], "user_data": {"a": [[[[0]]]]}}
    raw = cbor2.dumps(msg)
    n = values(msg) + 1  # (2**70 is a bignum: tag 2 around its bytes)
    check_cbor(raw, n)
    with pytest.raises(DecodeError, match=f"more than {n - 1} values"):
        check_cbor(raw, n - 1)
    check_cbor(raw, n, max_depth=6)  # top map, user_data's map, 4 lists
    with pytest.raises(DecodeError, match="deeper than 5 levels"):
        check_cbor(raw, n, max_depth=5)
    # indefinite-length map, array and string (chunks), as a streaming encoder writes them
    indefinite = b"\xbf" + cbor2.dumps("k") + b"\x9f\x01\x02\xff" + cbor2.dumps("s") + b"\x7f\x61a\x61b\xff\xff"
    assert cbor2.loads(indefinite) == {"k": [1, 2], "s": "ab"}
    check_cbor(indefinite, 9)  # map, "k", array, 1, 2, "s", the string and each of its 2 chunks
    with pytest.raises(DecodeError):
        check_cbor(indefinite, 8)
    check_cbor(b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", 10)  # truncated: cbor2's to name
    with pytest.raises(DecodeError, match="more than 10 values"):
        check_cbor(b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00" + b"\x00" * 100, 10)


def _start_with_user_data(item: bytes, series_id: int = 9) -> bytes:
    """A start message whose user_data is the raw CBOR ``item``."""
    head = cbor2.dumps({"type": "start", "series_id": series_id, "series_unique_id": "shared",
                        "channels": [CHANNEL]})
    return MAGIC + bytes([head[0] + 1]) + head[1:] + cbor2.dumps("user_data") + item


#: 28([29(0)]): an array holding itself (cbor2 decodes value sharing, RFC 8949 tags 28/29, by default)
CYCLE = b"\xd8\x1c\x81\xd8\x1d\x00"


def _shared_dag(levels: int) -> bytes:
    """[28("x"), 28([29(0), 29(0)]), 28([29(1), 29(1)]), …]: ~8 bytes a level, and each level
    twice the one before once walked as a tree (2^levels strings)."""
    items = [b"\xd8\x1c" + cbor2.dumps("x")]
    items += [b"\xd8\x1c\x82" + (b"\xd8\x1d" + cbor2.dumps(i)) * 2 for i in range(levels)]
    return b"\x99" + len(items).to_bytes(2, "big") + b"".join(items)


def test_shared_values_are_refused_before_they_are_built(tmp_path, v2) -> None:
    """cbor2 decodes RFC 8949 value sharing (tag 28 marks a value, tag 29 refers to it) and
    string references (tags 256/25). No DECTRIS message uses them, and the walk counted each
    reference as one value: a start whose user_data is a 6-byte array holding itself raised
    RecursionError out of decode_v2 (caught nowhere: the source failed and stopped the daemon),
    and a few hundred bytes of shared arrays expand to 2^levels values once read as a tree (the
    start's user_data is walked into the scan's metadata). Both are refused by name now, and the
    series after them arrives whole."""
    from cryoptycho.protocols.dectris.bounds import check_cbor
    from cryoptycho.protocols.dectris.decode import decode_v2
    from cryoptycho.protocols.dectris.schema import DecodeError

    assert isinstance(cbor2.loads(CYCLE)[0], list)  # (cbor2 builds the cycle)
    with pytest.raises(DecodeError, match="tag 28"):
        decode_v2(_start_with_user_data(CYCLE))
    with pytest.raises(DecodeError, match="tag 28"):
        check_cbor(_shared_dag(40), 65536)
    stringref = b"\xd9\x01\x00\x83" + cbor2.dumps("y" * 64) + b"\xd8\x19\x00" * 2
    assert cbor2.loads(stringref) == ["y" * 64] * 3  # (cbor2 builds string references too)
    with pytest.raises(DecodeError, match="tag 256"):
        check_cbor(stringref, 65536)
    daemon = _Daemon(tmp_path, v2)
    try:
        v2.send_raw(_start_with_user_data(CYCLE))
        v2.send_raw(_start_with_user_data(_shared_dag(40), series_id=10))
        for m in _series(_frames(12, seed=2), "after-shared"):
            v2.send_raw(m)
        session = daemon.scan("after-shared-series1")
        assert session.ledger.received == 12, session.ledger.received
        assert daemon.running()
        said = daemon.errors("dectris_message_undecodable")
        assert sum("tag 28" in m for m in said) == 2, said
    finally:
        daemon.stop()
