"""Process-wide settings the daemon makes at start (daemon/SERVICE.md, "Process settings")."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import weakref

import numpy as np
import pytest
from cryoptycho.daemon.bench.protocol import _scan
from cryoptycho.daemon.config import ServiceConfig
from cryoptycho.daemon.service import BackgroundService, set_numpy_hugepages
from cryoptycho.gpu import framestore
from cryoptycho.protocols.messages import RasterScan
from cryoptycho.protocols.producer import Producer
from daemon_support import wait_for


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


def _config(tmp_path, **extra):
    return ServiceConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*",
                         metrics_enabled=False, spool_dir=tmp_path / "s", results_dir=tmp_path / "r", **extra)


@pytest.fixture
def restore_frame_store_reuse():
    before = framestore.MAPPINGS.keep_bytes
    yield
    framestore.MAPPINGS.set_keep_bytes(before)


@pytest.mark.parametrize("configured", [None, 0, 3 << 20])
def test_the_daemon_sets_how_much_frame_store_memory_it_keeps(tmp_path, restore_frame_store_reuse, configured):
    framestore.MAPPINGS.set_keep_bytes(12345)
    extra = {} if configured is None else {"frame_store_reuse_bytes": configured}
    bg = BackgroundService(_config(tmp_path, **extra))
    try:
        assert framestore.MAPPINGS.keep_bytes == (4 << 30 if configured is None else configured)
    finally:
        bg.stop()


def test_frame_store_reuse_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("CRYOPTYCHO_FRAME_STORE_REUSE_BYTES", "0")
    assert ServiceConfig().frame_store_reuse_bytes == 0
    monkeypatch.setenv("CRYOPTYCHO_FRAME_STORE_REUSE_BYTES", "-1")
    with pytest.raises(ValueError, match="frame_store_reuse_bytes"):
        ServiceConfig()


def test_a_scan_s_engine_and_frame_store_go_when_its_worker_has_ended(tmp_path, restore_frame_store_reuse):
    """A finished scan stays listed (the history) long after its worker; its engine, frame store
    included, must not stay with it, or a daemon running scan after scan keeps them all."""
    bg = BackgroundService(_config(tmp_path))
    scans = bg.service.scans
    try:
        with Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"]) as producer:
            frames = np.random.default_rng(0).poisson(0.1, (64, 96, 96)).astype(np.uint16)
            producer.start_scan(_scan("gone", 96, 256, raster=RasterScan((4, 64), (1e-10, 1e-10))))
            producer.send_frames(frames, np.arange(64))
            engine = wait_for(lambda: getattr(scans.running.get("gone"), "engine", None), 60, "engine")
            gone = weakref.ref(engine)
            store = weakref.ref(engine.frame_store)
            del engine
            producer.abort("test")
        wait_for(lambda: "gone" in scans.sessions and scans.sessions["gone"].state.final
                 and "gone" not in scans.running, 60, "end of the scan")
        # what the spool thread still had queued for the scan may hold its worker a moment longer
        wait_for(lambda: gc.collect() >= 0 and gone() is None and store() is None, 30, "engine released")
        assert "gone" in scans.sessions  # still listed
    finally:
        bg.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm reserve is Linux's")
def test_the_daemon_faults_in_its_frame_store_reserve_at_start_and_its_first_scan_takes_it(tmp_path):
    """``frame_store_warm_bytes``: faulted in on a thread at start; the first scan's store takes
    it (no fresh pages for its frames), and a daemon started without it gives a reserve back."""
    framestore.MAPPINGS.set_warm_bytes(1 << 20)  # left by something earlier in the process
    bg = BackgroundService(_config(tmp_path / "a"))
    try:
        assert framestore.MAPPINGS.warm_bytes() == 0 and bg.service.frame_store_warming is None
    finally:
        bg.stop()
    frames_bytes = 256 * 96 * 96 * 2
    bg = BackgroundService(_config(tmp_path / "b", frame_store_warm_bytes=frames_bytes))
    scans = bg.service.scans
    try:
        bg.service.frame_store_warming.join(60)
        assert framestore.MAPPINGS.warm_bytes() == frames_bytes
        moved = framestore.MAPPINGS.warm_moved
        with Producer(bg.service.endpoints["ingest"], control=bg.service.endpoints["control"]) as producer:
            frames = np.random.default_rng(1).poisson(0.1, (64, 96, 96)).astype(np.uint16)
            producer.start_scan(_scan("ahead", 96, 256, raster=RasterScan((4, 64), (1e-10, 1e-10))))
            for i in range(4):
                producer.send_frames(frames, np.arange(64 * i, 64 * (i + 1)))
            engine = wait_for(lambda: getattr(scans.running.get("ahead"), "engine", None), 60, "engine")
            wait_for(lambda e=engine: e.n_frames == 256, 60, "every frame in the store")
            store = engine.frame_store
            assert store._populated == store.capacity == 256  # faulted in ahead, none by the appends
            assert framestore.MAPPINGS.warm_moved - moved == frames_bytes
            assert framestore.MAPPINGS.warm_bytes() == 0
            expected = np.roll(frames, (-48, -48), axis=(1, 2))
            np.testing.assert_array_equal(store.frames[192:256], expected)
            del engine, store
            producer.abort("test")
    finally:
        bg.stop()


def test_frame_store_warm_bytes_is_read_from_the_environment_and_checked(monkeypatch):
    assert ServiceConfig().frame_store_warm_bytes == 0  # none unless asked for: it is resident from start
    monkeypatch.setenv("CRYOPTYCHO_FRAME_STORE_WARM_BYTES", str(1 << 30))
    assert ServiceConfig().frame_store_warm_bytes == 1 << 30
    monkeypatch.setenv("CRYOPTYCHO_FRAME_STORE_WARM_BYTES", "-1")
    with pytest.raises(ValueError, match="frame_store_warm_bytes"):
        ServiceConfig()


def test_a_reserve_over_half_the_available_memory_is_refused_with_a_warning(tmp_path, monkeypatch, caplog):
    from cryoptycho.daemon import service

    monkeypatch.setattr(service, "memory_available", lambda: 8 << 20)
    with caplog.at_level("WARNING", logger="cryoptycho.service"):
        bg = BackgroundService(_config(tmp_path, frame_store_warm_bytes=5 << 20))
        try:
            assert bg.service.frame_store_warming is None and framestore.MAPPINGS.warm_bytes() == 0
        finally:
            bg.stop()
    assert any("frame_store_warm_bytes = 5242880 is more than half" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MemAvailable is Linux's")
def test_the_available_memory_is_read_from_the_host():
    from cryoptycho.daemon.service import memory_available

    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < memory_available() <= total


def test_a_started_daemon_has_imported_what_its_first_scan_s_engine_would(tmp_path):
    """scipy.fft (the engine's host FFTs) is imported at start, not inside the first scan."""
    import subprocess

    code = ("import sys\n"
            "from pathlib import Path\n"
            "from cryoptycho.daemon.config import ServiceConfig\n"
            "from cryoptycho.daemon.service import Service\n"
            "d = Path(sys.argv[1])\n"
            "s = Service(ServiceConfig(ingest='tcp://127.0.0.1:*', publish='tcp://127.0.0.1:*', "
            "control='tcp://127.0.0.1:*', metrics_enabled=False, recover=False, spool_dir=d / 's', "
            "results_dir=d / 'r'))\n"
            "before = 'scipy.fft' in sys.modules\n"
            "s.start()\n"
            "print(before, 'scipy.fft' in sys.modules)\n"
            "s.close()\n")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"], run.stdout


_MESSAGES = r"""
import ctypes, queue, resource, sys, threading
from cryoptycho.daemon.ingest import keep_message_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
kept = sys.argv[1] == "keep" and keep_message_memory(256 << 20)
size, waiting, rounds = 256 * 96 * 96 * 2 + 400, 16, 4  # 256-frame 96x96 uint16 messages
fresh, bursts, freed = [], queue.Queue(), queue.Queue()

def receive():  # as ZeroMQ's I/O thread: each message malloc'ed and written on one thread
    for _ in range(rounds):
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        held = []
        for _ in range(waiting):
            p = libc.malloc(size)
            libc.memset(p, 1, size)
            held.append(p)
        fresh.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / (waiting * size / 4096))
        bursts.put(held)
        freed.get()

t = threading.Thread(target=receive)
t.start()
for _ in range(rounds):  # a burst of messages waited; another thread frees them all
    for p in bursts.get():
        libc.free(p)
    freed.put(None)
t.join()
print(kept, *fresh)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_received_messages_reuse_freed_memory_once_the_daemon_keeps_it():
    """Messages allocated on one thread and freed on another (ZeroMQ's I/O thread, then the
    spool and the worker): kept (keep_message_memory), the bursts after the first reuse the
    first's pages (with glibc 2.36's defaults every burst of 16 waiting messages landed in
    fresh memory again: 0.99 fresh pages per page). Counted in page faults of the receiving
    thread, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _MESSAGES, "keep"], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc: the allocator did not take the settings")
    first, later = float(out[1]), [float(x) for x in out[2:]]
    assert first > 0.9  # fresh pages per page of a message: the first burst is all fresh
    assert max(later) < 0.01


def test_the_daemon_keeps_message_memory_up_to_its_ingest_queue(tmp_path, monkeypatch):
    from cryoptycho.daemon import service

    calls = []
    monkeypatch.setattr(service, "keep_message_memory", lambda n: calls.append(n) or True)
    bg = BackgroundService(_config(tmp_path, ingest_queue_bytes=96 << 20))
    bg.stop()
    assert calls == [96 << 20]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc")
def test_an_idle_daemon_gives_the_memory_it_kept_for_messages_back(tmp_path):
    """keep_message_memory keeps freed message memory (and the scans' other freed heap memory)
    resident up to ingest_queue_bytes so that the next scan reuses it: kept for ever, a daemon
    that runs for years stayed at the most it ever held. Once no scan has been live for
    release_memory_idle_s it is given back (malloc_trim). Measured by the real daemon's RSS (its
    own log's figures before and after the trim, and /proc), waited for with a generous deadline
    (no timing asserted): 345 → 213 MB here; before, 362 MB for good."""
    from cryoptycho.daemon.ingest import _glibc
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_daemon, synthetic_scan

    if _glibc() is None:  # (the daemon runs on this interpreter and C library)
        pytest.skip("the C library is not glibc: nothing is kept, nothing to give back")
    scan = synthetic_scan(n_side=16, m=128)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=2",
                          "--set", "resolution_interval_s=0", "--set", "frame_store_reuse_bytes=0",
                          "--set", "release_memory_idle_s=1")
    try:
        start = _rss_mb(daemon.proc.pid)
        with ControlClient(daemon.control, timeout_s=60) as ctl:
            for k in range(3):
                with Producer(daemon.ingest, control=daemon.control, batch_frames=64) as producer:
                    producer.start_scan(**scan.start_fields(f"s{k}"))
                    producer.send_frames(scan.frames)
                    producer.end_scan()
            wait_for(lambda: len(ctl.list_scans(state="finished")) == 3, 300, "the scans to finish", daemon)

        def trimmed() -> dict | None:  # the daemon's own RSS before and after (no race with the trim)
            for line in list(daemon.log_lines):
                if line.startswith("{") and "freed message memory given back" in (record := json.loads(line))["msg"]:
                    return record
            return None

        record = wait_for(trimmed, 120, "the idle daemon to give its kept memory back", daemon)
        before, after = map(float, re.search(r"resident (\d+) → (\d+) MB", record["msg"]).groups())
        assert after < before - (before - start) / 3, (start, before, after)  # here 345 → 213 (start 120)
        assert _rss_mb(daemon.proc.pid) < before
    finally:
        assert daemon.stop() == 0, daemon.log()
