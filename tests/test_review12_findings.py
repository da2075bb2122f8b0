"""review12's proof tests of defects found in the session's merged change (bd1685b..32b8bc2).

Each test asserts the behaviour the code should have and fails today because of the defect it
names: it is marked ``xfail(strict=True)``, so a fix turns it into an XPASS, which fails the run
until its mark is removed."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import msgpack
import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ProtocolError
from cryoptycho.protocols.limits import Limits
from daemon_support import loopback_config


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


def test_a_set_options_reopen_does_not_spend_the_admission_lock_of_the_workers_reopen(tmp_path, monkeypatch):
    """daemon/scans.py: admission (_spool_held) keeps a shared flock on a parked scan's spool until
    its worker's re-open (_unpark pops it from _admission_locks), so that no program takes the file
    for writing in between. keep_waiting_options (set_options of the scan while it waits) re-opens
    the spool through the same _unpark on the spool thread; when that runs after admission — the
    spool thread behind other scans' appends, as SERVICE.md says the re-open is — it pops the
    worker's lock, and its writer's close lets go of every lock: a program opening the file ``"r+"``
    before the worker's re-open is let in, and the started scan waits for it keeping its slot
    (the very case test_qasvc8_admission.py's test closes)."""
    from cryoptycho.daemon.scans import ScanManager
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.protocols.producer import Producer
    from daemon_support import synthetic_scan, wait_for
    from spool_support import park_behind, scan_ended, try_open

    go, in_window, reopen = threading.Event(), threading.Event(), threading.Event()
    finish, unpark = ScanManager.finish_result, ScanManager._unpark
    calls: list[str] = []

    def finish_gated(self: ScanManager, session: Any, state: Any) -> dict[str, str]:
        if session.scan_id == "a":
            assert go.wait(120)
        return finish(self, session, state)

    def unpark_gated(self: ScanManager, scan_id: str, parked: Any) -> Any:
        if scan_id == "b":
            calls.append(threading.current_thread().name)
            if len(calls) == 1:  # set_options' re-open, on the spool thread: let admission come first
                deadline = time.monotonic() + 120
                while "b" not in self.running:
                    assert time.monotonic() < deadline, "b was not admitted"
                    time.sleep(0.01)
            else:  # the worker's re-open: the window between admission and it
                in_window.set()
                assert reopen.wait(120)
        return unpark(self, scan_id, parked)

    monkeypatch.setattr(ScanManager, "finish_result", finish_gated)
    monkeypatch.setattr(ScanManager, "_unpark", unpark_gated)
    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2, max_concurrent_scans=1)
    spool = cfg.spool_dir / "b.spool.h5"
    bg = BackgroundService(cfg)
    svc = bg.service
    replies: list[Any] = []

    def set_options() -> None:
        with ControlClient(svc.endpoints["control"], timeout_s=120) as other:
            replies.append(other.set_options("b", {"iterations": 7}))

    asker = threading.Thread(target=set_options)
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            park_behind(p, svc, scan)  # b ends while a runs: its spool closed, waiting
            asker.start()
            wait_for(lambda: len(calls) == 1, 60, "set_options' re-open of b to reach the spool thread")
            go.set()  # a finishes; b is admitted (its spool looked at, the lock kept) and started
            assert in_window.wait(120), "the worker's re-open of b never came"
            holder = try_open(spool, "r+")
            reopen.set()
            asker.join(120)
            assert replies and replies[0]["options"]["iterations"] == 7, replies
            assert scan_ended(ctl, "b")["state"] == "finished"
    finally:
        go.set()
        reopen.set()
        bg.stop()
    # as right after admission without a set_options (test_qasvc8_admission.py): the writer is refused
    assert holder == "refused", "a program took b's spool for writing between its admission and its re-open"
