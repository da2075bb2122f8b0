"""The DECTRIS bridge: detector stream (+ optional positions side channel) → daemon ingest.

:func:`run_bridge` is what ``cryoptycho serve --source dectris2://HOST:31001`` runs; the
conversion itself is :mod:`.convert` (re-exported here).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from ..errors import ProtocolError
from ..limits import Limits
from ..messages import Frames, Request, ScanEnd, ScanStart, decode
from ..producer import Producer
from .convert import BridgeConfig, IngestMessage, SeriesConverter, SeriesNotice, bridge_messages
from .receiver import DectrisReceiver, ErrorLogLimiter, parse_source
from .scan import parse_positions
from .schema import DectrisError, SeriesEnd, SeriesStart

__all__ = ["BridgeConfig", "BridgeStats", "IngestMessage", "SeriesConverter", "SeriesNotice", "bridge_messages",
           "dispatch", "run_bridge"]

log = logging.getLogger(__name__)


@dataclass
class BridgeStats:
    series: int = 0
    frames_sent: int = 0
    decode_errors: int = 0
    rejected_images: dict[str, int] = field(default_factory=dict)
    converter: dict[str, int] = field(default_factory=dict)
    position_errors: int = 0
    series_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_bridge(
    source_url: str,
    ingest_endpoint: str,
    config: BridgeConfig | dict[str, Any] | None = None,
    stop_event: threading.Event | None = None,
    *,
    max_series: int | None = None,
    context: zmq.Context | None = None,
    producer: Producer | None = None,
    on_notice: Callable[[SeriesNotice], None] | None = None,
    limits: Limits | None = None,
) -> BridgeStats:
    """Receive a DECTRIS stream from ``source_url`` (``dectris2://host:31001`` or
    ``dectris1://host:9999``) and push each series as a scan to the daemon's ingest endpoint,
    until ``stop_event`` is set or ``max_series`` series have ended. A scan still open then is
    aborted. Decode errors and rejected images are logged and counted, never fatal; a skipped
    or rejected series and an implausible header value also go to ``on_notice``."""
    version, endpoint = parse_source(source_url)
    if config is not None and not isinstance(config, (BridgeConfig, dict)):
        raise TypeError(f"config must be a BridgeConfig or a dict of its fields, not "
                        f"{type(config).__name__} (pass the daemon configuration's DECTRIS section)")
    cfg = config if isinstance(config, BridgeConfig) else BridgeConfig.model_validate(config or {})
    stop = stop_event or threading.Event()
    ctx = context or zmq.Context.instance()
    stats = BridgeStats()
    converter = SeriesConverter(cfg, side_channel=cfg.positions_endpoint is not None, on_notice=on_notice)

    on_error = ErrorLogLimiter(log, f"DECTRIS stream {source_url}")  # counted in decode_errors
    receiver = DectrisReceiver(endpoint, version, context=ctx, on_error=on_error,
                               channels=[cfg.channel] if cfg.channel else None)
    side = open_side_channel(ctx, cfg)
    own_producer = producer is None
    # confirm=False: the detector's stream has no acknowledgement to pass on, and waiting for
    # the daemon's at each series end would stall the detector's stream behind it
    prod = producer or Producer(ingest_endpoint, context=ctx, limits=limits, confirm=False)  # the daemon's limits
    ended = 0
    try:
        while not stop.is_set() and (max_series is None or ended < max_series or converter.closing):
            out: list[IngestMessage] = []
            if side is not None:
                out += _drain_side_channel(side, converter, stats)
            for msg in receiver.drain(min(0.05, cfg.flush_interval_s)):
                if isinstance(msg, SeriesStart) and cfg.channel is None and msg.channels:
                    receiver.channels = (msg.channels[0],)  # decompress only what is used
                try:
                    out += converter.feed(msg)
                except (DectrisError, ValueError) as exc:
                    stats.series_errors += 1
                    log.error("DECTRIS stream %s: %s", source_url, exc)
                ended += isinstance(msg, SeriesEnd)
                if max_series is not None and ended >= max_series and not converter.closing:
                    break  # the rest belongs to series this run does not take
            out += converter.flush(cfg.flush_interval_s)
            dispatch(prod, out, converter, stats)
            on_error.flush()
        dispatch(prod, converter.stop("the DECTRIS bridge stopped before the series ended"), converter, stats)
    finally:
        on_error.flush(force=True)
        receiver.close()
        if side is not None:
            side.close(linger=0)
        if own_producer:
            prod.close()
    stats.series = converter.stats["series"]
    stats.frames_sent = converter.stats["frames_sent"]
    stats.decode_errors = receiver.decode_errors
    stats.rejected_images = dict(converter.rejected)
    stats.converter = dict(converter.stats)
    return stats


def open_side_channel(ctx: zmq.Context, cfg: BridgeConfig) -> zmq.Socket | None:
    """The PULL socket bound at ``cfg.positions_endpoint`` for side-channel positions, if set."""
    if cfg.positions_endpoint is None:
        return None
    side = ctx.socket(zmq.PULL)
    side.setsockopt(zmq.LINGER, 0)
    side.bind(cfg.positions_endpoint)
    return side


def _drain_side_channel(sock: zmq.Socket, converter: SeriesConverter, stats: BridgeStats) -> list[IngestMessage]:
    out: list[IngestMessage] = []
    while True:
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return out
        try:
            msg = decode(parts)
            if not isinstance(msg, Request):
                raise TypeError(f"type: expected a request with method 'dectris_positions', got {msg.type!r}")
            series, ids, pos = parse_positions(msg)
        except (ProtocolError, ValueError, TypeError) as exc:
            stats.position_errors += 1
            log.error("positions side channel: %s", exc)
            continue
        out += converter.add_positions(series, ids, pos)


def dispatch(producer: Producer, messages: list[IngestMessage], converter: SeriesConverter,
             stats: BridgeStats) -> None:
    """Send the converter's messages through ``producer``; a message our protocol refuses
    stops (and aborts) its scan, counted in ``stats``."""
    for msg in messages:
        if producer.scan is None and not isinstance(msg, ScanStart):
            continue  # the scan's start was refused; its frames and end go nowhere
        try:
            if isinstance(msg, ScanStart):
                producer.start_scan(msg)
            elif isinstance(msg, Frames):
                producer.send_frames(msg.data, msg.indices, msg.positions_m)
            elif isinstance(msg, ScanEnd):
                producer.end_scan(msg.frame_count)
            else:
                producer.abort(msg.reason)
        except ProtocolError as exc:
            # Our own checks refused the message (e.g. positions beyond the field limit).
            stats.series_errors += 1
            converter.refused(msg.scan_id, exc.field, str(exc))  # logged, counted and reported there
            if producer.scan is not None:
                producer.abort(f"bridge: {exc}")
