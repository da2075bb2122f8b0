"""The viewer in a real headless Chromium, against the real daemon (subprocess) while a scan
streams: the object appears and changes, the counters update, the final state and the result
files are shown; a frozen browser slows nothing. Skipped only where Chromium, ChromeDriver or
selenium are absent (`.ci/run` installs them)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryoptycho.daemon.bench.view import (
    BrowserUnavailable,
    find_browser,
    open_browser,
    viewer_server,
)
from cryoptycho.protocols.producer import Producer
from daemon_support import metrics_of, start_daemon, synthetic_scan, wait_for

try:
    find_browser()
    import selenium  # noqa: F401
except (BrowserUnavailable, ImportError) as exc:
    pytest.skip(f"no headless browser: {exc}", allow_module_level=True)

ARTIFACTS = Path(os.environ.get("CRYOPTYCHO_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
DAEMON_ARGS = ("--set", "options.iterations=15", "--set", "refine_time_budget_s=10",
               "--set", "preview_hz=5", "--set", "resolution_interval_s=1")


def _text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').textContent")


def _counter(driver) -> str | None:
    """The frames counter ("received / expected …") once it shows a number."""
    text = _text(driver, "st-frames")
    return text if text[:1].isdigit() else None


def _object_pixels(driver) -> str | None:
    return driver.execute_script(
        "const c = document.getElementById('object'); return c.width ? c.toDataURL() : null")


def test_browser_follows_a_streamed_scan(tmp_path):
    import websockets.sync.client

    scan = synthetic_scan(n_side=16)
    n = len(scan.frames)
    daemon = start_daemon(tmp_path, *DAEMON_ARGS)
    try:
        with viewer_server(daemon.publish, daemon.control) as url:
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(url + "files/ghost/result")
            assert missing.value.code == 404 and "ghost" in missing.value.read().decode()
            driver = open_browser(url, tmp_path / "profile")
            # a frozen browser: it connects and never reads a message
            frozen = websockets.sync.client.connect(url.replace("http", "ws") + "ws", max_size=None)
            try:
                with Producer(daemon.ingest, control=daemon.control) as producer:
                    producer.start_scan(**scan.start_fields("browser"))
                    for i in range(0, n // 2, 16):
                        producer.send_frames(scan.frames[i:i + 16])
                    first = wait_for(lambda: _object_pixels(driver), 60, "the object image", daemon)
                    counter = wait_for(lambda: _counter(driver), 60, "the frame counter", daemon)
                    for i in range(n // 2, n - 16, 16):
                        producer.send_frames(scan.frames[i:i + 16])
                    # the last frames are held back, so the scan still acquires: the page follows it
                    wait_for(lambda: _object_pixels(driver) not in (None, first), 60,
                             "the object image to change while frames arrive", daemon)
                    wait_for(lambda: _counter(driver) not in (None, counter), 60,
                             "the frame counter to move while frames arrive", daemon)
                    wait_for(lambda: _text(driver, "st-res").endswith("Å"), 60,
                             "a live resolution while frames arrive", daemon)
                    assert _text(driver, "scan-state") != "finished"
                    producer.send_frames(scan.frames[n - 16:])
                    producer.end_scan()
                wait_for(lambda: _text(driver, "scan-state") == "finished", 120, "the final state", daemon)
                assert _text(driver, "st-frames").startswith(f"{n} / {n}")
                assert _text(driver, "st-res").endswith("Å"), _text(driver, "st-res")
                assert "final result" in _text(driver, "range")
                links = driver.execute_script(
                    "return [...document.querySelectorAll('#files a')].map(a => a.textContent)")
                assert "result" in links or any("h5" in k for k in links), links
                # a late joiner (reload) sees the final state too, not the last metrics' state
                driver.refresh()
                wait_for(lambda: _text(driver, "scan-state") == "finished" and _object_pixels(driver),
                         60, "the final state after a reload", daemon)
                assert "final result" in _text(driver, "range")
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(ARTIFACTS / "viewer.png"))
                # the curve is labelled as what it is (tests/test_view.py checks the figure itself)
                assert "per frame" in _text(driver, "st-loss-label")
                # a viewer started after the scan ended shows its result (read from the file)
                with viewer_server(daemon.publish, daemon.control) as late_url:
                    driver.get(late_url)
                    wait_for(lambda: _text(driver, "scan-state") == "finished" and _object_pixels(driver),
                             60, "the finished scan in a viewer opened afterwards", daemon)
                    wait_for(lambda: "final result" in _text(driver, "range"), 120, "the result image", daemon)
                    assert _text(driver, "st-frames").startswith(f"{n} / {n}")
                    links = driver.execute_script(
                        "return [...document.querySelectorAll('#files a')].map(a => a.href)")
                    assert links and urllib.request.urlopen(links[0]).read(8) == b"\x89HDF\r\n\x1a\n"
            finally:
                frozen.socket.close()  # dropped, as a crashed browser would
                driver.quit()
        # ingest was not slowed into dropping: every frame arrived and none was dropped
        m = metrics_of(daemon)
        assert m["cryoptycho_frames_received_total"] == n
        assert not any(v for k, v in m.items() if k.startswith("cryoptycho_frames_dropped_total"))
    finally:
        daemon.stop()
