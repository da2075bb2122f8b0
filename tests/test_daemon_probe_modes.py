"""Mixed-state probes through the real daemon: a scan declared with a (modes, M, M) probe and
``probe_modes`` finishes with the refined modes in the result file."""

from __future__ import annotations

import signal

import h5py
import numpy as np
import pytest
from cryoptycho.gpu.probes import initial_modes
from cryoptycho.protocols.subscriber import Subscriber
from daemon_support import start_daemon, stream_for_result, synthetic_scan, wait_subscribed

pytestmark = pytest.mark.subprocess


def test_scan_with_probe_modes_saves_the_modes(tmp_path) -> None:
    scan = synthetic_scan(n_side=10)
    two = initial_modes(scan.probe, 2).astype(np.complex64)  # a measured two-mode probe
    daemon = start_daemon(tmp_path, "--set", "options.iterations=6", "--set", "refine_time_budget_s=30")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        fields = scan.start_fields("modes", options={"probe_modes": 3, "refine_probe": True})
        fields["probe"] = two
        result = stream_for_result(daemon, sub, fields, scan.frames)
        sub.close()
        assert result.probe.shape == (3, 32, 32)
        with h5py.File(result.files["result"]) as f:
            probe = f["probe"][()]
        assert probe.shape == (3, 32, 32)
        flat = probe.reshape(3, -1).astype(np.complex128)
        powers = np.real(np.diag(flat @ flat.conj().T))
        assert list(powers) == sorted(powers, reverse=True) and powers[2] > 0
        # the given main mode stays the main mode
        main = flat[0] / np.linalg.norm(flat[0])
        given = two[0].ravel() / np.linalg.norm(two[0])
        assert abs(np.vdot(given, main)) > 0.9
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)


def test_scan_whose_probe_model_states_a_source_size_is_reconstructed_with_its_modes(tmp_path) -> None:
    """A scan_start whose probe model states ``source_size_m``, with no options: the daemon's
    defaults (``source_size_m`` "auto") reconstruct three modes of that source, and the result
    saves the size used."""
    from cryoptycho.protocols.messages import ProbeModelSpec

    scan = synthetic_scan(n_side=10)
    daemon = start_daemon(tmp_path, "--set", "options.iterations=4", "--set", "refine_time_budget_s=30")
    try:
        sub = Subscriber(daemon.publish, latest_only=False)
        wait_subscribed(daemon, sub)
        fields = scan.start_fields("stated")
        del fields["probe"]
        fields["probe_model"] = ProbeModelSpec(semiangle_rad=9.2e-3, defocus_m=40e-9, source_size_m=0.5e-10)
        result = stream_for_result(daemon, sub, fields, scan.frames)
        sub.close()
        assert result.probe.shape == (3, 32, 32)
        from cryoptycho.daemon.storage.result import read_result

        state = read_result(result.files["result"]).state
        assert state.probe.shape == (3, 32, 32)
        assert state.options["source_size_m"] == pytest.approx(0.5e-10)
    finally:
        daemon.stop(signal.SIGKILL if daemon.proc.poll() is None else signal.SIGTERM)
