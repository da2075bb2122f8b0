"""`cryoptycho dectris-sim` as a subprocess: a dataset file streamed as a DECTRIS detector would."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cryoptycho.daemon.storage.dataset import write_dataset
from cryoptycho.gpu.data import ProbeModel, PtychoData
from cryoptycho.protocols.dectris.bridge import BridgeConfig, bridge_messages
from cryoptycho.protocols.dectris.receiver import DectrisReceiver
from cryoptycho.protocols.dectris.schema import SeriesEnd
from cryoptycho.protocols.messages import Frames, ScanStart

pytestmark = pytest.mark.subprocess


@pytest.mark.parametrize("version", ["2", "1"])
def test_dataset_streamed_by_the_cli_reaches_a_receiver(tmp_path: Path, version: str) -> None:
    # V1 carries the pixel mask only with header_detail "all"
    rng = np.random.default_rng(0)
    frames = rng.poisson(3, (4, 16, 16)).astype(np.uint16)
    positions = rng.uniform(-1e-9, 1e-9, (4, 2))
    mask = np.ones((16, 16), np.uint8)
    mask[3, 4] = 0
    path = write_dataset(tmp_path / "scan.h5", PtychoData(
        frames=frames, positions=positions, energy=200e3, detector_pixel_angle=1.5e-3, mask=mask,
        probe_model=ProbeModel(semiangle=20e-3, defocus=1e-8, source_size=1e-10)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-sim", "--version", version,
         "--dataset", str(path), "--port", "0", "--compression", "lz4", "--header-detail", "all"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on (tcp://127\.0\.0\.1:\d+)", line)
        assert match, f"no endpoint announced: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        stop = threading.Event()
        timer = threading.Timer(300.0, stop.set)  # a safety net against a hung sender
        timer.start()
        got = []
        with DectrisReceiver(match.group(1), int(version)) as rx:
            for msg in rx.messages(stop):
                got.append(msg)
                if isinstance(msg, SeriesEnd):
                    break
        timer.cancel()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = list(bridge_messages(got, BridgeConfig()))
    start = out[0]
    assert isinstance(start, ScanStart)
    assert start.scan_id == "scan-series1" and start.energy_eV == 200e3  # header_appendix id + series
    assert start.detector_pixel_angle_rad == pytest.approx(1.5e-3)
    np.testing.assert_array_equal(start.positions_m, positions)
    np.testing.assert_array_equal(start.mask, mask)
    assert start.probe_model.semiangle_rad == 20e-3 and start.probe_model.defocus_m == 1e-8
    assert start.probe_model.source_size_m == 1e-10  # the source size the file states goes on
    data = np.concatenate([m.data for m in out if isinstance(m, Frames)])
    expected = frames.copy()
    expected[:, 3, 4] = 0  # masked pixels carry no counts
    np.testing.assert_array_equal(data, expected)
