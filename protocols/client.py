"""What the SDK clients (Producer, Subscriber, ControlClient) share: socket setup and closing."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq

from .security import ClientCurve, apply_curve

if TYPE_CHECKING:  # typing.Self is Python ≥ 3.11
    from typing_extensions import Self

HEARTBEAT_MS = 5000


def connect(
    kind: int,
    endpoint: str,
    *,
    curve: ClientCurve | None = None,
    context: zmq.Context | None = None,
    heartbeat: bool = True,
    **options: Any,
) -> zmq.Socket:
    """A ``kind`` socket with ``options`` (zmq attribute → value) and CURVE, connected."""
    sock = (context or zmq.Context.instance()).socket(kind)
    for name, value in options.items():
        setattr(sock, name, value)
    if heartbeat:
        # ZMTP heartbeats notice a peer host that vanished without closing the connection:
        # without them a silent peer and a dead one look alike
        sock.heartbeat_ivl = HEARTBEAT_MS
        sock.heartbeat_timeout = 3 * HEARTBEAT_MS
    apply_curve(sock, curve)
    sock.connect(endpoint)
    return sock


class SocketClient:
    """A context manager that closes its ``_socket`` on exit."""

    _socket: zmq.Socket

    def close(self) -> None:
        self._socket.close(linger=0)

    def _before_close(self, exc: BaseException | None) -> None:
        """Leaving the ``with`` block (``exc``: what ended it); subclasses tidy up here."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._before_close(exc)
        finally:
            self.close()
