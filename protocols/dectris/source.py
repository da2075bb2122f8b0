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
  spool writes it as an HDF5 chunk without recompressing it).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
)
from .codec import bslz4_array
from .convert import BridgeConfig, IngestMessage, SeriesConverter, SeriesNotice, _Plan
from .decode import ImagePayload, split_v2_image
from .receiver import DectrisReceiver, parse_source
from .schema import DecodeError, DectrisError, Image, Message, SeriesEnd, SeriesStart

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">QI")
#: images per decoding job, and so per frames message into the daemon: the spool's cost per
#: append (resizing five datasets, the commit count, a flush) is shared by this many frames;
#: a slow stream is not held back, as a job also ends with each socket drain
BATCH = 256
#: frames binned together by a worker: enough to share NumPy's per-call cost (which holds the
#: GIL), few enough (1.2 MB at 192×192 uint16) to stay in the core's cache
SUB_BATCH = 16


def spool_chunk(payload: bytes, nbytes: int) -> bytes:
    """A detector's bslz4 payload as an HDF5 bitshuffle-filter chunk: the same bytes, unless
    its header gives 0 for the size (as LiberTEM's simulator writes), which the filter needs."""
    size, block = _HEADER.unpack_from(payload)
    if size == nbytes:
        return payload
    return _HEADER.pack(nbytes, block) + payload[_HEADER.size:]


@dataclass
class DecodedBatch:
    """A decoding job's result: the images that decoded (metadata only), their spool chunks,
    and either their binned frames (the job knew the series' reducer) or the detector frames
    themselves (it did not: the series' first frames, which build the reducer)."""

    images: list[Image] = field(default_factory=list)
    shape: tuple[int, int] = (0, 0)  #: (H, W) of the detector frames
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint16))
    raw: list[bytes] = field(default_factory=list)
    errors: list[DectrisError] = field(default_factory=list)
    reducer: Any = None  #: the FrameReducer the binned frames came from
    counts: np.ndarray | None = None  #: (k, M, M) binned frames
    saturated: np.ndarray | None = None  #: (k,) whether a valid bin of the frame saturated
    frames: list[np.ndarray] | None = None  #: the detector frames, when not binned

    def stack(self, rows: list[int]) -> np.ndarray:
        assert self.frames is not None
        return np.stack([self.frames[j] for j in rows]) if rows else np.empty((0, *self.shape), self.dtype)


class Decoder:
    """The workers' job, with a count of decompressed frames (one per image: tests check it).

    Frames are binned :data:`SUB_BATCH` at a time, soon after they are decompressed, while they
    are in the core's cache; a job over a whole stack at once was slower, its 19 MB of
    temporaries going through memory several times. The binned frames are compressed by the spool, a chunk of
    frames at a time (one HDF5 call per chunk rather than per frame)."""

    def __init__(self) -> None:
        self.decoded = 0
        self._lock = threading.Lock()

    def __call__(self, items: list[bytes | Image], channel: str | None, reducer: Any) -> DecodedBatch:
        out = DecodedBatch(reducer=reducer)
        payloads: list[ImagePayload] = []
        images: list[Image] = []
        for item in items:
            try:
                if isinstance(item, bytes):
                    if channel is None:
                        raise DecodeError("image before any start message named the channel")
                    msg, payload = split_v2_image(item, channel)
                    if not isinstance(msg, Image) or payload is None:
                        raise DecodeError(f"a {type(msg).__name__} message announced itself as an image")
                else:
                    msg = item
                    name = channel or next(iter(msg.data), None)
                    if name not in msg.data:
                        raise DecodeError(f"image {msg.image_id} lacks channel {name!r}")
                    arr = msg.data[name]
                    payload = ImagePayload((arr.shape[0], arr.shape[1]), arr.dtype, array=arr)
                if payloads and (payload.shape, payload.dtype) != (payloads[0].shape, payloads[0].dtype):
                    raise DecodeError(f"image {msg.image_id} is {payload.shape} {payload.dtype}, the "
                                      f"images before it {payloads[0].shape} {payloads[0].dtype}")
            except DecodeError as exc:
                out.errors.append(exc)
                continue
            images.append(msg)
            payloads.append(payload)
        if not payloads:
            return out
        shape, dtype = payloads[0].shape, payloads[0].dtype
        out.shape, out.dtype = shape, dtype
        nbytes = shape[0] * shape[1] * dtype.itemsize
        binning = reducer is not None and reducer.detector_shape == shape
        if binning:
            m = reducer.frame_side
            counts = np.empty((len(payloads), m, m), reducer.out_dtype)
            saturated = np.zeros(len(payloads), bool)
            group = np.empty((SUB_BATCH, *shape), dtype)  # decoded frames awaiting their binning
        else:
            out.frames = []
        k = g = 0
        for msg, p in zip(images, payloads):
            try:
                if p.bslz4 is not None:
                    frame = bslz4_array(p.bslz4, dtype, shape)
                    chunk = spool_chunk(p.bslz4, nbytes)
                else:
                    frame = p.array
                    chunk = compression.bslz4_compress(frame)
            except DecodeError as exc:
                out.errors.append(exc)
                continue
            out.images.append(msg)
            out.raw.append(chunk)
            if binning:
                group[g] = frame
                g += 1
                if g == SUB_BATCH:
                    counts[k + 1 - g:k + 1], saturated[k + 1 - g:k + 1] = reducer.reduce_batch(group)
                    g = 0
            else:
                out.frames.append(frame)  # type: ignore[union-attr]
            k += 1
        if binning and g:
            counts[k - g:k], saturated[k - g:k] = reducer.reduce_batch(group[:g])
        with self._lock:
            self.decoded += k
        if binning:
            out.counts, out.saturated = counts[:k], saturated[:k]
        return out


class DirectConverter(SeriesConverter):
    """:class:`SeriesConverter` fed decoded batches: frames leave as :class:`DetectorFrames`
    (one per batch, with the detector's chunks) instead of being copied into message batches."""

    def __init__(self, config: BridgeConfig | None = None, side_channel: bool = False,
                 on_notice: Callable[[SeriesNotice], None] | None = None) -> None:
        super().__init__(config, side_channel, on_notice)
        #: (scan id, image id) → detector chunk of frames waiting for a position
        self._held: dict[tuple[str, int], bytes] = {}
        self._held_kind: dict[str, RawChunks] = {}

    def feed_batch(self, batch: DecodedBatch) -> list[SourceMessage]:
        out: list[SourceMessage] = []
        accepted: list[int] = []
        plan: _Plan | None = None
        for j, image in enumerate(batch.images):
            if not self.tracker.accept(image):
                continue
            plan = self.plan
            if plan is None:
                self.stats["skipped_images"] += 1
                continue
            if plan.scan_start is None:
                if batch.frames is None:  # binned by a reducer of an earlier plan: cannot open a scan
                    self.stats["skipped_images"] += 1
                    continue
                try:
                    plan.scan_start = self._open_scan(plan, batch.frames[j])
                except Exception as exc:  # noqa: BLE001 - skips the series, never the source
                    self.plan = None
                    self._skip(plan.start, exc)
                    continue
                out.append(plan.scan_start)
            accepted.append(j)
        plan = self.plan
        if not accepted or plan is None or plan.reducer is None:
            return out
        reducer = plan.reducer
        if batch.shape != reducer.detector_shape:
            self.stats["skipped_images"] += len(accepted)
            log.error("scan %s: %d images of %s, the series' first image was %s; skipped", plan.scan_id,
                      len(accepted), batch.shape, reducer.detector_shape)
            return out
        if batch.reducer is reducer and batch.counts is not None:
            counts, saturated = batch.counts[accepted], batch.saturated[accepted]  # type: ignore[index]
        elif batch.frames is not None:  # decoded before the series' first frame built its reducer
            counts, saturated = reducer.reduce_batch(batch.stack(accepted))
        else:  # binned by another series' reducer of the same detector shape
            self.stats["skipped_images"] += len(accepted)
            log.error("scan %s: %d images were binned for another series; skipped", plan.scan_id, len(accepted))
            return out
        raw = [batch.raw[j] for j in accepted]
        ids = np.array([batch.images[j].image_id for j in accepted], dtype=np.uint32)
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
        out.append(DetectorFrames(Frames(plan.scan_id, ids, counts, positions),
                                  raw=RawChunks(batch.shape, batch.dtype, raw)))
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

    def _take_batch(self, plan: _Plan) -> list[IngestMessage]:
        """Frames released by side-channel positions leave with the chunks they were held with."""
        out: list[Any] = []
        for msg in super()._take_batch(plan):
            kind = self._held_kind.get(plan.scan_id)
            held = [self._held.pop((plan.scan_id, int(i)), None) for i in msg.indices]
            if kind is None or any(h is None for h in held):
                out.append(msg)
                continue
            out.append(DetectorFrames(msg, raw=RawChunks(kind.shape, kind.dtype, held)))  # type: ignore[arg-type]
        return out


class DectrisSource(Source):
    """A DECTRIS Stream V1/V2 detector read by the daemon itself (see the module docstring).
    ``workers`` decoding threads; ``config`` is the daemon's ``[dectris]`` table."""

    schemes = ("dectris", "dectris1", "dectris2")
    config_section = "dectris"

    def __init__(self, url: str, config: BridgeConfig | dict[str, Any] | None = None, *, workers: int = 2,
                 batch: int = BATCH, context: zmq.Context | None = None,
                 on_notice: Callable[[SeriesNotice], None] | None = None) -> None:
        self.url = url
        self.on_notice = on_notice
        self.version, self.endpoint = parse_source(url)
        if config is not None and not isinstance(config, (BridgeConfig, dict)):
            raise TypeError(f"config must be a BridgeConfig or a dict of its fields, not {type(config).__name__}")
        self.config = config if isinstance(config, BridgeConfig) else BridgeConfig.model_validate(config or {})
        if workers < 1 or batch < 1:
            raise ValueError(f"workers and batch must be ≥ 1, got {workers} and {batch}")
        self.workers, self.batch = workers, batch
        self.context = context
        self.decoder = Decoder()

    def run(self, sink: FrameSink, stop: threading.Event, *, max_series: int | None = None) -> SourceStats:
        """Deliver every series as a scan until ``stop`` is set, the sink closes or
        ``max_series`` series have ended; a scan still open then is aborted."""
        cfg = self.config
        ctx = self.context or zmq.Context.instance()
        conv = DirectConverter(cfg, side_channel=cfg.positions_endpoint is not None, on_notice=self.on_notice)
        stats = SourceStats()
        job_errors = [0]

        def on_error(exc: DectrisError) -> None:
            log.error("DECTRIS stream %s: %s", self.url, exc)
            if self.on_notice is not None:  # published and counted by the daemon, not only logged
                try:
                    self.on_notice(SeriesNotice("undecodable", None, getattr(exc, "field", None) or "message",
                                                f"a detector message could not be decoded: {exc}"))
                except Exception:  # the listener's failure must not stop the stream
                    log.exception("DECTRIS notice listener failed on an undecodable message")

        receiver = DectrisReceiver(self.endpoint, self.version, context=ctx, on_error=on_error,
                                   channels=[cfg.channel] if cfg.channel else None)
        side = None
        if cfg.positions_endpoint is not None:
            side = ctx.socket(zmq.PULL)
            side.setsockopt(zmq.LINGER, 0)
            side.bind(cfg.positions_endpoint)
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dectris-decode")
        pending: deque[tuple[Message | None, Future[DecodedBatch] | None]] = deque()
        gathered: list[bytes | Image] = []
        state: dict[str, Any] = {"channel": cfg.channel, "start": None, "ended": 0}

        def submit() -> None:
            if not gathered:
                return
            plan = conv.plan  # its reducer serves this job only if no newer start was received
            reducer = plan.reducer if plan is not None and plan.start is state["start"] else None
            pending.append((None, pool.submit(self.decoder, list(gathered), state["channel"], reducer)))
            gathered.clear()

        def deliver(messages: list[Any]) -> None:
            for m in messages:
                sink.put(m)

        def consume(block: bool) -> None:
            """Results of the head of the queue, in arrival order, while they are ready (or
            while more jobs are in flight than the workers can start: bounded memory)."""
            while pending:
                msg, fut = pending[0]
                if fut is not None and not fut.done() and not block and len(pending) <= 2 * self.workers:
                    return
                pending.popleft()
                if fut is not None:
                    batch = fut.result()  # a worker's unexpected exception surfaces here
                    for exc in batch.errors:
                        job_errors[0] += 1
                        log.error("DECTRIS stream %s: %s", self.url, exc)
                    deliver(conv.feed_batch(batch))
                    continue
                try:
                    deliver(conv.feed(msg))  # type: ignore[arg-type]
                except (DectrisError, ValueError) as exc:
                    stats.series_errors += 1
                    log.error("DECTRIS stream %s: %s", self.url, exc)
                state["ended"] += isinstance(msg, SeriesEnd)

        def done() -> bool:
            return max_series is not None and state["ended"] >= max_series and not conv.closing

        try:
            while not stop.is_set() and not done():
                if side is not None:
                    deliver(_side_positions(side, conv, stats))
                for item in receiver.drain_split(min(0.05, cfg.flush_interval_s)):
                    if isinstance(item, (bytes, Image)):
                        gathered.append(item)
                        if len(gathered) >= self.batch:
                            submit()
                        continue
                    submit()
                    if isinstance(item, SeriesStart):
                        state["start"] = item
                        if cfg.channel is None and item.channels:
                            state["channel"] = item.channels[0]
                    pending.append((item, None))
                    if max_series is not None and isinstance(item, SeriesEnd) and \
                            state["ended"] + sum(isinstance(m, SeriesEnd) for m, _ in pending) >= max_series:
                        break  # what follows belongs to series this run does not take
                submit()
                consume(block=False)
                deliver(conv.flush(cfg.flush_interval_s))
                if max_series is not None and any(isinstance(m, SeriesEnd) for m, _ in pending):
                    consume(block=True)
            consume(block=True)
            deliver(conv.stop("the DECTRIS source stopped before the series ended"))
        except SinkClosed:
            log.info("DECTRIS source %s: the daemon stopped taking frames", self.url)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            receiver.close()
            if side is not None:
                side.close(linger=0)
        stats.series = conv.stats["series"]
        stats.frames_sent = conv.stats["frames_sent"]
        stats.decode_errors = receiver.decode_errors + job_errors[0]
        stats.rejected_images = dict(conv.rejected)
        stats.extra = {"converter": dict(conv.stats), "frames_decoded": self.decoder.decoded}
        return stats


def _side_positions(sock: zmq.Socket, conv: SeriesConverter, stats: SourceStats) -> list[IngestMessage]:
    from .bridge import BridgeStats, _drain_side_channel

    bridge_stats = BridgeStats()
    out = _drain_side_channel(sock, conv, bridge_stats)
    stats.series_errors += bridge_stats.position_errors
    return out
