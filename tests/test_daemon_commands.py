"""`cryoptycho watch` and `cryoptycho demo` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryoptycho.protocols.producer import Producer
from daemon_support import publish_probe_until, start_daemon, synthetic_scan
from PIL import Image

pytestmark = pytest.mark.subprocess


def test_watch_follows_a_scan_and_saves_images(tmp_path):
    scan = synthetic_scan()
    daemon = start_daemon(tmp_path, "--set", "options.iterations=5", "--set", "preview_hz=10",
                          "--set", "resolution_interval_s=0")
    try:
        save = tmp_path / "images"
        watch = subprocess.Popen(
            [sys.executable, "-m", "cryoptycho.daemon.cli", "watch", "--publish", daemon.publish,
             "--control", daemon.control, "--save-dir", str(save), "--exit-after-results", "1",
             "--timeout", "90"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: list[str] = []
        pump = threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True)
        pump.start()
        # the watcher has subscribed once it prints an event the daemon published
        publish_probe_until(daemon, lambda: any(ln.startswith("error") for ln in list(lines)) or watch.poll() is not None,
                            "the watcher to print a published event")
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**scan.start_fields("watched"))
            for lo in range(0, len(scan.frames), 32):
                producer.send_frames(scan.frames[lo : lo + 32])
                time.sleep(0.05)
            producer.end_scan()
        watch.wait(120)
        pump.join(10)
        out = "".join(lines)
        assert watch.returncode == 0, out
        assert "watched" in out and "final image" in out, out
        for name in ("watched.preview.png", "watched.result.png"):
            with Image.open(save / name) as img:
                assert img.size[0] > 32 and img.mode == "L"
    finally:
        daemon.stop()


def test_demo_runs_end_to_end(tmp_path):
    # a folder whose paths are longer than a piped console is wide (80 columns): rich folded
    # them, and the test passed or failed with the length of pytest's temporary folder
    out = tmp_path / "a-results-folder-named-long-enough-that-its-files-paths-pass-80-columns" / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "cryoptycho.daemon.cli", "demo", "--out", str(out), "--rate", "2000",
         "--refine-s", "3"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] > 100 and report["iterations"] > 0
    assert set(report["resolution_vs_truth_m"]) == {"1-bit", "1/2-bit", "0.143"}
    for path in report["files"].values():
        assert Path(path).is_file(), path  # absolute: --out was absolute
    printed = [line.rsplit(maxsplit=1)[-1] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert str(out / "report.json") in printed, proc.stdout  # each path whole on its own line


def test_serve_bridges_a_dectris_stream(tmp_path):
    from cryoptycho.protocols.control import ControlClient
    from daemon_support import start_dectris_sim, wait_for

    sim, source = start_dectris_sim("--frames", "64", "--size", "32", "--rate", "200")
    try:
        daemon = start_daemon(tmp_path, "--source", source, "--set", "options.iterations=3",
                              "--set", "resolution_interval_s=0")
        try:
            with ControlClient(daemon.control) as ctl:
                scans = wait_for(lambda: [s for s in ctl.list_scans() if s["state"] == "finished"], 90,
                                 "the bridged scan to finish", daemon)
            assert scans[0]["frames"]["received"] == 64
            assert Path(scans[0]["result_path"]).is_file()
        finally:
            daemon.stop()
    finally:
        sim.kill()
        sim.wait(10)
