"""Errors of the wire protocol; every rejected byte is a :class:`ProtocolError` naming its rule."""

from __future__ import annotations

from typing import Any


class ProtocolError(ValueError):
    """A message broke the protocol (PROTOCOL.md § Validation).

    ``field`` is the dotted path of the offending header key or array (``"data"``,
    ``"scan.positions_m"``, ``"arrays[1].dtype"``; ``"message"`` for the multipart envelope) and
    ``rule`` the short, stable name of the rule it broke (``"max_frame_side"``, ``"known_scan"``, …;
    the table in PROTOCOL.md lists them all). Receivers publish and count these and carry on.
    """

    def __init__(self, field: str, rule: str, message: str, scan_id: str | None = None) -> None:
        super().__init__(f"{field}: {message} [rule {rule}]")
        self.field = field
        self.rule = rule
        self.message = message
        self.scan_id = scan_id
        #: set by the decoder once the header was read: the message's ``type`` (None when the
        #: header itself was refused), and how many frames a refused ``frames`` message carried
        #: (its ``indices``, 0 when its arrays were not read): a receiver accounts for a refused
        #: message without decoding it again
        self.message_type: str | None = None
        self.frames = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields of an ``error`` event on the publish socket."""
        return {
            "field": self.field,
            "rule": self.rule,
            "message": self.message,
            "scan_id": self.scan_id,
        }


class ProducerTimeout(TimeoutError):
    """The daemon took no message within the producer's send timeout (stalled or absent)."""


class DeliveryError(RuntimeError):
    """The daemon does not hold every frame a producer gave it (PROTOCOL.md § Delivery).

    ``sent`` counts the distinct frame indices the producer was given for ``scan_id``,
    ``acknowledged`` those the daemon reports as received (spooled); ``receipt`` is the daemon's
    last answer (None when it never answered).
    """

    def __init__(
        self, message: str, scan_id: str, sent: int, acknowledged: int, receipt: Any = None
    ) -> None:
        super().__init__(message)
        self.scan_id = scan_id
        self.sent = sent
        self.acknowledged = acknowledged
        self.receipt = receipt

    @property
    def unacknowledged(self) -> int:
        return max(0, self.sent - self.acknowledged)


class DeliveryTimeout(DeliveryError, ProducerTimeout):
    """The daemon acknowledged nothing more within the producer's timeout (stalled or absent)."""


class ControlTimeout(TimeoutError):
    """No reply from the control socket after every retry (Lazy Pirate gave up)."""


class ControlError(RuntimeError):
    """The daemon answered a control request with ``success: False``; ``reply`` holds the answer."""

    def __init__(self, method: str, msg: str, reply: Any = None) -> None:
        super().__init__(f"control method {method!r} failed: {msg}")
        self.method = method
        self.msg = msg
        self.reply = reply

    @property
    def busy(self) -> bool:
        """The daemon could not look now and asks to be asked again (rule ``file_checks_busy``:
        its look at the spool and results directories is behind, PROTOCOL.md § 6)."""
        result = getattr(self.reply, "result", None)
        return isinstance(result, dict) and result.get("rule") == "file_checks_busy"
