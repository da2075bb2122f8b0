"""What the daemon answered "ok" to survives a restart: options set on a scan waiting for a
worker are kept with its spool (its journal), and the scan recovered after a kill -9 runs with
them (the result file's saved options say so)."""

from __future__ import annotations

import json
import signal

import h5py
import numpy as np
import pytest
from cryoptycho.protocols.control import ControlClient, ControlError
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, synthetic_scan, wait_for

pytestmark = pytest.mark.subprocess

FAST = ("--set", "options.iterations=3", "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=8, m=32)



def _recovered_options(tmp_path, scan_id: str, n: int, *serve_args: str) -> dict:
    """Restart the daemon on the killed one's spool, wait for ``scan_id`` to be recovered and
    finish with every one of its ``n`` frames; the options its result was reconstructed with."""
    daemon = start_daemon(tmp_path, *FAST, "--set", "recover_wait_s=0.5", *serve_args)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            info = wait_for(lambda: next((s for s in ctl.list_scans() if s["scan_id"] == scan_id
                                          and s["state"] in ("finished", "failed", "aborted")), None),
                            120, f"the recovered scan {scan_id} to end", daemon)
            assert info["state"] == "finished" and info["recovered"] is True, info
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    with h5py.File(info["result_path"]) as f:
        assert np.sort(f["raw/entry_1/data_1/frame_index"][()]).tolist() == list(range(n))
        return json.loads(f.attrs["options"])

def test_options_set_on_a_queued_scan_survive_a_kill_and_restart(tmp_path, scan):
    """set_options on a queued scan was applied in memory only: after a crash the recovered
    scan ran with its declared options, though the daemon had answered ok."""
    n = len(scan.frames)
    daemon = start_daemon(tmp_path, *FAST, "--max-concurrent-scans", "1")
    try:
        with (ControlClient(daemon.control, timeout_s=30) as ctl, Producer(daemon.ingest, control=daemon.control) as one,
              Producer(daemon.ingest, control=daemon.control, send_timeout_s=30) as two):
            one.start_scan(**scan.start_fields("first"))  # holds the only slot: no scan_end
            wait_for(lambda: ctl.status()["running"] == ["first"], 120, "the first scan to run", daemon)
            two.start_scan(**scan.start_fields("queued", options={"iterations": 2}))
            two.send_frames(scan.frames)
            assert two.end_scan().acknowledged == n
            assert ctl.status()["waiting"] == ["queued"]
            reply = ctl.set_options("queued", {"seed": 4242, "stream": {"batch_size": 16}})
            assert reply["queued"] is True and reply["options"]["seed"] == 4242
            with pytest.raises(ControlError, match="iterations"):  # refused: nothing kept
                ctl.set_options("queued", {"iterations": -1})
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
            one.scan = two.scan = None  # the daemon is gone: no abort at close
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()

    options = _recovered_options(tmp_path, "queued", n, "--max-concurrent-scans", "2")
    # set while it waited, merged on what its scan_start declared (iterations 2), not the defaults'
    assert (options["seed"], options["stream"]["batch_size"], options["iterations"]) == (4242, 16, 2), options


def test_options_a_queued_scan_could_not_keep_are_answered_as_not_kept(tmp_path, monkeypatch, scan):
    """A disk fault writing them into the spool: the answer says they apply but would not
    survive a restart (rule kept_with_scan), instead of an ok the restart would contradict."""
    import errno

    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from daemon_support import loopback_config

    def fails(self, options):
        raise OSError(errno.EIO, "Input/output error (test)")

    monkeypatch.setattr(SpoolWriter, "set_options", fails)
    cfg = loopback_config(tmp_path, max_concurrent_scans=1)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as two):
            one.start_scan(**scan.start_fields("first"))
            wait_for(lambda: ctl.status()["running"] == ["first"], 120, "the first scan to run")
            two.start_scan(**scan.start_fields("queued"))
            wait_for(lambda: ctl.status()["waiting"] == ["queued"], 120, "the second scan to queue")
            with pytest.raises(ControlError) as info:
                ctl.set_options("queued", {"seed": 4242})
            result = info.value.reply.result
            assert (result["field"], result["rule"]) == ("params.options", "kept_with_scan"), info.value.reply
            assert "Input/output error (test)" in str(info.value) and "earlier options" in str(info.value)
            assert ctl.ping()["pong"] is True
            one.abort("test ends")
            two.abort("test ends")
    finally:
        bg.stop()


def test_options_set_on_a_running_scan_survive_a_kill_and_restart(tmp_path, scan):
    """set_options on a running scan changed only its worker's options in memory: after a
    kill -9 the recovered scan ran with the options it had started with, though the daemon had
    answered ok."""
    n = len(scan.frames)
    daemon = start_daemon(tmp_path, *FAST)
    try:
        with (ControlClient(daemon.control, timeout_s=30) as ctl,
              Producer(daemon.ingest, control=daemon.control, send_timeout_s=30) as one):
            one.start_scan(**scan.start_fields("running", options={"iterations": 2}))
            one.send_frames(scan.frames[: n // 2], indices=range(n // 2))
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the scan to run", daemon)
            reply = ctl.set_options("running", {"seed": 4242, "stream": {"batch_size": 16}})
            assert reply["options"]["seed"] == 4242 and "queued" not in reply, reply
            with pytest.raises(ControlError, match="iterations"):  # refused: nothing kept
                ctl.set_options("running", {"iterations": -1})
            one.send_frames(scan.frames[n // 2:], indices=range(n // 2, n))
            wait_for(lambda: ctl.receipt("running")["frames"]["received"] == n, 120, "every frame spooled", daemon)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(30)
            one.scan = None  # the daemon is gone: no abort at close
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()

    options = _recovered_options(tmp_path, "running", n)
    # set while it ran, merged on what its scan_start declared (iterations 2), not the defaults'
    assert (options["seed"], options["stream"]["batch_size"], options["iterations"]) == (4242, 16, 2), options


def test_options_a_running_scan_could_not_keep_are_answered_as_not_kept(tmp_path, monkeypatch, scan):
    """A disk fault writing a running scan's new options into its spool: the answer says they
    apply but would not survive a restart (rule kept_with_scan); the scan goes on."""
    import errno

    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from daemon_support import loopback_config

    def fails(self, options):
        raise OSError(errno.EIO, "Input/output error (test)")

    monkeypatch.setattr(SpoolWriter, "set_options", fails)
    cfg = loopback_config(tmp_path)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("running"))
            wait_for(lambda: ctl.status()["running"] == ["running"], 120, "the scan to run")
            with pytest.raises(ControlError) as info:
                ctl.set_options("running", {"seed": 4242})
            result = info.value.reply.result
            assert (result["field"], result["rule"]) == ("params.options", "kept_with_scan"), info.value.reply
            assert "Input/output error (test)" in str(info.value) and "earlier options" in str(info.value)
            assert ctl.status()["running"] == ["running"]
            one.abort("test ends")
    finally:
        bg.stop()


def test_options_set_on_a_scan_whose_end_was_read_are_answered_as_not_kept(tmp_path):
    """Once a scan's end is read its spool is closed (its final refinement runs from the frames its
    worker holds): a change applies to the refinement, and the answer says it would not survive a
    restart (``kept: false``) — it answered rule kept_with_scan, an error for a change that was applied."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.gpu.options import ReconOptions
    from daemon_support import loopback_config

    scan = synthetic_scan(n_side=6, m=32, counts=20)  # low counts, a sparse prior: a refinement of minutes
    cfg = loopback_config(tmp_path, refine_time_budget_s=600,
                          options=ReconOptions(iterations=1_000_000, prior="sparse", denoise_every=1))
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"]) as one):
            one.start_scan(**scan.start_fields("ended"))
            one.send_frames(scan.frames)
            one.end_scan()
            wait_for(lambda: ctl.status()["scans"]["ended"]["state"] == "refining", 120, "the scan to refine")
            # applied to the final refinement (the moment operators adjust it), and the answer says
            # a restart would not keep it, rather than an ok the restart would contradict
            reply = ctl.set_options("ended", {"seed": 4242})
            assert reply["kept"] is False and "takes no more frames" in reply["note"], reply
            assert reply["options"]["seed"] == 4242
            ctl.cancel("ended", "test ends")
    finally:
        bg.stop()
