"""The daemon's sink for in-process sources: back-pressure, shutdown, and the ingest socket's
checks applied to what a source delivers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from cryoptycho.daemon.ingest import DirectIngest, check_chunks, check_direct
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import Frames, ProbeModelSpec, ScanEnd, ScanStart
from cryoptycho.protocols.sources import DetectorFrames, RawChunks, SinkClosed


def _start(scan_id: str = "s") -> ScanStart:
    return ScanStart(scan_id, 300e3, (8, 8), "uint16", 16, pixel_size_m=1e-10, probe_model=ProbeModelSpec(),
                     positions_m=np.zeros((16, 2)))


def _frames(n: int, scan_id: str = "s", side: int = 8) -> Frames:
    return Frames(scan_id, np.arange(n, dtype=np.uint32), np.zeros((n, side, side), np.uint16))


def test_put_waits_for_room_and_close_releases_it() -> None:
    sink = DirectIngest(capacity_frames=4)
    sink.put(_frames(3))
    outcome: list[object] = []

    def blocked() -> None:
        try:
            sink.put(_frames(3))
            outcome.append("put")
        except SinkClosed as exc:
            outcome.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    t.join(0.3)
    assert t.is_alive() and not outcome  # 3 + 3 frames > 4: it waits
    taken = sink.take(10)
    assert [len(m.indices) for m, _ in taken] == [3]
    t.join(10)
    assert outcome == ["put"]  # the room made by take() let it in
    sink.put(ScanEnd("s", 6))  # no frames: never waits
    t = threading.Thread(target=blocked)
    t.start()
    t.join(0.3)
    sink.close()
    t.join(10)
    assert isinstance(outcome[-1], SinkClosed)
    with pytest.raises(SinkClosed):
        sink.put(ScanEnd("s", 6))
    sink.release()


def test_a_source_s_messages_meet_the_ingest_socket_s_rules() -> None:
    limits, start = Limits(), _start()
    check_direct(start, limits, {})
    with pytest.raises(ProtocolError) as err:
        check_direct(start, limits, {"s": start})
    assert err.value.rule == "unique_scan"
    with pytest.raises(ProtocolError) as err:
        check_direct(_frames(2, "other"), limits, {"s": start})
    assert err.value.rule == "known_scan"
    with pytest.raises(ProtocolError) as err:
        check_direct(_frames(2, side=6), limits, {"s": start})
    assert err.value.field == "data"
    with pytest.raises(ProtocolError) as err:
        check_direct(object(), limits, {"s": start})
    assert err.value.rule == "known_type"
    check_direct(_frames(2), limits, {"s": start})
    chunk = RawChunks((8, 8), np.dtype(np.uint16), [b"x"])
    with pytest.raises(ProtocolError) as err:
        check_chunks(DetectorFrames(_frames(2), raw=chunk), start)
    assert err.value.rule == "chunk_count"
