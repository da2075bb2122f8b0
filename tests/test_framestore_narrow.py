"""A narrow frame store (FrameStore(narrow=True)): unsigned frames whose counts fit a byte are
held as uint8, and the first count over 255 widens the store to the declared dtype once, every
row kept; the live engine's results do not depend on which the store holds."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from cryoptycho.gpu import framestore, operators
from cryoptycho.gpu.framestore import NARROW_MAX, FrameStore
from cryoptycho.gpu.geometry import fit_geometry
from cryoptycho.gpu.operators import from_fft_order
from cryoptycho.gpu.options import ReconOptions
from cryoptycho.gpu.probes import make_probe
from cryoptycho.gpu.stream import StreamingReconstructor

SIDE = 32
PIXEL = 1e-10


@pytest.fixture
def mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every host store gets a mapping of its own (the daemon's are ≥ 1 MiB; these are small)."""
    monkeypatch.setattr(framestore, "_MAP_BYTES", 1)


def _low(n: int, seed: int = 0, top: int = NARROW_MAX, dtype: type = np.uint16) -> np.ndarray:
    frames = np.random.default_rng(seed).poisson(0.5, (n, SIDE, SIDE)).astype(dtype)
    frames[0, 3, 4] = top  # the batch's largest count, exactly
    return frames


def _append(store: FrameStore, frames: np.ndarray, batch: int, peak: bool) -> None:
    for lo in range(0, len(frames), batch):
        part = frames[lo:lo + batch]
        store.append(part, np.zeros((len(part), 2)), peak=int(part.max()) if peak else None)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("peak", [True, False])
def test_counts_up_to_255_are_held_as_uint8_with_their_values(mapped, dtype: type, peak: bool) -> None:
    frames = _low(200, top=NARROW_MAX, dtype=dtype)
    store = FrameStore((SIDE, SIDE), dtype, 256, narrow=True)
    _append(store, frames, 64, peak)
    assert store.narrow and store.frames.dtype == np.uint8 and store.dtype == dtype and store.widenings == 0
    np.testing.assert_array_equal(from_fft_order(store.frames[:200]), frames)
    assert store.nbytes < FrameStore((SIDE, SIDE), dtype, 256).nbytes  # half the rows' bytes or less
    assert store.raw_nbytes == 200 * SIDE * SIDE * np.dtype(dtype).itemsize  # (the frames' own dtype)


@pytest.mark.parametrize("peak", [True, False])
@pytest.mark.parametrize("top", [NARROW_MAX + 1, 65535])
def test_the_first_count_over_255_widens_the_store_once_keeping_every_row(mapped, peak: bool, top: int) -> None:
    first = _low(150, seed=1)
    over = _low(40, seed=2, top=top)
    later = _low(60, seed=3, top=300)
    store = FrameStore((SIDE, SIDE), np.uint16, 256, narrow=True)
    _append(store, first, 64, peak)
    assert store.narrow
    _append(store, over, 64, peak)
    assert not store.narrow and store.frames.dtype == np.uint16 and store.widenings == 1
    _append(store, later, 64, peak)
    assert store.widenings == 1 and store.reallocations == 0
    np.testing.assert_array_equal(from_fft_order(store.frames[:250]), np.concatenate([first, over, later]))


def test_growth_keeps_a_narrow_store_narrow_and_a_widened_one_wide(mapped) -> None:
    frames = _low(100, seed=4)
    store = FrameStore((SIDE, SIDE), np.uint16, 16, narrow=True, growth=2.0)
    _append(store, frames, 24, True)
    assert store.reallocations > 0 and store.narrow
    more = _low(100, seed=5, top=1000)
    _append(store, more, 24, True)
    assert not store.narrow and store.widenings == 1
    np.testing.assert_array_equal(from_fft_order(store.frames[:200]), np.concatenate([frames, more]))


def test_only_host_unsigned_frames_wider_than_a_byte_in_a_mapping_are_held_narrow(monkeypatch) -> None:
    low = _low(8, dtype=np.uint8)
    assert not FrameStore((SIDE, SIDE), np.uint16, 8).narrow  # not asked
    assert not FrameStore((SIDE, SIDE), np.uint16, 8, narrow=True).narrow  # 8 KiB: no mapping of its own
    monkeypatch.setattr(framestore, "_MAP_BYTES", 1)
    for dtype in (np.uint8, np.int16, np.int32, np.float32):
        store = FrameStore((SIDE, SIDE), dtype, 8, narrow=True)
        assert not store.narrow and store.frames.dtype == dtype
    store = FrameStore((SIDE, SIDE), np.uint16, 8, narrow=True)
    store.append(low, np.zeros((8, 2)))  # uint8 frames: nothing to measure, they fit
    assert store.narrow
    np.testing.assert_array_equal(from_fft_order(store.frames[:8]), low)


class _HeldPrefaulter:
    """Wraps ``_populate_write``: each prefaulter call waits until ``go`` is set or the store
    asks its prefaulter to stop; the appends' calls go straight through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = framestore._populate_write
        self.store: FrameStore | None = None
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls = 0
        monkeypatch.setattr(framestore, "_populate_write", self)

    def __call__(self, address: int, nbytes: int) -> None:
        if threading.current_thread().name == "frame-store-prefault":
            self.calls += 1
            self.entered.set()
            deadline = time.monotonic() + 60  # only for a broken test
            while not (self.go.is_set() or self.store._prefault_stop.is_set()) and time.monotonic() < deadline:
                time.sleep(0.001)
        self.real(address, nbytes)


def test_widening_while_the_prefaulter_runs_starts_it_again_on_the_wide_store(mapped, monkeypatch) -> None:
    gate = _HeldPrefaulter(monkeypatch)
    monkeypatch.setattr(framestore, "_PREFAULT_STEP_BYTES", 16 * SIDE * SIDE)  # several calls
    capacity = 400
    store = gate.store = FrameStore((SIDE, SIDE), np.uint16, capacity, narrow=True)
    first = _low(50, seed=6)
    store.append(first, np.zeros((50, 2)))
    assert store.start_prefault()
    assert gate.entered.wait(60)  # held inside its first call
    over = _low(50, seed=7, top=NARROW_MAX + 1)
    store.append(over, np.zeros((50, 2)))  # widens: stops the prefaulter, then starts it again
    assert store.widenings == 1 and not store.narrow
    assert store.prefaulting  # the new one, on the wide store (held by the gate until go)
    gate.go.set()
    deadline = time.monotonic() + 60
    while store.prefaulting and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not store.prefaulting and store.prefault_error is None
    assert store._populated == capacity  # the wide store's rows, all of them, by the new thread
    np.testing.assert_array_equal(from_fft_order(store.frames[:100]), np.concatenate([first, over]))


def _scan(rng: np.random.Generator, top: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 10×10 raster of low-dose frames (≈ 300 counts a pattern; ``top`` put in one pixel of
    one frame, if given), its positions and the probe."""
    probe = make_probe("defocused", (SIDE, SIDE), PIXEL, semiangle=8e-3, defocus=80e-9,
                       total_intensity=300.0, precision="double")
    ys, xs = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], -1) * 3.3 * PIXEL
    geo = fit_geometry(pos, PIXEL, (SIDE, SIDE), margin_px=2)
    obj = np.exp(1j * 0.3 * rng.standard_normal(geo.object_shape))
    batch = operators.make_batch(geo.to_pixels(pos), geo.object_shape, (SIDE, SIDE))
    counts = rng.poisson(np.abs(operators.forward(obj, probe, batch)) ** 2)
    frames = operators.from_fft_order(counts).astype(np.uint16)
    if top is not None:
        frames[60, 5, 5] = top
    return frames, pos, probe


@pytest.mark.parametrize("top", [None, NARROW_MAX + 45])
def test_the_engine_gives_the_same_results_from_a_narrow_store(monkeypatch, top: int | None) -> None:
    """Frames streamed in, steps between them, then a full-batch refinement: object, probe and
    losses bit for bit those of an engine whose store holds the frames' own dtype (a count
    over 255 in the middle of the scan: widened there)."""
    frames, pos, probe = _scan(np.random.default_rng(8), top)
    assert frames.max() <= NARROW_MAX or top is not None
    opts = ReconOptions(backend="numpy", init="ones", refine_probe=True, prior="tikhonov", mu0=1e-3,
                        stream={"batch_size": 16, "probe_warmup_steps": 2})
    results = []
    for map_bytes in (1 << 40, 1):  # no mapping (own dtype), then a mapping for every store (narrow)
        monkeypatch.setattr(framestore, "_MAP_BYTES", map_bytes)
        engine = StreamingReconstructor(frame_shape=(SIDE, SIDE), frame_dtype=np.uint16, pixel_size=PIXEL,
                                        probe=probe, options=opts, expected_frames=len(frames))
        losses = []
        for lo in range(0, len(frames), 20):
            engine.add_frames(frames[lo:lo + 20], pos[lo:lo + 20])
            losses += [float(engine.step().loss) for _ in range(3)]
        losses += engine.refine(3)
        store = engine.frame_store
        results.append((store.frames.dtype, store.widenings, np.asarray(engine.obj).copy(),
                        np.asarray(engine.probe).copy(), losses))
    (wide_dtype, _, obj_a, probe_a, loss_a), (narrow_dtype, widened, obj_b, probe_b, loss_b) = results
    assert wide_dtype == np.uint16
    assert (narrow_dtype, widened) == ((np.uint8, 0) if top is None else (np.uint16, 1))
    np.testing.assert_array_equal(obj_b, obj_a)
    np.testing.assert_array_equal(probe_b, probe_a)
    assert loss_b == loss_a


def _wait_prefault_end(store: FrameStore) -> None:
    deadline = time.monotonic() + 120  # only for a broken test
    while store.prefaulting and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not store.prefaulting and store.prefault_error is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
def test_a_widening_after_the_prefaulter_finished_prefaults_the_wide_store_too(mapped) -> None:
    """The prefaulter that faulted in every narrow row before the first count over 255 came
    goes on in the wide store (whose rows past the copy are fresh memory): the appends after
    the widening do not fault their own rows in; one stopped on purpose is not started again."""
    capacity = 400
    for stopped in (False, True):
        store = FrameStore((SIDE, SIDE), np.uint16, capacity, narrow=True)
        store.append(_low(10, seed=9), np.zeros((10, 2)))
        assert store.start_prefault()
        _wait_prefault_end(store)
        assert store._populated == capacity and store.narrow
        if stopped:
            assert store.stop_prefault()
        store.append(_low(10, seed=10, top=NARROW_MAX + 1), np.zeros((10, 2)))
        assert store.widenings == 1 and not store.narrow
        _wait_prefault_end(store)
        assert store._populated == (20 if stopped else capacity)


@pytest.fixture
def warm_pool(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> framestore.MappingPool:
    """A pool of its own (keeping no mapping, or keeping them: the daemon's reuse bytes) with
    a warm reserve of 8 MiB."""
    pool = framestore.MappingPool(keep_bytes=getattr(request, "param", 0))
    monkeypatch.setattr(framestore, "MAPPINGS", pool)
    pool.set_warm_bytes(8 << 20)
    yield pool
    pool.set_warm_bytes(0)
    pool.set_keep_bytes(0)


_WARM = 8 << 20
_M, _N = 64, 300  # one 4 KiB page a narrow row, 1.2 MiB narrow: a mapping of its own by default


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm reserve is Linux's")
@pytest.mark.parametrize("warm_pool", [0, 64 << 20], indirect=True)
def test_a_store_widened_by_its_first_frames_spends_only_its_own_bytes_of_the_warm_reserve(warm_pool) -> None:
    """A scan whose first frames hold a count over 255 (most scans above low dose): the narrow
    rows it never held give their pages of the warm reserve back, so that the wide store takes
    them (it was left a third short of a uint16 store's pages, faulted in on the ingest thread)."""
    pool = warm_pool
    rng = np.random.default_rng(11)
    frames = rng.poisson(40.0, (_N, _M, _M)).astype(np.uint16)
    frames[0, 1, 2] = 400
    store = FrameStore((_M, _M), np.uint16, _N, narrow=True)
    assert store.narrow and pool.warm_bytes() == _WARM - _N * _M * _M
    store.append(frames[:50], np.zeros((50, 2)))
    assert store.widenings == 1 and not store.narrow
    assert pool.warm_bytes() == _WARM - 2 * _N * _M * _M  # the wide store's pages, no more
    assert store._populated == _N  # all of them from the reserve: no append faults its rows in
    store.append(frames[50:], np.zeros((_N - 50, 2)))
    np.testing.assert_array_equal(from_fft_order(store.frames[:_N]), frames)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm reserve is Linux's")
def test_a_widened_stores_narrow_rows_refill_the_warm_reserve_unless_a_view_holds_them(warm_pool) -> None:
    """Widened after rows came: the narrow rows' pages go back to the warm reserve (up to its
    size) once copied — unless an array over them is alive (a parallax fit's view), which
    keeps reading the rows it had."""
    pool = warm_pool
    row8 = _M * _M
    for viewed in (False, True):
        pool.set_warm_bytes(0)
        pool.set_warm_bytes(_WARM)
        low = _low(100, seed=12).repeat(2, axis=1).repeat(2, axis=2)  # (100, 64, 64)
        store = FrameStore((_M, _M), np.uint16, _N, narrow=True)
        store.append(low, np.zeros((100, 2)))
        view = store.frames[:100:3] if viewed else None
        store.append(np.full((1, _M, _M), NARROW_MAX + 1, np.uint16), np.zeros((1, 2)))
        assert store.widenings == 1
        spent = _N * row8 + _N * 2 * row8  # the narrow store's, then the wide store's pages
        assert pool.warm_bytes() == _WARM - spent + (0 if viewed else _N * row8)
        if viewed:
            np.testing.assert_array_equal(from_fft_order(view), low[::3])
        np.testing.assert_array_equal(from_fft_order(store.frames[:100]), low)
        del view


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
@pytest.mark.parametrize("before_widening", [0, 100])
def test_scans_widened_by_counts_over_255_reuse_the_last_ones_wide_memory(monkeypatch, before_widening: int) -> None:
    """Scans above low dose one after the other, with a pool whose bound holds a wide (uint16)
    store but not the narrow rows beside it (the daemon's 4 GiB: a 2.7–4 GiB store): from the
    second scan on, no store maps or faults in fresh memory — the wide mapping is kept (not the
    narrow one), and a store that finds it takes it in its own dtype, with nothing to widen.
    Before, every scan mapped its wide store afresh and faulted it in on the appending thread."""
    row8 = _M * _M
    pool = framestore.MappingPool(keep_bytes=5 * _N * row8 // 2)
    monkeypatch.setattr(framestore, "MAPPINGS", pool)
    rng = np.random.default_rng(13)
    try:
        for scan in range(3):
            frames = rng.poisson(0.5, (_N, _M, _M)).astype(np.uint16)
            frames[before_widening, 7, 9] = 300 + scan
            store = FrameStore((_M, _M), np.uint16, _N, narrow=True)
            for lo in range(0, _N, 50):
                store.append(frames[lo:lo + 50], np.zeros((len(frames[lo:lo + 50]), 2)))
                if scan and lo == 0:
                    assert store._populated == _N  # the memory of the scan before, faulted in
            assert pool.fresh == 2  # the first scan's narrow and wide mappings, no other
            assert store.frames.dtype == np.uint16
            np.testing.assert_array_equal(from_fft_order(store.frames[:_N]), frames)
            del store
    finally:
        pool.set_keep_bytes(0)
