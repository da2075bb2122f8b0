"""Process-wide settings the daemon makes at start (daemon/SERVICE.md, "Process settings")."""

from __future__ import annotations

import pytest
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService, set_numpy_hugepages


def _numpy_advises_hugepages() -> bool:
    previous = set_numpy_hugepages(True)  # read it by setting it, then put it back
    set_numpy_hugepages(previous)
    return previous


@pytest.fixture
def restore_numpy_advice():
    before = _numpy_advises_hugepages()
    yield
    set_numpy_hugepages(before)


@pytest.mark.parametrize("configured", [None, False, True])
def test_the_daemon_sets_numpy_huge_page_advice_from_its_config(tmp_path, restore_numpy_advice, configured):
    set_numpy_hugepages(not bool(configured))  # the opposite of what the daemon must set
    extra = {} if configured is None else {"numpy_hugepages": configured}
    cfg = ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                        metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r", **extra)
    bg = BackgroundService(cfg)
    try:
        assert _numpy_advises_hugepages() is bool(configured)  # unset means off
    finally:
        bg.stop()


def test_the_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("CRYOPTYCHO_NUMPY_HUGEPAGES", "true")
    assert ServiceConfig().numpy_hugepages is True
