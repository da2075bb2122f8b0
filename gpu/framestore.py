"""A growable store of detector frames for a scan that is still arriving.

Frames are kept in their own integer (or float) dtype — never a float copy of the dataset — in
FFT order, converted once on append; a host store of unsigned frames asked to (``narrow``) keeps
them as uint8 while every count received fits one, and widens to their own dtype (a copy) the
first time one does not (:meth:`FrameStore._widen`). The store is pre-allocated; when it fills it grows
geometrically (amortised O(1) per frame), and when the scan's frame count is known up front it
is allocated exactly, so the store ends the scan at ≈ the frames' bytes as it holds them.

Per-frame bookkeeping (positions, scan indices, visit counts) stays on the host: it is small
and the batch selection that reads it runs on the host anyway.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading
import time
import traceback
from types import ModuleType
from typing import Any

import numpy as np

from .backend import asarray

log = logging.getLogger(__name__)

#: Linux's MADV_POPULATE_WRITE (kernel 5.14+), which Python 3.11's mmap module does not name
_MADV_POPULATE_WRITE = 23
#: host frame stores at least this large get their own mapping (see :func:`_host_empty`)
_MAP_BYTES = 1 << 20
#: Linux's mremap flags: move the pages to the address given, unmapping what was there
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
#: mmap's MAP_FIXED (Python's mmap module does not name it)
_MAP_FIXED = 0x10
#: the warm reserve (:meth:`MappingPool.set_warm_bytes`) is mapped and faulted in in parts this
#: large, each handed out as soon as it is in memory
_WARM_PART_BYTES = 256 << 20
#: the largest count a narrow store (``FrameStore(narrow=True)``) holds before it widens
NARROW_MAX = 255
#: the prefaulter (:meth:`FrameStore.start_prefault`) faults in this much per system call: small
#: enough that it stops within a few milliseconds when asked and that an append overtaking it
#: shares few pages with it, large enough that its per-call overhead is nothing (≈ 230 frames of
#: 96×96 uint16, ≈ 3 ms of kernel work on the development VM)
_PREFAULT_STEP_BYTES = 8 << 20


class _Libc:
    """The C library's memory calls through ctypes, which releases the interpreter lock for the
    call: ``mmap.mmap.madvise`` holds it, and faulting in the rows of one 256-frame append
    (≈ 2 ms) then stopped every other thread of the daemon (measured: a spinning thread ran
    66,000 loops while ``mmap.madvise`` populated 1 GiB, 4.9 million during the ctypes call)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.madvise.restype = ctypes.c_int
        self.mmap = libc.mmap
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.mmap.restype = ctypes.c_void_p
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.munmap.restype = ctypes.c_int
        self.mremap = libc.mremap
        self.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.mremap.restype = ctypes.c_void_p

    @staticmethod
    def check(ok: bool, what: str) -> None:
        if not ok:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


_LIBC: _Libc | None = None
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def _populate_write(address: int, nbytes: int) -> None:
    """Fault in (and zero) the pages of ``[address, address + nbytes)`` with one system call,
    the interpreter lock released; OSError where the kernel refuses (before 5.14: EINVAL)."""
    libc = _libc()
    libc.check(libc.madvise(address, nbytes, _MADV_POPULATE_WRITE) == 0, "madvise(MADV_POPULATE_WRITE)")


def _address(buffer: Any) -> int:
    exported = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(exported)
    finally:
        del exported  # the export would keep the mapping from closing (and from looking idle)


class _WarmPart:
    """Anonymous memory faulted in ahead of the stores (:meth:`MappingPool.set_warm_bytes`):
    its first ``size`` bytes from ``address`` are still mapped here; pages handed to a store
    are moved off its end."""

    __slots__ = ("address", "size")

    def __init__(self, nbytes: int) -> None:
        libc = _libc()
        address = libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        libc.check(address not in (None, _MAP_FAILED), f"mmap of {nbytes} bytes")
        self.address, self.size = int(address), nbytes
        try:
            _populate_write(self.address, nbytes)
        except OSError:
            self.unmap()
            raise

    def unmap(self) -> None:
        if self.size:
            libc = _libc()
            libc.check(libc.munmap(self.address, self.size) == 0, "munmap")
            self.size = 0


class _Mapping:
    """An anonymous mapping that holds a host store's frames, and how many of its bytes (from
    the start) are faulted in: a reused mapping needs no new faults there."""

    __slots__ = ("address", "mmap", "populated")

    def __init__(self, nbytes: int) -> None:
        self.mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.populated = 0
        self.address = _address(self.mmap)

    @property
    def nbytes(self) -> int:
        return len(self.mmap)

    def idle(self) -> bool:
        # Every array over the mapping (the store's frames and any view of them) holds a
        # reference to the mmap object; the entry's own and getrefcount's argument are the
        # only two left once none is alive, and nothing can make a new one but this module.
        return sys.getrefcount(self.mmap) <= 2


class MappingPool:
    """The mappings of host frame stores, kept after their stores are gone so that the next
    store reuses memory already faulted in instead of faulting in fresh pages (a fresh 96×96
    uint16 frame's 4.5 pages cost more than its copy: :meth:`FrameStore._populate`). A mapping
    is handed out again only when no array over it is alive (:meth:`_Mapping.idle`), so a
    store never shares memory with frames still in use. The pool keeps mappings of at most
    ``keep_bytes`` in all, in use or idle (idle ones are unmapped, oldest first, to make room
    for a new one); with ``keep_bytes`` 0, the default, it keeps none and every store maps
    fresh memory that goes back with it. Process-wide (:data:`MAPPINGS`): the daemon sets the
    bound at start (``frame_store_reuse_bytes``).

    A fresh mapping is first filled from the warm reserve, memory faulted in before any store
    asked for it (:meth:`set_warm_bytes`, the daemon's ``frame_store_warm_bytes``): its pages
    are moved into the new mapping (``mremap``: page tables move, nothing is copied or faulted
    in), so a daemon's first scan needs no fresh pages either, whatever its size."""

    def __init__(self, keep_bytes: int = 0) -> None:
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._mappings: list[_Mapping] = []  #: kept mappings, oldest first
        #: stores that got a kept mapping / a fresh one
        self.reused = 0
        self.fresh = 0
        self._warm: list[_WarmPart] = []  #: the warm reserve, taken from the last part first
        #: one resize of the reserve at a time (a resize waits for one still faulting memory in)
        self._warm_resize = threading.Lock()
        #: bytes of the warm reserve moved into stores' mappings so far
        self.warm_moved = 0
        #: the reserve's size as last set (:meth:`set_warm_bytes`): what :meth:`reclaim` refills it to at most
        self.warm_target = 0
        #: bytes of dropped stores' pages moved back into the warm reserve (:meth:`reclaim`)
        self.warm_reclaimed = 0
        #: bytes of a part of the reserve being faulted in now (:meth:`_resize_warm`)
        self._warm_coming = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype, reused_only: bool = False
             ) -> tuple[np.ndarray, _Mapping] | None:
        """An uninitialised array over a mapping of at least its bytes: the smallest idle kept
        one of up to twice that, else a new one (kept if the bound allows); and the mapping.
        ``reused_only``: None instead of a new one."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            idle = [m for m in self._mappings if m.idle()]
            fits = [m for m in idle if nbytes <= m.nbytes <= 2 * nbytes]
            if fits:
                self.reused += 1
                mapping = min(fits, key=lambda m: m.nbytes)
            elif reused_only:
                return None
            else:
                self._trim(idle, self.keep_bytes - nbytes)
                mapping = _Mapping(nbytes)
                self.fresh += 1
                self._fill_from_warm(mapping)
                if self._kept_bytes() + nbytes <= self.keep_bytes:
                    self._mappings.append(mapping)
            # made under the lock: from here on the array's reference keeps the mapping from
            # looking idle to a store made at the same time on another thread
            array = np.frombuffer(mapping.mmap, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
        return array, mapping

    def _fill_from_warm(self, mapping: _Mapping) -> None:
        """Move pages of the warm reserve to the start of a fresh mapping (under the lock)."""
        want = -(-mapping.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # the mapping's whole pages
        moved = 0
        libc = _libc() if self._warm else None
        while libc is not None and moved < want and self._warm:
            part = self._warm[-1]
            n = min(want - moved, part.size)
            to = mapping.address + moved
            done = libc.mremap(part.address + part.size - n, n, n, _MREMAP_MAYMOVE | _MREMAP_FIXED, to)
            if done != to:
                # refused (e.g. the process's limit on mappings): Linux may have unmapped the
                # destination before it failed, so it is mapped afresh (no array uses it yet) and
                # the rest of this mapping is faulted in as fresh memory is
                again = libc.mmap(to, n, mmap.PROT_READ | mmap.PROT_WRITE,
                                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
                libc.check(again == to, "mmap of a frame store's pages after a refused mremap")
                break
            part.size -= n
            moved += n
            if not part.size:
                self._warm.pop()
        mapping.populated = min(moved, mapping.nbytes)
        self.warm_moved += moved

    def warm_bytes(self) -> int:
        """Bytes of the warm reserve not handed to a store yet."""
        with self._lock:
            return sum(p.size for p in self._warm)

    def set_warm_bytes(self, nbytes: int) -> None:
        """Make the warm reserve hold ``nbytes`` (rounded up to whole pages): unmap what is over
        it, or map and fault in what is missing, in parts of :data:`_WARM_PART_BYTES`, each
        handed out as soon as it is in memory. Blocking (≈ 0.4–0.8 s per GiB on the
        development VM), the interpreter lock released while the kernel faults pages in. The
        reserve is resident memory whether or not a store ever takes it: more than the host
        has free calls in its out-of-memory killer, so the caller checks that first. OSError
        where the kernel cannot populate memory this way (before Linux 5.14)."""
        if nbytes < 0:
            raise ValueError(f"warm bytes must be ≥ 0, got {nbytes}")
        target = -(-int(nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        if target and not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "a warm frame-store reserve needs Linux (MADV_POPULATE_WRITE, mremap)")
        with self._warm_resize:
            with self._lock:
                self.warm_target = target
            self._resize_warm(target)

    def reclaim(self, mapping: _Mapping, successor: _Mapping | None = None) -> int:
        """A store dropped ``mapping`` for ``successor`` (a narrow store widened:
        :meth:`FrameStore._widen`). Its faulted-in pages go back into the warm reserve, up to
        the reserve's set size: where the pool does not keep the mapping they would be unmapped
        with it, and a first scan whose counts exceed a byte would have spent that much of the
        reserve on rows it never held (a uint16 scan: a third of what its store took); a kept
        mapping's only where the reserve takes them all. A kept mapping still makes room for
        ``successor`` where the bound kept that one out: a wide mapping serves later stores of
        either kind (a narrow one takes one of up to twice its bytes), the narrow one only
        narrow stores — kept beside it, a wide store within the bound but over it with the
        narrow rows was mapped and faulted in afresh by every scan. Nothing where an array over
        the mapping is still alive (e.g. a parallax fit's view). Returns the bytes moved."""
        with self._lock:
            if not mapping.idle() or mapping.mmap.closed:
                return 0
            kept = any(m is mapping for m in self._mappings)
            moved = self._to_warm(mapping, kept)
            if kept and successor is not None and not any(m is successor for m in self._mappings) \
                    and self._kept_bytes() - mapping.nbytes + successor.nbytes <= self.keep_bytes:
                self._mappings.remove(mapping)
                self._mappings.append(successor)
                kept = False
            if moved or not kept:
                if kept:
                    self._mappings.remove(mapping)
                mapping.mmap.close()  # (idle: no array over it; what is left of its pages goes back)
        return moved

    def _to_warm(self, mapping: _Mapping, kept: bool) -> int:
        """Move ``mapping``'s faulted-in pages from its start into the warm reserve (under the
        lock; :meth:`reclaim`), a kept mapping's all or none; the bytes moved."""
        whole = min(mapping.populated, mapping.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        room = self.warm_target - sum(p.size for p in self._warm) - self._warm_coming
        size = min(whole, max(0, room)) // mmap.PAGESIZE * mmap.PAGESIZE
        if size <= 0 or (kept and size < whole):
            return 0
        libc = _libc()
        # a place of their own first: mremap of an unchanged size without MREMAP_FIXED may
        # leave the pages where they are, and closing the mapping would then unmap them
        address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if address in (None, _MAP_FAILED):
            return 0  # (the pages stay where they are)
        if libc.mremap(mapping.address, size, size, _MREMAP_MAYMOVE | _MREMAP_FIXED, address) != address:
            libc.check(libc.munmap(address, size) == 0, "munmap")
            return 0
        part = _WarmPart.__new__(_WarmPart)
        part.address, part.size = int(address), size
        self._warm.append(part)
        mapping.populated = 0
        self.warm_reclaimed += size
        return size

    def _resize_warm(self, target: int) -> None:
        with self._lock:
            while self._warm and sum(p.size for p in self._warm) > target:
                part = self._warm[-1]
                over = sum(p.size for p in self._warm) - target
                if over >= part.size:
                    self._warm.pop().unmap()
                else:  # the end of the last part: what a store would have taken next
                    libc = _libc()
                    libc.check(libc.munmap(part.address + part.size - over, over) == 0, "munmap")
                    part.size -= over
        while True:
            with self._lock:
                missing = target - sum(p.size for p in self._warm)
                if missing <= 0:
                    return
                # (counted by reclaim as the reserve's already: it never fills it past its size)
                self._warm_coming = coming = min(missing, _WARM_PART_BYTES)
            try:
                part = _WarmPart(coming)  # faulted in without the lock
            except BaseException:
                with self._lock:
                    self._warm_coming = 0
                raise
            with self._lock:
                self._warm.append(part)
                self._warm_coming = 0

    def _kept_bytes(self) -> int:
        return sum(m.nbytes for m in self._mappings)

    def idle_bytes(self) -> int:
        """Bytes of kept mappings that no store uses now."""
        with self._lock:
            return sum(m.nbytes for m in self._mappings if m.idle())

    def set_keep_bytes(self, keep_bytes: int) -> int:
        """Set the bound (idle mappings over it are unmapped now); returns the previous one."""
        if keep_bytes < 0:
            raise ValueError(f"keep_bytes must be ≥ 0, got {keep_bytes}")
        with self._lock:
            previous, self.keep_bytes = self.keep_bytes, int(keep_bytes)
            self._trim([m for m in self._mappings if m.idle()], self.keep_bytes)
            # mappings in use over the bound are no longer kept: they go with their stores
            while self._kept_bytes() > self.keep_bytes:
                self._mappings.pop(0)
        return previous

    def _trim(self, idle: list[_Mapping], room: int) -> None:
        """Unmap idle mappings, oldest first, until all kept ones hold at most ``room`` bytes."""
        total = self._kept_bytes()
        for m in idle:
            if total <= room:
                break
            self._mappings.remove(m)
            total -= m.nbytes
            m.mmap.close()


#: the process's pool of host frame-store mappings (:class:`MappingPool`)
MAPPINGS = MappingPool()


class FrameStore:
    """Pre-allocated ``(capacity, M, M)`` frames in FFT order plus per-frame bookkeeping.

    ``frames`` (device/backend array) holds valid data in ``[:n]``; ``positions`` (host, m),
    ``indices`` (host, scan index of each frame) and ``visits`` (host, how many mini-batch steps
    have used each frame) are aligned with it.

    ``dtype`` is the frames' declared dtype (what :meth:`append` accepts); ``frames`` holds them
    in it, or — ``narrow`` — as uint8 while every count so far is ≤ :data:`NARROW_MAX` (host
    stores of unsigned frames wider than a byte, large enough for a mapping of their own; others
    ignore it). Low-dose frames qualify: a 96×96 uint16 frame then takes 2.25 fresh 4 KiB pages
    instead of 4.5 (a daemon's first scan faults each in at ≈ 1.2 µs of kernel CPU) and half the
    store's memory. The first count over the limit widens the store (:meth:`_widen`, once: a
    copy of the rows so far into a store of the declared dtype, the uint8 rows beside it until
    the copy is done — half the declared bytes more at most, as a growth's old rows). Readers of
    ``frames`` see the counts' values either way; ``frames.dtype`` tells which. A store that
    finds an earlier store's memory for its rows in their own dtype in the pool takes that
    (faulted in already: narrow rows would save no page, and a widening would need a second
    mapping beside it).
    """

    def __init__(
        self,
        frame_shape: tuple[int, int],
        dtype: Any,
        capacity: int,
        xp: ModuleType = np,
        growth: float = 1.5,
        narrow: bool = False,
    ) -> None:
        if len(frame_shape) != 2 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (M, M) with M ≥ 1, got {frame_shape!r}")
        dt = np.dtype(dtype)
        if dt.kind not in "uif":
            raise ValueError(f"frame dtype must hold counts (integer or float), got {dt}")
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if growth <= 1.0:
            raise ValueError(f"growth factor must be > 1 (geometric growth), got {growth}")
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = dt
        #: asked to keep counts ≤ NARROW_MAX as uint8 (it does where :meth:`_empty` could)
        self._narrow_asked = bool(narrow) and xp is np and dt.kind == "u" and dt.itemsize > 1
        self.xp = xp
        self.growth = float(growth)
        self.n = 0
        #: how many times the frame array was re-allocated (growth events)
        self.reallocations = 0
        self._mapping: _Mapping | None = None
        self._populated = 0  #: rows [0, _populated) of the mapping are faulted in
        #: guards ``_mapping``/``_populated`` between the writer and the prefaulter; never held
        #: over a system call, so the writer does not wait for the prefaulter's work
        self._populate_lock = threading.Lock()
        self._prefault_thread: threading.Thread | None = None
        self._prefault_stop = threading.Event()
        #: what ended the prefaulter, if it failed (also logged as a warning)
        self.prefault_error: BaseException | None = None
        #: rows the prefaulter faulted in before the writer reached them
        self.prefaulted_rows = 0
        #: CPU seconds the prefaulter thread used (its page faults: kernel time), once it ended
        self.prefault_cpu_s = 0.0
        self._prefault_limit: int | None = None  #: start_prefault's limit_bytes (kept for _widen)
        #: times the rows were widened from uint8 to ``dtype`` (0 or 1 per store)
        self.widenings = 0
        self.frames = self._empty(capacity)
        self.positions = np.empty((capacity, 2), dtype=np.float64)
        self.indices = np.empty(capacity, dtype=np.int64)
        self.visits = np.zeros(capacity, dtype=np.int32)

    @property
    def capacity(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the store (allocated capacity, frames plus bookkeeping)."""
        return int(
            self.frames.nbytes + self.positions.nbytes + self.indices.nbytes + self.visits.nbytes
        )

    @property
    def narrow(self) -> bool:
        """The rows are held as uint8 (every count so far ≤ :data:`NARROW_MAX`)."""
        return self.frames.dtype != self.dtype

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the frames received so far in their own dtype (the floor for ``nbytes``,
        unless the store holds them narrow: :attr:`held_nbytes`)."""
        return self.n * self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize

    @property
    def held_nbytes(self) -> int:
        """Bytes of the frames received so far as the store holds them (``frames.dtype``): the
        floor for ``nbytes``."""
        return self.n * self.frame_shape[0] * self.frame_shape[1] * self.frames.dtype.itemsize

    def reserve(self, capacity: int) -> None:
        """Make room for at least ``capacity`` frames (one re-allocation at most)."""
        if capacity <= self.capacity:
            return
        # the prefaulter works on the old mapping; the store grows past the declared frames
        # only, and the new mapping is faulted in by the appends as before
        self._prefault_stop.set()
        old = self.frames
        self.frames = self._empty(capacity, old.dtype)
        self._populate(0, self.n)
        self.frames[: self.n] = old[: self.n]
        self.positions = _grow_host(self.positions, capacity, self.n)
        self.indices = _grow_host(self.indices, capacity, self.n)
        self.visits = _grow_host(self.visits, capacity, self.n)
        self.reallocations += 1

    def append(self, frames: Any, positions_m: Any, indices: Any | None = None, peak: int | None = None) -> slice:
        """Append ``frames`` (n, M, M) in *detector order* with positions (n, 2) in metres.

        The caller validates content; this checks only what the store itself relies on.
        ``peak``: the frames' largest count, where the caller measured it (a narrow store
        measures it otherwise). Returns the slice of the store that now holds them.
        """
        k = int(frames.shape[0])
        start = self.n
        need = start + k
        if need > self.capacity:
            self.reserve(max(need, int(np.ceil(self.capacity * self.growth))))
        if k and self.frames.dtype != self.dtype and frames.dtype != np.uint8:
            top = int(frames.max()) if peak is None else int(peak)
            if top > NARROW_MAX:
                self._widen()
        self._populate(start, need)
        _write_fft_order(self.frames[start:need], asarray(frames, self.xp))
        self.positions[start:need] = np.asarray(positions_m, dtype=np.float64).reshape(k, 2)
        if indices is None:
            self.indices[start:need] = np.arange(start, need)
        else:
            self.indices[start:need] = np.asarray(indices, dtype=np.int64).reshape(k)
        self.visits[start:need] = 0
        self.n = need
        return slice(start, need)

    def _empty(self, capacity: int, dtype: np.dtype | None = None) -> Any:
        """Rows for ``capacity`` frames in ``dtype`` (None: uint8 where the store may hold them
        narrow — a host store in its own mapping —, else the declared dtype)."""
        shape = (capacity,) + self.frame_shape
        if self.xp is np:
            narrow = (self._narrow_asked and (dtype is None or np.dtype(dtype) == np.uint8)
                      and int(np.prod(shape)) >= _MAP_BYTES and sys.platform.startswith("linux"))
            # memory of an earlier store that holds the rows in their own dtype (faulted in: no
            # page to save) is taken so, where the pool has it: a count over 255 then needs no
            # widening, whose copy needs a second mapping (beside that one: mapped afresh where
            # the pool's bound does not hold both)
            wide = MAPPINGS.take(shape, self.dtype, reused_only=True) if narrow else None
            frames, mapping = wide if wide is not None else _host_empty(shape, np.dtype(np.uint8) if narrow else self.dtype)
            row = int(np.prod(self.frame_shape)) * frames.dtype.itemsize
            with self._populate_lock:
                self._mapping = mapping
                self._populated = 0 if mapping is None else mapping.populated // row
            return frames
        return self.xp.empty(shape, dtype=self.dtype)

    def _widen(self) -> None:
        """Hold the rows in the declared dtype from now on: a store of it, the rows so far
        copied into it (as a growth does: arrays over the uint8 rows, e.g. a parallax fit's
        view, keep them). The prefaulter goes on in the new store from where the copy ended,
        with its limit, if it ran and was not stopped (also where it had finished the narrow
        rows). The narrow rows' mapping goes to :meth:`MappingPool.reclaim` (before the new
        store is taken where no row was written)."""
        # started and not asked to stop (running, or done with the narrow rows): it goes on in
        # the new store, whose rows past the copy are as fresh as the narrow ones were; waited
        # for (its step, a few ms), so that it can be started again there
        thread = self._prefault_thread
        resume = (thread is not None and not self._prefault_stop.is_set() and self.prefault_error is None
                  and self.stop_prefault())
        capacity, old_mapping = self.capacity, self._mapping
        if self.n == 0 and old_mapping is not None:
            # no row to copy: the narrow rows' memory goes back to the warm reserve first, so
            # that the new store takes it (a scan whose first frames hold counts over a byte)
            self.frames = np.empty((0, *self.frame_shape), np.uint8)
            with self._populate_lock:
                self._mapping = None
            MAPPINGS.reclaim(old_mapping)
            self.frames = self._empty(capacity, self.dtype)
        else:
            old = self.frames
            self.frames = self._empty(capacity, self.dtype)
            self._populate(0, self.n)
            self.frames[: self.n] = old[: self.n]
            del old
            if old_mapping is not None:  # (unless a view of the rows is still alive)
                MAPPINGS.reclaim(old_mapping, self._mapping)
        self.widenings += 1
        if resume:
            self.start_prefault(self._prefault_limit)

    def _populate(self, start: int, stop: int) -> None:
        """Fault in the host pages of rows [start, stop) with one system call, before they are
        written. A fresh store's pages are first touched by appends, and a page fault for each
        4 KiB page (4.5 per 96×96 uint16 frame) cost more than the copy itself: an append of
        96×96 uint16 frames into fresh memory took 13–15 µs per frame faulting page by page,
        9.3–9.7 populated this way (one thread, 2-core VM, side by side)."""
        mapping = self._mapping
        start = max(start, self._populated)
        if mapping is None or stop <= start:
            return  # rows written before are in memory already: asking again costs a page walk
        row = self.frames[0].nbytes
        lo = start * row // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            # rows the prefaulter is faulting in at this moment are asked for again: the kernel
            # faults each page once, and the writer never waits for the prefaulter to finish
            _populate_write(mapping.address + lo, stop * row - lo)
        except OSError:
            # a kernel before 5.14 does not know the advice (EINVAL): the copy faults the pages
            # in one by one, as it would without it; this store stops asking
            with self._populate_lock:
                if self._mapping is mapping:
                    self._mapping = None
            return
        with self._populate_lock:  # (the prefault thread updates it too: no lost update)
            if self._mapping is mapping:
                self._populated = max(self._populated, stop)
            mapping.populated = max(mapping.populated, stop * row)

    def start_prefault(self, limit_bytes: int | None = None) -> bool:
        """Fault in the store's rows ahead of the appends on a thread of its own, from the
        first row not yet in memory up to the capacity (the scan's declared frames) or
        ``limit_bytes`` of frames, whichever is less. The appends fault in what it has not
        reached yet themselves (:meth:`_populate`) and it skips what they did, so it only
        works ahead of them; it ends there, when the store grows, or at
        :meth:`stop_prefault`. The page faults of a fresh store (≈ 13.5 µs of kernel CPU per
        36 kB frame) move off the thread that appends, which is the slowest stage of a
        daemon's first scan: this pays where a core is free and costs the same CPU otherwise.
        An exception ends the thread, is logged and kept in :attr:`prefault_error`; the
        appends go on faulting their own rows in. Returns whether a thread was started.

        Only host stores on Linux: a CuPy store is device memory, which CuPy's allocator
        commits when it allocates it (no demand paging), so there is nothing to fault in."""
        with self._populate_lock:
            mapping, start = self._mapping, self._populated
        if mapping is None or self.xp is not np or self.prefaulting:
            return False
        self._prefault_limit = limit_bytes
        row = self.frames[0].nbytes
        limit = self.capacity if limit_bytes is None else min(self.capacity, max(0, limit_bytes) // row)
        if start >= limit:
            return False
        self._prefault_stop = threading.Event()
        self.prefault_error = None
        self._prefault_thread = threading.Thread(
            target=self._prefault, args=(mapping, mapping.mmap, limit, self._prefault_stop),
            name="frame-store-prefault", daemon=True)
        self._prefault_thread.start()
        return True

    @property
    def prefaulting(self) -> bool:
        """The prefaulter thread is still running."""
        return self._prefault_thread is not None and self._prefault_thread.is_alive()

    def stop_prefault(self, timeout: float | None = 5.0) -> bool:
        """Stop the prefaulter (if any) and wait up to ``timeout`` seconds for it to end (it
        stops after its current system call, ≈ :data:`_PREFAULT_STEP_BYTES`); whether it has
        ended."""
        self._prefault_stop.set()
        thread = self._prefault_thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _prefault(self, mapping: _Mapping, hold: mmap.mmap, limit: int, stop: threading.Event) -> None:
        # ``hold`` keeps the mapping's mmap referenced while this runs, so the pool does not
        # see it idle and unmap or hand it out under the system call
        row = self.frames[0].nbytes
        step = max(1, _PREFAULT_STEP_BYTES // row)
        cpu0 = time.thread_time()
        try:
            while not stop.is_set():
                with self._populate_lock:
                    if self._mapping is not mapping:
                        return
                    lo = self._populated
                if lo >= limit:
                    return
                hi = min(lo + step, limit)
                first = lo * row // mmap.PAGESIZE * mmap.PAGESIZE
                _populate_write(mapping.address + first, hi * row - first)
                with self._populate_lock:
                    if self._mapping is not mapping:
                        return
                    if self._populated < hi:  # rows [0, lo) were in memory already
                        self.prefaulted_rows += hi - max(lo, self._populated)
                        self._populated = hi
                    mapping.populated = max(mapping.populated, hi * row)
        except Exception as exc:  # noqa: BLE001 - logged and kept (prefault_error); the appends fault their own rows in
            # the traceback goes as text and is not kept: its frames hold this store and the
            # mapping, and a log record or the kept exception holding them would keep the mapping
            # from looking idle to the pool (the store's memory not reused) for as long
            log.warning("frame store prefault stopped (the appends fault their own memory in): %s: %s\n%s",
                        type(exc).__name__, exc, "".join(traceback.format_exception(exc)).rstrip())
            self.prefault_error = exc.with_traceback(None)
        finally:
            self.prefault_cpu_s = time.thread_time() - cpu0
            del hold

    def counts(self, which: Any) -> Any:
        """Frames (FFT order, as held: ``frames.dtype``) for the store indices ``which`` (host int array)."""
        return self.frames[self.xp.asarray(which)]


def _host_empty(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, _Mapping | None]:
    """An uninitialised host array, and for a large one on Linux the anonymous mapping that
    holds it (for :meth:`FrameStore._populate`; NumPy would map so large an array anyway),
    from :data:`MAPPINGS`: it may hold an earlier store's frames. The array keeps its mapping
    alive; the memory goes back when the array goes, unless the pool keeps it."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < _MAP_BYTES or not sys.platform.startswith("linux"):
        return np.empty(shape, dtype=dtype), None
    return MAPPINGS.take(shape, dtype)


def _grow_host(arr: np.ndarray, capacity: int, n: int) -> np.ndarray:
    out = np.zeros((capacity,) + arr.shape[1:], dtype=arr.dtype)
    out[:n] = arr[:n]
    return out


def _write_fft_order(dest: Any, frames: Any) -> None:
    """``dest[...] = ifftshift(frames)`` (detector → FFT order) without a temporary of the
    chunk (``operators.to_fft_order`` rolls twice): one copy for even sides, four quadrant
    copies for odd ones."""
    n, my, mx = frames.shape
    hy, hx = my // 2, mx // 2
    if my % 2 == 0 and mx % 2 == 0:
        # even sides: the shift swaps equal halves, so one copy through (n, 2, hy, 2, hx) views
        # does what four quadrant copies do, at less loop overhead (the destination rows of
        # the store are contiguous, so its reshape is a view)
        dest.reshape(n, 2, hy, 2, hx)[...] = frames.reshape(n, 2, hy, 2, hx)[:, ::-1, :, ::-1]
        return
    dest[:, : my - hy, : mx - hx] = frames[:, hy:, hx:]
    dest[:, : my - hy, mx - hx :] = frames[:, hy:, :hx]
    dest[:, my - hy :, : mx - hx] = frames[:, :hy, hx:]
    dest[:, my - hy :, mx - hx :] = frames[:, :hy, :hx]
