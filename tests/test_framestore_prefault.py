"""The frame store's prefaulter (gpu/framestore.py ``FrameStore.start_prefault``): a thread that
faults a fresh store's memory in ahead of the appends. What is checked: frames appended while it
runs are stored byte for byte, the appends never wait for it (they overtake it while it is held
inside a system call), it stops when asked (the scan's end, abort or the daemon's stop) and when
the store grows, and an exception in it is reported (logged and kept), not swallowed. No timing.
"""

from __future__ import annotations

import errno
import logging
import sys
import threading

import numpy as np
import pytest
from cryoptycho.gpu import framestore
from cryoptycho.gpu.framestore import FrameStore
from cryoptycho.gpu.operators import from_fft_order
from daemon_support import wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory on Linux only")

SIDE = 96
THREAD = "frame-store-prefault"


@pytest.fixture(autouse=True)
def fresh_pool():
    """Every store here starts in fresh memory: the process-wide pool may hold idle mappings or a
    warm reserve left by earlier tests (a daemon in this process keeps its stores' memory), and a
    store made from them starts with rows in memory already."""
    keep = framestore.MAPPINGS.set_keep_bytes(0)
    warm = framestore.MAPPINGS.warm_bytes()
    framestore.MAPPINGS.set_warm_bytes(0)
    yield
    framestore.MAPPINGS.set_keep_bytes(keep)
    framestore.MAPPINGS.set_warm_bytes(warm)


class _Gate:
    """Wraps ``_populate_write``: the prefaulter's calls wait for ``go`` before faulting memory in
    (or raise ``fail``); the appends' calls go straight through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: BaseException | None = None) -> None:
        self.real = framestore._populate_write
        self.entered = threading.Event()
        self.go = threading.Event()
        self.fail = fail
        self.calls = 0
        monkeypatch.setattr(framestore, "_populate_write", self)

    def __call__(self, address: int, nbytes: int) -> None:
        if threading.current_thread().name == THREAD:
            self.calls += 1
            self.entered.set()
            if self.fail is not None:
                raise self.fail
            self.go.wait(60)  # a deadline only for a broken test: the test sets it
        self.real(address, nbytes)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, size=(n, SIDE, SIDE), dtype=np.uint16)


def _append(store: FrameStore, frames: np.ndarray, start: int, stop: int, batch: int) -> None:
    for lo in range(start, stop, batch):
        hi = min(lo + batch, stop)
        store.append(frames[lo:hi], np.zeros((hi - lo, 2)))


def _assert_intact(store: FrameStore, frames: np.ndarray) -> None:
    assert store.n == len(frames)
    stored = from_fft_order(store.frames[: store.n])  # FFT order back to detector order
    assert stored.dtype == np.uint16 and np.array_equal(stored, frames)


def test_frames_appended_while_the_prefaulter_runs_are_intact(monkeypatch):
    monkeypatch.setattr(framestore, "_PREFAULT_STEP_BYTES", 16 * SIDE * SIDE * 2)  # 16 rows a call
    gate = _Gate(monkeypatch)
    frames = _frames(1024)
    store = FrameStore((SIDE, SIDE), np.uint16, len(frames))
    _append(store, frames, 0, 64, 64)
    assert store.start_prefault()
    assert gate.entered.wait(60)
    # held inside its first call: the appends overtake it, faulting their own rows in
    _append(store, frames, 64, 512, 50)
    assert store.prefaulting and gate.calls == 1
    gate.go.set()
    # free-running now: appends and prefaulter fault the same region concurrently
    _append(store, frames, 512, 768, 7)
    wait_for(lambda: not store.prefaulting, 60, "the prefaulter to reach the store's end")
    assert store.prefault_error is None
    # it went on from where the appends were, not from its own first rows: nothing behind them
    assert store._populated == store.capacity
    # the rows no append had reached were its: at least [768, 1024)
    assert 256 <= store.prefaulted_rows <= 1024 - 512
    _append(store, frames, 768, 1024, 64)
    _assert_intact(store, frames)


def test_prefaulter_stops_when_asked_and_the_appends_go_on(monkeypatch):
    monkeypatch.setattr(framestore, "_PREFAULT_STEP_BYTES", 16 * SIDE * SIDE * 2)
    gate = _Gate(monkeypatch)
    frames = _frames(512, seed=1)
    store = FrameStore((SIDE, SIDE), np.uint16, len(frames))
    _append(store, frames, 0, 32, 32)
    assert store.start_prefault()
    assert gate.entered.wait(60)
    assert store.stop_prefault(timeout=0) is False  # still inside its call: asked, not ended
    gate.go.set()
    assert store.stop_prefault() is True
    assert not store.prefaulting and not store._prefault_thread.is_alive()
    assert gate.calls == 1  # it made no call after it was asked to stop
    assert store._populated == 32 + 16  # the rows of the call it was in, no more
    _append(store, frames, 32, 512, 100)
    _assert_intact(store, frames)


def test_prefault_error_is_reported_and_the_store_still_works(monkeypatch, caplog):
    injected = OSError(errno.ENOMEM, "injected: the kernel refused to populate")
    gate = _Gate(monkeypatch, fail=injected)
    frames = _frames(256, seed=2)
    store = FrameStore((SIDE, SIDE), np.uint16, len(frames))
    _append(store, frames, 0, 16, 16)
    with caplog.at_level(logging.WARNING, logger="cryoptycho.gpu.framestore"):
        assert store.start_prefault()
        wait_for(lambda: not store.prefaulting, 60, "the failing prefaulter to end")
    assert store.prefault_error is injected
    assert any("prefault" in r.getMessage() and "injected" in r.getMessage() and "Traceback" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert gate.calls == 1
    _append(store, frames, 16, 256, 60)  # the appends fault their own rows in
    _assert_intact(store, frames)


def test_prefaulter_stops_when_the_store_grows(monkeypatch):
    monkeypatch.setattr(framestore, "_PREFAULT_STEP_BYTES", 16 * SIDE * SIDE * 2)
    gate = _Gate(monkeypatch)
    frames = _frames(300, seed=3)
    store = FrameStore((SIDE, SIDE), np.uint16, 200)  # more frames come than were declared
    _append(store, frames, 0, 20, 20)
    assert store.start_prefault()
    assert gate.entered.wait(60)
    _append(store, frames, 20, 300, 70)  # grows past 200: a new mapping
    assert store.reallocations == 1
    gate.go.set()
    assert store.stop_prefault() is True
    assert gate.calls == 1  # the old mapping's call only: it did not go on in either mapping
    _assert_intact(store, frames)


def test_prefault_bounds_and_what_has_nothing_to_fault_in(monkeypatch):
    gate = _Gate(monkeypatch)
    gate.go.set()
    row = SIDE * SIDE * 2
    store = FrameStore((SIDE, SIDE), np.uint16, 1024)
    store.append(_frames(8), np.zeros((8, 2)))
    assert store.start_prefault(limit_bytes=100 * row)  # the memory budget bounds it
    wait_for(lambda: not store.prefaulting, 60, "the prefaulter to reach its bound")
    assert store._populated == 100 and store.prefaulted_rows == 92
    assert not store.start_prefault(limit_bytes=50 * row)  # those rows are in memory already
    # a store under a mapping's size is ordinary heap memory: nothing of its own to fault in
    small = FrameStore((SIDE, SIDE), np.uint16, 8)
    assert not small.start_prefault() and not small.prefaulting


def _service(tmp_path):  # type: ignore[no-untyped-def]
    """An in-process service for one short scan: one iteration, a 1 s refinement, HDF5 results."""
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService

    return BackgroundService(ServiceConfig(
        ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", metrics_enabled=False,
        spool_dir=tmp_path / "spool", results_dir=tmp_path / "results", refine_time_budget_s=1,
        resolution_interval_s=0, drain_timeout_s=5, output_formats=("h5",), options={"iterations": 1}))


@pytest.mark.parametrize("ending", ["scan_end", "cancel", "daemon_stop"])
def test_daemon_scan_prefaults_its_store_and_the_thread_ends_with_the_scan(tmp_path, monkeypatch, ending):
    """Through the service (in this process): a scan that declared 4,096 frames of 96×96 gets a
    prefaulter after its first frames; it is held inside its first call, and whichever way the
    scan ends (its end, a cancel, the daemon's stop) the worker stops it and it ends having
    faulted in no more than that call; the frames it ran beside are stored intact."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import PIXEL_M, synthetic_scan

    gate = _Gate(monkeypatch)
    stopped: list[tuple[FrameStore, np.ndarray]] = []
    real_stop = FrameStore.stop_prefault

    def stop_prefault(self: FrameStore, timeout: float | None = 5.0) -> bool:
        stopped.append((self, from_fft_order(self.frames[: self.n])))
        gate.go.set()  # the worker asked: the held call may finish, and the thread must end
        return real_stop(self, timeout)

    monkeypatch.setattr(FrameStore, "stop_prefault", stop_prefault)
    scan = synthetic_scan(n_side=8, m=SIDE)
    declared = 4096
    iy, ix = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    positions = np.stack([iy.ravel(), ix.ravel()], 1) * 3.0 * PIXEL_M
    bg = _service(tmp_path)
    ctl = ControlClient(bg.service.endpoints["control"], timeout_s=10)
    stopped_daemon = False
    try:
        p = Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"], send_timeout_s=60)
        p.start_scan(**scan.start_fields("pf", expected_frames=declared, positions_m=positions))
        p.send_frames(scan.frames)
        p.flush()
        assert gate.entered.wait(60), "no prefaulter started for the scan's store"
        assert not stopped  # running (held) while the scan is
        if ending == "scan_end":
            p.end_scan()
        elif ending == "cancel":
            ctl.cancel("pf", "test")
        else:
            bg.stop()
            stopped_daemon = True
        wait_for(lambda: stopped, 60, "the worker to stop the prefaulter")
        store, held = stopped[0]
        wait_for(lambda: not store.prefaulting, 60, "the prefaulter thread to end")
        assert store.prefault_error is None and gate.calls == 1
        step = framestore._PREFAULT_STEP_BYTES // store.frames[0].nbytes  # (uint8 rows: the counts fit)
        # its one call (from the end of the first frames' rows, at most all 64), not the rest
        assert len(scan.frames) <= store._populated <= len(scan.frames) + step < declared
        assert np.array_equal(held, scan.frames)
        p.close()
    finally:
        ctl.close()
        if not stopped_daemon:
            bg.stop()


@pytest.mark.parametrize("fails", [False, True])
def test_a_prefaulted_store_gives_its_memory_back_to_the_pool(monkeypatch, fails):
    """Once the prefaulter has ended (done or failed) and the store is gone, its mapping is idle
    and the next store of that size reuses it, without a garbage collection: the thread keeps no
    reference to the store or its memory (a kept exception keeps no traceback)."""
    gate = _Gate(monkeypatch, fail=OSError(errno.ENOMEM, "injected") if fails else None)
    gate.go.set()
    framestore.MAPPINGS.set_keep_bytes(64 << 20)  # (the fixture puts the bound back)
    stores = [FrameStore((SIDE, SIDE), np.uint16, 512)]
    stores[0].append(_frames(8), np.zeros((8, 2)))
    assert stores[0].start_prefault()
    wait_for(lambda: not stores[0].prefaulting, 60, "the prefaulter to end")
    assert (stores[0].prefault_error is not None) == fails
    assert fails or stores[0]._populated == 512
    stores.clear()
    reused = framestore.MAPPINGS.reused
    again = FrameStore((SIDE, SIDE), np.uint16, 512)
    assert framestore.MAPPINGS.reused == reused + 1
    # the memory the prefaulter faulted in comes with it: no row to fault in again
    assert again._populated == (8 if fails else 512)


def test_a_prefaulter_that_cannot_start_leaves_the_scan_to_finish(tmp_path, monkeypatch, caplog):
    """The prefaulter is an optimisation: when its thread cannot start (no thread left in the
    OS) the scan's worker logs it and the scan finishes with every frame (it failed the scan)."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan

    def no_thread(self: FrameStore, limit_bytes: int | None = None) -> bool:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(FrameStore, "start_prefault", no_thread)
    scan = synthetic_scan(n_side=8, m=SIDE)
    bg = _service(tmp_path)
    ctl = ControlClient(bg.service.endpoints["control"], timeout_s=10)
    try:
        with caplog.at_level("WARNING", logger="cryoptycho"):
            p = Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"], send_timeout_s=60)
            p.start_scan(**scan.start_fields("nothread"))
            p.send_frames(scan.frames)
            p.flush()
            p.end_scan()

            def ended() -> bool:
                return ctl.call("receipt", scan_id="nothread").get("state") in ("finished", "failed")
            wait_for(ended, 120, "the scan to end")
        receipt = ctl.call("receipt", scan_id="nothread")
        assert receipt["state"] == "finished", receipt
        assert "frame store prefault not started" in caplog.text
        p.close()
    finally:
        ctl.close()
        bg.stop()
