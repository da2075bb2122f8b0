"""Spool files for tests, and another process holding one open (HDF5's file locks are between
processes): an operator's h5py, HDFView, a pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from cryoptycho.daemon.scan import ScanSpec
from cryoptycho.daemon.storage.spool import SpoolWriter

#: holds the file open in ``mode`` (h5py's defaults: a shared lock for "r", exclusive for
#: "r+"/"a") until a line on stdin; then (a writer) sets an attribute and closes it, as an
#: operator's script would
_HOLDER = textwrap.dedent("""
    import sys, h5py
    try:
        f = h5py.File(sys.argv[1], sys.argv[2])
    except BlockingIOError:
        print("refused", flush=True)
        sys.exit(0)
    print("open", flush=True)
    sys.stdin.readline()
    if sys.argv[2] == "r+":  # ("a": opened for writing, nothing written, as old h5py's default)
        f.attrs["operator_note"] = "looked at it"
    f.close()
""")


@contextmanager
def held_open(path: Path, mode: str = "r") -> Iterator[None]:
    """Another process holding ``path`` open in ``mode`` for the block."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.close()  # its readline returns: it closes the file and exits
        assert holder.wait(30) == 0


def try_open(path: Path, mode: str) -> str:
    """Whether another process can open ``path`` in ``mode`` now ("open" or "refused")."""
    out = subprocess.run([sys.executable, "-c", _HOLDER, str(path), mode], input="\n", capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.split()[0]


def small_spool(spool_dir: Path, scan_id: str, status: str) -> Path:
    """A closed spool of five 16×16 frames of 7 (of 64 expected), with ``status`` ("open":
    its journal ends "closed", as a scan recovered at a start)."""
    spec = ScanSpec(scan_id=scan_id, frame_shape=(16, 16), frame_dtype="uint16", pixel_size_m=1e-10,
                    energy_eV=300e3, probe=np.ones((16, 16), np.complex64), expected_frames=64)
    w = SpoolWriter.create(spool_dir, spec)
    w.append(np.full((5, 16, 16), 7, np.uint16), np.arange(5), np.zeros((5, 2)))
    if status != "open":
        w.set_status(status)
    w.close()
    return w.path


@contextmanager
def aborted_scan_on_a_daemon(tmp_path: Path, scan_id: str = "held") -> Iterator[tuple[Any, Path]]:
    """A daemon (in this process) with one scan ``scan_id`` of 10 frames, cancelled and its spool
    closed — its close (closer thread) deletes the journal last: the file is whole then. Yields the
    daemon's control client and the spool's path; the daemon stops at the end."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import journal_path
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.producer import Producer
    from daemon_support import loopback_config, synthetic_scan, wait_for

    scan = synthetic_scan(n_side=4, m=32)
    cfg = loopback_config(tmp_path, refine_time_budget_s=2)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as p):
            p.start_scan(**scan.start_fields(scan_id))
            p.send_frames(scan.frames[:10])
            p.flush()
            ctl.cancel(scan_id, reason="stage drift")
            wait_for(lambda: scan_state(ctl, scan_id) == "aborted", 60, "the scan to be aborted")
            path = cfg.spool_dir / f"{scan_id}.spool.h5"
            wait_for(lambda: not journal_path(path).exists(), 60, "the aborted scan's spool to be closed")
            yield ctl, path
    finally:
        bg.stop()


def scan_state(ctl: Any, scan_id: str) -> str:
    return next(s for s in ctl.list_scans() if s["scan_id"] == scan_id)["state"]


def scan_ended(ctl: Any, scan_id: str) -> dict:
    """The scan's listing once it finished or failed (a finish_scan's reconstruction)."""
    from daemon_support import wait_for

    return wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == scan_id
                                  and s["state"] in ("finished", "failed")), None), 120, "the scan to end")


def gate_finish(monkeypatch: Any, scan_id: str) -> threading.Event:
    """Holds ``scan_id``'s finish (``ScanManager.finish_result``) until the returned event is
    set, so that with one worker a scan ending meanwhile waits parked, its spool closed."""
    from cryoptycho.daemon.scans import ScanManager

    go = threading.Event()
    finish = ScanManager.finish_result

    def finish_gated(self: ScanManager, session: Any, state: Any) -> dict[str, str]:
        if session.scan_id == scan_id:
            assert go.wait(120), f"{scan_id}'s finish was never let go of"
        return finish(self, session, state)

    monkeypatch.setattr(ScanManager, "finish_result", finish_gated)
    return go


def park_behind(producer: Any, service: Any, scan: Any, first: str = "a", second: str = "b") -> None:
    """Sends ``first`` and ``second`` whole; with one worker (``first``'s finish held by
    :func:`gate_finish`) ``second`` ends while ``first`` runs: returns once its spool is
    closed and it waits parked for a worker."""
    from daemon_support import wait_for

    for scan_id in (first, second):
        producer.start_scan(**scan.start_fields(scan_id))
        producer.send_frames(scan.frames)
        producer.end_scan()
    wait_for(lambda: (closed := service.scans._parked.get(second)) is not None and closed.is_set(), 60,
             f"{second}'s spool to be closed while {second} waits")
