"""Message types of protocol v1 and their encode/decode: the module to import.

Ingest (producer → daemon): :class:`ScanStart`, :class:`Frames`, :class:`ScanEnd`, :class:`Abort`.
Published (daemon → subscribers): :class:`ScanEvent`, :class:`Preview`, :class:`Metrics`,
:class:`Result`, :class:`ErrorEvent`. Control: :class:`Request`, :class:`Reply`.

``encode(msg)`` gives the multipart parts; ``decode(parts, limits, scans)`` checks every header
key and array against the schema, the limits and (with ``scans``) the scan's declaration, and
raises :class:`~.errors.ProtocolError` naming field and rule. Received arrays are views of the
message buffers (not copies), in their wire dtype. PROTOCOL.md is the normative text.
"""

from .codec import decode, encode, peek
from .message_types import (
    EVENT_TYPES,
    INGEST_TYPES,
    Abort,
    ErrorEvent,
    Frames,
    Message,
    Metrics,
    Preview,
    ProbeModelSpec,
    RasterScan,
    Reply,
    Request,
    Result,
    ScanEnd,
    ScanEvent,
    ScanStart,
)

__all__ = [
    "EVENT_TYPES",
    "INGEST_TYPES",
    "Abort",
    "ErrorEvent",
    "Frames",
    "Message",
    "Metrics",
    "Preview",
    "ProbeModelSpec",
    "RasterScan",
    "Reply",
    "Request",
    "Result",
    "ScanEnd",
    "ScanEvent",
    "ScanStart",
    "decode",
    "encode",
    "peek",
]
