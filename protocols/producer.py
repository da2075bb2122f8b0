"""The producer side of ingest: ``Producer`` streams scans to the daemon over PUSH → PULL.

PUSH blocks when the daemon's queue and the socket's high-water mark are full, so a fast
producer is slowed to the daemon's pace instead of losing frames; ``send_timeout_s`` turns a
stall (daemon gone or hung) into :class:`~.errors.ProducerTimeout` rather than a silent hang.
Every message is checked with the daemon's own rules before it leaves.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import zmq

from . import validate
from .client import SocketClient, connect
from .errors import ProducerTimeout
from .limits import Limits
from .messages import Abort, Frames, Message, ScanEnd, ScanStart, encode
from .security import ClientCurve
from .wire import wire_dtype

DEFAULT_INGEST = "tcp://127.0.0.1:5600"


class Hook(Protocol):
    """Rewrites the stream on its way out (see :class:`.faults.Faults`)."""

    def process(self, msg: Message, parts: list[Any]) -> Iterable[list[Any]]: ...

    def flush(self) -> Iterable[list[Any]]: ...


class Producer(SocketClient):
    """Send scans to a daemon. Use as a context manager::

        with Producer("tcp://127.0.0.1:5600") as p:
            p.start_scan(scan_id="s1", energy_eV=300e3, frame_shape=(64, 64), frame_dtype="uint16",
                         expected_frames=n, pixel_size_m=1e-10, probe_model=ProbeModelSpec(),
                         positions_m=positions)
            p.send_frames(frames)          # (n, 64, 64) uint16, any batch size
            p.end_scan()

    An exception inside the ``with`` block aborts the open scan. Arrays passed in are sent
    without a copy when large: do not write into them until the next call returns.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_INGEST,
        *,
        limits: Limits | None = None,
        send_timeout_s: float | None = 30.0,
        hwm: int = 64,
        compression: str = "none",
        batch_frames: int = 256,
        checksum: bool = False,
        curve: ClientCurve | None = None,
        context: zmq.Context | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.limits = limits or Limits()
        if compression not in self.limits.compressions:
            raise ValueError(
                f"compression {compression!r} is not one of {self.limits.compressions}"
            )
        if batch_frames < 1:
            raise ValueError("batch_frames must be ≥ 1")
        self.compression = compression
        self.batch_frames = min(batch_frames, self.limits.max_frames_per_message)
        self.send_timeout_s = send_timeout_s
        self.hook = hook
        self.checksum = checksum
        self._socket = connect(
            zmq.PUSH,
            endpoint,
            curve=curve,
            context=context,
            sndhwm=hwm,
            sndtimeo=-1 if send_timeout_s is None else int(send_timeout_s * 1000),
        )
        self.scan: ScanStart | None = None
        self.frames_sent = 0
        self._next_index = 0

    # -- scan lifecycle ------------------------------------------------------------------------

    def start_scan(self, start: ScanStart | None = None, /, **fields: Any) -> ScanStart:
        """Open a scan from a ScanStart or its fields (``scan_id`` defaults to a fresh UUID)."""
        if self.scan is not None:
            raise RuntimeError(
                f"scan {self.scan.scan_id!r} is still open; end_scan() or abort() it first"
            )
        if start is None:
            fields.setdefault("scan_id", f"scan-{uuid.uuid4().hex[:12]}")
            start = ScanStart(**fields)
        elif fields:
            raise TypeError("pass either a ScanStart or its fields, not both")
        validate.check(start, self.limits)
        self.send(start)
        self.scan, self.frames_sent, self._next_index = start, 0, 0
        return start

    def send_frames(
        self,
        data: np.ndarray,
        indices: Any = None,
        positions_m: Any = None,
        compression: str | None = None,
    ) -> int:
        """Send (n, M, M) frames in the scan's dtype, split into messages of ``batch_frames``.

        ``indices`` default to the next n indices; ``positions_m`` (n, 2) only when the scan
        streams its positions. Returns the number of frames sent.
        """
        scan = self._open()
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[None]
        n = data.shape[0]
        idx = (
            np.arange(self._next_index, self._next_index + n)
            if indices is None
            else np.asarray(indices)
        )
        if idx.shape != (n,):
            raise ValueError(f"indices shape {idx.shape} does not match {n} frames")
        if idx.size and (idx.min() < 0 or idx.max() > np.iinfo(np.uint32).max):
            raise ValueError("frame indices must lie in [0, 2**32)")
        pos = None if positions_m is None else np.asarray(positions_m, dtype=np.float64)
        codec = compression or self.compression
        if data.dtype.kind == "f" and scan.frame_dtype == "float32":
            data = data.astype(np.float32, copy=False)
        elif data.dtype.kind not in "ui" or wire_dtype(data.dtype) != scan.frame_dtype:
            raise ValueError(f"frames are {data.dtype}, the scan declared {scan.frame_dtype}")
        step = self._batch_size(data)
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            msg = Frames(
                scan.scan_id,
                idx[sl].astype(np.uint32),
                data[sl],
                None if pos is None else pos[sl],
                codec,
                time.time(),
            )
            validate.check(msg, self.limits, scan)
            self.send(msg)
            self.frames_sent += len(msg.indices)
        if n:
            self._next_index = max(self._next_index, int(idx.max()) + 1)
        return n

    def end_scan(self, frame_count: int | None = None) -> ScanEnd:
        """Close the scan; ``frame_count`` defaults to the frames sent."""
        scan = self._open()
        msg = ScanEnd(
            scan.scan_id, self.frames_sent if frame_count is None else frame_count, time.time()
        )
        validate.check(msg, self.limits, scan)
        self._flush_hook()
        self.send(msg)
        self.scan = None
        return msg

    def abort(self, reason: str = "") -> Abort:
        """Abort the open scan (the daemon discards it)."""
        scan = self._open()
        msg = Abort(scan.scan_id, reason[:4096], time.time())
        self._flush_hook()
        self.send(msg)
        self.scan = None
        return msg

    # -- transport -----------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Encode and send one message (through the hook, if any)."""
        if msg.time_s is None:
            msg.time_s = time.time()
        parts = encode(msg, self.checksum)
        out = [parts] if self.hook is None else self.hook.process(msg, parts)
        for p in out:
            self.send_parts(p)

    def send_parts(self, parts: list[Any]) -> None:
        """Send already-encoded parts as one message (tests use it to send broken messages)."""
        try:
            # copy=False: pyzmq still copies parts below its copy threshold (64 kB), where
            # zero-copy costs more than it saves
            self._socket.send_multipart(parts, copy=False)
        except zmq.Again:
            raise ProducerTimeout(
                f"the daemon at {self.endpoint} took no message for {self.send_timeout_s} s "
                "(not running, unreachable, CURVE key refused, or its queue is full)"
            ) from None

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket, waiting up to ``linger_s`` (default: the send timeout) for queued
        messages to leave."""
        if self._socket.closed:
            return
        linger = self.send_timeout_s if linger_s is None else linger_s
        self._socket.close(linger=-1 if linger is None else int(linger * 1000))

    def _before_close(self, exc: BaseException | None) -> None:
        if self.scan is not None and exc is not None and not isinstance(exc, ProducerTimeout):
            self.abort(f"producer failed: {type(exc).__name__}: {exc}")

    # -- helpers -------------------------------------------------------------------------------

    def _open(self) -> ScanStart:
        if self.scan is None:
            raise RuntimeError("no open scan: call start_scan() first")
        return self.scan

    def _batch_size(self, data: np.ndarray) -> int:
        per_frame = max(1, data[0].nbytes if data.shape[0] else 1)
        # leave headroom under the message limit for the header, indices and positions
        by_bytes = max(1, (self.limits.max_message_bytes // 2) // per_frame)
        return max(1, min(self.batch_frames, by_bytes))

    def _flush_hook(self) -> None:
        if self.hook is not None:
            for p in self.hook.flush():
                self.send_parts(p)
