"""A daemon with CURVE on (README "Deployment": `cryoptycho keys DIR --client NAME`, then
`curve_keys_dir`), followed by the operator's tools. `watch` and `view` had no way to give keys:
against such a daemon they saw nothing at all."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.producer import Producer
from cryoptycho.protocols.security import ClientCurve
from daemon_support import start_daemon, synthetic_scan, wait_for

pytestmark = pytest.mark.subprocess


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryoptycho.daemon.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_watch_and_the_viewer_follow_a_curve_daemon_with_their_keys(tmp_path):
    from cryoptycho.daemon.web.hub import Hub

    keys = tmp_path / "keys"
    made = cli("keys", str(keys), "--client", "beamline", "--client", "operator")
    assert made.returncode == 0, made.stderr
    daemon = start_daemon(tmp_path, "--set", f"curve_keys_dir={keys}", "--set", "options.iterations=2",
                          "--set", "refine_time_budget_s=5", "--set", "resolution_interval_s=0")
    try:
        scan = synthetic_scan(n_side=4, m=32)
        with Producer(daemon.ingest, control=daemon.control,
                      curve=ClientCurve.from_keys_dir(keys, "beamline")) as producer:
            producer.start_scan(**scan.start_fields("curved"))
            producer.send_frames(scan.frames)
            producer.end_scan()
        operator = ClientCurve.from_keys_dir(keys, "operator")
        with ControlClient(daemon.control, timeout_s=30, curve=operator) as ctl:
            wait_for(lambda: ctl.call("receipt", scan_id="curved")["state"] == "finished", 120, "the scan", daemon)

        # watch seeds its table from the control socket: with the keys it lists the scan
        key_args = ("--client-key", str(keys / "private" / "operator.key_secret"),
                    "--server-key", str(keys / "server.key"))
        for _ in range(5):  # watch asks once, for 2 s: a loaded host may answer later (never without keys)
            out = cli("watch", "--publish", daemon.publish, "--control", daemon.control, "--timeout", "1", *key_args)
            if "no scan list" not in out.stdout:
                break
        assert out.returncode == 0 and "curved" in out.stdout and "finished" in out.stdout, out.stdout + out.stderr
        half = cli("watch", "--control", daemon.control, "--client-key", key_args[1])
        assert half.returncode == 2 and "give both --client-key and --server-key" in half.stderr, half.stderr

        hub = Hub(daemon.publish, daemon.control, curve=operator, control_timeout_s=30)
        assert hub.refresh_from_control() is None
        assert hub.scans["curved"].state == "finished"
        assert Hub(daemon.publish, daemon.control, control_timeout_s=1).refresh_from_control() is not None

        # a producer without keys is dropped in the handshake, which looks like no daemon: the
        # error said to check the endpoint only
        dataset = tmp_path / "curved.h5"
        from cryoptycho.daemon.storage.dataset import write_dataset
        from cryoptycho.gpu.data import PtychoData
        from daemon_support import PIXEL_M

        write_dataset(dataset, PtychoData(frames=scan.frames, positions=scan.positions, energy=300e3,
                                          pixel_size=PIXEL_M, probe=scan.probe))
        keyless = cli("replay", str(dataset), "--scan-id", "keyless", "--ingest", daemon.ingest,
                      "--control", daemon.control, "--timeout", "3")
        assert keyless.returncode == 1, keyless.stderr
        assert "CURVE on answers only clients with its keys" in keyless.stderr, keyless.stderr
        assert daemon.stop() == 0
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
