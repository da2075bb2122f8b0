"""A sender's bitshuffle-LZ4 frames spooled as they arrived, through the real daemon: the spool
and the result file read back the frames sent, the spool compressed none of them again, and a
message whose bslz4 part is broken or contradicts its header is refused by name, nothing else lost."""

from __future__ import annotations

import signal
import struct

import h5py
import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with h5py)
import msgpack
import numpy as np
import pytest
import zmq
from cryoptycho.daemon.storage.spool import read_spool
from cryoptycho.protocols.compression import bslz4_compress
from cryoptycho.protocols.messages import ErrorEvent, Frames, ScanEvent, encode
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import metrics_of, start_daemon, synthetic_scan, wait_for, wait_subscribed

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=60")


def _broken(scan_id: str, frames: np.ndarray, lo: int, how: str) -> list[bytes]:
    """A bslz4 frames message for indices lo.. whose data part is cut short, or whose bslz4
    header declares one frame too few (the descriptor's nbytes kept true to the part)."""
    parts = [bytes(memoryview(p).cast("B")) for p in encode(Frames(scan_id, np.arange(lo, lo + len(frames), dtype=np.uint32),
                                                                    frames, None, "bslz4"))]
    header = msgpack.unpackb(parts[0])
    i = next(j for j, d in enumerate(header["arrays"]) if d["name"] == "data")
    blob = parts[1 + i]
    if how == "truncated":
        blob = blob[:-40]
    else:
        size, block = struct.unpack_from(">QI", blob)
        blob = struct.pack(">QI", size - frames[0].nbytes, block) + blob[12:]
    header["arrays"][i]["nbytes"] = len(blob)
    parts[0], parts[1 + i] = msgpack.packb(header), blob
    return parts


def test_bslz4_frames_are_spooled_as_received_and_broken_ones_refused_by_name(tmp_path) -> None:
    """Sent with the bslz4 codec, 64 frames a message: every spool chunk is the sender's bytes."""
    scan = synthetic_scan()  # 256 frames of 32×32 uint16: spool chunks of 64 frames, 16 bitshuffle blocks
    daemon = start_daemon(tmp_path, *FAST, "--set", "keep_spool=true")
    push = zmq.Context.instance().socket(zmq.PUSH)
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        push.connect(daemon.ingest)
        with Producer(daemon.ingest, control=daemon.control, compression="bslz4", batch_frames=64) as producer:
            producer.start_scan(**scan.start_fields("wire"))
            producer.send_frames(scan.frames[:128])
            # the broken messages come through another connection, which the daemon may read
            # first: they are sent once it holds the scan (else they name an unknown scan)
            assert producer.flush().acknowledged == 128
            for how in ("truncated", "declared_size"):
                push.send_multipart(_broken("wire", scan.frames[128:192], 128, how))
            rules = set()

            def refused() -> bool:
                ev = sub.recv(timeout_s=0.1)
                if isinstance(ev, ErrorEvent) and ev.scan_id == "wire":
                    assert ev.field == "arrays[1].data", ev
                    rules.add(ev.rule)
                return rules == {"decompress", "decoded_size"}

            wait_for(refused, 120, "both broken messages refused by name", daemon)
            producer.send_frames(scan.frames[128:])
            receipt = producer.end_scan()
        assert receipt.acknowledged == len(scan.frames)
        wait_for(lambda: (ev := sub.recv(timeout_s=0.2)) is not None and isinstance(ev, ScanEvent)
                 and ev.scan_id == "wire" and ev.event == "finished", 120, "the scan to finish", daemon)
        m = metrics_of(daemon)
        # every chunk came from the sender's bytes; none was compressed by the spool
        assert m.get("cryoptycho_spool_chunks_total{path=as_received}") == len(scan.frames) // 64, m
        assert not any(k.startswith("cryoptycho_spool_chunks_total") and "as_received" not in k and v
                       for k, v in m.items()), m
        assert m["cryoptycho_frames_received_total"] == len(scan.frames)
        assert m["cryoptycho_messages_rejected_total{rule=decompress}"] == 1
        assert m["cryoptycho_messages_rejected_total{rule=decoded_size}"] == 1
        spooled = read_spool(tmp_path / "spool" / "wire.spool.h5")
        np.testing.assert_array_equal(np.sort(spooled.indices), np.arange(len(scan.frames)))
        np.testing.assert_array_equal(spooled.frames, scan.frames[spooled.indices])
        with h5py.File(tmp_path / "spool" / "wire.spool.h5") as f:
            data = f["entry_1/data_1/data"]
            assert data.chunks[0] == 64
            for row in range(0, len(scan.frames), 64):  # the bytes HDF5's own filter would write
                assert data.id.read_direct_chunk((row, 0, 0))[1] == bslz4_compress(spooled.frames[row:row + 64])
        with h5py.File(tmp_path / "results" / "wire.h5") as f:
            raw = f["raw/entry_1/data_1"]
            np.testing.assert_array_equal(raw["frame_index"][()], spooled.indices)
            np.testing.assert_array_equal(raw["data"][()], spooled.frames)
        # the counter's other side: frames sent raw are compressed by the spool, and counted so
        with Producer(daemon.ingest, control=daemon.control, batch_frames=64) as producer:
            producer.start_scan(**scan.start_fields("raw"))
            producer.send_frames(scan.frames)
            producer.end_scan()
        m = metrics_of(daemon)
        assert m.get("cryoptycho_spool_chunks_total{path=not_bslz4}") == len(scan.frames) // 64, m
        assert m["cryoptycho_spool_chunks_total{path=as_received}"] == len(scan.frames) // 64
        sub.close()
        assert daemon.stop() == 0
    finally:
        push.close(linger=0)
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)

