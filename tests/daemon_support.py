"""Shared helpers of the daemon tests: a small synthetic scan and the real daemon as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryoptycho.gpu.geometry import ScanGeometry, fit_geometry
from cryoptycho.gpu.metrics import nrmse
from cryoptycho.gpu.operators import forward, from_fft_order, make_batch
from cryoptycho.gpu.probes import make_probe
from prometheus_client.parser import text_string_to_metric_families
from scipy.ndimage import gaussian_filter

PIXEL_M = 1e-10


@dataclass
class Scan:
    frames: np.ndarray  #: (K, M, M) uint16 counts, detector order
    positions: np.ndarray  #: (K, 2) m
    probe: np.ndarray  #: (M, M) complex64, Σ|ψ|² = counts per pattern
    truth: np.ndarray  #: complex object on ``geometry``
    geometry: ScanGeometry

    def start_fields(self, scan_id: str, **extra: Any) -> dict[str, Any]:
        """Keyword arguments of Producer.start_scan for this scan."""
        m = self.frames.shape[1]
        fields = {"scan_id": scan_id, "energy_eV": 300e3, "frame_shape": (m, m), "frame_dtype": "uint16",
                  "expected_frames": len(self.frames), "pixel_size_m": PIXEL_M, "probe": self.probe,
                  "positions_m": self.positions}
        return {**fields, **extra}

    def offline_nrmse(self, iterations: int) -> float:
        """NRMSE of an offline full-batch reconstruction of the same frames (the engine alone)."""
        from cryoptycho.gpu.data import PtychoData
        from cryoptycho.gpu.options import ReconOptions
        from cryoptycho.gpu.reconstruct import reconstruct

        data = PtychoData(frames=self.frames, positions=self.positions, energy=300e3, pixel_size=PIXEL_M,
                          probe=self.probe)
        state = reconstruct(data, ReconOptions(iterations=iterations))
        return self.score(state.object, state.geometry.origin)[0]

    def check_live(self, obj: np.ndarray, origin: tuple[float, float], iterations: int) -> None:
        """The daemon's result is as good as the engine run offline on the same frames (so no
        frame, position or probe was lost on the way) and clearly better than a flat object."""
        err, flat = self.score(obj, origin)
        offline = self.offline_nrmse(iterations)
        assert err <= 1.15 * offline and err < 0.95 * flat, (
            f"live NRMSE {err:.4f}, offline {offline:.4f}, flat object {flat:.4f}")

    def score(self, obj: np.ndarray, origin: tuple[float, float], margin: int = 14) -> tuple[float, float]:
        """(NRMSE of ``obj`` against the truth, NRMSE of a flat object) inside the scanned area."""
        g = self.geometry
        off = np.rint((np.asarray(origin) - np.asarray(g.origin)) / g.pixel_size).astype(int)
        ny, nx = g.object_shape
        sl_t = (slice(margin, ny - margin), slice(margin, nx - margin))
        sl_r = (slice(margin - off[0], ny - margin - off[0]), slice(margin - off[1], nx - margin - off[1]))
        truth = self.truth[sl_t]
        return nrmse(np.asarray(obj)[sl_r], truth), nrmse(np.full_like(truth, np.exp(0.1j)), truth)


def synthetic_scan(n_side: int = 16, m: int = 32, step_px: int = 3, counts: float = 5000.0, seed: int = 0) -> Scan:
    """A weak-phase object (≤ 0.5 rad) scanned by a defocused probe, Poisson counts."""
    rng = np.random.default_rng(seed)
    iy, ix = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    pos = np.stack([iy.ravel(), ix.ravel()], 1) * step_px * PIXEL_M
    pos = pos + rng.normal(0, 0.3 * PIXEL_M, pos.shape)
    geo = fit_geometry(pos, PIXEL_M, (m, m))
    phase = gaussian_filter(rng.normal(size=geo.object_shape), 2.0)
    obj = np.exp(0.5j * phase / np.abs(phase).max()).astype(np.complex64)
    probe = make_probe("defocused", (m, m), PIXEL_M, semiangle=8e-3, defocus=60e-9)
    probe = (probe * np.sqrt(counts / (np.abs(probe) ** 2).sum())).astype(np.complex64)
    batch = make_batch(geo.to_pixels(pos), geo.object_shape, (m, m))
    intensity = np.abs(forward(obj, probe, batch)) ** 2
    frames = rng.poisson(from_fft_order(intensity)).astype(np.uint16)
    return Scan(frames, pos, probe, obj, geo)


@dataclass
class Daemon:
    """A running `cryoptycho serve` subprocess and its bound endpoints."""

    proc: subprocess.Popen
    ready: dict[str, Any]
    workdir: Path
    log_lines: list[str] = field(default_factory=list)
    #: the threads copying its stdout/stderr into log_lines: joined at stop, so that a test
    #: reading the log after stop sees the last lines (a busy host may not have copied them yet)
    pumps: list[threading.Thread] = field(default_factory=list)

    @property
    def ingest(self) -> str:
        return self.ready["ingest"]

    @property
    def publish(self) -> str:
        return self.ready["publish"]

    @property
    def control(self) -> str:
        return self.ready["control"]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ready['metrics_port']}/metrics"

    def log(self) -> str:
        return "\n".join(self.log_lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon ignored signal {sig} for {timeout} s\n{self.log()}") from None
        for pump in self.pumps:  # the pipes are closed: each ends once it has copied the rest
            pump.join(60)
        return rc


#: `python -c` program that sets module attributes (JSON, its first argument) and then runs the
#: CLI on the remaining arguments, as `python -m cryoptycho.daemon.cli` would
_SCALED_CLI = """\
import importlib, json, sys
for name, value in json.loads(sys.argv.pop(1)).items():
    module, attr = name.rsplit(".", 1)
    target = importlib.import_module(module)
    if not hasattr(target, attr):  # a renamed constant must fail the test, not go unscaled
        raise SystemExit(f"cli_command(scaled=...): {module} has no {attr}")
    setattr(target, attr, value)
from cryoptycho.daemon.cli import main
main()
"""


def cli_command(scaled: dict[str, float] | None = None) -> list[str]:
    """The command that runs the CLI (`python -m cryoptycho.daemon.cli`), with the module
    constants ``scaled`` set in its process first (see start_daemon)."""
    if not scaled:
        return [sys.executable, "-m", "cryoptycho.daemon.cli"]
    return [sys.executable, "-c", _SCALED_CLI, json.dumps(scaled)]


def start_daemon(workdir: Path, *args: str, timeout: float = 60, prefix: tuple[str, ...] = (),
                 scaled: dict[str, float] | None = None) -> Daemon:
    """Start the real daemon on loopback with random ports; waits for its ready line.
    ``prefix``: a command the daemon runs under (e.g. strace). ``scaled``: module constants
    ("cryoptycho.daemon.service.PUB_HEARTBEAT_TIMEOUT_MS": 2000) set in the daemon's process
    before it starts, for a test of a timeout that would otherwise wait out the production
    value (as tests/test_subscriber_heartbeat.py scales the PUB socket's heartbeats down)."""
    cmd = [
        *prefix, *cli_command(scaled), "serve",
        "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*",
        "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
        "--spool-dir", str(workdir / "spool"), "--results-dir", str(workdir / "results"),
        "--log-format", "json", *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    daemon = Daemon(proc, {}, workdir)
    daemon.pumps.append(threading.Thread(target=_pump, args=(proc.stderr, daemon.log_lines), daemon=True))
    daemon.pumps[-1].start()
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line and not line.startswith("{") and time.monotonic() < deadline:
        line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"daemon exited before ready (rc {proc.returncode})\n{daemon.log()}")
    daemon.ready = json.loads(line)
    daemon.pumps.append(threading.Thread(target=_pump, args=(proc.stdout, daemon.log_lines), daemon=True))
    daemon.pumps[-1].start()
    return daemon


def _pump(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip())


def start_dectris_sim(*args: str, stderr: int = subprocess.STDOUT) -> tuple[subprocess.Popen, str]:
    """``cryoptycho dectris-sim`` on a free port (plus ``args``) and the ``dectris2://`` URL it
    announces; the caller kills it."""
    sim = subprocess.Popen([sys.executable, "-m", "cryoptycho.daemon.cli", "dectris-sim", "--port", "0", *args],
                           stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = sim.stdout.readline()
    return sim, line[line.index("dectris2://"):].split()[0].rstrip(")")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, daemon: Daemon | None = None) -> Any:
    """Poll ``predicate`` until truthy; fail naming ``what`` (with the daemon's log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{daemon.log()}" if daemon else ""))


def publish_probe_until(daemon: Daemon, seen: Callable[[], Any], what: str, timeout: float = 60) -> None:
    """Make the daemon publish an error event (it rejects a one-part message that is not msgpack)
    until ``seen()`` is truthy. A SUB socket gets nothing published before its subscription has
    reached the daemon (ZeroMQ's slow joiner): only an event that arrives proves it has."""
    import zmq

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(daemon.ingest)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            push.send_multipart([b"\x00subscription probe"])
            again = time.monotonic() + 0.2  # one probe per 0.2 s: the daemon is not flooded
            while time.monotonic() < again:
                if seen():
                    return
                time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}\n{daemon.log()}")
    finally:
        push.close(linger=0)


def wait_subscribed(daemon: Daemon, sub: Any) -> None:
    """Return once the Subscriber ``sub`` receives what ``daemon`` publishes."""
    from cryoptycho.protocols.messages import ErrorEvent

    publish_probe_until(daemon, lambda: isinstance(sub.recv(timeout_s=0), ErrorEvent),
                        "the subscriber to receive the daemon's events")


def metrics_of(daemon: Daemon) -> dict[str, float]:
    """The daemon's Prometheus samples, keyed ``name{label=value,…}``."""
    text = urllib.request.urlopen(daemon.metrics_url, timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def stream_for_result(daemon: Daemon, sub: Any, fields: dict[str, Any], frames: np.ndarray,
                      batch: int = 20, timeout_s: float = 120.0) -> Any:
    """Stream one scan (``fields`` for start_scan, then ``frames`` in messages of ``batch``),
    wait until the subscribed ``sub`` sees it finish, and return its Result message (the scan
    failing, or no result, fails the test with the daemon's log)."""
    from cryoptycho.protocols.messages import Result, ScanEvent
    from cryoptycho.protocols.producer import Producer

    scan_id = fields["scan_id"]
    with Producer(daemon.ingest, control=daemon.control) as producer:
        producer.start_scan(**fields)
        for lo in range(0, len(frames), batch):
            producer.send_frames(frames[lo:lo + batch])
        producer.end_scan()
    result = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ev = sub.recv(timeout_s=0.5)
        if isinstance(ev, Result):
            result = ev
        if isinstance(ev, ScanEvent) and ev.scan_id == scan_id and ev.event in ("finished", "failed"):
            assert ev.event == "finished", daemon.log()
            break
    assert result is not None, daemon.log()
    return result


def loopback_config(tmp_path: Path, **settings: Any) -> Any:
    """An in-process daemon's ServiceConfig on loopback ports the kernel picks, spool and results
    under ``tmp_path``, no metrics server, no resolution figures; ``settings`` on top."""
    from cryoptycho.daemon.config import ServiceConfig

    return ServiceConfig(**{"ingest": "tcp://127.0.0.1:*", "publish": "tcp://127.0.0.1:*",
                            "control": "tcp://127.0.0.1:*", "metrics_enabled": False,
                            "spool_dir": tmp_path / "s", "results_dir": tmp_path / "r",
                            "resolution_interval_s": 0, **settings})
