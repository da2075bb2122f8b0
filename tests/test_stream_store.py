"""The growable frame store: own dtype, FFT order, amortised growth, exact allocation."""

from __future__ import annotations

import math
import resource
import sys

import numpy as np
import pytest
from cryoptycho.gpu import framestore
from cryoptycho.gpu.backend import to_numpy
from cryoptycho.gpu.framestore import FrameStore


def _frames(rng, n, m, dtype=np.uint16):
    return rng.integers(0, 50, size=(n, m, m)).astype(dtype)


@pytest.mark.parametrize("m", [6, 7])
def test_append_stores_fft_order_in_own_dtype(xp, m):
    rng = np.random.default_rng(0)
    frames = _frames(rng, 9, m)
    store = FrameStore((m, m), np.uint16, capacity=4, xp=xp)
    store.append(frames[:5], np.zeros((5, 2)))
    store.append(xp.asarray(frames[5:]), np.ones((4, 2)))
    assert store.frames.dtype == np.uint16
    assert store.n == 9
    # ifftshift by hand: zero frequency (detector index M//2) moves to index 0.
    expected = np.roll(frames, (-(m // 2), -(m // 2)), axis=(1, 2))
    np.testing.assert_array_equal(to_numpy(store.frames[:9]), expected)
    np.testing.assert_array_equal(store.positions[5:9], np.ones((4, 2)))
    np.testing.assert_array_equal(store.indices[:9], np.arange(9))
    assert store.visits[:9].sum() == 0


def test_growth_is_geometric_not_per_append(xp):
    rng = np.random.default_rng(1)
    store = FrameStore((4, 4), np.uint8, capacity=8, xp=xp, growth=1.5)
    n = 1000
    for k in range(n):
        store.append(_frames(rng, 1, 4, np.uint8), [[k, 0.0]], indices=[10 * k])
    # 8 · 1.5^r ≥ 1000 needs r = 12 growth events; one per append would be ~1000.
    assert store.reallocations <= math.ceil(math.log(n / 8) / math.log(1.5)) + 1
    assert store.reallocations >= 1
    assert store.frames.dtype == np.uint8
    assert store.positions[n - 1, 0] == n - 1
    assert store.indices[n - 1] == 10 * (n - 1)


def test_exact_allocation_when_frame_count_known(xp):
    rng = np.random.default_rng(2)
    m, n = 64, 40
    store = FrameStore((m, m), np.uint16, capacity=n, xp=xp)
    for lo in range(0, n, 7):
        k = min(7, n - lo)
        store.append(_frames(rng, k, m), np.zeros((k, 2)))
    assert store.reallocations == 0
    assert store.raw_nbytes == n * m * m * 2
    assert store.nbytes <= 1.05 * store.raw_nbytes


def test_growth_keeps_earlier_frames(xp):
    rng = np.random.default_rng(3)
    frames = _frames(rng, 30, 5)
    store = FrameStore((5, 5), np.int32, capacity=2, xp=xp)
    for k in range(30):
        store.append(frames[k : k + 1].astype(np.int32), [[0.0, k]])
    store.visits[:30] = np.arange(30)
    store.reserve(100)
    expected = np.roll(frames, (-2, -2), axis=(1, 2))
    np.testing.assert_array_equal(to_numpy(store.frames[:30]), expected)
    np.testing.assert_array_equal(store.visits[:30], np.arange(30))
    np.testing.assert_array_equal(store.positions[:30, 1], np.arange(30))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frame_shape": (0, 4), "dtype": np.uint16, "capacity": 1}, "frame_shape"),
        ({"frame_shape": (4, 4), "dtype": np.complex64, "capacity": 1}, "dtype"),
        ({"frame_shape": (4, 4), "dtype": np.uint16, "capacity": 0}, "capacity"),
        ({"frame_shape": (4, 4), "dtype": np.uint16, "capacity": 1, "growth": 1.0}, "growth"),
    ],
)
def test_bad_store_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FrameStore(**kwargs)


def _resident_bytes(array: np.ndarray) -> int:
    """Resident bytes (Rss, /proc/self/smaps) of the mapping that holds ``array``."""
    address = array.ctypes.data
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line: lo-hi perms offset dev inode
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= address < hi
            elif inside and head[0] == "Rss:":
                return int(head[1]) * 1024
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE and /proc are Linux's")
def test_a_large_host_store_faults_rows_in_before_writing_them(monkeypatch):
    """The rows an append fills are in memory before its copy touches them (one madvise
    instead of a page fault per page), across growth too, and the frames land in FFT order."""
    m, n = 64, 300  # 8 KiB frames: the store is a mapping of its own (≥ 1 MiB)
    frames = _frames(np.random.default_rng(4), n, m)
    store = FrameStore((m, m), np.uint16, capacity=200)
    faulted_by_copy = []
    write = framestore._write_fft_order

    def spy(dest, src):
        before = _resident_bytes(store.frames)
        write(dest, src)
        faulted_by_copy.append((_resident_bytes(store.frames) - before, dest.nbytes))

    monkeypatch.setattr(framestore, "_write_fft_order", spy)
    for lo in range(0, n, 50):
        store.append(frames[lo : lo + 50], np.zeros((50, 2)))
    assert store.reallocations == 1 and len(faulted_by_copy) == 6
    for grew, nbytes in faulted_by_copy:  # at most the page the previous append began
        assert grew <= 4096, (grew, nbytes, faulted_by_copy)
    np.testing.assert_array_equal(store.frames[:n], np.roll(frames, (-(m // 2), -(m // 2)), axis=(1, 2)))


def test_a_kernel_without_the_populate_advice_still_stores_every_frame(monkeypatch):
    """A kernel before 5.14 refuses MADV_POPULATE_WRITE (EINVAL); the store then writes as it
    always did, page faults and all, and stops asking."""
    monkeypatch.setattr(framestore, "_MADV_POPULATE_WRITE", -1)  # no kernel knows this advice
    monkeypatch.setattr(framestore, "MAPPINGS", framestore.MappingPool())  # fresh memory, as such a kernel gives
    m, n = 64, 300
    frames = _frames(np.random.default_rng(5), n, m)
    store = FrameStore((m, m), np.uint16, capacity=200)
    for lo in range(0, n, 60):
        store.append(frames[lo : lo + 60], np.ones((60, 2)))
    assert store._mapping is None
    np.testing.assert_array_equal(store.frames[:n], np.roll(frames, (-(m // 2), -(m // 2)), axis=(1, 2)))
    np.testing.assert_array_equal(store.positions[:n], np.ones((n, 2)))


@pytest.fixture
def pool(monkeypatch):
    """A pool of its own for the test (the process's, MAPPINGS, is the daemon's setting)."""
    p = framestore.MappingPool(keep_bytes=64 << 20)
    monkeypatch.setattr(framestore, "MAPPINGS", p)
    return p


def _fill(store, frames):
    for lo in range(0, len(frames), 50):
        store.append(frames[lo : lo + 50], np.zeros((len(frames[lo : lo + 50]), 2)))


def _faults_filling(store, frames) -> int:
    """Minor page faults of this thread while ``frames`` are appended to ``store``."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    _fill(store, frames)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
def test_a_store_reuses_the_memory_of_one_that_is_gone_without_faulting_it_in_again(pool):
    m, n = 64, 300  # 8 KiB frames: mappings of their own (≥ 1 MiB)
    rng = np.random.default_rng(6)
    first, second = _frames(rng, n, m), _frames(rng, n, m)
    store = FrameStore((m, m), np.uint16, capacity=n)
    pages = n * m * m * 2 // 4096
    assert _faults_filling(store, first) >= pages  # fresh memory: every page faulted in once
    address = store.frames.ctypes.data
    del store
    store = FrameStore((m, m), np.uint16, capacity=n)
    assert store.frames.ctypes.data == address and (pool.reused, pool.fresh) == (1, 1)
    assert _faults_filling(store, second) < pages // 10  # the same memory, in already
    np.testing.assert_array_equal(store.frames[:n], np.roll(second, (-(m // 2), -(m // 2)), axis=(1, 2)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
def test_memory_a_live_view_still_reads_is_never_handed_to_another_store(pool):
    m, n = 64, 300
    rng = np.random.default_rng(7)
    first, second = _frames(rng, n, m), _frames(rng, n, m)
    store = FrameStore((m, m), np.uint16, capacity=n)
    _fill(store, first)
    kept = store.frames[10:20]  # e.g. a batch the engine still holds
    expected = kept.copy()
    del store
    other = FrameStore((m, m), np.uint16, capacity=n)
    _fill(other, second)
    assert (pool.reused, pool.fresh) == (0, 2)
    assert not np.shares_memory(kept, other.frames)
    np.testing.assert_array_equal(kept, expected)
    del kept, other
    third = FrameStore((m, m), np.uint16, capacity=n)  # both are idle now: one is reused
    assert pool.reused == 1 and third._populated == n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
def test_the_pool_keeps_at_most_its_bound_and_nothing_by_default(monkeypatch):
    m = 64
    row = m * m * 2
    rows = (1 << 20) // row * 2  # 2 MiB stores
    pool = framestore.MappingPool()  # the default: keep nothing
    monkeypatch.setattr(framestore, "MAPPINGS", pool)
    for _ in range(3):
        FrameStore((m, m), np.uint16, capacity=rows)
    assert (pool.reused, pool.fresh, pool.idle_bytes()) == (0, 3, 0)
    pool.set_keep_bytes(5 << 20)  # room for two
    stores = [FrameStore((m, m), np.uint16, capacity=rows) for _ in range(3)]
    assert pool.fresh == 6  # the third was not kept: it goes with its store
    del stores
    assert pool.idle_bytes() == 4 << 20
    pool.set_keep_bytes(3 << 20)  # lowered: idle mappings over the bound are unmapped now
    assert pool.idle_bytes() == 2 << 20
    big = FrameStore((m, m), np.uint16, capacity=3 * rows)  # no idle one fits: the idle one makes room
    assert pool.idle_bytes() == 0 and pool.fresh == 7
    del big
    assert pool.idle_bytes() == 0  # 6 MiB: over the bound, so not kept
    pool.set_keep_bytes(8 << 20)
    FrameStore((m, m), np.uint16, capacity=2 * rows)  # one 4 MiB mapping, kept, idle once the store goes
    assert pool.idle_bytes() == 4 << 20
    small = FrameStore((m, m), np.uint16, capacity=3 * rows // 4)  # 1.5 MiB: 4 MiB is over twice that
    assert (pool.reused, small.capacity, small.frames.nbytes) == (0, 3 * rows // 4, 3 << 19)
    fits = FrameStore((m, m), np.uint16, capacity=3 * rows // 2)  # 3 MiB: in the 4 MiB mapping
    assert (pool.reused, fits.capacity, fits.frames.nbytes) == (1, 3 * rows // 2, 3 << 20)
    with pytest.raises(ValueError, match="keep_bytes"):
        pool.set_keep_bytes(-1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="host stores map memory of their own on Linux")
def test_stores_made_at_once_on_several_threads_never_share_memory(pool):
    """Scan workers make their engines' stores on their own threads: each fills its store with
    its own value and checks it is still there after the others have written theirs."""
    import threading

    m, rows = 64, (1 << 20) // (64 * 64 * 2)  # 1 MiB stores: mappings from the pool
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(value: int) -> None:
        start.wait()
        for _ in range(40):
            store = FrameStore((m, m), np.uint16, capacity=rows)
            store.append(np.full((rows, m, m), value, np.uint16), np.zeros((rows, 2)))
            for _ in range(3):  # let the other threads make and fill theirs meanwhile
                FrameStore((m, m), np.uint16, capacity=rows)
            if not np.all(store.frames == value):
                errors.append(f"thread {value}: its store was written by another")

    threads = [threading.Thread(target=work, args=(v,)) for v in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert pool.reused > 0  # the stores did come from the pool


_linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="the warm reserve is Linux's (MADV_POPULATE_WRITE, mremap)")


@_linux_only
def test_stores_take_the_warm_reserve_s_pages_without_faulting_them_in(pool):
    """Memory faulted in ahead (the daemon's frame_store_warm_bytes) is moved into new stores'
    mappings: their appends fault no page in, two stores never share it, and the reserve
    shrinks by each store's pages."""
    m, n = 64, 300  # 8 KiB frames (two pages each): 2,400 KiB stores
    store_bytes = n * m * m * 2
    pool.set_warm_bytes(3 * store_bytes)
    assert pool.warm_bytes() == 3 * store_bytes and pool.warm_moved == 0
    rng = np.random.default_rng(8)
    first, second = _frames(rng, n, m), _frames(rng, n, m)
    a = FrameStore((m, m), np.uint16, capacity=n)
    b = FrameStore((m, m), np.uint16, capacity=n)
    assert (a._populated, b._populated) == (n, n)  # the whole store is in memory already
    assert pool.warm_bytes() == store_bytes and pool.warm_moved == 2 * store_bytes
    assert _faults_filling(a, first) < n // 10 and _faults_filling(b, second) < n // 10
    assert not np.shares_memory(a.frames, b.frames)
    np.testing.assert_array_equal(a.frames[:n], np.roll(first, (-(m // 2), -(m // 2)), axis=(1, 2)))
    np.testing.assert_array_equal(b.frames[:n], np.roll(second, (-(m // 2), -(m // 2)), axis=(1, 2)))


@_linux_only
def test_a_store_larger_than_the_warm_reserve_takes_all_of_it_and_faults_in_the_rest(pool):
    m, n = 64, 600
    row = m * m * 2
    pool.set_warm_bytes(200 * row + 100)  # rounded up to whole pages: 200 rows and one page
    assert pool.warm_bytes() == 200 * row + 4096
    frames = _frames(np.random.default_rng(9), n, m)
    store = FrameStore((m, m), np.uint16, capacity=n)
    assert store._populated == 200 and pool.warm_bytes() == 0 and pool.warm_moved == 200 * row + 4096
    faults = _faults_filling(store, frames)
    beyond = (400 * row - 4096) // 4096  # the pages past the reserve's (its last one holds half a row)
    assert beyond <= faults < beyond + n // 10
    np.testing.assert_array_equal(store.frames[:n], np.roll(frames, (-(m // 2), -(m // 2)), axis=(1, 2)))


@_linux_only
def test_the_warm_reserve_is_set_shrunk_and_given_back(pool):
    pool.set_warm_bytes(600 << 10)  # grown in parts: each a mapping of its own
    assert pool.warm_bytes() == 600 << 10
    pool.set_warm_bytes(1 << 20)  # topped up
    assert pool.warm_bytes() == 1 << 20
    pool.set_warm_bytes(300 << 10)  # cut from the end
    assert pool.warm_bytes() == 300 << 10
    pool.set_warm_bytes(0)
    assert pool.warm_bytes() == 0
    with pytest.raises(ValueError, match="warm bytes"):
        pool.set_warm_bytes(-1)


@_linux_only
def test_the_warm_reserve_is_faulted_in_as_it_is_mapped(pool, monkeypatch):
    """Its pages are resident before any store takes them (what the daemon pays at start)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    monkeypatch.setattr(framestore, "_WARM_PART_BYTES", 1 << 20)
    pool.set_warm_bytes(3 << 20)
    assert len(pool._warm) == 3
    for part in pool._warm:
        pages = part.size // 4096
        vec = ctypes.create_string_buffer(pages)
        assert libc.mincore(part.address, part.size, vec) == 0, ctypes.get_errno()
        assert all(b & 1 for b in vec.raw[:pages])  # every page in memory
    # a fresh mapping, for contrast: none of its pages is in memory before it is written
    fresh = framestore._Mapping(1 << 20)
    vec = ctypes.create_string_buffer(256)
    assert libc.mincore(fresh.address, 1 << 20, vec) == 0
    assert not any(b & 1 for b in vec.raw[:256])


@_linux_only
def test_a_refused_page_move_leaves_the_reserve_and_the_store_whole(pool, monkeypatch):
    """Where the kernel refuses to move the pages (e.g. the process's limit on mappings), the
    store faults its memory in as without a reserve, and the reserve stays for later stores.
    The refusal here also unmaps the destination first, as Linux may before it fails: the
    store's memory must be mapped again, not left a hole."""
    m, n = 64, 300
    pool.set_warm_bytes(n * m * m * 2)
    libc = framestore._libc()

    class Refusing:
        def __getattr__(self, name):
            return getattr(libc, name)

        @staticmethod
        def mremap(old, old_size, new_size, flags, to):
            assert libc.munmap(to, new_size) == 0
            return framestore._MAP_FAILED

    monkeypatch.setattr(framestore, "_LIBC", Refusing())
    frames = _frames(np.random.default_rng(10), n, m)
    store = FrameStore((m, m), np.uint16, capacity=n)
    assert store._populated == 0 and pool.warm_bytes() == n * m * m * 2 and pool.warm_moved == 0
    _fill(store, frames)
    np.testing.assert_array_equal(store.frames[:n], np.roll(frames, (-(m // 2), -(m // 2)), axis=(1, 2)))
    monkeypatch.setattr(framestore, "_LIBC", libc)
    assert FrameStore((m, m), np.uint16, capacity=n)._populated == n  # the next store takes it


def test_a_kernel_without_the_populate_advice_gets_no_warm_reserve(pool, monkeypatch):
    monkeypatch.setattr(framestore, "_MADV_POPULATE_WRITE", -1)
    with pytest.raises(OSError):
        pool.set_warm_bytes(1 << 20)
    assert pool.warm_bytes() == 0


@_linux_only
def test_stores_made_at_once_on_several_threads_share_no_page_of_the_reserve(pool):
    """The reserve's pages go to one store each, while another thread faults more of it in."""
    import threading

    m, rows = 64, (1 << 20) // (64 * 64 * 2)  # 1 MiB stores
    pool.set_warm_bytes(4 << 20)
    errors: list[str] = []
    start = threading.Barrier(5)

    def work(value: int) -> None:
        start.wait()
        stores = []
        for _ in range(6):
            store = FrameStore((m, m), np.uint16, capacity=rows)
            store.append(np.full((rows, m, m), value, np.uint16), np.zeros((rows, 2)))
            stores.append(store)
        if not all(np.all(s.frames == value) for s in stores):
            errors.append(f"thread {value}: a store was written by another")

    def top_up() -> None:
        start.wait()
        pool.set_warm_bytes(8 << 20)

    threads = [threading.Thread(target=work, args=(v,)) for v in (1, 2, 3, 4)] + [threading.Thread(target=top_up)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert pool.warm_moved > 0  # stores did take reserve pages
