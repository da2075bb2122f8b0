"""What the SDK clients (Producer, Subscriber, ControlClient) share: socket setup and closing."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq

from .security import ClientCurve, apply_curve

if TYPE_CHECKING:  # typing.Self is Python ≥ 3.11
    from typing_extensions import Self

HEARTBEAT_MS = 5000


class InvalidEndpoint(zmq.ZMQError, ValueError):
    """An endpoint ZeroMQ cannot connect to as written (no transport, a bad port): a ValueError
    naming it, for commands that report bad input, and still a ZMQError for callers that
    catch those."""


def connect(
    kind: int,
    endpoint: str,
    *,
    curve: ClientCurve | None = None,
    context: zmq.Context | None = None,
    heartbeat: bool = True,
    before_connect: Callable[[zmq.Socket], object] | None = None,
    **options: Any,
) -> zmq.Socket:
    """A ``kind`` socket with ``options`` (zmq attribute → value) and CURVE, connected;
    ``before_connect(socket)`` runs just before (a monitor attached later can miss the
    connection)."""
    sock = (context or zmq.Context.instance()).socket(kind)
    try:
        for name, value in options.items():
            setattr(sock, name, value)
        if heartbeat:
            # ZMTP heartbeats notice a peer host that vanished without closing the connection:
            # without them a silent peer and a dead one look alike
            sock.heartbeat_ivl = HEARTBEAT_MS
            sock.heartbeat_timeout = 3 * HEARTBEAT_MS
        apply_curve(sock, curve)
        if before_connect is not None:
            before_connect(sock)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise InvalidEndpoint(exc.errno, f"cannot connect to {endpoint!r}: {exc.strerror} (a ZeroMQ "
                                  "endpoint looks like tcp://HOST:PORT)") from None
    except BaseException:
        # a socket left open here blocked its context's term() for ever: a Producer given
        # control="typo" hung at exit instead of reporting the endpoint
        sock.close(linger=0)
        raise
    return sock


def check_endpoint(endpoint: str, kind: int) -> None:
    """Raise :class:`InvalidEndpoint` unless ZeroMQ can connect a ``kind`` socket to
    ``endpoint`` as written (for clients that connect lazily, or on threads of their own). The
    socket is closed at once; ``kind`` is one the peer accepts, so a connection it may see is
    one it expects."""
    connect(kind, endpoint, heartbeat=False).close(linger=0)


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
