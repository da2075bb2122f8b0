"""The service as a facility's sysadmin meets it: configuration through the environment."""

from __future__ import annotations

import time

import pytest
from cryoptycho.protocols.producer import Producer
from daemon_support import start_daemon, wait_for

pytestmark = pytest.mark.subprocess


def test_a_misspelt_environment_variable_is_named_at_start(tmp_path, monkeypatch):
    """CRYOPTYCHO_SPOOL_DIRR (one R too many) was ignored without a word: the spool went to the
    default directory, on whatever disk the working directory is."""
    monkeypatch.setenv("CRYOPTYCHO_SPOOL_DIRR", str(tmp_path / "big-disk"))
    monkeypatch.setenv("CRYOPTYCHO_VIEW_TOKEN", "the viewer's, not the service's")
    monkeypatch.setenv("CRYOPTYCHO_PREVIEW_HZ", "3")  # a real key: no warning
    daemon = start_daemon(tmp_path)
    try:
        wait_for(lambda: "CRYOPTYCHO_SPOOL_DIRR" in daemon.log(), 120, "the warning", daemon)
        assert daemon.stop() == 0
        log = daemon.log()
        assert "ignored" in log and "CRYOPTYCHO_VIEW_TOKEN" not in log and "CRYOPTYCHO_PREVIEW_HZ" not in log, log
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_an_unreachable_detector_is_named_and_the_daemon_stays_up(tmp_path):
    """`serve --source dectris2://HOST:PORT` with nothing listening there said nothing at all:
    ZeroMQ retries silently, so a wrong address looked like a detector not yet acquiring."""
    import socket

    from cryoptycho.protocols.control import ControlClient

    with socket.socket() as s:  # a port nothing listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        daemon = start_daemon(tmp_path, "--source", f"dectris2://127.0.0.1:{port}")
        try:
            wait_for(lambda: "cannot reach the detector at 127.0.0.1" in daemon.log(), 120, "the warning", daemon)
            with ControlClient(daemon.control, timeout_s=30) as ctl:
                assert ctl.ping()["pong"] is True
            assert daemon.stop() == 0
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()


def test_watch_off_a_terminal_prints_one_line_per_scan_event(tmp_path):
    """`cryoptycho watch > log` (or under systemd) wrote nothing at all: rich draws its live
    bars only on a terminal."""
    import subprocess
    import sys
    import threading

    from cryoptycho.protocols.producer import Producer
    from daemon_support import publish_probe_until, synthetic_scan

    scan = synthetic_scan(n_side=6, m=32)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=3", "--set", "refine_time_budget_s=5",
                          "--set", "resolution_interval_s=0")
    watch = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "watch", "--publish", daemon.publish,
                              "--control", daemon.control, "--exit-after-results", "1", "--timeout", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True).start()
    try:
        publish_probe_until(daemon, lambda: any("error" in line for line in lines), "watch to subscribe")
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**scan.start_fields("logged"))
            producer.send_frames(scan.frames)
            producer.end_scan()
        assert watch.wait(120) == 0, "".join(lines)
        text = "".join(lines)
        assert "logged: accepted" in text and "logged: ended: scan_end" in text, text
        result = next(line for line in lines if line.startswith("logged: result"))
        assert str(tmp_path / "results" / "logged.h5") in result, text  # whole paths, not wrapped
        assert daemon.stop() == 0
    finally:
        if watch.poll() is None:
            watch.kill()
        if daemon.proc.poll() is None:
            daemon.proc.kill()


@pytest.mark.parametrize("key", ["results_dir", "spool_dir"])
def test_a_directory_that_cannot_be_written_is_named_at_start(tmp_path, key):
    """results_dir under a file (as a typo in the TOML makes) was a traceback at start; one
    the service's user may not write only failed each scan once its result was due."""
    import subprocess
    import sys

    (tmp_path / "a-file").write_text("")
    out = subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", "serve", "--ingest", "tcp://127.0.0.1:*",
                          "--publish", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
                          "--spool-dir", str(tmp_path / "s"), "--results-dir", str(tmp_path / "r"),
                          "--set", f"{key}={tmp_path / 'a-file' / 'sub'}"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1, out.stderr
    assert f"{key} {tmp_path / 'a-file' / 'sub'} is not a writable directory" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_compose_viewer_reads_the_result_files_the_daemon_names():
    """The compose viewer had no access to the daemon's volume: the image's VOLUME gave it an
    empty one, so result downloads and a late joiner's final images failed."""
    import re
    from pathlib import Path

    import yaml

    deploy = Path(__file__).parents[1] / "deploy"
    services = yaml.safe_load((deploy / "compose.yaml").read_text())["services"]
    results = re.search(r"CRYOPTYCHO_RESULTS_DIR=(\S+)", (deploy / "docker" / "Dockerfile.cpu").read_text()).group(1)

    def mount_of(service: str) -> tuple[str, str]:
        for spec in services[service].get("volumes", []):
            source, target = spec.split(":")[:2]
            if results.startswith(target.rstrip("/") + "/"):
                return source, target
        raise AssertionError(f"{service} mounts nothing holding {results}: {services[service].get('volumes')}")

    assert mount_of("viewer") == mount_of("cryoptycho")


def test_a_scan_id_that_is_not_a_string_is_named_alike_by_every_method(tmp_path):
    """PROTOCOL.md §6: `scan_id` not a non-empty string is params.scan_id / string_type; the
    `receipt` that producers poll answered rule `invalid_params` instead."""
    from cryoptycho.protocols.control import ControlClient
    from cryoptycho.protocols.errors import ControlError

    daemon = start_daemon(tmp_path)
    try:
        with ControlClient(daemon.control, timeout_s=30) as ctl:
            for method in ("receipt", "cancel", "snapshot", "finish_scan"):
                for bad in (None, "", 7, {"a": 1}):
                    with pytest.raises(ControlError) as info:
                        ctl.call(method, scan_id=bad)
                    result = info.value.reply.result
                    assert (result["field"], result["rule"]) == ("params.scan_id", "string_type"), (method, bad, result)
            assert ctl.ping()["pong"] is True
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_service_md_names_every_place_an_internal_error_is_counted():
    """A full spool disk is counted as `internal_errors_total{where="spool"}`, which SERVICE.md
    did not list: an operator reading the table could not tell what the label meant."""
    from pathlib import Path

    from cryoptycho.daemon.metrics import INTERNAL_ERROR_PLACES

    doc = (Path(__file__).parents[1] / "daemon" / "SERVICE.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `cryoptycho_internal_errors_total{where}`"))
    assert [p for p in INTERNAL_ERROR_PLACES if f"`{p}`" not in row] == []


def test_a_beam_energy_given_in_kev_is_named_at_scan_start(tmp_path):
    """energy_eV = 300 (300 keV meant) was accepted without a word: with a detector angle
    instead of a pixel size the pixel size, hence the whole reconstruction, comes out 36× off.
    The scan still runs (the value is possible), but the daemon's log and the scan.accepted
    event name the field."""
    from cryoptycho.protocols.subscriber import Subscriber
    from daemon_support import synthetic_scan, wait_subscribed

    scan = synthetic_scan(n_side=4, m=32)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=2", "--set", "refine_time_budget_s=5")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        fields = scan.start_fields("kev")
        assert fields["energy_eV"] == 300e3
        with Producer(daemon.ingest, control=daemon.control) as producer:
            producer.start_scan(**{**fields, "energy_eV": 300.0})
            producer.send_frames(scan.frames)
            producer.end_scan()
        accepted = None
        deadline = time.monotonic() + 60
        while accepted is None and time.monotonic() < deadline:
            event = sub.recv(timeout_s=1)
            if getattr(event, "event", None) == "accepted" and getattr(event, "scan_id", None) == "kev":
                accepted = event
        sub.close()
        assert accepted is not None, daemon.log()
        assert any("energy_eV = 300 " in w and "keV" in w for w in accepted.info["warnings"]), accepted
        wait_for(lambda: "energy_eV = 300 " in daemon.log(), 120, "the warning in the log", daemon)
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


def test_plausible_beam_energies_pass_and_unit_slips_are_named():
    from cryoptycho.gpu.geometry import implausible_energy

    for ok in (20e3, 60e3, 80e3, 200e3, 300e3, 1.25e6):  # what TEMs and 4D-STEM SEMs run at
        assert implausible_energy(ok) is None, ok
    assert "300 keV meant" in implausible_energy(300.0)
    assert "energy_eV = 3e+08" in implausible_energy(300e6)


def test_offline_reconstruction_names_an_implausible_beam_energy(caplog):
    import logging

    from cryoptycho.gpu.data import PtychoData
    from cryoptycho.gpu.reconstruct import prepare
    from daemon_support import PIXEL_M, synthetic_scan

    scan = synthetic_scan(n_side=3, m=16)
    data = PtychoData(frames=scan.frames, positions=scan.positions, energy=300.0, pixel_size=PIXEL_M,
                      probe=scan.probe)
    with caplog.at_level(logging.WARNING, logger="cryoptycho.gpu.reconstruct"):
        prepare(data, {"iterations": 1})
    assert any("energy_eV = 300 " in r.getMessage() for r in caplog.records), caplog.text
