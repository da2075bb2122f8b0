"""The daemon against producers that get things wrong in ways the fuzz does not reach: values
each valid alone whose consequence is what breaks (a canvas from streamed positions)."""

from __future__ import annotations

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import DeliveryError
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=2", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")


def test_streamed_positions_in_micrometres_are_refused_by_name_and_the_scan_goes_on(tmp_path):
    """Positions that stream with the frames declare no extent at scan_start. Sent in µm as
    metres (inside max_abs_position_m) they were spooled and acknowledged, then the worker asked
    NumPy for a 409 TiB canvas and the scan failed with "MemoryError: Unable to allocate": the
    frames before them were lost to the reconstruction and nothing named the positions."""
    scan = synthetic_scan(n_side=4, m=32)
    fields = scan.start_fields("microns", positions_m=None)  # neither positions nor raster: streamed
    daemon = start_daemon(tmp_path, *FAST)
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=60) as producer:
            producer.start_scan(**fields)
            producer.send_frames(scan.frames[:8], positions_m=scan.positions[:8])
            producer.send_frames(scan.frames[8:], positions_m=scan.positions[8:] * 1e6)
            with pytest.raises(DeliveryError) as info:
                producer.end_scan()
        said = str(info.value)
        assert "positions_m" in said and "memory_budget" in said and "are its positions or step in metres?" in said, said
        assert info.value.acknowledged == 8
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            done = wait_for(lambda: (r := ctl.call("receipt", scan_id="microns"))["state"] in ("finished", "failed")
                            and r, 120, "the scan to finish", daemon)
            assert done["state"] == "finished", done
        assert (tmp_path / "results" / "microns.h5").is_file()
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_a_raster_step_in_micrometres_is_refused_naming_the_scan_not_the_frame_count(tmp_path):
    """A raster of 100 frames with its step in µm as metres was refused as
    expected_frames/memory_budget: the user was sent to the frame count, which was right."""
    from cryoptycho.protocols.messages import RasterScan

    scan = synthetic_scan(n_side=4, m=32)
    fields = scan.start_fields("steps", positions_m=None, raster=RasterScan((4, 4), (2e-4, 2e-4)))
    daemon = start_daemon(tmp_path, *FAST)
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=60) as producer, \
                pytest.raises(DeliveryError) as info:
            producer.start_scan(**fields)
            producer.send_frames(scan.frames)
            producer.end_scan()
        said = str(info.value)
        assert "scan: " in said and "[rule memory_budget]" in said and "step in metres?" in said, said
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_a_probe_stack_sent_as_modes_is_refused_before_it_runs(tmp_path):
    """A (modes, M, M) probe is the incoherent modes of one probe; the option probe_modes stops
    at 16, the declared array did not: a stack of one probe per position was accepted with the
    memory estimate of one mode, and its worker ran 2000 modes for ever."""
    import numpy as np

    scan = synthetic_scan(n_side=5, m=32)  # 25 positions: 25 probes, more than 16 modes
    stack = (np.repeat(scan.probe[None], len(scan.frames), axis=0) / np.sqrt(len(scan.frames))).astype(np.complex64)
    daemon = start_daemon(tmp_path, *FAST)
    try:
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=60) as producer, \
                pytest.raises(DeliveryError) as info:
            producer.start_scan(**scan.start_fields("stack", probe=stack))
            producer.end_scan()
        said = str(info.value)
        assert "probe: the probe declares 25 modes, at most 16 are run" in said and "[rule probe_modes]" in said, said
        with Producer(daemon.ingest, control=daemon.control, send_timeout_s=60) as producer:  # the daemon goes on
            producer.start_scan(**scan.start_fields("single"))
            producer.send_frames(scan.frames)
            assert producer.end_scan().acknowledged == len(scan.frames)
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
