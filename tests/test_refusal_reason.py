"""A scan refused after its spool was made keeps its refusal's reason even when the spool
cannot be closed: its producer and the operator learn why the scan was refused (not an internal
error about an empty spool), and nothing of the refused scan stays on disk."""

from __future__ import annotations

import errno

import pytest
from cryoptycho.daemon.storage.journal import journal_path
from cryoptycho.daemon.storage.spool import SpoolWriter, spool_path
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from daemon_support import synthetic_scan, wait_for


@pytest.fixture(scope="module")
def scan():
    return synthetic_scan(n_side=4, m=32)


def test_a_refused_scan_whose_spool_close_fails_is_refused_with_its_reason(tmp_path, monkeypatch, scan, caplog):
    from cryoptycho.daemon.service import BackgroundService
    from daemon_support import loopback_config

    real_close = SpoolWriter.close

    def close(self, held=None, peak=None):  # the refused scan's close fails as a disk fault makes it fail
        if self.path.name.startswith("refused"):
            self._let_go()
            raise OSError(errno.EIO, "Input/output error (test)")
        return real_close(self, held, peak)

    from cryoptycho.daemon.scans import ScanManager

    real_create = ScanManager.create_spool

    def create_spool(self, spec):  # a SIGTERM while the scan's start is prepared: refused once its spool exists
        spool = real_create(self, spec)
        if spec.scan_id == "refused":
            self.stopping = True
        return spool

    monkeypatch.setattr(SpoolWriter, "close", close)
    monkeypatch.setattr(ScanManager, "create_spool", create_spool)
    cfg = loopback_config(tmp_path)
    bg = BackgroundService(cfg)
    svc = bg.service
    try:
        with (ControlClient(svc.endpoints["control"], timeout_s=30) as ctl,
              Producer(svc.endpoints["ingest"], control=svc.endpoints["control"], confirm=False) as two):
            two.start_scan(**scan.start_fields("refused"))
            two.scan = None
            receipt = wait_for(lambda: (r := ctl.receipt("refused"))["state"] == "refused" and r, 120,
                               "the second scan's refusal")
            # before: "internal error: OSError: … Input/output error (test)", the reason lost
            assert "service_stopping" in receipt["error"] and "internal error" not in receipt["error"], receipt
            path = spool_path(cfg.spool_dir, "refused")
            assert not path.exists() and not journal_path(path).exists()  # nothing of it is kept
            assert any("could not be discarded" in r.getMessage() and "Input/output error (test)" in r.getMessage()
                       for r in caplog.records)
            assert ctl.ping()["pong"] is True
    finally:
        bg.stop()
