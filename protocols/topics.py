"""Published messages on the PUB socket: ``[topic, header, arrays…]`` (PROTOCOL.md § Publish).

Topics: ``scan.<event>`` (accepted, rejected, acquiring, ended, finished, failed, aborted),
``preview``, ``metrics``, ``result``, ``error``. Subscribers filter by prefix (``b"scan."``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ProtocolError
from .limits import Limits
from .messages import EVENT_TYPES, ErrorEvent, Metrics, Preview, Result, ScanEvent, decode, encode

Event = ScanEvent | Preview | Metrics | Result | ErrorEvent

#: topics a viewer may skip to the newest of (per scan): only the latest image matters
CONFLATED_TOPICS = ("preview", "metrics")


def topic_of(event: Event) -> str:
    """The topic an event is published under."""
    if isinstance(event, ScanEvent):
        return f"scan.{event.event}"
    if isinstance(event, EVENT_TYPES):
        return event.type
    raise TypeError(f"{type(event).__name__} is not a published event")


def encode_event(event: Event) -> list[Any]:
    """Parts for ``pub_socket.send_multipart(parts, copy=False)``."""
    return [topic_of(event).encode(), *encode(event)]


def decode_event(parts: Sequence[Any], limits: Limits | None = None) -> Event:
    """Parts received on a SUB socket → event; the topic must match the header."""
    if len(parts) < 2:
        raise ProtocolError(
            "message", "part_count", "a published message is [topic, header, arrays…]"
        )
    raw = parts[0]
    topic = bytes(getattr(raw, "bytes", raw)).decode("utf-8", "replace")
    event = decode(parts[1:], limits)
    if not isinstance(event, EVENT_TYPES):
        raise ProtocolError("type", "event_type", f"{event.type!r} is not a published event type")
    if topic != topic_of(event):
        raise ProtocolError(
            "topic", "topic_match", f"topic {topic!r} does not match a {topic_of(event)!r} message"
        )
    return event
