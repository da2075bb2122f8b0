"""Stream V1 against a third-party implementation: LiberTEM's Rust receiver and mock sender
(PyPI ``libertem-dectris``), so our V1 encoder and decoder are not only checked against each other."""

from __future__ import annotations

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
