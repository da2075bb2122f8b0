"""Frames from validated wire messages (protocols.messages) to the service, and the sink through
which sources in this process (detectors read directly) deliver them. The scan description and
its conversions live in scan.py."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryoptycho.protocols import validate
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import Abort, Frames, ScanEnd, ScanStart
from cryoptycho.protocols.sources import (
    DetectorFrames,
    RecoveredScan,
    SinkClosed,
    SourceMessage,
    UnpositionedFrames,
)

from .scan import ScanSpec

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: the largest allocation glibc still serves from its heaps (HEAP_MAX_SIZE / 2 on 64-bit: a
#: larger M_MMAP_THRESHOLD is refused); larger messages are mapped and unmapped as before
MESSAGE_HEAP_MAX = 32 << 20
#: free memory kept at the top of glibc's heaps, and kept in heaps that came free (M_TOP_PAD)
MESSAGE_HEAP_PAD = 64 << 20


def keep_message_memory(keep_bytes: int) -> bool:
    """Let the C allocator keep up to ``keep_bytes`` of freed memory for the next messages
    instead of giving it back to the kernel (glibc's ``mallopt``; the daemon owns its process).
    ZeroMQ's I/O thread allocates each received message (``malloc``), and a message is freed
    when its frames are in the spool and the frame store. With glibc's defaults the receiving
    thread's heap was trimmed, or deleted, whenever the waiting messages had been freed, so the
    next ones (4.7 MB for 256 frames of 96×96 uint16) were mapped afresh: on a daemon's next scan
    0.5–1.4 page faults per frame, and the socket reads 1.1–1.6 µs per frame slower than with the
    memory kept (``cryoptycho bench protocol``; daemon/bench/INGEST.md, seventh pass). Kept, a
    message's memory is reused by the next: resident up to the most the daemon held at once (the
    ingest queue, frames waiting for the spool and the workers). Returns whether the allocator
    took the settings (False: not glibc, nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    keep = int(min(max(keep_bytes, 0), 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MESSAGE_HEAP_MAX), (_M_TRIM_THRESHOLD, keep), (_M_TOP_PAD, min(keep, MESSAGE_HEAP_PAD))))


def release_free_memory() -> bool:
    """Give the C allocator's free memory back to the kernel (glibc's ``malloc_trim(0)``: every
    heap's free top, and the free pages inside heaps): what :func:`keep_message_memory` kept
    resident for the next messages, once the daemon is idle (Service, ``release_memory_idle_s``).
    Returns False where the allocator is not glibc (nothing done)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.malloc_trim(0)
    return True


def _glibc() -> Any:
    """The process's C library when it is glibc (its mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # musl's mallopt accepts and ignores ours: glibc only (gnu_get_libc_version)
    return libc if all(hasattr(libc, n) for n in ("gnu_get_libc_version", "mallopt", "malloc_trim")) else None


def resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc/self/statm), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def frame_positions(msg: Frames, spec: ScanSpec) -> np.ndarray:
    """Positions (n, 2) m of a frames message: carried, or looked up in the declared scan."""
    if msg.positions_m is not None:
        return np.asarray(msg.positions_m, dtype=np.float64)
    if spec.positions_m is None:
        raise ProtocolError("positions_m", "positions", "this scan streams positions: send them with the frames",
                            msg.scan_id)
    idx = np.asarray(msg.indices, dtype=np.int64)
    if idx.size and idx.max() >= len(spec.positions_m):
        raise ProtocolError("indices", "index_range", f"index {int(idx.max())} ≥ {len(spec.positions_m)} declared "
                            "positions", msg.scan_id)
    return spec.positions_m[idx]


def check_direct(msg: Any, limits: Limits, declared: Mapping[str, ScanStart]) -> None:
    """The checks :func:`cryoptycho.protocols.messages.decode` applies to a message from the
    ingest socket, for a message a source in this process built: known or unique scan id,
    then the limits and the scan's declaration (shape, dtype, index range, positions)."""
    if not isinstance(msg, (ScanStart, Frames, ScanEnd, Abort)):
        raise ProtocolError("type", "known_type", f"a source sent a {type(msg).__name__}, not an ingest message")
    known = msg.scan_id in declared
    if isinstance(msg, ScanStart):
        if known:
            raise ProtocolError("scan_id", "unique_scan", f"scan {msg.scan_id!r} was already started", msg.scan_id)
        validate.check(msg, limits, None)
        return
    if not known:
        raise ProtocolError("scan_id", "known_scan", f"no scan {msg.scan_id!r} was started", msg.scan_id)
    validate.check(msg, limits, declared[msg.scan_id])


def check_chunks(detector: DetectorFrames, scan: ScanStart) -> None:
    """A detector source's chunks must be one per frame (the spool writes them as they are)."""
    n = len(detector.frames.indices)
    raw = detector.raw
    if raw is not None and len(raw.chunks) != n:
        raise ProtocolError("raw", "chunk_count", f"{len(raw.chunks)} chunks for {n} frames", scan.scan_id)


class DirectIngest:
    """The sink of sources running in the daemon (:mod:`cryoptycho.protocols.sources`): a
    queue the manager thread drains as it reads its ingest socket. ``put`` blocks while more
    than ``capacity_frames`` frames wait (back-pressure reaches the detector's socket, as it
    does for the ingest socket), and raises :class:`SinkClosed` once the daemon stops."""

    def __init__(self, capacity_frames: int = 4096,
                 scan_id_taken: Callable[[str], bool] | None = None) -> None:
        self.capacity_frames = capacity_frames
        self._scan_id_taken = scan_id_taken
        #: set by the service once it recovered its spool, before a source starts
        self.recovered: list[RecoveredScan] = []
        self._items: deque[tuple[Any, float]] = deque()
        self._frames = 0
        self._closed = False
        #: set once the daemon stops: a source then delivers what it holds and leaves its scan
        #: open for the next start to resume (FrameSink.stopping), instead of aborting it
        self.stopping = False
        #: the stop events of the sources running into this sink, and whether each has returned
        #: (:meth:`attach`): the daemon's stop sets them and reads on until they return, so
        #: that the images a source holds reach the spool before the sink closes
        self._sources: list[tuple[threading.Event, threading.Event]] = []
        #: the daemon's limits, which a source bounds what its peer sends with (FrameSink.limits)
        self.limits: Limits | None = None
        self._cond = threading.Condition()
        self._rx, self._tx = socket.socketpair()
        self._rx.setblocking(False)
        self._tx.setblocking(False)

    @property
    def fd(self) -> int:
        """Readable while messages wait (for the manager's poller)."""
        return self._rx.fileno()

    def put(self, msg: SourceMessage) -> None:
        n = _frame_count(msg)
        with self._cond:
            while not self._closed and self._frames and self._frames + n > self.capacity_frames:
                self._cond.wait(0.5)
            if self._closed:
                raise SinkClosed("the daemon is stopping")
            self._items.append((msg, time.monotonic()))
            self._frames += n
            first = len(self._items) == 1
            self._cond.notify_all()  # (a stopping daemon waits in wait_readable)
        if first:
            self._wake()

    def attach(self, stop: threading.Event) -> threading.Event:
        """A source about to run into this sink, watching ``stop``: the daemon's stop sets it
        (:meth:`stop_sources`) and takes the source's messages until the returned event is set
        (by the source's thread, once :meth:`Source.run` returned, whatever way)."""
        ended = threading.Event()
        with self._cond:
            self._sources.append((stop, ended))
        return ended

    def stop_sources(self) -> None:
        """The daemon stops: every source is asked to deliver what it holds and return."""
        with self._cond:
            self.stopping = True
            sources = list(self._sources)
        for stop, _ in sources:
            stop.set()

    @property
    def sources_running(self) -> int:
        """Sources attached that have not returned yet."""
        with self._cond:
            return sum(not ended.is_set() for _, ended in self._sources)

    @property
    def waiting(self) -> int:
        """Messages put and not taken yet."""
        with self._cond:
            return len(self._items)

    def wait_readable(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a message (the daemon's stop, reading its sources out)."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout_s)

    def scan_id_taken(self, scan_id: str) -> bool:
        """Whether the daemon would refuse a scan of this id as not unique (FrameSink)."""
        return self._scan_id_taken is not None and self._scan_id_taken(scan_id)

    def recovered_scans(self) -> list[RecoveredScan]:
        """Open scans recovered at the start that a detector source may resume (FrameSink):
        handed over once, so that a source run again later does not resume them again."""
        out, self.recovered = self.recovered, []
        return out

    def take(self, limit: int) -> list[tuple[Any, float]]:
        """Up to ``limit`` waiting messages with their arrival times (monotonic)."""
        try:
            while self._rx.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            out = [self._items.popleft() for _ in range(min(limit, len(self._items)))]
            self._frames -= sum(_frame_count(m) for m, _ in out)
            left = bool(self._items)
            self._cond.notify_all()
        if left:
            self._wake()
        return out

    def _wake(self) -> None:
        try:
            self._tx.send(b"\0")
        except OSError:
            pass  # full of wake-ups already, or closed: the daemon stopped and reads no more

    def close(self) -> None:
        """Refuse further messages and wake every blocked ``put``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def release(self) -> None:
        self.close()
        self._rx.close()
        self._tx.close()


def _frame_count(msg: Any) -> int:
    if isinstance(msg, UnpositionedFrames):  # (held back like frames: a detector may send many)
        return len(msg.image_ids)
    if isinstance(msg, DetectorFrames):
        msg = msg.frames
    return len(msg.indices) if isinstance(msg, Frames) else 0
