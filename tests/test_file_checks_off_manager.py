"""A scan id's spool and result files are looked for off the manager thread: a receipt of an
unknown scan (``taken``, polled by producers before and after a scan) and every scan_start made
stat calls on the spool and results directories on the manager thread, and on a slow or hung
network file system every peer waited for them. Here the look at the files blocks (as on a hung
NFS server) until the test lets it go: another client's ping must be answered meanwhile."""

from __future__ import annotations

import threading

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import loopback_config, synthetic_scan


@pytest.fixture
def hung(tmp_path, monkeypatch):
    """An in-process daemon whose look at the files of ids starting ``slow`` blocks."""
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage import outputs

    entered, release = threading.Event(), threading.Event()
    paths = outputs.output_paths

    def blocking(stem, formats=outputs.ALL_FORMATS):
        if str(stem).rsplit("/", 1)[-1].startswith("slow"):
            entered.set()
            release.wait(120)
        return paths(stem, formats)

    monkeypatch.setattr(outputs, "output_paths", blocking)
    bg = BackgroundService(loopback_config(tmp_path))
    try:
        yield bg.service, entered, release
    finally:
        release.set()
        bg.stop()


def _in_thread(fn):
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _ping_while_hung(svc, entered, release) -> None:
    assert entered.wait(60), "the files were not looked for"
    try:
        # before: the manager thread was the one blocked, and this ping was never answered
        with ControlClient(svc.endpoints["control"], timeout_s=20, retries=1) as other:
            assert other.ping()["pong"] is True
    finally:
        release.set()


def test_a_receipt_looks_for_the_files_off_the_manager_thread(hung, tmp_path):
    svc, entered, release = hung
    with ControlClient(svc.endpoints["control"], timeout_s=60) as ctl:
        thread, out = _in_thread(lambda: ctl.receipt("slow-1"))
        _ping_while_hung(svc, entered, release)
        thread.join(60)
        assert out.get("value", {}).get("state") == "unknown" and out["value"]["taken"] is None, out
        # the files are looked for at each receipt, not remembered: a result put there by hand
        # (or by another daemon) counts at once
        from cryoptycho.daemon.storage.outputs import output_paths
        from cryoptycho.daemon.storage.spool import file_stem

        assert ctl.receipt("by-hand")["taken"] is None
        result = next(iter(output_paths(svc.config.results_dir / file_stem("by-hand"),
                                        svc.config.output_formats).values()))
        result.write_bytes(b"")
        taken = ctl.receipt("by-hand")["taken"]
        assert taken is not None and str(result) in taken, taken


def test_a_scan_start_looks_for_the_files_off_the_manager_thread(hung):
    svc, entered, release = hung
    scan = synthetic_scan(n_side=4, m=32)
    # unconfirmed: a confirming producer asks a receipt of its scan first, whose look blocks
    with Producer(svc.endpoints["ingest"], confirm=False) as producer:
        producer.start_scan(**scan.start_fields("slow-2"))
        _ping_while_hung(svc, entered, release)
        with ControlClient(svc.endpoints["control"], timeout_s=60) as ctl:
            from daemon_support import wait_for

            wait_for(lambda: ctl.receipt("slow-2")["state"] not in ("unknown",), 60, "the scan to be accepted")
            assert ctl.receipt("slow-2")["state"] != "refused"
        producer.abort("test over")
