"""The control channel: client REQ/DEALER → daemon ROUTER, ``Request`` → ``Reply``.

Server side: :func:`handle` takes the parts a ROUTER received and returns the parts to send
back; :func:`dispatch` runs a method → handler table in which a handler's exception, bad
parameters or an unknown method all become ``Reply(success=False, msg=…)`` — never a crash.
Client side: :class:`ControlClient`, a Lazy-Pirate REQ client (timeout, close, reopen, retry).
Retried requests may run twice, so every standard method is idempotent.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import Any

import zmq

from .client import SocketClient, connect
from .errors import ControlError, ControlTimeout, ProtocolError
from .limits import Limits, control_max_part_bytes
from .messages import Reply, Request, decode, encode
from .security import ClientCurve
from .wire import encodable, values_over

log = logging.getLogger(__name__)

DEFAULT_CONTROL = "tcp://127.0.0.1:5602"

#: the standard methods (PROTOCOL.md § Control) and their parameters
METHODS: dict[str, tuple[str, ...]] = {
    "ping": (),
    "status": (),
    "list_scans": ("state",),
    "snapshot": ("scan_id",),
    "cancel": ("scan_id", "reason"),
    "set_options": ("options", "scan_id"),
    "receipt": ("scan_id",),
    "finish_scan": ("scan_id",),
}

Handler = Callable[..., Any]


def dispatch(table: Mapping[str, Handler], request: Request) -> Reply:
    """Run ``table[request.method](**request.params)``.

    A handler returns a dict (the reply's ``result``; NumPy arrays anywhere in it travel as
    array parts), a message dataclass (sent as its field tree) or None. Exceptions become failed
    replies whose ``msg`` names the exception; a ProtocolError also sets ``result.field/rule``.
    """
    handler = table.get(request.method)
    if handler is None:
        known = ", ".join(sorted(table))
        return Reply(
            False,
            f"unknown method {request.method!r}; known: {known}",
            {"field": "method", "rule": "known_method"},
        )
    try:
        inspect.signature(handler).bind(**request.params)
    except TypeError as exc:
        return Reply(
            False,
            f"bad params for {request.method!r}: {exc}",
            {"field": "params", "rule": "signature"},
        )
    try:
        result = handler(**request.params)
    except ProtocolError as exc:
        return Reply(False, str(exc), {"field": exc.field, "rule": exc.rule})
    except Exception as exc:  # noqa: BLE001 - a handler bug is the caller's reply, never a crash
        return Reply(
            False,
            f"{request.method} failed: {type(exc).__name__}: {exc}",
            {"field": "method", "rule": "internal_error"},
        )
    if result is None:
        result = {}
    elif is_dataclass(result) and not isinstance(result, type):
        result = as_tree(result)
    if not isinstance(result, dict):
        return Reply(
            False, f"handler of {request.method!r} returned {type(result).__name__}, not a dict"
        )
    return Reply(True, "ok", result)


def split_envelope(parts: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """ROUTER parts → (routing envelope, body).

    REQ peers add an empty delimiter frame after the identity; DEALERs may not.
    """
    if len(parts) >= 2 and memoryview(getattr(parts[1], "buffer", parts[1])).nbytes == 0:
        return list(parts[:2]), list(parts[2:])
    return list(parts[:1]), list(parts[1:])


def handle(
    parts: Sequence[Any], table: Mapping[str, Handler], limits: Limits | None = None
) -> list[Any]:
    """A ROUTER message → the reply parts to send back (with the routing envelope).

    Returns ``[]`` when there is nobody to answer (no identity frame).
    """
    if len(parts) < 2:
        return []
    envelope, body = split_envelope(parts)
    request: Any = None
    try:
        request = decode(body, limits)
        if not isinstance(request, Request):
            raise ProtocolError(
                "type",
                "request_expected",
                f"the control socket takes requests, not {request.type!r}",
            )
    except ProtocolError as exc:
        reply = Reply(False, str(exc), {"field": exc.field, "rule": exc.rule})
    else:
        reply = dispatch(table, request)
    reply.time_s = time.time()
    method = request.method if isinstance(request, Request) else "?"
    return envelope + encode_reply(reply, method, limits)


def encode_reply(reply: Reply, method: str, limits: Limits | None = None) -> list[Any]:
    """The parts of ``reply``; one that cannot be encoded, or whose header is larger than a
    client reads (``max_header_bytes``, or more values than ``max_header_values``: the client
    refuses it, and the caller learns nothing but a protocol error), is answered as a failure
    that says so instead — itself within ``max_header_bytes``, however small that is set."""
    limits = limits or Limits()
    try:
        try:
            parts = encode(reply)
        except UnicodeEncodeError:  # a path quoted from a non-UTF-8 directory name (wire.encodable)
            parts = encode(replace(reply, msg=encodable(reply.msg), result=encodable(reply.result)))
    except Exception as exc:  # noqa: BLE001 - a result msgpack cannot carry is still answered
        return _failure(f"reply of {method!r} could not be encoded: {exc}", "encodable", reply.time_s, limits)
    size = memoryview(parts[0]).nbytes
    if size > limits.max_header_bytes:
        return _failure(
            f"reply of {method!r} would be {size} bytes, more than the {limits.max_header_bytes} "
            "a client reads (max_header_bytes); this is a daemon bug, please report it",
            "max_header_bytes", reply.time_s, limits,
        )
    values = values_over(parts[0], limits.max_header_values)
    if values is not None:
        return _failure(
            f"reply of {method!r} would hold {values} values, more than the {limits.max_header_values} "
            "a client reads (max_header_values); this is a daemon bug, please report it",
            "max_header_values", reply.time_s, limits,
        )
    return parts


def _failure(msg: str, rule: str, time_s: float | None, limits: Limits) -> list[Any]:
    """A failed reply's parts, its message cut so that its header fits ``max_header_bytes``
    (at its 256-byte least a failure naming a 64-character method was 311 bytes: the client
    refused the very answer that said why)."""
    parts = encode(Reply(False, msg, {"field": "result", "rule": rule}, time_s=time_s))
    over = memoryview(parts[0]).nbytes - limits.max_header_bytes
    if over <= 0:
        return parts
    # msgpack's string header shrinks with the string: cutting ``over`` bytes (and the "…") is enough
    text = msg.encode()[: max(0, len(msg.encode()) - over - 3)].decode(errors="ignore")
    return encode(Reply(False, text + "…", {"field": "result", "rule": rule}, time_s=time_s))


def as_tree(msg: Any) -> dict[str, Any]:
    """A message dataclass as a plain tree (``type`` + fields) to embed in a reply."""
    tree: dict[str, Any] = {"type": msg.type}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if value is None:
            continue
        if is_dataclass(value):
            value = (
                as_tree(value)
                if hasattr(value, "type")
                else {g.name: getattr(value, g.name) for g in fields(value)}
            )
        elif isinstance(value, tuple):
            value = list(value)
        tree[f.name] = value
    return tree


class ControlClient(SocketClient):
    """Talk to a daemon's control socket; every call has a timeout and retries (Lazy Pirate).

    ``call`` returns the result dict or raises :class:`ControlError` (``success: False``) or
    :class:`ControlTimeout` (no reply after ``retries`` attempts of ``timeout_s`` each).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_CONTROL,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        limits: Limits | None = None,
        curve: ClientCurve | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        if timeout_s <= 0 or retries < 1:
            raise ValueError("timeout_s must be > 0 and retries ≥ 1")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.limits = limits or Limits()
        self._curve = curve
        self._ctx = context
        self._socket: zmq.Socket | None = None  # opened by the first request

    def request(self, method: str, **params: Any) -> Reply:
        """Send one request and return the daemon's reply, whatever its ``success``."""
        parts = encode(Request(method, params, time.time()))
        for _ in range(self.retries):
            sock = self._connect()
            try:
                sock.send_multipart(parts, copy=False)
            except zmq.Again:
                self._reset()
                continue
            if sock.poll(int(self.timeout_s * 1000)):
                reply = decode(sock.recv_multipart(copy=False), self.limits)
                if not isinstance(reply, Reply):
                    raise ProtocolError(
                        "type", "reply_expected", f"control answered with {reply.type!r}"
                    )
                return reply
            # a REQ socket that missed its reply is stuck in "expect reply": start over
            self._reset()
        largest = max(memoryview(getattr(p, "buffer", p)).nbytes for p in parts)
        cap = control_max_part_bytes(self.limits)
        raise ControlTimeout(
            f"no reply from {self.endpoint} to {method!r} "
            f"after {self.retries} tries of {self.timeout_s} s"
            + (f" (the request has a {largest}-byte part: a daemon with these limits disconnects a "
               f"control client whose message part exceeds {cap} bytes, its control_max_part_bytes, "
               "without an answer)" if largest > cap else "")
        )

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        reply = self.request(method, **params)
        if not reply.success:
            raise ControlError(method, reply.msg, reply)
        return reply.result

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def list_scans(self, state: str | None = None) -> list[dict[str, Any]]:
        """Summaries of the daemon's scans (512 at most: the running ones and the newest others),
        optionally only those in ``state``. A cut list is logged with the daemon's count; the raw
        reply (``call("list_scans")``) carries it as ``total``."""
        params = {} if state is None else {"state": state}
        reply = self.call("list_scans", **params)
        scans = list(reply.get("scans", []))
        total = reply.get("total")
        if isinstance(total, int) and total > len(scans):
            log.warning("list_scans: the daemon holds %d scans%s; its reply lists %d (the running ones and "
                        "the newest others)", total, "" if state is None else f" in state {state!r}", len(scans))
        return scans

    def snapshot(self, scan_id: str) -> dict[str, Any]:
        """A late joiner's starting point: the scan's summary and its latest images (``object``,
        ``probe``, ``coverage`` arrays, ``iteration``, ``pixel_size_m``, ``origin_m``) once the
        first preview exists. Subscribe first, then snapshot, then apply newer previews."""
        return self.call("snapshot", scan_id=scan_id)

    def cancel(self, scan_id: str, reason: str = "") -> dict[str, Any]:
        return self.call("cancel", scan_id=scan_id, reason=reason)

    def set_options(self, scan_id: str | None, options: dict[str, Any]) -> dict[str, Any]:
        """Change ReconOptions of a running scan, or with ``scan_id=None`` the defaults of
        later scans."""
        params: dict[str, Any] = {"options": options}
        if scan_id is not None:
            params["scan_id"] = scan_id
        return self.call("set_options", **params)

    def receipt(self, scan_id: str) -> dict[str, Any]:
        """What the daemon holds of a scan: ``frames`` (``received``, ``gaps``, …), ``ended``
        (its scan_end was read), ``end_reason``, ``state`` (``"unknown"`` before the daemon read
        the scan's start, ``"refused"`` after a refusal), ``missing`` (first missing indices once
        the scan takes no more frames). Producers poll it to confirm delivery."""
        return self.call("receipt", scan_id=scan_id)

    def finish_scan(self, scan_id: str) -> dict[str, Any]:
        """Reconstruct what the scan received now: ends an open scan, or re-opens one that was
        stopped without a result (e.g. its sender went silent) from the daemon's spool."""
        return self.call("finish_scan", scan_id=scan_id)

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            # a REQ socket is replaced after every missed reply: heartbeats would not help
            self._socket = connect(
                zmq.REQ,
                self.endpoint,
                curve=self._curve,
                context=self._ctx,
                heartbeat=False,
                linger=0,
                sndtimeo=int(self.timeout_s * 1000),
            )
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()
