"""review12's proof tests of defects found in the session's merged change (bd1685b..32b8bc2).

Each test asserts the behaviour the code should have and fails today because of the defect it
names: it is marked ``xfail(strict=True)``, so a fix turns it into an XPASS, which fails the run
until its mark is removed."""

from __future__ import annotations

import gc
import threading

import msgpack
import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from daemon_support import loopback_config


@pytest.mark.xfail(strict=True, reason="review12: encode_reply bounds a reply's bytes (max_header_bytes) but not "
                   "its values (max_header_values): a reply our own client cannot read is sent as is")
def test_a_reply_over_the_clients_value_limit_is_answered_readably(tmp_path):
    """``set_options`` echoes the options it set. ``aberrations`` has no length bound, so a request
    within the daemon's max_header_values (65,536) sets a list that, with the ~100 other options
    echoed beside it, makes a reply of more values than the client reads: the change is applied,
    and the caller learns only a ProtocolError about the daemon's own reply — as does every later
    defaults set_options, whose reply echoes the same list."""
    from cryoptycho.daemon.service import BackgroundService

    n = Limits().max_header_values - 64  # the request (its list and ~10 envelope values) is within it
    bg = BackgroundService(loopback_config(tmp_path))
    try:
        with ControlClient(bg.service.endpoints["control"], timeout_s=30) as ctl:
            try:
                reply = ctl.request("set_options", options={"aberrations": ["C10"] * n})
            except ProtocolError as exc:
                pytest.fail(f"the daemon's reply could not be read by its own client: {exc}")
            # either applied and echoed, or refused by name: a reply the client reads
            assert reply.success or reply.result.get("rule"), reply
            assert ctl.ping()["pong"] is True
    finally:
        bg.stop()


class _Interleaved:
    """``gc`` as protocols/wire.py sees it, holding two readers at the points of one possible
    interleaving (the interpreter may switch threads between any two of these calls)."""

    def __init__(self) -> None:
        self.b_looked = threading.Event()
        self.a_done = threading.Event()

    def isenabled(self) -> bool:
        enabled = gc.isenabled()
        if threading.current_thread().name == "reader-b":
            self.b_looked.set()  # B saw the collector off (A's disable) ...
            assert self.a_done.wait(30)  # ... and is switched out until A is through
        return enabled

    def disable(self) -> None:
        gc.disable()
        if threading.current_thread().name == "reader-a":
            assert self.b_looked.wait(30)

    def enable(self) -> None:
        gc.enable()


@pytest.mark.xfail(strict=True, reason="review12: read_header saves and restores the process-wide gc flag "
                   "per call: two threads reading headers can leave the collector off for good")
def test_two_threads_reading_headers_leave_the_garbage_collector_on(monkeypatch):
    """protocols/wire.py read_header: ``collecting = gc.isenabled(); gc.disable(); … finally: if
    collecting: gc.enable()``. Thread A disables; thread B reads "off" and is switched out; A
    finishes and enables; B disables and, having seen "off", never enables: the process (a client
    with a subscriber thread and a control client, the daemon in-process beside producers in
    bench or a notebook) runs without a cyclic collector from then on — its reference cycles
    are never freed."""
    from cryoptycho.protocols import wire

    shim = _Interleaved()
    monkeypatch.setattr(wire, "gc", shim)
    head = msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "request", "method": "ping",
                          "params": {}, "arrays": []})
    errors: list[BaseException] = []

    def read(name: str) -> None:
        try:
            wire.read_header([head], Limits())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if name == "reader-a":
                shim.a_done.set()

    assert gc.isenabled()
    try:
        a = threading.Thread(target=read, args=("reader-a",), name="reader-a")
        b = threading.Thread(target=read, args=("reader-b",), name="reader-b")
        a.start()
        b.start()
        a.join(60)
        b.join(60)
        assert not errors, errors
        on = gc.isenabled()
    finally:
        gc.enable()
    assert on, "the garbage collector was left disabled after both headers were read"
