"""Stream V1 against a third-party implementation: LiberTEM's Rust receiver and mock sender
(PyPI ``libertem-dectris``), so our V1 encoder and decoder are not only checked against each other."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.protocols.dectris.decode import V1_CHANNEL
from cryoptycho.protocols.dectris.receiver import DectrisReceiver
from cryoptycho.protocols.dectris.schema import Image, SeriesEnd, SeriesStart
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries

ld = pytest.importorskip("libertem_dectris")


# LiberTEM decodes only compressed V1 images ("<" is "unknown or unsupported encoding" there)
@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
def test_libertem_receiver_decodes_our_v1_sender(tmp_path: Path, compression: str) -> None:
    frames = np.random.default_rng(0).poisson(3, (8, 32, 48)).astype(np.uint16)
    with SimSender(1) as sender:
        handle = str(tmp_path / "shm.sock")
        conn = ld.DectrisConnection(uri=sender.endpoint, frame_stack_size=4, handle_path=handle,
                                    num_slots=64, bytes_per_frame=frames[0].nbytes, huge=False)
        try:
            conn.start_passive(timeout=5)
            thread = threading.Thread(target=sender.send_series,
                                      args=(SimSeries(frames, compression=compression),), daemon=True)
            thread.start()
            armed = conn.wait_for_arm(10)
            assert armed is not None, "LiberTEM saw no dheader from our sender"
            client = ld.CamClient(handle)
            got = []
            while sum(len(g) for g in got) < len(frames):
                stack = conn.get_next_stack(max_size=4)
                assert stack is not None
                out = np.zeros((len(stack), *stack.get_shape()), dtype=stack.get_dtype_string())
                client.decode_range_into_buffer(stack, out, 0, len(stack))
                client.done(stack)
                got.append(out)
            client.close()
            thread.join(10)
        finally:
            conn.close()
    np.testing.assert_array_equal(np.concatenate(got).reshape(frames.shape), frames)


def test_our_v1_receiver_decodes_the_libertem_mock_sender() -> None:
    # LiberTEM's sender splits the global header into separate messages and writes zeroed
    # bitshuffle headers: both quirks of real-world V1 senders.
    sim = ld.DectrisSim.new_mocked("tcp://127.0.0.1", 5, random_port=True)
    errors: list[Exception] = []
    got: list = []
    with DectrisReceiver(sim.get_uri(), 1, on_error=errors.append) as rx:
        def send() -> None:
            sim.send_headers()
            sim.send_frames()
            sim.send_footer()

        threading.Thread(target=send, daemon=True).start()
        stop = threading.Event()
        timer = threading.Timer(300.0, stop.set)  # a safety net against a silent sender
        timer.start()
        for msg in rx.messages(stop):
            got.append(msg)
            if isinstance(msg, SeriesEnd):
                break
        timer.cancel()
    assert not errors
    start, *images, end = got
    assert isinstance(start, SeriesStart) and isinstance(end, SeriesEnd)
    assert start.header_detail == "basic" and start.number_of_images == 5
    assert [i.image_id for i in images] == list(range(5))
    assert all(isinstance(i, Image) and i.data[V1_CHANNEL].shape == start.image_shape for i in images)
    assert start.saturation_value == 3825  # the mock's countrate_correction_count_cutoff


def _libertem_dump(path: Path, series: int, frames: np.ndarray) -> None:
    """A LiberTEM "zeromq dump" file (per ZeroMQ part: little-endian i64 size, then its bytes)
    of one Stream V1 series as a DCU sends it, the pixel data compressed by bitshuffle itself
    (not by our codec), for ``DectrisSim(uri, filename)`` to send."""
    import json
    import struct

    import bitshuffle

    n, side, _ = frames.shape
    config = {"beam_center_x": side / 2, "beam_center_y": side / 2, "bit_depth_image": 16, "bit_depth_readout": 16,
              "compression": "bslz4", "countrate_correction_count_cutoff": 60000, "description": "a file-fed sender",
              "detector_distance": 0.0, "nimages": 1, "ntrigger": n, "trigger_mode": "exte",
              "x_pixel_size": 5.5e-5, "y_pixel_size": 5.5e-5, "x_pixels_in_detector": side, "y_pixels_in_detector": side}

    def part(b: bytes | dict) -> bytes:
        b = json.dumps(b).encode() if isinstance(b, dict) else b
        return struct.pack("<q", len(b)) + b

    with open(path, "wb") as f:
        f.write(part({"htype": "dheader-1.0", "header_detail": "basic", "series": series}))
        f.write(part(config))
        for i, frame in enumerate(frames):
            f.write(part({"htype": "dimage-1.0", "series": series, "frame": i, "hash": ""}))
            f.write(part({"htype": "dimage_d-1.0", "shape": [side, side], "type": "uint16", "encoding": "bs16-lz4<"}))
            f.write(part(struct.pack(">QI", frame.nbytes, 8192) + bitshuffle.compress_lz4(frame, 0).tobytes()))
            f.write(part({"htype": "dconfig-1.0", "start_time": i, "stop_time": i + 1, "real_time": 1}))


@pytest.mark.subprocess
def test_libertem_file_sender_streams_into_the_daemon_bit_for_bit(tmp_path: Path) -> None:
    """LiberTEM's Rust sender fed from a recorded file (not its mock: real bitshuffle headers,
    our frames) into `serve --source dectris1://…`; the spool holds every frame as sent, read
    back by h5py + hdf5plugin. Field QA of fieldqa9 (4,096 frames of 64² and 192² held too)."""
    import h5py
    import hdf5plugin  # noqa: F401 - filter 32008 for h5py
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, wait_for

    yy, xx = np.mgrid[:32, :32] - 16
    frames = np.random.default_rng(3).poisson(np.where(yy**2 + xx**2 <= 40, 3.0, 0.05), (64, 32, 32)).astype(np.uint16)
    dump = tmp_path / "series.dump"
    _libertem_dump(dump, 5, frames)
    sim = ld.DectrisSim("tcp://127.0.0.1", str(dump), random_port=True)
    daemon = start_daemon(tmp_path, "--source", "dectris1://" + sim.get_uri().split("//", 1)[1],
                          "--set", "dectris.energy_eV=300000", "--set", "dectris.detector_pixel_angle_rad=1e-3",
                          "--set", "dectris.raster.shape=[8, 8]", "--set", "dectris.raster.step_m=[2e-10, 2e-10]",
                          "--set", "keep_spool=true", "--set", "options.iterations=2",
                          "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")
    try:
        threading.Thread(target=lambda: (sim.send_headers(), sim.send_frames(), sim.send_footer()), daemon=True).start()
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            scan = wait_for(lambda: next((s for s in ctl.list_scans() if s["state"] in ("finished", "failed", "aborted")),
                                         None), 120, "the series' scan to end", daemon)
        assert scan["frames"]["received"] == 64 and scan["frames"]["duplicates"] == 0, scan
        assert scan["state"] == "finished", daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
    with h5py.File(tmp_path / "spool" / f"{scan['scan_id']}.spool.h5") as f:
        group = f["entry_1/data_1"]
        order = np.argsort(group["frame_index"][()])
        np.testing.assert_array_equal(group["frame_index"][()][order], np.arange(64))
        np.testing.assert_array_equal(group["detector_frames"][()][order], frames)
        meta = json.loads(f["scan"].attrs["json"])["metadata"]
    assert (meta["stream_version"], meta["series_id"], meta["detector"]) == (1, 5, "a file-fed sender")
