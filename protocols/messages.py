"""Message types of protocol v1 and their encode/decode: the module to import.

Ingest (producer → daemon): :class:`ScanStart`, :class:`Frames`, :class:`ScanEnd`, :class:`Abort`.
Published (daemon → subscribers): :class:`ScanEvent`, :class:`Preview`, :class:`Metrics`,
:class:`Result`, :class:`ErrorEvent`. Control: :class:`Request`, :class:`Reply`.

``encode(msg)`` gives the multipart parts; ``decode(parts, limits, scans)`` checks every header
key and array against the schema, the limits and (with ``scans``) the scan's declaration, and
raises :class:`~.errors.ProtocolError` naming field and rule. Received arrays are views of the
message buffers (not copies), in their wire dtype. PROTOCOL.md is the normative text.
"""

from . import message_types
from .codec import decode, encode, peek
from .message_types import *  # this module is the public home of the message types

__all__ = ["decode", "encode", "peek"]
__all__ += message_types.__all__
