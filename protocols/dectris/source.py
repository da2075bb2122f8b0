"""The DECTRIS detector as a direct source of the daemon (``dectris2://HOST:31001``,
``dectris1://HOST:9999``): one pass from the detector's socket to the daemon's frame store.

Three stages, on threads:

* the receiver (the thread that calls :meth:`DectrisSource.run`) reads the socket, decodes the
  rare start and end messages itself, and gathers image messages, still compressed, in batches;
* decoding workers (a thread pool) parse each image's CBOR, decompress its channel once and bin
  it. bslz4 decompression (``dectris-compression`` or ``bitshuffle``) and NumPy's arithmetic
  release the GIL (checked: a pure-Python thread keeps running beside them), so threads spread
  this work over the cores without pickling frames to other processes;
* the receiver takes the workers' results back in arrival order, runs the series bookkeeping
  (:class:`.convert.SeriesConverter`: duplicates, ids, geometry) and hands ScanStart / frames /
  ScanEnd objects to the daemon's sink, with each frame's detector chunk as it arrived (the
  spool writes it as an HDF5 chunk without recompressing it) and the reducer that binned it:
  while the scan is open the spool writes only the detector's chunks, and derives the binned
  frames from them (daemon/storage/FORMATS.md, "Binned frames derived").
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import multiprocessing
import os
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import zmq

from .. import compression
from ..messages import Frames
from ..sources import (
    DetectorFrames,
    FrameSink,
    RawChunks,
    SinkClosed,
    Source,
    SourceMessage,
    SourceStats,
    UnpositionedFrames,
)
from .binning import scratch
from .bounds import DEFAULT_LIMITS
from .codec import bslz4_array, bslz4_batch, bslz4_batch_plan
from .convert import BridgeConfig, IngestMessage, SeriesConverter, SeriesNotice, _Plan, unlike_start
from .decode import _DTYPES as _TYPED_DTYPES
from .decode import ImagePayload, load_plain_v2, plain_bslz4_image, split_v2_image
from .receiver import DectrisReceiver, ErrorLogLimiter, parse_source
from .schema import DecodeError, DectrisError, Image, Message, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">QI")
#: images per decoding job, and so per frames message into the daemon: the per-message costs
#: (a job's hand-off, the converter's bookkeeping, the spool's resizes and flush, the frame
#: store's add) are shared by this many frames; a slow stream is not held back, as a job also
#: ends with each socket drain
BATCH = 256
#: a job ends a series' images on a multiple of this many while images keep coming (the rest
#: wait for the next socket drain, for at most the flush interval): the frames messages then
#: fill whole chunks of the spool's frames (a power of two of up to 64 frames,
#: daemon/storage/h5format.py), instead of sending a partly filled chunk through HDF5's
#: filter, under the GIL, and reading it back to add the rest (measured: 5–10 µs of CPU per
#: frame, a sixth of the spool's)
ALIGN = 64
#: socket parts per drain of the receiver
DRAIN_PARTS = 256
#: frames binned together by a worker: enough to share NumPy's per-call cost, few enough
#: (1.2 MB at 192×192 uint16) to stay in the core's cache
SUB_BATCH = 16
#: the most bytes one decoded image may have: the wire's cap on a decompressed array (limits.max_message_bytes)
MAX_IMAGE_BYTES = DEFAULT_LIMITS.max_message_bytes
#: the largest id an image may carry: the batch keeps them as int64 (CBOR and JSON ids may be larger)
_ID_MAX = (1 << 63) - 1
#: a stopping daemon (FrameSink.stopping): the source takes what its socket already holds for
#: at most this long (the images the detector sent before the stop; a detector still streaming
#: is cut off after it), then waits at most :data:`STOP_JOBS_S` for its decoding jobs. A job not
#: done by then (a hung worker) is dropped, its images named in the log and an ``error`` event
#: (rule ``dectris_images_lost``): the stop stays bounded (the daemon's SOURCES_STOP_S is more)
STOP_DRAIN_S = 2.0
STOP_JOBS_S = 10.0
#: how often a wait for a decoding job looks at the stop (a hung job must not hide it)
STOP_POLL_S = 0.1


def spool_chunk(payload: bytes, nbytes: int) -> bytes:
    """A detector's bslz4 payload as an HDF5 bitshuffle-filter chunk: the same bytes, unless
    its header gives 0 for the size (as LiberTEM's simulator writes), which the filter needs."""
    size, block = _HEADER.unpack_from(payload)
    if size == nbytes:
        return payload
    return _HEADER.pack(nbytes, block) + payload[_HEADER.size:]


@dataclass
class DecodedBatch:
    """A decoding job's result, as arrays (no object per image): the ids of the images that
    decoded, their spool chunks, and their binned frames (the job knew the series' reducer),
    or the detector frames themselves (it did not: a series' first frame, which builds the
    reducer), or nothing but the ids (``decode`` was off: images no scan will take)."""

    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    series_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unique_ids: list[str | None] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)  #: (H, W) of the detector frames
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    raw: list[bytes] = field(default_factory=list)  #: the detector's chunks, one per image
    errors: list[DectrisError] = field(default_factory=list)
    reducer: Any = None  #: the FrameReducer the binned frames came from
    counts: np.ndarray | None = None  #: (k, M, M) binned frames
    saturated: np.ndarray | None = None  #: (k,) whether a valid bin of the frame saturated
    #: a bound of ``counts``' largest value, never below it (FrameReducer.reduce_batch_peak)
    peak: int | None = None
    frames: np.ndarray | None = None  #: (k, H, W) the detector frames, when not binned
    decoded: int = 0  #: frames decompressed
    cpu_s: float = 0.0  #: CPU time of the job (its thread's clock)
    in_slot: bool = False  #: ``counts`` are in the job's shared-memory slot (process workers)

    def __len__(self) -> int:
        return len(self.image_ids)


def _item_parts(item: bytes | Image, channel: str | None,
                loaded: Any = None) -> tuple[int, str | None, int, ImagePayload]:
    """The ids and channel of an image that is not as detectors send it (or a decoded V1
    image), or the :class:`DecodeError` that names what is wrong with it; ``loaded``: the
    message as the plain path loaded it (None: load it here)."""
    if isinstance(item, bytes):
        # without a channel (no start received yet) the image's first: its ids are what
        # counts, the series tracker rejects it as an image without a start
        return split_v2_image(item, channel, loaded)
    name = channel or next(iter(item.data), None)
    if name not in item.data:
        raise DecodeError(f"image {item.image_id} lacks channel {name!r}")
    arr = item.data[name]
    return (item.series_id, item.series_unique_id, item.image_id,
            ImagePayload((arr.shape[0], arr.shape[1]), arr.dtype, array=arr))


#: each dtype an image's typed array can have, as the decoder's own object (split_plain_v2_image's)
_CANONICAL_DTYPES: dict[np.dtype | None, np.dtype] = {d: d for d in _TYPED_DTYPES.values()}


def decode_job(items: list[bytes | Image], channel: str | None, reducer: Any, decode: bool = True,
               counts_out: np.ndarray | None = None) -> DecodedBatch:
    """The workers' job: parse each image, and with ``decode``, decompress its channel once
    and bin it (``reducer``; None: keep the detector frames) into ``counts_out`` (or a new
    array); the binned frames are not compressed: the spool derives them from the detector's
    chunks. Frames are binned :data:`SUB_BATCH` at a time soon after they are decompressed,
    while they are in the core's cache. A bad image is an error of the batch (``errors``);
    anything else raised is a bug, and the caller's."""
    c0 = time.thread_time()
    out = DecodedBatch(reducer=reducer)
    # per image: its bslz4 bytes as they came (None: decoded already, ``arrays``), ids; all of
    # the first image's shape and dtype (another is an error of that image)
    blobs: list[bytes | None] = []
    arrays: list[np.ndarray | None] = []
    ids: list[int] = []
    series: list[int] = []
    unique_ids = out.unique_ids
    # a job binned by its series' reducer: images of another size than the series' are errors of
    # their own (the job's first image set the size, and an odd one leading a job made every
    # other image of it an error: up to a job of the detector's images lost)
    shape: tuple[int, int] | None = None if reducer is None else tuple(reducer.detector_shape)  # type: ignore[assignment]
    # (the decoder's own dtype object, which the plain path below compares by identity: a
    # reducer's came through pickle in worker processes)
    dtype: np.dtype | None = None if reducer is None else _CANONICAL_DTYPES.get(reducer.in_dtype)
    for item in items:
        # an image as detectors send it: one plain tuple, no object per image (split_plain_v2_image)
        loaded = load_plain_v2(item) if type(item) is bytes else None
        fields = None if loaded is None else plain_bslz4_image(loaded, channel)
        if fields is not None:
            series_id, unique_id, image_id, y, x, item_dtype, blob = fields
            if (shape is not None and y == shape[0] and x == shape[1] and item_dtype is dtype
                    and -_ID_MAX <= image_id <= _ID_MAX and -_ID_MAX <= series_id <= _ID_MAX):
                blobs.append(blob)
                arrays.append(None)
                ids.append(image_id)
                series.append(series_id)
                unique_ids.append(unique_id)
                continue
            payload = ImagePayload((y, x), item_dtype, bslz4=blob)
        try:
            if fields is None:
                series_id, unique_id, image_id, payload = _item_parts(item, channel, loaded)
            if math.prod(payload.shape) * payload.dtype.itemsize > MAX_IMAGE_BYTES:
                # (an error of this image: the job's frames array of that size raised ValueError or
                # MemoryError, which failed the whole job and its scan)
                raise DecodeError(f"image {image_id} is {payload.shape[0]} × {payload.shape[1]} {payload.dtype}: "
                                  f"more than {MAX_IMAGE_BYTES} bytes decoded (the limit max_message_bytes)")
            if not (-_ID_MAX <= image_id <= _ID_MAX and -_ID_MAX <= series_id <= _ID_MAX):
                # an error of this image: the batch's int64 ids raised OverflowError, a failed scan
                raise DecodeError(f"image id {image_id} of series {series_id} does not fit in 64 bits")
            if shape is not None and (payload.shape != shape or (dtype is not None and payload.dtype != dtype)):
                raise DecodeError(f"image {image_id} is {payload.shape} {payload.dtype}, "
                                  f"{'the images before it' if ids else 'its series images'} {shape}"
                                  f"{'' if dtype is None else f' {dtype}'}")
        except DecodeError as exc:
            out.errors.append(exc)
            continue
        if dtype is None:
            shape, dtype = payload.shape, payload.dtype
        blobs.append(payload.bslz4)
        arrays.append(payload.array)
        ids.append(image_id)
        series.append(series_id)
        unique_ids.append(unique_id)
    if shape is None or dtype is None:
        out.unique_ids = []
        out.cpu_s = time.thread_time() - c0
        return out
    out.shape, out.dtype = shape, dtype
    if not decode:
        out.image_ids, out.series_ids = np.array(ids, np.int64), np.array(series, np.int64)
        out.cpu_s = time.thread_time() - c0
        return out
    nbytes = shape[0] * shape[1] * dtype.itemsize
    binning = reducer is not None and reducer.detector_shape == shape
    n = len(blobs)
    if binning:
        m = reducer.frame_side
        counts = counts_out[:n] if counts_out is not None else np.empty((n, m, m), reducer.out_dtype)
        saturated = np.zeros(n, bool)
        group = scratch((SUB_BATCH, *shape), dtype, "group")  # decoded frames awaiting their binning
    else:
        frames = np.empty((n, *shape), dtype)
    keep = np.ones(n, bool)
    k = g = 0
    # bslz4 frames whose framing is whole are decoded up to SUB_BATCH at a time, in one codec
    # call (codec.bslz4_batch), and binned from the codec's output as they are; the rest (and
    # the frames of a batch the codec refused) one at a time, gathered in ``group`` for binning
    together, block_bytes = (bslz4_batch_plan(blobs, dtype, shape)  # type: ignore[arg-type]
                             if None not in blobs else (np.zeros(n, bool), 0))

    peak = 0

    def bin_rows(stack: np.ndarray, rows: slice) -> None:
        nonlocal peak
        _, saturated[rows], top = reducer.reduce_batch_peak(stack, out=counts[rows])
        peak = max(peak, top)

    j = 0
    while j < n:
        if together[j]:
            end = j + 1
            while end < n and end - j < SUB_BATCH and together[end]:
                end += 1
            try:
                stack = bslz4_batch(blobs[j:end], dtype, shape, block_bytes)  # type: ignore[arg-type]
            except DecodeError:  # a corrupt block: each frame alone, which names the one
                together[j:end] = False
                continue
            if binning and g:  # frames gathered before these are binned first (row order)
                bin_rows(group[:g], slice(k - g, k))
                g = 0
            out.raw.extend(spool_chunk(blob, nbytes) for blob in blobs[j:end])  # type: ignore[arg-type]
            if binning:
                bin_rows(stack, slice(k, k + end - j))
            else:
                frames[k:k + end - j] = stack
            k += end - j
            j = end
            continue
        blob = blobs[j]
        try:
            if blob is not None:
                frame = bslz4_array(blob, dtype, shape)
                chunk = spool_chunk(blob, nbytes)
            else:
                frame = arrays[j]
                chunk = compression.bslz4_compress(frame)
        except DecodeError as exc:
            out.errors.append(exc)
            keep[j] = False
            j += 1
            continue
        j += 1
        out.raw.append(chunk)
        if binning:
            group[g] = frame
            g += 1
            k += 1
            if g == SUB_BATCH:
                bin_rows(group, slice(k - g, k))
                g = 0
        else:
            frames[k] = frame
            k += 1
    if binning and g:
        bin_rows(group[:g], slice(k - g, k))
    out.image_ids = np.array(ids, np.int64)[keep]
    out.series_ids = np.array(series, np.int64)[keep]
    if not keep.all():
        out.unique_ids = [u for u, ok in zip(out.unique_ids, keep) if ok]
    out.decoded = k
    if binning:
        out.counts, out.saturated, out.peak = counts[:k], saturated[:k], peak
    else:
        out.frames = frames[:k]
    out.cpu_s = time.thread_time() - c0
    return out


class Decoder:
    """:func:`decode_job` with a count of decompressed frames (one per image: tests check it)."""

    def __init__(self) -> None:
        self.decoded = 0
        self._lock = threading.Lock()

    def count(self, n: int) -> None:
        with self._lock:
            self.decoded += n

    def __call__(self, items: list[bytes | Image], channel: str | None, reducer: Any,
                 decode: bool = True) -> DecodedBatch:
        out = decode_job(items, channel, reducer, decode)
        self.count(out.decoded)
        return out


# ------------------------------------------------------------------ decoding in worker processes

#: the worker process's attachment to the source's shared memory (name → block)
_attached: dict[str, shared_memory.SharedMemory] = {}


def _process_job(items: list[bytes], channel: str | None, reducer: Any, decode: bool,
                 slot: tuple[str, int, int] | None) -> DecodedBatch:
    """:func:`decode_job` in a worker process: the binned frames go into the shared-memory slot
    ``(block name, byte offset, bytes)``; the rest (ids, chunks) is sent back."""
    counts_out = None
    if slot is not None and decode and reducer is not None:
        name, offset, size = slot
        shm = _attached.get(name)
        if shm is None:
            for old in _attached.values():
                old.close()
            _attached.clear()
            shm = _attached[name] = shared_memory.SharedMemory(name)
        m = reducer.frame_side
        k = size // (m * m * reducer.out_dtype.itemsize)
        counts_out = np.ndarray((k, m, m), reducer.out_dtype, shm.buf, offset)
    out = decode_job(items, channel, reducer, decode, counts_out)
    if out.counts is not None and counts_out is not None:
        out.counts, out.in_slot = None, True  # the caller reads them from the slot
    out.reducer = None  # the caller's own is put back (a copy would not be the series')
    return out


def _shm_free() -> str:
    """The room left in /dev/shm, for a message."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError as exc:
        return f"unknown: {exc}"
    return _mb(st.f_bavail * st.f_frsize)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.3g} MB"


def _ready() -> int:
    """A no-op job: the worker has started and imported this module."""
    return os.getpid()


#: how long :meth:`DecodePool.close` waits for its worker processes to end before it kills them
#: (a stopped or hung worker otherwise held the daemon's stop until systemd killed it; well
#: under serve's wait for its source, SOURCE_STOP_S)
CLOSE_WAIT_S = 10.0
#: after the decoding fell back to threads, worker processes are tried again at the first series
#: start this many seconds later, then at twice the wait after each failure, up to
#: RETRY_PROCESSES_MAX_S: a transient cause (/dev/shm full for a while, a descriptor shortage)
#: degraded the source for the rest of the daemon's life, and a lasting one costs a spawn attempt
#: (seconds, at a series start) ever more rarely
RETRY_PROCESSES_S = 60.0
RETRY_PROCESSES_MAX_S = 3600.0


def _end_processes(pool: ProcessPoolExecutor, wait_s: float, why: str) -> list[int]:
    """Shut ``pool`` down, its worker processes given ``wait_s`` to end (0: killed at once),
    then killed (SIGKILL: a stopped process outlives the pool's SIGTERM) and reaped; the pids
    killed. Never waits past ``wait_s`` plus the kills' reaping."""
    from multiprocessing.connection import wait as wait_sentinels

    processes = dict(getattr(pool, "_processes", None) or {})
    pool.shutdown(wait=False, cancel_futures=True)
    sentinels: dict[int, Any] = {}
    for pid, process in processes.items():
        try:
            sentinels[process.sentinel] = (pid, process)
        except ValueError:  # the pool closed its Process object: that worker was waited for
            pass
    deadline = time.monotonic() + wait_s
    while sentinels:  # (a sentinel is ready once its process ended, whoever reaps it)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for ended in wait_sentinels(list(sentinels), left):
            sentinels.pop(ended, None)
    killed = []
    for pid, process in sentinels.values():
        if wait_s > 0:
            log.warning("DECTRIS decoding: worker process %d did not end %s (stopped or hung); "
                        "killed (SIGKILL)", pid, why)
        try:
            process.kill()
            process.join(CLOSE_WAIT_S)  # reaped: SIGKILL ends a stopped process too
        except ValueError:  # closed by the pool meanwhile: it was waited for
            pass
        killed.append(pid)
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:  # (it ends once its workers have: it sees them gone)
        manager.join(CLOSE_WAIT_S)
        if manager.is_alive():
            log.error("DECTRIS decoding: the worker pool's manager thread did not end after its "
                      "workers had; left behind")
    return killed


class DecodePool:
    """The decoding workers: ``workers`` threads, or (``processes``) worker processes whose
    binned frames come back through shared memory, in :attr:`slots` slots of one job each.
    Results are taken back with :meth:`result` in submission order.

    A job's binned frames are handed on as a view of its slot (no copy) while at most
    :attr:`lend_max` slots are lent so; such a slot serves another job only once nothing
    references its frames any more (the frame store has copied them, the spool and every
    message holding them are done: the slot's own array's reference count says so, as for the
    store's mappings). Past that many, the frames are copied out (:meth:`_copy_out`) and the
    slot is free at once, so that frames held for long (a scan waiting for positions, a
    cancelled scan's close) never stop the decoding: :attr:`slots` − :attr:`lend_max` slots are
    always there for the jobs in flight."""

    def __init__(self, workers: int, processes: bool, lend_max: int | None = None,
                 on_degraded: Callable[[str], None] | None = None,
                 on_restored: Callable[[str], None] | None = None) -> None:
        self.workers, self.processes = workers, processes
        #: called (with the reason, logged already) when worker processes cannot be started and
        #: the pool decodes on threads instead
        self.on_degraded = on_degraded
        #: called (with what happened, logged already) when worker processes started again after
        #: a fallback (:meth:`retry_processes`)
        self.on_restored = on_restored
        #: after a fallback: the wait before the next try of worker processes, and when it is due
        self._retry_s = RETRY_PROCESSES_S
        self._retry_at = 0.0
        #: why the pool decodes on threads though worker processes were asked for (None: it does not)
        self.fallback: str | None = None
        #: slots for the jobs in flight (what the receiver submits before it takes results)
        self.in_flight = in_flight = 2 * workers + 2
        #: slots whose frames may be out as views at once (0: every job's frames are copied out;
        #: set to 0 where the shared memory cannot hold these slots too, :meth:`_reserve`)
        self.lend_max = in_flight if lend_max is None else max(0, int(lend_max))
        self._lend_wanted = self.lend_max  #: (tried again at each growth after a shortage dropped them)
        self.slots = in_flight + self.lend_max
        self._free: deque[int] = deque(range(self.slots))
        self._lent: set[int] = set()
        self._shm: shared_memory.SharedMemory | None = None
        #: each slot's bytes as an array over this process's own mapping of the shared memory
        #: (not the SharedMemory's buffer: that one cannot be closed while views of it live,
        #: and a lent slot's frames may outlive the pool); views of a slot's frames reference
        #: its array, and the mapping goes once the last of them does
        self._slot_arrays: list[np.ndarray] = []
        self._slot_bytes = 0
        #: the largest job whose slots could not be made (:meth:`_grow` failed): jobs up to that
        #: size go without a slot (their frames come back pickled) rather than retry each time
        self._unmapped = 0
        #: arrays the slots' binned frames are copied into, handed out again once nothing
        #: references them (:meth:`_copy_out`)
        self._out: list[np.ndarray] = []
        self.process_cpu_s = 0.0  #: CPU time of the jobs run in worker processes
        self.generation = 0  #: how many times the workers were restarted
        self.outstanding = 0  #: jobs submitted whose result was not taken yet
        self.abandoned = 0  #: jobs dropped at a stop, still running (a hung worker): close waits for none
        self._pool: ThreadPoolExecutor | ProcessPoolExecutor = self._start_or_fall_back("start")

    def _start(self) -> ThreadPoolExecutor | ProcessPoolExecutor:
        if not self.processes:
            return ThreadPoolExecutor(self.workers, thread_name_prefix="dectris-decode")
        # spawn, not fork: the daemon's threads may hold locks (and ZeroMQ contexts) a forked
        # child would inherit in an unusable state
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            for f in [pool.submit(_ready) for _ in range(self.workers)]:
                f.result(timeout=120)  # started before the first scan, not during it
        except BaseException:
            _end_processes(pool, 0, "after the pool failed to start")  # (the ones that did start)
            raise
        log.info("DECTRIS decoding: %d worker processes ready (pids %s)", self.workers,
                 ", ".join(map(str, getattr(pool, "_processes", None) or {})))
        return pool

    def _start_or_fall_back(self, what: str) -> ThreadPoolExecutor | ProcessPoolExecutor:
        """New workers; where worker processes cannot be had (no room in /dev/shm for their
        semaphores: ENOSPC, no file descriptors left: EMFILE, a spawn that fails or dies),
        threads, which need none of that: the source goes on taking series, more slowly,
        instead of stopping with the error (and the daemon, deaf to the detector, with it)."""
        try:
            return self._start()
        except Exception as exc:  # (any failure to start is a fallback, and said so)
            if not self.processes:
                raise  # (threads: nothing to fall back to)
            reason = (f"the DECTRIS decoding worker processes could not {what} ({type(exc).__name__}: "
                      f"{exc}; /dev/shm {_shm_free()} free); decoding on {self.workers} threads "
                      f"instead (slower); worker processes are tried again at a series start "
                      f"{self._retry_s:g} s or more from now")
            log.error("%s", reason, exc_info=exc)
            self.processes, self.fallback = False, reason
            self._retry_at = time.monotonic() + self._retry_s
            if self.on_degraded is not None:
                try:
                    self.on_degraded(reason)
                except Exception:  # the listener's failure must not stop the decoding
                    log.exception("DECTRIS decoding: the fallback's listener failed")
            return self._start()

    def retry_due(self) -> bool:
        """Whether the pool decodes on threads after a fallback and its next try of worker
        processes is due (:meth:`retry_processes`)."""
        return self.fallback is not None and time.monotonic() >= self._retry_at

    def retry_processes(self) -> bool:
        """Worker processes again, where the pool fell back to threads and the try is due
        (the caller has taken every job's result: none is in the threads' hands). On success
        the fallback is over (``on_restored``); on failure the pool stays on threads and the
        next try waits twice as long (at most RETRY_PROCESSES_MAX_S). Whether it switched."""
        if not self.retry_due() or self.outstanding:
            return False
        self.processes = True  # (what _start builds)
        try:
            pool = self._start()
        except Exception as exc:  # noqa: BLE001 - still on threads, said so, tried again later
            self.processes = False
            self._retry_s = min(2 * self._retry_s, RETRY_PROCESSES_MAX_S)
            self._retry_at = time.monotonic() + self._retry_s
            log.warning("DECTRIS decoding: worker processes still cannot start (%s: %s; /dev/shm %s free); "
                        "decoding on threads, tried again in %g s or more", type(exc).__name__, exc,
                        _shm_free(), self._retry_s)
            return False
        threads, self._pool = self._pool, pool
        threads.shutdown(wait=True)  # (idle: every job's result was taken)
        self.generation += 1
        was, self.fallback = self.fallback, None
        self._retry_s, self._retry_at = RETRY_PROCESSES_S, 0.0
        said = f"the DECTRIS decoding worker processes started again: decoding in {self.workers} processes " \
               f"(after: {was})"
        log.warning("%s", said)
        if self.on_restored is not None:
            try:
                self.on_restored(said)
            except Exception:  # the listener's failure must not stop the decoding
                log.exception("DECTRIS decoding: the restore's listener failed")
        return True

    def pids(self) -> list[int]:
        """The worker processes' ids (none for threads)."""
        return list(getattr(self._pool, "_processes", None) or {}) if self.processes else []

    def restart(self, generation: int) -> bool:
        """New workers after a worker process of ``generation`` died (its pool is then broken:
        its other jobs fail too, and restart nothing more). Whether it restarted."""
        if generation != self.generation:
            return False
        # the broken pool's workers killed and waited for: it fails their jobs before it
        # terminates them, and one still running writes into its job's slot, which that job's
        # failure freed; killed (SIGKILL), for a stopped one outlives the pool's SIGTERM and
        # the wait would not end
        for process in list((getattr(self._pool, "_processes", None) or {}).values()):
            try:
                process.kill()
            except ValueError:  # the pool closed its Process object: that worker was waited for
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.generation += 1
        # the broken pool's jobs keep their slots until their results are taken (:meth:`result`):
        # one that finished before a worker died holds frames still to be taken
        self._pool = self._start_or_fall_back("be restarted after one died")
        return True

    def _reclaim(self) -> int:
        """Lent slots whose frames nothing references any more become free; how many did."""
        back = 0
        for i in list(self._lent):
            # the list's reference and getrefcount's own: no view of the slot is alive (a view
            # of a view references the slot's array too: NumPy keeps the owner as the base)
            if sys.getrefcount(self._slot_arrays[i]) == 2:
                self._lent.discard(i)
                self._free.append(i)
                back += 1
        return back

    def free_slots(self) -> int:
        """Slots free for a job now (lent slots let go of included)."""
        self._reclaim()
        return len(self._free)

    @property
    def lent(self) -> int:
        """Slots whose frames are out as views (let go of or not: :meth:`free_slots`)."""
        return len(self._lent)

    @property
    def has_free_slot(self) -> bool:
        return not self.processes or bool(self._free) or self._reclaim() > 0

    def submit(self, items: list[bytes | Image], channel: str | None, reducer: Any,
               decode: bool) -> Future[DecodedBatch]:
        """The job as a future; one that could not start (its pool is broken) fails with it.
        Workers found dead are replaced first, so that no later job is lost with them."""
        if self.processes and getattr(self._pool, "_broken", False):
            self.restart(self.generation)
        index, slot = None, None
        self.outstanding += 1
        try:
            if not self.processes:
                future = self._pool.submit(decode_job, items, channel, reducer, decode)
            else:
                need = 0 if not decode or reducer is None else \
                    len(items) * reducer.frame_side ** 2 * reducer.out_dtype.itemsize
                if need > self._slot_bytes and need > self._unmapped:
                    try:
                        self._grow(need)
                    except OSError as exc:
                        # (shm_open's EMFILE, a full /dev/shm): not tried again for jobs this
                        # size, each of which the source would wait for every job before
                        self._unmapped = need
                        log.error("DECTRIS decoding: no shared memory for the jobs' binned frames "
                                  "(slots of %s: %s; /dev/shm %s free): they come back through the "
                                  "worker processes' pipes instead (more CPU per frame)", _mb(need), exc,
                                  _shm_free())
                if 0 < need <= self._slot_bytes and (self._free or self._reclaim()):
                    # (no slot free: jobs dropped as hung at a stop keep theirs, for their worker may
                    # still write there; this job's frames come back through the pipe instead)
                    # the slot freed last: its pages are the ones faulted in already (a slot
                    # used for the first time costs its page faults in the worker and here)
                    index = self._free.pop()
                    assert self._shm is not None
                    slot = (self._shm.name, index * self._slot_bytes, self._slot_bytes)
                future = self._pool.submit(_process_job, items, channel, reducer, decode, slot)
        except BrokenProcessPool as exc:
            future = Future()
            future.set_exception(exc)
        future.slot = index  # type: ignore[attr-defined]
        future.reducer = reducer  # type: ignore[attr-defined]
        future.generation = self.generation  # type: ignore[attr-defined]
        future.images = len(items)  # type: ignore[attr-defined]  (counted when the job is lost)
        #: what the job was given: run again by new workers when its worker process dies
        future.job = (items, channel, reducer, decode)  # type: ignore[attr-defined]
        future.processes = self.processes  # type: ignore[attr-defined]
        return future

    def _grow(self, need: int) -> None:
        """Larger slots (only when no job holds one: the caller takes every result first).
        Frames still lent out keep the old mapping alive (their arrays reference it) after its
        shared memory is closed and unlinked here. Lent slots dropped for a shortage of
        /dev/shm are tried again (it may have room now). Raises OSError (the slots as they were)
        where no block can be made or mapped."""
        assert len(self._free) + len(self._lent) == self.slots, "slots grow only while no job holds one"
        old = self._shm
        was = self.lend_max, self.slots
        slot_bytes = max(need, 2 * self._slot_bytes)
        self.lend_max, self.slots = self._lend_wanted, self.in_flight + self._lend_wanted
        try:
            shm = self._reserve(slot_bytes)
            try:
                mapping = mmap.mmap(shm._fd, self.slots * slot_bytes)  # type: ignore[attr-defined]
            except BaseException:
                shm.close()
                shm.unlink()
                raise
        except BaseException:
            self.lend_max, self.slots = was
            raise
        self._shm, self._slot_bytes = shm, slot_bytes
        self._slot_arrays = [np.frombuffer(mapping, np.uint8, self._slot_bytes, i * self._slot_bytes)
                             for i in range(self.slots)]
        self._free, self._lent = deque(range(self.slots)), set()
        self._out = [b for b in self._out if b.nbytes >= self._slot_bytes]  # the smaller go with their frames
        if old is not None:
            old.close()
            old.unlink()

    def _reserve(self, slot_bytes: int) -> shared_memory.SharedMemory:
        """A shared-memory block of :attr:`slots` slots, its pages reserved at once. A block is
        a file of /dev/shm (a tmpfs, 64 MB in a container by default), whose pages are taken
        only as they are first written: one past the tmpfs' room is a SIGBUS in the worker
        process writing a job's frames there (its pool breaks, the scan fails, and so does each
        scan after it). Where the lent slots do not fit as well, none is lent (the frames are
        copied out, as with ``lend_max`` 0); where the slots for the jobs in flight do not
        either, the block is used unreserved (as before lending: workers may die of it), and
        the shortage is logged with the sizes."""
        while True:
            size = self.slots * slot_bytes
            shm = shared_memory.SharedMemory(create=True, size=size)
            if not hasattr(os, "posix_fallocate"):  # (macOS: no tmpfs to reserve in either)
                return shm
            try:
                os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]
                return shm
            except OSError as exc:
                if exc.errno != errno.ENOSPC:  # no reserving there (not a tmpfs): as before, unreserved
                    log.info("DECTRIS decoding: the shared memory's pages cannot be reserved (%s)", exc)
                    return shm
                shm.close()
                shm.unlink()  # (its reserved pages go with it)
                free = _shm_free()
                if self.lend_max == 0:
                    log.error("DECTRIS decoding: the shared memory (/dev/shm, %s free) cannot hold the "
                              "%d slots of %s for the jobs in flight: a worker process writing past "
                              "its room dies (SIGBUS) and fails its scan; give /dev/shm more room (for a "
                              "container: --shm-size) or use fewer workers", free, self.slots,
                              _mb(slot_bytes))
                    return shared_memory.SharedMemory(create=True, size=size)
                log.warning("DECTRIS decoding: the shared memory (/dev/shm, %s free) cannot hold %d "
                            "slots of %s: the %d lent slots dropped, every job's binned frames are "
                            "copied out of its slot (give /dev/shm more room to lend them)", free,
                            self.slots, _mb(slot_bytes), self.lend_max)
                self.lend_max, self.slots = 0, self.in_flight

    def needs_grow(self, items: int, reducer: Any) -> bool:
        if not self.processes or reducer is None:
            return False
        need = items * reducer.frame_side ** 2 * reducer.out_dtype.itemsize
        return need > self._slot_bytes and need > self._unmapped

    def result(self, future: Future[DecodedBatch]) -> DecodedBatch:
        """The job's result, its binned frames a view of its slot (lent: the slot is free
        again once nothing references them) or, past :attr:`lend_max` lent slots, copied out
        of shared memory; raises what the job raised (BrokenProcessPool when its worker
        process died)."""
        # (of this generation of workers or of one before: a restart frees no job's slot)
        slot = getattr(future, "slot", None)
        own = slot is not None
        try:
            batch = future.result()
        except BaseException:
            if own:
                self._free.append(slot)
            raise
        finally:
            self.outstanding -= 1
        if getattr(future, "processes", self.processes):  # (a worker process's job: a fallback may have come since)
            self.process_cpu_s += batch.cpu_s
            batch.reducer = getattr(future, "reducer", None)
        if not batch.in_slot:
            if own:
                self._free.append(slot)
            return batch
        assert slot is not None and batch.reducer is not None
        m, k, dtype = batch.reducer.frame_side, batch.decoded, batch.reducer.out_dtype
        view = self._slot_arrays[slot][:k * m * m * dtype.itemsize].view(dtype).reshape(k, m, m)
        batch.in_slot = False
        if own and self._room_to_lend():
            self._lent.add(slot)
            batch.counts = view
            return batch
        batch.counts = self._copy_out(view)  # the slot serves the next job
        del view
        if own:
            self._free.append(slot)
        return batch

    def _room_to_lend(self) -> bool:
        """Whether fewer than :attr:`lend_max` slots are lent (those let go of count no more)."""
        if len(self._lent) >= self.lend_max:
            self._reclaim()
        return len(self._lent) < self.lend_max

    def _copy_out(self, view: np.ndarray) -> np.ndarray:
        """A copy of a slot's frames, in a kept array that nothing references any more (the
        frame store has copied the frames it held, and every view of it is gone), else in a new
        one, kept while at most :attr:`slots` × 2 are. A fresh array per job came partly from
        fresh pages each time: measured, a 256-frame job's copy out of shared memory 7–9 µs per
        96×96 uint32 frame (0.6 page faults) against 4.0 (none) into a kept array."""
        nbytes = view.nbytes
        for i in range(len(self._out)):
            # the list's reference and getrefcount's own: no array or view over it is alive, and
            # only this method hands it out (the frames' readers hold references while they read)
            if sys.getrefcount(self._out[i]) == 2 and self._out[i].nbytes >= nbytes:
                out = self._out[i][:nbytes].view(view.dtype).reshape(view.shape)
                break
        else:
            buf = np.empty(self._slot_bytes, np.uint8)
            if len(self._out) < 2 * self.slots:
                self._out.append(buf)
            out = buf[:nbytes].view(view.dtype).reshape(view.shape)
        np.copyto(out, view)
        return out

    def close(self, wait_s: float | None = None, hung_ok: bool = False) -> list[int]:
        """Stop the workers: worker processes get ``wait_s`` (default CLOSE_WAIT_S) to end, then
        are killed (a stopped or hung one held the daemon's stop for ever: systemd's SIGKILL of
        the whole daemon ended it); the shared memory is unlinked either way, and frames lent out
        stay valid (their arrays keep this process's mapping). The pids killed."""
        # (read at the call, not bound at the definition: a test scales the module's value down)
        wait_s = CLOSE_WAIT_S if wait_s is None else wait_s
        killed: list[int] = []
        if isinstance(self._pool, ThreadPoolExecutor):  # (threads cannot be killed; a job is bounded)
            # ``hung_ok``: a job was dropped as hung at the stop: its thread is left to end by itself
            self._pool.shutdown(wait=not hung_ok, cancel_futures=True)
        else:
            killed = _end_processes(self._pool, wait_s, f"within {wait_s:g} s of the decoding's close")
        self._out = []  # frames still referenced keep their arrays; the rest go now
        # frames still lent out keep the mapping (their arrays reference it); the rest go now
        self._slot_arrays, self._lent, self._free = [], set(), deque()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
        return killed


class DirectConverter(SeriesConverter):
    """:class:`SeriesConverter` fed decoded batches: frames leave as :class:`DetectorFrames`
    (one per batch, with the detector's chunks) instead of being copied into message batches;
    images past the scan's positions leave as :class:`UnpositionedFrames`, kept by the spool."""

    keeps_unpositioned = True

    def __init__(self, config: BridgeConfig | None = None, side_channel: bool = False,
                 on_notice: Callable[[SeriesNotice], None] | None = None,
                 taken: Callable[[str], bool] | None = None) -> None:
        super().__init__(config, side_channel, on_notice, taken)
        #: (scan id, image id) → detector chunk of frames waiting for a position
        self._held: dict[tuple[str, int], bytes] = {}
        self._held_kind: dict[str, RawChunks] = {}

    def feed_batch(self, batch: DecodedBatch) -> list[SourceMessage]:
        out: list[SourceMessage] = []
        keep = self.tracker.accept_batch(batch.series_ids, batch.unique_ids, batch.image_ids)
        plan = self.plan
        if plan is None:
            self.stats["skipped_images"] += int(np.count_nonzero(keep))
            return out
        if plan.scan_start is None and keep.any():
            if batch.frames is None:  # binned by a reducer of an earlier plan: cannot open a scan
                self.stats["skipped_images"] += int(np.count_nonzero(keep))
                return out
            first = int(np.flatnonzero(keep)[0])
            unlike = unlike_start(plan.start, batch.shape, batch.dtype)
            if unlike is not None:  # not the detector's images: the next one opens the scan
                self.stats["skipped_images"] += int(np.count_nonzero(keep))
                log.error("scan %s: image %d is %s: refused (the scan opens with the next image as the start "
                          "message describes)", plan.scan_id, int(batch.image_ids[first]), unlike)
                return out
            try:
                plan.scan_start = self._open_scan(plan, batch.frames[first])
            except Exception as exc:  # noqa: BLE001 - skips the series, never the source
                self.plan = None
                self._skip(plan.start, exc)
                self.stats["skipped_images"] += int(np.count_nonzero(keep)) - 1
                return out
            out.append(plan.scan_start)
        if not keep.any() or plan.reducer is None:
            return out
        past = keep & self.tracker.past(batch.image_ids)
        if past.any():  # more images than the scan's positions: kept (once: the spool), not reconstructed
            rows_past = np.flatnonzero(past)
            out.append(UnpositionedFrames(plan.scan_id, batch.image_ids[rows_past].astype(np.int64),
                                          RawChunks(batch.shape, batch.dtype, [batch.raw[k] for k in rows_past])))
            self.stats["unpositioned_images"] += len(rows_past)
            keep = keep & ~past
            if not keep.any():
                return out
        reducer = plan.reducer
        rows = None if keep.all() else np.flatnonzero(keep)
        accepted = slice(None) if rows is None else rows
        if batch.shape != reducer.detector_shape:
            self.stats["skipped_images"] += int(np.count_nonzero(keep))
            log.error("scan %s: %d images of %s, the series' first image was %s; skipped", plan.scan_id,
                      int(np.count_nonzero(keep)), batch.shape, reducer.detector_shape)
            return out
        if batch.reducer is reducer and batch.counts is not None:
            # (the batch's peak bounds any of its rows')
            counts, saturated, peak = batch.counts[accepted], batch.saturated[accepted], batch.peak  # type: ignore[index]
        elif batch.frames is not None:  # decoded before the series' first frame built its reducer
            counts, saturated, peak = reducer.reduce_batch_peak(batch.frames[accepted])
        else:  # binned by another series' reducer of the same detector shape
            self.stats["skipped_images"] += int(np.count_nonzero(keep))
            log.error("scan %s: %d images were binned for another series; skipped", plan.scan_id,
                      int(np.count_nonzero(keep)))
            return out
        raw = batch.raw if rows is None else [batch.raw[k] for k in rows]
        ids = batch.image_ids[accepted].astype(np.uint32)
        self._count_saturated(plan, ids, saturated)
        positions = None
        if plan.streamed:
            found = [self._position(plan, int(i)) for i in ids]
            ready = np.array([p is not None for p in found], bool)
            for k in np.flatnonzero(~ready):
                plan.waiting[int(ids[k])] = counts[k].copy()
                self._held[(plan.scan_id, int(ids[k]))] = raw[k]
            self._held_kind[plan.scan_id] = RawChunks(batch.shape, batch.dtype, [])
            if not ready.all():
                sel = np.flatnonzero(ready)
                ids, counts = ids[sel], counts[sel]
                raw = [raw[k] for k in sel]
                found = [found[k] for k in sel]
            if not len(ids):
                return out
            positions = np.stack(found)  # type: ignore[arg-type]
        plan.sent += len(ids)
        self.stats["frames_sent"] += len(ids)
        out.append(DetectorFrames(
            Frames(plan.scan_id, ids, counts, positions),
            raw=RawChunks(batch.shape, batch.dtype, raw), reducer=reducer, peak=peak))
        return out

    def _count_saturated(self, plan: _Plan, ids: np.ndarray, saturated: np.ndarray) -> None:
        n = int(np.count_nonzero(saturated))
        if not n:
            return
        plan.saturated_frames += n
        self.stats["saturated_frames"] += n
        if plan.saturated_frames == n:
            log.warning("scan %s: saturated pixels outside the mask in image %d; they count as "
                        "the saturation value (our protocol carries no per-frame mask)",
                        plan.scan_id, int(ids[np.flatnonzero(saturated)[0]]))

    def _release_waiting(self, plan: _Plan) -> list[IngestMessage]:
        """An aborted scan's images still waiting for side-channel positions are kept in its
        spool as the detector sent them, like images past its positions (until this they
        were dropped with the abort)."""
        kind = self._held_kind.pop(plan.scan_id, None)
        ids = sorted(plan.waiting)
        raw = [self._held.pop((plan.scan_id, i), None) for i in ids]
        if kind is None or not ids or any(r is None for r in raw):
            return []
        plan.waiting = {}
        plan.unpositioned += len(ids)
        self.stats["unpositioned_images"] += len(ids)
        return [UnpositionedFrames(plan.scan_id, np.array(ids, np.int64),  # type: ignore[list-item]
                                   RawChunks(kind.shape, kind.dtype, raw))]  # type: ignore[arg-type]

    def _take_batch(self, plan: _Plan) -> list[IngestMessage]:
        """Frames released by side-channel positions leave with the chunks they were held with."""
        out: list[Any] = []
        for msg in super()._take_batch(plan):
            kind = self._held_kind.get(plan.scan_id)
            held = [self._held.pop((plan.scan_id, int(i)), None) for i in msg.indices]
            if kind is None or any(h is None for h in held):
                out.append(msg)
                continue
            out.append(DetectorFrames(msg, raw=RawChunks(kind.shape, kind.dtype, held),  # type: ignore[arg-type]
                                      reducer=plan.reducer))
        return out


class DectrisSource(Source):
    """A DECTRIS Stream V1/V2 detector read by the daemon itself (see the module docstring).
    ``workers`` decoding threads, or worker processes with ``processes`` (Stream V2 only: V1
    images are decoded by the receiver); ``config`` is the daemon's ``[dectris]`` table."""

    schemes = ("dectris", "dectris1", "dectris2")
    config_section = "dectris"

    def __init__(self, url: str, config: BridgeConfig | dict[str, Any] | None = None, *, workers: int = 2,
                 batch: int = BATCH, context: zmq.Context | None = None,
                 on_notice: Callable[[SeriesNotice], None] | None = None,
                 processes: bool | None = None) -> None:
        self.url = url
        self.on_notice = on_notice
        self.version, self.endpoint = parse_source(url)
        if config is not None and not isinstance(config, (BridgeConfig, dict)):
            raise TypeError(f"config must be a BridgeConfig or a dict of its fields, not {type(config).__name__}")
        self.config = config if isinstance(config, BridgeConfig) else BridgeConfig.model_validate(config or {})
        if workers < 1 or batch < 1:
            raise ValueError(f"workers and batch must be ≥ 1, got {workers} and {batch}")
        self.workers, self.batch = workers, batch
        if processes is None:
            processes = self.config.worker_processes
        self.processes = bool(processes) and self.version == 2
        if processes and self.version != 2:
            # an operator who set it for a V1 detector was given threads without a word
            log.warning("DECTRIS source %s: [dectris] worker_processes = true applies to Stream V2 only; "
                        "Stream V1 images are decoded by the receiver, on threads", url)
        self.context = context
        self.decoder = Decoder()
        self.pool: DecodePool | None = None  #: the decoding workers while :meth:`run` runs
        #: set once :meth:`run` has its workers started and its socket connected
        self.ready = threading.Event()

    @property
    def process_cpu_s(self) -> float:
        """CPU seconds the worker processes spent on jobs so far (0 with threads)."""
        return self.pool.process_cpu_s if self.pool is not None else 0.0

    def run(self, sink: FrameSink, stop: threading.Event, *, max_series: int | None = None) -> SourceStats:
        """Deliver every series as a scan until ``stop`` is set, the sink closes or
        ``max_series`` series have ended; a scan still open then is aborted."""
        cfg = self.config
        ctx = self.context or zmq.Context.instance()
        conv = DirectConverter(cfg, side_channel=cfg.positions_endpoint is not None, on_notice=self.on_notice,
                               taken=getattr(sink, "scan_id_taken", None))
        stats = SourceStats()
        job_errors = [0]
        retried = [0]  #: jobs run again after their worker process died

        log_error = ErrorLogLimiter(log, f"DECTRIS stream {self.url}")

        def on_error(exc: DectrisError) -> None:
            log_error(exc)  # each one is counted through the notice
            if self.on_notice is not None:  # published and counted by the daemon, not only logged
                try:
                    self.on_notice(SeriesNotice("undecodable", None, getattr(exc, "field", None) or "message",
                                                f"a detector message could not be decoded: {exc}"))
                except Exception:  # the listener's failure must not stop the stream
                    log.exception("DECTRIS notice listener failed on an undecodable message")

        resumed = None
        recovered = getattr(sink, "recovered_scans", None)
        if recovered is not None:
            resumed = conv.resume(recovered(), self.version)
        def on_degraded(reason: str) -> None:
            """Worker processes could not be started: published and counted (the pool logged it)."""
            if self.on_notice is None:
                return
            plan = conv.plan
            try:
                self.on_notice(SeriesNotice("degraded", None if plan is None else plan.start.series_id,
                                            "worker_processes", reason, None if plan is None else plan.scan_id))
            except Exception:  # the listener's failure must not stop the stream
                log.exception("DECTRIS notice listener failed on the decoding's fallback to threads")

        def on_restored(said: str) -> None:
            """Worker processes started again after a fallback: published (the pool logged it)."""
            if self.on_notice is None:
                return
            try:
                self.on_notice(SeriesNotice("restored", None, "worker_processes", said))
            except Exception:  # the listener's failure must not stop the stream
                log.exception("DECTRIS notice listener failed on the decoding's return to processes")

        pool = self.pool = DecodePool(self.workers, self.processes, on_degraded=on_degraded,
                                      on_restored=on_restored)
        receiver = DectrisReceiver(self.endpoint, self.version, context=ctx, on_error=on_error,
                                   channels=[cfg.channel] if cfg.channel else None,
                                   limits=getattr(sink, "limits", None))
        from .bridge import open_side_channel  # (imported here as _drain_side_channel is, below)

        side = open_side_channel(ctx, cfg)
        self.ready.set()
        pending: deque[tuple[Message | None, Future[DecodedBatch] | None]] = deque()
        gathered: list[bytes | Image] = []
        #: channel; the last start received and the last fed to the converter; series ended
        #: images submitted since the last start received
        state: dict[str, Any] = {"channel": cfg.channel, "start": None, "fed": None, "plan": None, "ended": 0,
                                 "images": 0, "held": False, "held_since": 0.0,
                                 "failed": None, "lost_at_stop": 0, "stop_by": None}
        if resumed is not None:  # the series the daemon was killed in: its images come on, not its start
            state.update(start=resumed, fed=resumed, plan=conv.plan, images=conv.plan.sent,  # type: ignore[union-attr]
                         channel=conv.plan.channel)  # type: ignore[union-attr]

        def job_kind() -> tuple[Any, bool, bool]:
            """(reducer, decode, alone) for the images gathered now. The converter may still
            be behind the receiver (a start not yet fed): a job is binned only by the reducer
            of the series it belongs to, and a series' first image goes alone, unbinned, and
            is taken back at once, for it builds the reducer of the rest."""
            start, plan = state["start"], conv.plan
            if start is None:
                return None, False, False  # no scan will take them
            if state["fed"] is not start:
                return None, True, True
            if plan is None or plan is not state["plan"]:
                return None, False, False  # its series was skipped, or failed
            return (None, True, True) if plan.reducer is None else (plan.reducer, True, False)

        #: (a job never grows past the batch size for it)
        align = math.gcd(self.batch, ALIGN)

        def submit(aligned: bool = False) -> None:
            """Jobs of the images gathered; ``aligned`` (more images are coming): only as many
            as end the series' images so far on a multiple of ``align``, the rest wait for the
            next drain."""
            while gathered:
                reducer, decode, alone = job_kind()
                if alone:
                    take = 1
                elif aligned:
                    take = len(gathered) - (state["images"] + len(gathered)) % align
                    if take <= 0:
                        return
                else:
                    take = len(gathered)
                items = gathered[:take]
                if pool.needs_grow(len(items), reducer):
                    consume(block=True)  # every slot free before they grow
                while not pool.has_free_slot and pending:  # (none left: jobs dropped at the stop hold
                    consume(block=True, one=True)          # theirs, and this one goes without: pool.submit)
                future = pool.submit(items, state["channel"], reducer, decode)
                del gathered[:len(items)]
                state["images"] += len(items)
                pending.append((None, future))
                if alone:
                    consume(block=True)

        def deliver(messages: list[Any]) -> None:
            for m in messages:
                sink.put(m)

        def job_failed(exc: BaseException, generation: int, lost: int) -> None:
            """A job raised (a bug) or its worker process died (``lost``: the images it held):
            the scan in progress fails with the reason once its series is over (its end, the
            next start, or the source stopping: :func:`fail_scan`), so that the images of its
            other jobs — in flight behind the failed one, or still to come — reach the spool
            first. Until this the scan was aborted at once and those images dropped (the
            converter had no scan for them). The source goes on with the next series (and
            new workers)."""
            if isinstance(exc, BrokenProcessPool):
                before = pool.fallback
                pool.restart(generation)  # (once for all the jobs of the broken pool; never raises)
                reason = f"a DECTRIS decoding worker process died ({exc})"
                if pool.fallback is not None and pool.fallback is not before:
                    reason += f"; {pool.fallback}"
            else:
                reason = f"DECTRIS decoding failed: {type(exc).__name__}: {exc}"
            plan = conv.plan
            if plan is None:  # nothing in progress to fail (the series failed with a job before)
                log.error("DECTRIS stream %s: %s; %d images lost", self.url, reason, lost)
                return
            failed = state["failed"]
            if failed is not None and failed["plan"] is plan:  # another job of the failing series
                failed["lost"] += lost
                log.error("DECTRIS stream %s: %s; %d more images of scan %s lost", self.url, reason, lost,
                          plan.scan_id)
                return
            stats.series_errors += 1
            scan_id = plan.scan_id
            log.error("DECTRIS stream %s: %s; %d images lost; scan %s fails at the end of its series",
                      self.url, reason, lost, scan_id, exc_info=exc)
            state["failed"] = {"plan": plan, "reason": reason, "lost": lost}
            if self.on_notice is not None:
                try:
                    self.on_notice(SeriesNotice("skipped", plan.start.series_id, "decoding", reason, scan_id))
                except Exception:  # the listener's failure must not stop the stream
                    log.exception("DECTRIS notice listener failed on a decoding failure")

        def fail_scan() -> None:
            """Abort the scan whose job failed, now that its series' images are all taken."""
            failed, state["failed"] = state["failed"], None
            if failed is not None and conv.plan is failed["plan"]:
                deliver(conv.stop(f"{failed['reason']}; {failed['lost']} images of the failed jobs are lost"))

        def take(fut: Future[DecodedBatch]) -> DecodedBatch:
            """The job's result. A job lost with a dead worker process — the pool breaks, and
            every job in flight fails with it — still has its images here: it is run once
            more by new workers, in its turn (the order of arrival holds), so that a worker
            killed (out of memory, a signal) loses nothing. Until this every image in flight
            was lost and the scan aborted. A job that fails again (an image that kills the
            decoder) is lost: :func:`job_failed`."""
            try:
                return pool.result(fut)
            except BrokenProcessPool as exc:
                job = getattr(fut, "job", None)
                if job is None or getattr(fut, "retried", False):
                    raise
                if pool.restart(getattr(fut, "generation", pool.generation)):
                    log.warning("DECTRIS stream %s: a decoding worker process died (%s); its jobs in flight "
                                "are run again by new workers", self.url, exc)
                again = pool.submit(*job)
                again.retried = True  # type: ignore[attr-defined]
                retried[0] += 1
                try:
                    return pool.result(again)
                except BrokenProcessPool:
                    pool.restart(getattr(again, "generation", pool.generation))  # (job_failed's is stale)
                    raise

        def abandon(fut: Future[DecodedBatch], waited_s: float) -> None:
            """A job not done when the stop's wait ran out (a hung worker): dropped, its images
            named (they belong to the series fed last: everything before the job is fed)."""
            lost = getattr(fut, "images", 0)
            fut.cancel()
            pool.abandoned += 1
            plan = conv.plan
            scan_id = None if plan is None else plan.scan_id
            state["lost_at_stop"] += lost
            reason = (f"{lost} images in a decoding job not done {waited_s:g} s after the stop (a hung decoding "
                      f"worker) are dropped, not spooled")
            log.error("DECTRIS stream %s: %s; scan %s keeps the images before them", self.url, reason, scan_id,
                      extra={"scan_id": scan_id} if scan_id is not None else None)
            if self.on_notice is not None:
                try:
                    self.on_notice(SeriesNotice("lost", None if plan is None else plan.start.series_id,
                                                "decoding", reason, scan_id))
                except Exception:  # the listener's failure must not stop the stream
                    log.exception("DECTRIS notice listener failed on images lost at the stop")

        def stop_deadline() -> float | None:
            """When a stopping daemon's source gives up on a decoding job: :data:`STOP_JOBS_S`
            after it first saw the stop (None while the daemon does not stop)."""
            if state["stop_by"] is None and stop.is_set() and getattr(sink, "stopping", False):
                state["stop_by"] = time.monotonic() + STOP_JOBS_S
            return state["stop_by"]

        def wait_job(fut: Future[DecodedBatch]) -> bool:
            """Wait for a job; once the daemon stops, until :func:`stop_deadline` at most. Every
            blocking wait comes here (a series' first image waits for the jobs before it, more
            jobs than the workers start, a free slot), so that a hung job cannot hold the
            stop there either: the stop is looked at every :data:`STOP_POLL_S`. Whether it is done."""
            while not fut.done():
                by = stop_deadline()
                if by is None:
                    futures_wait([fut], STOP_POLL_S)
                else:
                    futures_wait([fut], max(0.0, by - time.monotonic()))
                    return fut.done()
            return True

        def consume(block: bool, one: bool = False) -> None:
            """Results of the head of the queue, in arrival order, while they are ready (or
            while more jobs are in flight than the workers can start: bounded memory). A job
            still running at the stop's deadline is dropped (:func:`wait_job`, :func:`abandon`)."""
            while pending:
                msg, fut = pending[0]
                if fut is not None and not fut.done() and not block and len(pending) <= 2 * self.workers:
                    return
                if fut is not None and not wait_job(fut):
                    pending.popleft()
                    abandon(fut, STOP_JOBS_S)
                    continue
                pending.popleft()
                if fut is not None:
                    try:
                        batch = take(fut)
                    except Exception as exc:  # noqa: BLE001 - fails the scan, never the source
                        job_failed(exc, getattr(fut, "generation", pool.generation), getattr(fut, "images", 0))
                        if one:
                            return
                        continue
                    self.decoder.count(batch.decoded)
                    for exc in batch.errors:  # (rate-limited: a broken detector fails every image)
                        job_errors[0] += 1
                        log_error(exc)
                    try:
                        converted = conv.feed_batch(batch)
                    except Exception as exc:  # noqa: BLE001 - fails the scan, never the source (the daemon)
                        job_failed(exc, pool.generation, len(batch))
                        converted = []
                    deliver(converted)
                    if one:
                        return
                    continue
                fail_scan()  # (a series' start or end: its jobs before it are all taken)
                try:
                    deliver(conv.feed(msg))  # type: ignore[arg-type]
                except (DectrisError, ValueError) as exc:
                    stats.series_errors += 1
                    log.error("DECTRIS stream %s: %s", self.url, exc)
                if isinstance(msg, SeriesStart):
                    state["fed"], state["plan"] = msg, conv.plan  # (the plan holds the checked header)
                state["ended"] += isinstance(msg, SeriesEnd)

        def done() -> bool:
            return max_series is not None and state["ended"] >= max_series and not conv.closing

        def take_drained(drained: list[bytes | Message]) -> None:
            """The receiver's messages: images gathered into jobs, starts and ends queued."""
            for item in drained:
                if isinstance(item, (bytes, Image)):
                    gathered.append(item)
                    if len(gathered) >= self.batch or (len(gathered) == 1 and job_kind()[2]):
                        submit(aligned=True)  # (a full batch also re-aligns after a flush)
                    continue
                submit()
                if isinstance(item, SeriesStart):
                    if pool.retry_due() and not stop.is_set():  # between series: worker processes again,
                        consume(block=True)  # after a fallback (no job left in the threads' hands)
                        pool.retry_processes()
                    state["start"], state["images"] = item, 0
                    if cfg.channel is None and item.channels:
                        state["channel"] = item.channels[0]
                pending.append((item, None))
                if max_series is not None and isinstance(item, SeriesEnd) and \
                        state["ended"] + sum(isinstance(m, SeriesEnd) for m, _ in pending) >= max_series:
                    return  # what follows belongs to series this run does not take

        def take_what_was_sent() -> None:
            """The daemon stops: the images the detector sent before the stop and the socket
            holds are taken too (closing the socket dropped them, and the detector does not
            send them again), until a read finds none or :data:`STOP_DRAIN_S` passed."""
            until = time.monotonic() + STOP_DRAIN_S
            while time.monotonic() < until and not done():
                drained = receiver.drain_split(0.05, DRAIN_PARTS)  # (a loaded IO thread may lag)
                if not drained:
                    return
                take_drained(drained)

        stopping = False
        try:
            while not stop.is_set() and not done():
                if side is not None:
                    deliver(_side_positions(side, conv, stats))
                drained = receiver.drain_split(min(0.05, cfg.flush_interval_s), DRAIN_PARTS)
                take_drained(drained)
                # images short of alignment wait for the next drain while images keep coming:
                # as long as drains come back full (the source is behind: the next drain takes
                # more at once), else for at most the flush interval (what a batch of the bridge
                # waits), and never past a drain that found the socket empty
                now = time.monotonic()
                if not drained or (len(drained) < DRAIN_PARTS and state["held"]
                                   and now - state["held_since"] >= cfg.flush_interval_s):
                    submit()
                else:
                    submit(aligned=True)
                if gathered and not state["held"]:
                    state["held_since"] = now
                state["held"] = bool(gathered)
                consume(block=False)
                deliver(conv.flush(cfg.flush_interval_s))
                log_error.flush()
                if max_series is not None and any(isinstance(m, SeriesEnd) for m, _ in pending):
                    consume(block=True)
            # the daemon stops (its sink says so): what was received is delivered and the scan
            # in progress stays open, kept in the spool for the restarted daemon to resume
            # (recovered_scans); a source stopped on its own aborts it (the daemon goes on)
            stopping = stop.is_set() and bool(getattr(sink, "stopping", False))
            if stopping:
                take_what_was_sent()
            submit()  # images held back for alignment are decoded and delivered too
            consume(block=True)  # (bounded at a daemon's stop: stop_deadline)
            fail_scan()
            if stopping:
                deliver(conv.checkpoint("the daemon stopped"))
            else:
                deliver(conv.stop("the DECTRIS source stopped before the series ended"))
        except SinkClosed:
            log.info("DECTRIS source %s: the daemon stopped taking frames", self.url)
        finally:
            log_error.flush(force=True)
            pool.close(hung_ok=bool(pool.abandoned))
            receiver.close()
            if side is not None:
                side.close(linger=0)
        stats.series = conv.stats["series"]
        stats.frames_sent = conv.stats["frames_sent"]
        stats.decode_errors = receiver.decode_errors + job_errors[0]
        stats.rejected_images = dict(conv.rejected)
        stats.extra = {"converter": dict(conv.stats), "frames_decoded": self.decoder.decoded,
                       "jobs_retried": retried[0], "images_lost_at_stop": state["lost_at_stop"],
                       "workers": self.workers, "processes": self.processes,
                       "decoding_fallback": pool.fallback,
                       "process_cpu_s": round(pool.process_cpu_s, 3)}
        return stats


def _side_positions(sock: zmq.Socket, conv: SeriesConverter, stats: SourceStats) -> list[IngestMessage]:
    from .bridge import BridgeStats, _drain_side_channel

    bridge_stats = BridgeStats()
    out = _drain_side_channel(sock, conv, bridge_stats)
    stats.series_errors += bridge_stats.position_errors
    return out
