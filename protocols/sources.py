"""Detector sources: streams that are not our wire protocol, read by the daemon itself.

A source turns a detector's stream into the ingest protocol's messages (ScanStart, Frames,
ScanEnd, Abort) and hands them, as Python objects, to a :class:`FrameSink` — the daemon's
manager thread, which validates them as it validates its ingest socket. Nothing is encoded for
our protocol and nothing crosses a second socket. Frames may carry the detector's own
compressed chunks (:class:`DetectorFrames`) so that the spool keeps the unbinned frames as
they arrived, without recompressing them.

Sources are found by URL scheme (:func:`open_source`). A detector family is a package under
``protocols/`` whose source class is named in :data:`_BUILTIN` (or registered with
:func:`register_source`); the daemon knows only this module.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import numpy as np

from .messages import Abort, Frames, ScanEnd, ScanStart

__all__ = ["DetectorFrames", "FrameSink", "RawChunks", "RecoveredScan", "SinkClosed", "Source", "UnpositionedFrames",
           "check_source", "open_source", "register_source", "source_class", "source_schemes"]


class SinkClosed(Exception):
    """The sink stopped taking messages (the daemon is shutting down)."""


@dataclass(frozen=True)
class RawChunks:
    """Frames as compressed HDF5 chunks, one frame per chunk: bitshuffle-LZ4 with the HDF5
    filter's 12-byte header (filter 32008, LZ4), exactly the bytes a DECTRIS detector sends."""

    shape: tuple[int, int]  #: (height, width) of one frame
    dtype: np.dtype
    chunks: list[bytes]

    def select(self, keep: np.ndarray) -> RawChunks:
        """The chunks of the frames where ``keep`` (bool, one per frame) is True."""
        return RawChunks(self.shape, self.dtype, [c for c, k in zip(self.chunks, keep) if k])


@dataclass(frozen=True)
class DetectorFrames:
    """A frames message plus what the spool can write as it is: ``raw`` (the unbinned detector
    frames, one chunk per frame of ``frames.data``). ``reducer``: what made ``frames.data`` of
    ``raw`` (a detector family's reducer, e.g.
    :class:`cryoptycho.protocols.dectris.binning.FrameReducer`): the spool then keeps only
    ``raw`` while the scan is open and derives the binned frames from it. ``peak``: never
    below the frames' largest count where given (a wrong one would wrap counts in a narrow
    frame store: only a reducer's measure is passed)."""

    frames: Frames
    raw: RawChunks | None = None
    reducer: Any = None
    #: a bound of ``frames.data``'s largest count, never below it (the reducer measured it while
    #: binning: the engine then skips its own max pass over the frames), else None
    peak: int | None = None


@dataclass(frozen=True)
class UnpositionedFrames:
    """Detector frames of an open scan that the scan has no position for (a detector that took
    more images than the scan has positions): not reconstructed, but kept, as the detector sent
    them, in the scan's spool (and so its result file) beside the frames that are."""

    scan_id: str
    image_ids: np.ndarray  #: the detector's image ids (int64), one per chunk
    raw: RawChunks


SourceMessage = ScanStart | Frames | ScanEnd | Abort | DetectorFrames | UnpositionedFrames


@dataclass(frozen=True)
class RecoveredScan:
    """A scan of a detector source that the daemon recovered from its spool at its start and
    that is still open for frames (the daemon was killed or stopped in the middle of it): a
    source may go on feeding it when the detector keeps sending that scan's images."""

    start: ScanStart  #: its declaration, as the daemon checks its frames (metadata included)
    received: np.ndarray  #: frame indices the spool already holds (int64, sorted)
    reducer: Any  #: what made its binned frames of the detector's (the spool's derivation)


class FrameSink(Protocol):
    """Where a source delivers. ``put`` blocks while the daemon applies back-pressure and
    raises :class:`SinkClosed` once it stops; a message it refuses is logged and counted by
    the daemon (never raised to the source)."""

    def put(self, msg: SourceMessage) -> None: ...

    def scan_id_taken(self, scan_id: str) -> bool:
        """Whether a scan of this id would be refused as not unique (a scan, spool or result of
        that id exists): sources that name scans themselves pick another name then. Optional:
        a sink without it takes every new name."""
        ...

    def recovered_scans(self) -> list[RecoveredScan]:
        """The open scans recovered from the spool at the daemon's start whose binned frames
        the spool derives from detector frames (:class:`RecoveredScan`), for a source to resume
        the series it was receiving. Optional: a sink without it resumes nothing."""
        ...

    #: True once the daemon stops (optional; absent: False). A source stopped then delivers
    #: every image it holds and leaves the scan in progress open, for the restarted daemon to
    #: resume (:meth:`recovered_scans`); stopped while the sink goes on, it aborts that scan.
    stopping: bool
    #: the daemon's limits (optional; absent: the defaults): a source bounds the messages its
    #: peer sends with them (max_message_bytes, max_header_values; protocols/dectris/bounds.py)
    limits: Any


@dataclass
class SourceStats:
    """What a source did, for its log line at the end."""

    series: int = 0
    frames_sent: int = 0
    decode_errors: int = 0
    series_errors: int = 0
    rejected_images: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """One detector stream. ``config_section`` names the daemon configuration table whose
    value is passed as ``config`` (e.g. ``dectris``)."""

    schemes: ClassVar[tuple[str, ...]] = ()
    config_section: ClassVar[str | None] = None

    @classmethod
    def check_url(cls, url: str) -> None:
        """Raise ValueError naming ``url`` and what it lacks, before anything is started. This
        default asks what every network stream needs, a host and (if given) a valid port;
        a source that reads something else overrides it."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if not parts.netloc and parts.path:  # "dectris2:host": the "//" is missing
            raise ValueError(f"source {url!r}: expected {scheme}://HOST[:PORT] (the '//' is missing)")
        try:
            parts.port  # noqa: B018 - urlsplit parses the port lazily: reading it validates it
        except ValueError as exc:
            raise ValueError(f"source {url!r}: bad port ({exc}); expected {scheme}://HOST[:PORT]") from None
        if not parts.hostname:
            raise ValueError(f"source {url!r} names no host: expected {scheme}://HOST[:PORT], "
                             f"e.g. {scheme}://detector-dcu:31001")

    @abstractmethod
    def __init__(self, url: str, config: Any = None, *, workers: int = 2,
                 on_notice: Callable[[Any], None] | None = None) -> None:
        """``on_notice`` receives what the source skipped, rejected or doubted (a notice with
        ``outcome``, ``field``, ``rule``, ``message`` and ``scan_id``), so that the daemon
        counts and publishes it instead of leaving it in the log."""

    @abstractmethod
    def run(self, sink: FrameSink, stop: threading.Event) -> SourceStats:
        """Deliver scans until ``stop`` is set (or the sink closes); a scan still open then is
        aborted. Bad detector messages are counted and logged, never raised."""


#: scheme → "module:Class", imported on first use (a detector's decoders load only when used)
_BUILTIN: dict[str, str] = {
    "dectris": "cryoptycho.protocols.dectris.source:DectrisSource",
    "dectris1": "cryoptycho.protocols.dectris.source:DectrisSource",
    "dectris2": "cryoptycho.protocols.dectris.source:DectrisSource",
}
_registry: dict[str, str | type[Source]] = dict(_BUILTIN)


def register_source(scheme: str, cls: str | type[Source]) -> None:
    """Make ``scheme://…`` open ``cls`` (a Source subclass or its "module:Class" path)."""
    if not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise ValueError(f"bad URL scheme {scheme!r}")
    _registry[scheme.lower()] = cls


def source_schemes() -> list[str]:
    return sorted(_registry)


def source_class(url: str) -> type[Source]:
    """The source class for ``url``'s scheme; ValueError naming the known schemes otherwise."""
    scheme = urlsplit(url).scheme.lower()
    entry = _registry.get(scheme)
    if entry is None:
        raise ValueError(f"source {url!r}: unknown scheme {scheme + '://' if scheme else '(none)'}; "
                         f"known: {', '.join(s + '://' for s in source_schemes())}")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        _registry[scheme] = entry
    assert isinstance(entry, type) and issubclass(entry, Source), entry
    return entry


def check_source(url: str) -> type[Source]:
    """The source class for ``url`` once ``url`` is complete (a known scheme, and what its
    class asks for: a host for a detector stream); ValueError naming the URL and what is
    missing otherwise. Run it before anything starts, so a typo fails alone."""
    cls = source_class(url)
    cls.check_url(url)
    return cls


def open_source(url: str, config: Any = None, *, workers: int = 2) -> Source:
    """A source for ``url`` (its scheme picks the class); ``config`` is its settings table."""
    return source_class(url)(url, config, workers=workers)
