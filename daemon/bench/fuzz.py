"""`cryoptycho bench fuzz`: property-based fuzzing of a real daemon over its sockets.

A `cryoptycho serve` subprocess runs in a scratch folder; Hypothesis draws hostile inputs — valid
messages with one header key set to an arbitrary msgpack value (timestamps, binary, deep trees,
floats where integers belong) or deleted, mangled bytes, messages meant for other sockets, scan
ids whose file names would be too long, scans that cannot fit, options naming missing backends,
control requests with random methods and parameters — and after EVERY input checks:

* the daemon process is alive and answers ``ping`` (its round trip is recorded: p50/p99/max,
  how many exceeded 50 ms and after which inputs; the bench also pings a process that does
  nothing but answer, right after, for the host's own floor, and collects the daemon's "slow
  manager step" log records, which say which step of its loop was slow and whether it worked
  or waited);
* every rejected message produced a named error: the error events received (each, or counted in
  a ``suppressed`` summary) equal the rejections the daemon counted (``messages_rejected``), and
  every failed control reply carries ``field`` and ``rule``;
* the daemon caught no unexpected exception (``internal_errors`` stays 0: each one is a crash
  the service survived, reported as such);
* no file was written outside the spool and results folders.

At the end (and every ``--check-every`` inputs) a valid scan must complete with every frame.
``--dectris N`` then sends N hostile DECTRIS Stream V2 series (edge header values, arbitrary
keys, mangled bytes, missing ends) from a simulated detector through ``serve --source
dectris2://``, with the same checks after each (the bridge's own drops are logged, not
published, so there the error accounting covers what reaches the ingest socket).
The test suite runs the same harness seeded and bounded (tests/test_fuzz_daemon.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import msgpack
import numpy as np
import zmq
from cryoptycho.protocols.control import ControlClient
from cryoptycho.protocols.errors import ControlError, ControlTimeout, ProtocolError
from cryoptycho.protocols.messages import (
    Abort,
    ErrorEvent,
    Frames,
    Metrics,
    ProbeModelSpec,
    RasterScan,
    Reply,
    Request,
    Result,
    ScanEnd,
    ScanEvent,
    ScanStart,
    encode,
)
from cryoptycho.protocols.subscriber import EventsDropped, Subscriber
from prometheus_client.parser import text_string_to_metric_families

#: the manager loop must answer within this (issue 12, item 4)
PING_LIMIT_S = 0.05
M = 16  #: frame side of every generated scan (small: the fuzz is about messages, not engines)
OPEN_SCAN = "fz-open"  #: a streamed scan kept open so that frames fuzzing reaches the spool
#: fast, bounded reconstructions: the final check scan finishes in seconds
SERVE_SETTINGS = ("options.iterations=4", "refine_time_budget_s=5", "preview_hz=5",
                  "resolution_interval_s=0", "max_queued_scans=64", "acquisition_timeout_s=120")


class FuzzFailure(AssertionError):
    """An invariant broke; the message says which, with the input and the daemon's log tail."""


@dataclass
class Figures:
    inputs: int = 0
    ingest_messages: int = 0
    control_requests: int = 0
    rejected: int = 0
    accepted_scans: int = 0
    crashes: int = 0  #: daemon deaths + unexpected exceptions it caught (internal_errors)
    crash_notes: list[str] = field(default_factory=list)
    ping_s: list[float] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")  #: the slowest ping and the input before it
    slow_pings: list[tuple[float, str]] = field(default_factory=list)  #: every ping over 50 ms, input before it
    #: the same ping, right after, to a process that only answers it (:class:`EchoControl`): the
    #: host's own floor (scheduling on a loaded machine), not the daemon's doing
    echo_s: list[float] = field(default_factory=list)
    checks: int = 0  #: valid scans completed with every frame
    #: the daemon's own "slow manager step" log records (service.SLOW_STEP_S): which step of its
    #: loop took longer than 50 ms, wall and CPU time; pings slow with none of these waited elsewhere
    slow_steps: list[dict[str, Any]] = field(default_factory=list)

    def fig_slowest_note(self) -> str:
        return f"{self.slowest[0] * 1e3:.0f} ms after {self.slowest[1]}"

    def summary(self) -> dict[str, Any]:
        pings = np.asarray(self.ping_s) if self.ping_s else np.zeros(1)
        return {
            "inputs": self.inputs, "ingest_messages": self.ingest_messages,
            "control_requests": self.control_requests, "rejected": self.rejected,
            "accepted_scans": self.accepted_scans, "crashes": self.crashes,
            "crash_notes": self.crash_notes[:10], "valid_scans_completed": self.checks,
            "ping_p50_ms": float(np.percentile(pings, 50) * 1e3),
            "ping_p99_ms": float(np.percentile(pings, 99) * 1e3),
            "ping_max_ms": float(pings.max() * 1e3),
            "pings_over_50ms": int((pings > PING_LIMIT_S).sum()),
            "slowest_ping_after": self.fig_slowest_note(),
            **_echo_figures(self.echo_s),
            "slow_pings_after": [f"{dt * 1e3:.0f} ms after {note}" for dt, note in sorted(self.slow_pings)[::-1][:10]],
            "manager_slow_steps": len(self.slow_steps),
            "manager_slowest_steps": [f"{r['msg']}" for r in sorted(
                self.slow_steps, key=lambda r: -float(r.get("wall_ms", 0)))[:8]],
        }


# ------------------------------------------------------------------------------------- the daemon


class FuzzDaemon:
    """`cryoptycho serve` in ``workdir`` (its cwd) with random loopback ports, plus the client
    sockets the invariants need: a PUSH to ingest, a subscriber of everything, a control client."""

    def __init__(self, workdir: Path, *serve_args: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "cryoptycho.daemon.cli", "serve",
            "--ingest", "tcp://127.0.0.1:*", "--publish", "tcp://127.0.0.1:*",
            "--control", "tcp://127.0.0.1:*", "--metrics-port", "0",
            "--spool-dir", "spool", "--results-dir", "results", "--log-format", "json",
            *(a for s in SERVE_SETTINGS for a in ("--set", s)), *serve_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.log_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while line and not line.startswith("{"):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise FuzzFailure(f"daemon exited before ready (rc {self.proc.returncode})\n{self.log_tail()}")
        self.ready = json.loads(line)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDTIMEO, 60_000)  # a bound on a failure: the daemon may pause ingest on a busy host
        self.push.connect(self.ready["ingest"])
        self.sub = Subscriber(self.ready["publish"], latest_only=False, rcvhwm=100_000, max_backlog=100_000)
        self.control = ControlClient(self.ready["control"], timeout_s=30, retries=1)
        self.metrics_url = f"http://127.0.0.1:{self.ready['metrics_port']}/metrics"

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.log_lines.append(line.rstrip())

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_lines[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return out

    def slow_steps(self) -> list[dict[str, Any]]:
        """The daemon's "slow manager step" records so far (its JSON log lines with a ``step``)."""
        out = []
        for line in list(self.log_lines):
            if '"step"' in line and line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def close(self) -> None:
        self.control.close()
        self.sub.close()
        self.push.close()
        self.ctx.term()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # beside its folder (whose files the harness checks): with --workdir, kept for reading
        self.workdir.with_suffix(".log").write_text("\n".join(self.log_lines) + "\n")


ECHO_SERVER = """
import sys, zmq
from cryoptycho.protocols.control import handle
ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
port = sock.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
table = {"ping": lambda: {"pong": True}}
while True:
    sock.send_multipart(handle(sock.recv_multipart(copy=False), table), copy=False)
"""


class EchoControl:
    """A process that answers control ``ping`` and does nothing else, through the protocol's own
    ``handle``: pinged beside the daemon, it measures what the host adds to a round trip."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port:
            raise FuzzFailure(f"the echo process exited (rc {self.proc.wait(10)})")
        self.client = ControlClient(f"tcp://127.0.0.1:{port}", timeout_s=30, retries=1)

    def ping_s(self) -> float:
        t0 = time.perf_counter()
        self.client.ping()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(10)


def _echo_figures(echo_s: list[float]) -> dict[str, Any]:
    if not echo_s:
        return {}
    pings = np.asarray(echo_s)
    return {"echo_ping_p50_ms": float(np.percentile(pings, 50) * 1e3),
            "echo_ping_p99_ms": float(np.percentile(pings, 99) * 1e3),
            "echo_ping_max_ms": float(pings.max() * 1e3), "echo_pings_over_50ms": int((pings > PING_LIMIT_S).sum())}


# ------------------------------------------------------------------------------------- the harness


def _raw(parts: list[Any]) -> list[bytes]:
    return [bytes(memoryview(p).cast("B")) if isinstance(p, np.ndarray) else bytes(p) for p in parts]


def scan_start_parts(scan_id: str, **over: Any) -> list[bytes]:
    fields: dict[str, Any] = {
        "scan_id": scan_id, "energy_eV": 300e3, "frame_shape": (M, M), "frame_dtype": "uint16",
        "expected_frames": 12, "pixel_size_m": 1e-10, "probe_model": ProbeModelSpec(),
        "raster": RasterScan((3, 4), (2e-10, 2e-10)),
    }
    fields.update(over)
    return _raw(encode(ScanStart(**fields)))


def base_parts(kind: str, scan_id: str, rng: np.random.Generator) -> list[bytes]:
    """A valid message of ``kind`` (the starting point of a mutation)."""
    n = int(rng.integers(1, 4))
    if kind == "scan_start":
        return scan_start_parts(scan_id)
    if kind == "frames":
        return _raw(encode(Frames(scan_id, np.sort(rng.choice(1000, n, replace=False)).astype(np.uint32),
                                  rng.poisson(0.5, (n, M, M)).astype(np.uint16),
                                  rng.normal(0, 1e-9, (n, 2)))))
    if kind == "frames_lz4":
        return _raw(encode(Frames(scan_id, np.arange(n, dtype=np.uint32),
                                  rng.poisson(0.5, (n, M, M)).astype(np.uint16),
                                  rng.normal(0, 1e-9, (n, 2)), compression="lz4")))
    if kind == "scan_end":
        return _raw(encode(ScanEnd(scan_id, int(rng.integers(0, 20)))))
    if kind == "abort":
        return abort_parts(scan_id)
    if kind == "request":
        return _raw(encode(Request("ping", {"x": 1})))
    if kind == "reply":
        return _raw(encode(Reply(True, "ok", {"a": np.ones(3)})))
    if kind == "scan_event":
        return _raw(encode(ScanEvent(scan_id, "accepted")))
    if kind == "error":
        return _raw(encode(ErrorEvent("data", "finite", "x", scan_id)))
    if kind == "metrics":
        return _raw(encode(Metrics(scan_id, 1, 1)))
    if kind == "result":
        return _raw(encode(Result(scan_id, 1, 1e-10, (0.0, 0.0), np.ones((4, 4), np.complex64),
                                  np.ones((M, M), np.complex64), np.zeros((2, 2)))))
    raise ValueError(kind)


def abort_parts(scan_id: str) -> list[bytes]:
    return _raw(encode(Abort(scan_id, "fuzz")))


def set_path(header: dict[str, Any], path: list[str], value: Any) -> None:
    node = header
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = node[key] = {}
        node = nxt
    if value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


_DELETE = object()


class Harness:
    """Sends inputs to a :class:`FuzzDaemon` and checks the invariants after each."""

    def __init__(self, daemon: FuzzDaemon, figures: Figures | None = None, open_scan: bool = True) -> None:
        self.d = daemon
        self.fig = figures or Figures()
        self.n = 0
        self.errors_seen = 0  #: error events received, a 'suppressed' one counting its number
        self.pending_aborts: set[str] = set()
        self.recent_errors: list[str] = []
        self._base = (self.fig.rejected, self.fig.crashes)  # figures of earlier daemons in this run
        #: abort fuzzed scans once accepted (ingest fuzz); DECTRIS series are small and end on their own
        self.abort_accepted = True
        self.own = {OPEN_SCAN}  #: the harness's own scans (the others are fuzzed: aborted when accepted)
        self.open_scan = open_scan
        self.echo: EchoControl | None = None  #: set by the bench: the host's floor, pinged after each check
        self._wait_subscribed()
        if open_scan:
            self.d.push.send_multipart(scan_start_parts(OPEN_SCAN, raster=None, expected_frames=1000))
            self._await_event(lambda e: isinstance(e, ScanEvent) and e.scan_id == OPEN_SCAN
                              and e.event in ("accepted", "rejected"), "the open scan's verdict")

    def fresh_id(self, suffix: str = "") -> str:
        self.n += 1
        return f"f{self.n}-{suffix}"

    # -- inputs ------------------------------------------------------------------------------
    def send_ingest(self, parts: list[bytes], note: str) -> None:
        self.fig.inputs += 1
        self.fig.ingest_messages += 1
        try:
            self.d.push.send_multipart(parts)
        except zmq.Again:
            raise FuzzFailure(f"ingest took no message for 10 s after: {note}\n{self.d.log_tail()}") from None
        self.check(note)

    def send_control(self, method: str, params: Any, note: str) -> None:
        """A request (possibly malformed at the msgpack level: ``params`` raw)."""
        self.fig.inputs += 1
        self.fig.control_requests += 1
        try:
            reply = self.d.control.request(method, **params) if isinstance(params, dict) else None
        except ControlTimeout:
            raise FuzzFailure(f"no control reply to {note}\n{self.d.log_tail()}") from None
        except (TypeError, ValueError):
            reply = None  # the client itself refused to encode it: nothing was sent
        if reply is not None and not reply.success and not ({"field", "rule"} <= set(reply.result)):
            raise FuzzFailure(f"failed control reply without field/rule: {reply.msg!r} ({note})")
        self.check(note)

    def send_raw_control(self, body: list[bytes], note: str) -> None:
        """Raw parts to the control socket through a REQ socket of our own."""
        self.fig.inputs += 1
        self.fig.control_requests += 1
        req = self.d.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.d.ready["control"])
        try:
            req.send_multipart(body)
            if not req.poll(10_000):
                raise FuzzFailure(f"no control reply to raw {note}\n{self.d.log_tail()}")
            from cryoptycho.protocols.messages import decode

            reply = decode(req.recv_multipart())
            if not reply.success and not ({"field", "rule"} <= set(reply.result)):
                raise FuzzFailure(f"failed control reply without field/rule: {reply.msg!r} ({note})")
        finally:
            req.close()
        self.check(note)

    # -- invariants --------------------------------------------------------------------------
    def check(self, note: str) -> None:
        if not self.d.alive():
            self.fig.crashes += 1
            self.fig.crash_notes.append(note)
            raise FuzzFailure(f"the daemon died (rc {self.d.proc.returncode}) after: {note}\n{self.d.log_tail()}")
        t0 = time.perf_counter()
        try:
            self.d.control.ping()
        except (ControlTimeout, ControlError) as exc:
            raise FuzzFailure(f"ping failed after {note}: {exc}\n{self.d.log_tail()}") from None
        dt = time.perf_counter() - t0
        self.fig.ping_s.append(dt)
        if dt > self.fig.slowest[0]:
            self.fig.slowest = (dt, note[:200])
        if dt > PING_LIMIT_S:
            self.fig.slow_pings.append((dt, note[:200]))
        if self.echo is not None:
            self.fig.echo_s.append(self.echo.ping_s())
        self._account(note)
        self._check_files(note)

    def _account(self, note: str) -> None:
        """Wait until every rejection the daemon counted arrived as an error event."""
        deadline = time.monotonic() + 30.0  # generous: it only bounds a failure, on a loaded host
        while True:
            # the events first, then the counts: the daemon counts a rejection before it
            # publishes its event, so every event drained here is in the counts read after it
            # (read the other way round, a rejection made in between looked like an extra event)
            self._drain(0.05)
            m = self.d.metrics()
            rejected = sum(v for k, v in m.items() if k.startswith("cryoptycho_messages_rejected_total"))
            internal = sum(v for k, v in m.items() if k.startswith("cryoptycho_internal_errors_total"))
            if internal + self._base[1] > self.fig.crashes:
                self.fig.crash_notes.append(note)
                self.fig.crashes = int(internal) + self._base[1]
                raise FuzzFailure(f"the daemon met an unexpected exception on: {note}\n{self.d.log_tail()}")
            # errors that are not rejected messages: ingest faults, and DECTRIS series the bridge
            # dropped or header values it set aside (each published as an error event too)
            ingest_internal = m.get("cryoptycho_internal_errors_total{where=ingest}", 0) + sum(
                v for k, v in m.items() if k.startswith(("cryoptycho_dectris_series_total",
                                                         "cryoptycho_dectris_header_warnings_total",
                                                         "cryoptycho_dectris_messages_undecodable_total")))
            if self.errors_seen == rejected + ingest_internal and not self.pending_aborts:
                self.fig.rejected = int(rejected) + self._base[0]
                return
            if self.errors_seen > rejected + ingest_internal and time.monotonic() > deadline - 28.0:
                # more events than rejections, still after 2 s: events the daemon published
                # without counting them
                raise FuzzFailure(f"{self.errors_seen} error events for {rejected} rejections ({note}); "
                                  f"last events {self.recent_errors}\n{self.d.log_tail()}")
            if time.monotonic() > deadline:
                raise FuzzFailure(f"{rejected:.0f} rejections but {self.errors_seen} error events "
                                  f"(pending aborts {sorted(self.pending_aborts)}) after: {note}\n{self.d.log_tail()}")

    def _drain(self, timeout_s: float) -> None:
        ev = self._recv(timeout_s)
        while ev is not None:
            self._on_event(ev)
            ev = self._recv(0)

    def _recv(self, timeout_s: float) -> Any:
        try:
            return self.d.sub.recv(timeout_s=timeout_s)
        except ProtocolError as exc:
            raise FuzzFailure(f"the daemon published an event its subscribers refuse: {exc}") from None
        except EventsDropped as exc:  # the accounting of every error needs every event
            raise FuzzFailure(f"the fuzzer's subscriber fell behind: {exc}") from None

    def _on_event(self, ev: Any) -> None:
        if isinstance(ev, ErrorEvent):
            if not ev.field or not ev.rule:
                raise FuzzFailure(f"an error event without field/rule: {ev}")
            self.recent_errors = [*self.recent_errors[-4:], f"{ev.field}/{ev.rule} {ev.scan_id}: {ev.message[:120]}"]
            if ev.field != "engine":  # a worker's rollback notice, not a rejected message
                self.errors_seen += int(ev.message.split()[0]) if ev.rule == "suppressed" else 1
        elif isinstance(ev, ScanEvent) and self.abort_accepted and ev.scan_id not in self.own:
            if ev.event == "accepted" and not ev.info.get("recovered"):
                # a fuzzed scan_start was valid: end it, so scans do not pile up
                self.fig.accepted_scans += 1
                self.pending_aborts.add(ev.scan_id)
                self.d.push.send_multipart(abort_parts(ev.scan_id))
            elif ev.event in ("aborted", "failed", "finished"):
                self.pending_aborts.discard(ev.scan_id)
        self.last_event = ev

    def _check_files(self, note: str) -> None:
        allowed = {self.d.workdir / "spool", self.d.workdir / "results"}
        for path in self.d.workdir.rglob("*"):
            if path.is_file() and not any(a in path.parents for a in allowed):
                raise FuzzFailure(f"file written outside the spool and results folders: {path} ({note})")

    def _wait_subscribed(self) -> None:
        """PUB/SUB joins asynchronously: send refused probes until one's error event arrives, so
        that no event of the fuzz is missed; the probes' own events are then drained."""
        probe = [msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "probe"})]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.d.push.send_multipart(probe)
            ev = self._recv(0.3)
            if isinstance(ev, ErrorEvent):
                # one last probe, then its event: the probes before it were read (one connection
                # keeps the order) and their events published before it, so once it arrives no
                # probe's event is still on its way (0.5 s without one was no proof on a busy host:
                # a late one then counted as an event without a rejection)
                last = [msgpack.packb({"protocol": "cryoptycho", "version": 1, "type": "last-probe"})]
                self.d.push.send_multipart(last)
                self._await_event(lambda e: isinstance(e, ErrorEvent) and "'last-probe'" in e.message,
                                  "the last subscription probe's error event")
                sent = sum(v for k, v in self.d.metrics().items() if k.startswith("cryoptycho_messages_rejected_total"))
                self.errors_seen = int(sent)  # every probe counts as seen; the accounting starts here
                self._account("the subscription probe")
                return
        raise FuzzFailure("the subscriber never received an event")

    def _await_event(self, pred: Callable[[Any], bool], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self._recv(0.2)
            if ev is None:
                continue
            self._on_event(ev)
            if pred(ev):
                return ev
        raise FuzzFailure(f"timed out waiting for {what}\n{self.d.log_tail()}")

    # -- the final property ------------------------------------------------------------------
    def valid_scan_completes(self, frames: int = 16) -> None:
        """A valid scan sent now finishes, with every frame received and used."""
        sid = self.fresh_id("check")
        self.own.add(sid)
        rng = np.random.default_rng(self.n)
        pos = np.stack(np.meshgrid(np.arange(4), np.arange(frames // 4), indexing="ij"), -1).reshape(-1, 2) * 2e-10
        self.d.push.send_multipart(scan_start_parts(sid, raster=None, positions_m=pos, expected_frames=frames,
                                                    options={"iterations": 3, "time_budget_s": 5.0}))
        data = rng.poisson(50, (frames, M, M)).astype(np.uint16)
        self.d.push.send_multipart(_raw(encode(Frames(sid, np.arange(frames, dtype=np.uint32), data))))
        self.d.push.send_multipart(_raw(encode(ScanEnd(sid, frames))))
        ev = self._await_event(lambda e: isinstance(e, ScanEvent) and e.scan_id == sid
                               and e.event in ("finished", "failed", "aborted", "rejected"),
                               f"valid scan {sid} to finish", timeout=120)
        if ev.event != "finished":
            raise FuzzFailure(f"valid scan {sid} ended {ev.event}: {ev.reason} {ev.info}\n{self.d.log_tail()}")
        scans = {s["scan_id"]: s for s in self.d.control.list_scans()}
        got = scans[sid]["frames"]
        if got.get("received") != frames or got.get("gaps", 0) or scans[sid].get("frames_used") != frames:
            raise FuzzFailure(f"valid scan {sid} finished with frames {got}, expected all {frames}")
        self.fig.checks += 1

    def finish(self) -> None:
        if self.open_scan:
            self.d.push.send_multipart(abort_parts(OPEN_SCAN))


# ------------------------------------------------------------------------------------- strategies


def strategies() -> Any:
    """The Hypothesis strategy of one fuzz input: ("ingest"|"control"|"raw_control", spec)."""
    from hypothesis import strategies as st

    text = st.text(max_size=12)
    leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | text
              | st.binary(max_size=6)
              | st.builds(msgpack.Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 999_999_999)))
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                          max_leaves=8)
    deep = st.integers(20, 60).map(_nested)
    keys = st.sampled_from(["type", "version", "protocol", "scan_id", "energy_eV", "pixel_size_m", "frame_shape",
                            "frame_dtype", "expected_frames", "scan", "scan.kind", "scan.shape", "scan.step_m",
                            "probe_model", "probe_model.kind", "probe_model.zones", "options", "metadata",
                            "metadata.when", "options.backend", "options.iterations", "frame_count", "reason",
                            "arrays", "time_s", "method", "params", "success", "result", "event", "info"]) | text
    mutation = st.tuples(keys, st.one_of(values, deep, st.just(_DELETE), st.sampled_from(
        [1.0, 2.0, -1, 0, 2**40, "cupy", "numpy", "frames", "request", "reply", "scan_event", "error"])))
    kinds = st.sampled_from(["scan_start", "frames", "frames_lz4", "scan_end", "abort", "request", "reply",
                             "scan_event", "error", "metrics", "result"])
    scan_ids = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9._:@+-]{0,140}", fullmatch=True),
                         st.integers(1, 140).map(lambda k: ":" * k), st.just(OPEN_SCAN))
    mutated = st.fixed_dictionaries({"kind": kinds, "sid": scan_ids, "mutations": st.lists(mutation, max_size=3),
                                     "seed": st.integers(0, 2**16)})
    mangled = st.fixed_dictionaries({"kind": kinds, "sid": scan_ids, "seed": st.integers(0, 2**16),
                                     "part": st.integers(0, 3),
                                     "edits": st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                       min_size=1, max_size=4),
                                     "cut": st.integers(0, 40)})
    special = st.one_of(
        st.fixed_dictionaries({"special": st.just("colons"), "k": st.integers(100, 140)}),
        st.fixed_dictionaries({"special": st.just("metadata"), "value": values}),
        st.fixed_dictionaries({"special": st.just("options"), "value": st.dictionaries(
            st.sampled_from(["backend", "iterations", "precision", "stream", "prior", "seed"]), values, max_size=2)}),
        st.fixed_dictionaries({"special": st.just("huge"), "side": st.integers(64, 1024),
                               "n": st.integers(1000, 4096)}),
    )
    ingest = st.tuples(st.just("ingest"), st.one_of(mutated, mangled, special))
    methods = st.sampled_from(["ping", "status", "list_scans", "snapshot", "cancel", "set_options"]) | st.from_regex(
        r"[a-z][a-z0-9_]{0,70}", fullmatch=True)
    params = st.dictionaries(st.sampled_from(["scan_id", "state", "options", "reason", "x"]) | text,
                             values, max_size=3)
    control = st.tuples(st.just("control"), st.fixed_dictionaries({"method": methods, "params": params}))
    raw_control = st.tuples(st.just("raw_control"), st.one_of(mutated, mangled))
    # seven in ten inputs go to ingest (the socket every producer and detector bridge reaches)
    return st.integers(0, 9).flatmap(lambda k: ingest if k < 7 else control if k < 9 else raw_control)


def _nested(depth: int) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for _ in range(depth):
        tree = {"a": tree}
    return tree


def _safe_options(value: Any) -> Any:
    """Fuzzed set_options must not make the final valid scan impossible to finish in bounded time
    (a valid iterations=10**9 would be obeyed): numbers that are valid AND large are capped."""
    if isinstance(value, dict):
        return {k: _safe_options(v) for k, v in value.items()}
    if isinstance(value, int) and not isinstance(value, bool) and value > 50:
        return -value
    return value


def run_input(h: Harness, example: tuple[str, dict[str, Any]]) -> None:
    channel, spec = example
    if channel == "control":
        params = spec["params"]
        if spec["method"] == "set_options":
            params = _safe_options(params)
        h.send_control(spec["method"], params, f"control {spec['method']}({params!r:.300})")
        return
    parts, note = build_parts(h, spec)
    if channel == "raw_control":
        h.send_raw_control(parts, "raw control " + note)
    else:
        h.send_ingest(parts, note)


def build_parts(h: Harness, spec: dict[str, Any]) -> tuple[list[bytes], str]:
    rng = np.random.default_rng(spec.get("seed", 0))
    if "special" in spec:
        kind = spec["special"]
        if kind == "colons":
            sid = (f"f{h.n + 1}" + ":" * spec["k"])[: spec["k"]]
            h.n += 1
            return scan_start_parts(sid), f"scan_start with id of {len(sid)} chars, mostly ':'"
        if kind == "metadata":
            return _with(scan_start_parts(h.fresh_id("md")), ["metadata", "x"], spec["value"]), (
                f"scan_start metadata {spec['value']!r:.200}")
        if kind == "options":
            return _with(scan_start_parts(h.fresh_id("op")), ["options"], _safe_options(spec["value"])), (
                f"scan_start options {spec['value']!r:.200}")
        if kind == "huge":
            n = spec["n"]
            return scan_start_parts(h.fresh_id("huge"), frame_shape=(spec["side"], spec["side"]),
                                    expected_frames=n * n, raster=RasterScan((n, n), (1e-10, 1e-10))), (
                f"scan_start of {n}×{n} frames of {spec['side']}²")
    sid = spec["sid"] if spec["sid"] == OPEN_SCAN else h.fresh_id(spec["sid"][:130])
    kind = spec["kind"]
    if kind.startswith("frames") and h.open_scan and spec["seed"] % 2:
        sid = OPEN_SCAN  # half of the frames messages reach a live scan (spool, ledger)
    parts = base_parts(kind, sid, rng)
    if "mutations" in spec:
        header = msgpack.unpackb(parts[0], raw=False, timestamp=0)
        for path, value in spec["mutations"]:
            set_path(header, path.split("."), value)
        parts = [msgpack.packb(header, use_bin_type=True), *parts[1:]]
        return parts, f"{kind} {sid!r:.60} with {spec['mutations']!r:.300}"
    k = spec["part"] % len(parts)
    blob = bytearray(parts[k])
    for pos, value in spec["edits"]:
        if blob:
            blob[pos % len(blob)] = value
    parts[k] = bytes(blob[: max(0, len(blob) - spec["cut"])])
    return parts, f"{kind} {sid!r:.60} with part {k} mangled {spec['edits']} cut {spec['cut']}"


def _with(parts: list[bytes], path: list[str], value: Any) -> list[bytes]:
    header = msgpack.unpackb(parts[0], raw=False)
    set_path(header, path, value)
    return [msgpack.packb(header, use_bin_type=True), *parts[1:]]


def fuzz(workdir: Path, examples: int, seed: int, check_every: int = 0,
         progress: Callable[[Figures], None] | None = None, figures: Figures | None = None,
         echo: EchoControl | None = None) -> Figures:
    """Run ``examples`` Hypothesis inputs (seeded) against a fresh daemon; raises FuzzFailure on
    the first broken invariant (Hypothesis then shrinks it), returns the figures otherwise."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    figures = figures if figures is not None else Figures()
    daemon = FuzzDaemon(workdir / "daemon")
    failures: list[FuzzFailure] = []
    try:
        harness = Harness(daemon, figures)
        harness.echo = echo

        # the daemon is state that Hypothesis cannot rewind: a failing input is not replayed or
        # shrunk (its message, with the daemon's log, is the report); the run stops at it
        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategies())
        def one(example: tuple[str, dict[str, Any]]) -> None:
            if failures:
                return
            try:
                run_input(harness, example)
                if check_every and figures.inputs % check_every == 0:
                    harness.valid_scan_completes()
            except FuzzFailure as exc:
                failures.append(exc)
            if progress is not None:
                progress(figures)

        one()
        if failures:
            raise failures[0]
        harness.finish()
        harness.valid_scan_completes()
        harness.check("the final valid scan")
    finally:
        daemon.close()
        figures.slow_steps += daemon.slow_steps()
    return figures


# ------------------------------------------------------------------------------ DECTRIS receiver


DX_STEP = 2e-10


def dectris_series(sid: str, series_id: int, n: int = 6, side: int = 16) -> Any:
    """A valid Stream V2 series whose user_data makes it scan ``sid`` (2×3 raster)."""
    from cryoptycho.protocols.dectris.sim import SimSeries

    frames = np.random.default_rng(series_id).poisson(2, (n, side, side)).astype(np.uint16)
    user = {"cryoptycho": {"scan_id": sid, "detector_pixel_angle_rad": 2e-3,
                           "scan": {"kind": "raster", "shape": [2, n // 2], "step_m": [DX_STEP, DX_STEP]},
                           "options": {"iterations": 3, "time_budget_s": 5.0}}}
    return SimSeries(frames, series_id=series_id, series_unique_id=f"01FUZZ{series_id:020d}",
                     detector_distance_m=0.1, user_data=user, compression="bslz4")


def dectris_strategy() -> Any:
    from hypothesis import strategies as st

    text = st.text(max_size=10)
    leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | text
              | st.binary(max_size=6) | st.sampled_from([0, 0.0, -1.0, 1e300, float("nan"), "cupy"]))
    values = st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3),
                          max_leaves=6)
    start_keys = st.sampled_from([
        "type", "series_id", "series_unique_id", "beam_center_x", "beam_center_y", "channels", "count_time",
        "frame_time", "image_dtype", "image_size_x", "image_size_y", "number_of_images", "pixel_size_x",
        "pixel_size_y", "pixel_mask_enabled", "incident_energy", "detector_distance", "saturation_value",
        "user_data", "user_data.cryoptycho", "user_data.cryoptycho.scan", "user_data.cryoptycho.scan.shape",
        "user_data.cryoptycho.scan.step_m", "user_data.cryoptycho.detector_pixel_angle_rad",
        "user_data.cryoptycho.energy_eV", "user_data.cryoptycho.options", "user_data.cryoptycho.scan_id",
    ]) | text
    image_keys = st.sampled_from(["type", "series_id", "series_unique_id", "image_id", "real_time", "start_time",
                                  "data", "data.threshold_1", "user_data"]) | text
    # the header's physical values at their edges (an uncalibrated control unit sends zeros),
    # with the user's pixel angle removed so that the header's geometry is what counts
    edge = st.tuples(st.sampled_from(["detector_distance", "beam_center_x", "beam_center_y", "incident_energy",
                                      "pixel_size_x", "pixel_size_y", "count_time", "frame_time",
                                      "number_of_images", "image_size_x", "saturation_value"]),
                     st.sampled_from([0, 0.0, -1.0, float("nan"), float("inf"), 1e300, 1e-300, 2**40]))
    hostile = st.lists(edge, min_size=1, max_size=3).map(
        lambda e: [("user_data.cryoptycho.detector_pixel_angle_rad", _DELETE), *e])
    which = st.sampled_from(["start", "image", "end"])
    return st.fixed_dictionaries({
        "which": which,
        # deleting the user's pixel angle makes the header's detector_distance count
        "start_edits": hostile | st.lists(st.tuples(start_keys, values | st.just(_DELETE)), max_size=3),
        "image_edits": st.lists(st.tuples(image_keys, values), max_size=2),
        "mangle": st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 40)),
        "drop_end": st.booleans(),
    })


def _cbor_edit(blob: bytes, edits: list[tuple[str, Any]]) -> bytes:
    import cbor2

    outer = cbor2.loads(blob)
    msg = outer.value if isinstance(outer, cbor2.CBORTag) else outer
    for path, value in edits:
        if isinstance(msg, dict):
            set_path(msg, path.split("."), value)
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def dectris_fuzz(workdir: Path, examples: int, seed: int, figures: Figures | None = None,
                 progress: Callable[[Figures], None] | None = None, echo: EchoControl | None = None) -> Figures:
    """Hostile Stream V2 series (headers set to arbitrary values, mangled bytes, missing ends)
    from a simulated detector into ``serve --source dectris2://``; after each: the daemon lives,
    answers ping and accounts for every rejection; at the end a valid series becomes a finished
    scan with every frame."""
    from cryoptycho.protocols.dectris.sim import SimSender, v2_messages
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    figures = figures if figures is not None else Figures()
    sender = SimSender(2)
    daemon = FuzzDaemon(workdir / "dectris", "--source", sender.url)
    failures: list[FuzzFailure] = []
    counter = [0]
    try:
        harness = Harness(daemon, figures, open_scan=False)
        harness.abort_accepted = False
        harness.echo = echo

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(dectris_strategy())
        def one(spec: dict[str, Any]) -> None:
            if failures:
                return
            counter[0] += 1
            sid = f"dx{counter[0]}"
            start, *images, end = list(v2_messages(dectris_series(sid, 1000 + counter[0])))
            unedited = ""
            try:
                start = _cbor_edit(start, spec["start_edits"])
                images[0] = _cbor_edit(images[0], spec["image_edits"])
            except Exception as exc:  # noqa: BLE001 - an edit CBOR cannot carry: the rest is still sent
                unedited = f" (edit not encodable: {type(exc).__name__})"
            msgs = [start, *images] + ([] if spec["drop_end"] else [end])
            if spec["mangle"] is not None:
                pos, value, cut = spec["mangle"]
                k = {"start": 0, "image": 1, "end": len(msgs) - 1}[spec["which"]]
                blob = bytearray(msgs[k])
                blob[pos % len(blob)] = value
                msgs[k] = bytes(blob[: max(1, len(blob) - cut)])
            figures.inputs += 1
            note = f"DECTRIS series {sid}: {spec!r:.400}{unedited}"
            try:
                for m in msgs:
                    sender.send_raw(m)
                harness.check(note)
            except FuzzFailure as exc:
                failures.append(exc)
            if progress is not None:
                progress(figures)

        one()
        if failures:
            raise failures[0]
        counter[0] += 1
        series_id = 1000 + counter[0]
        sender.send_series(dectris_series(f"dx{counter[0]}-final", series_id))
        sid = f"dx{counter[0]}-final-series{series_id}"  # the bridge's scan id of a user_data scan_id
        ev = harness._await_event(lambda e: isinstance(e, ScanEvent) and e.scan_id == sid
                                  and e.event in ("finished", "failed", "aborted", "rejected"),
                                  f"the valid DECTRIS series {sid}", timeout=120)
        if ev.event != "finished":
            raise FuzzFailure(f"valid DECTRIS series {sid} ended {ev.event}: {ev.reason}\n{daemon.log_tail()}")
        got = {s["scan_id"]: s for s in daemon.control.list_scans()}[sid]["frames"]
        if got.get("received") != 6:
            raise FuzzFailure(f"valid DECTRIS series {sid} finished with frames {got}, expected 6")
        figures.checks += 1
        harness.check("the final DECTRIS series")
    finally:
        daemon.close()
        figures.slow_steps += daemon.slow_steps()
        sender.close(linger_s=0)
    return figures


@click.command()
@click.option("--examples", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Hypothesis inputs to try.")
@click.option("--seed", default=0, show_default=True)
@click.option("--check-every", default=500, show_default=True,
              help="Send a valid scan (which must finish with every frame) every N inputs; 0 = only at the end.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch folder of the daemon [a temporary one].")
@click.option("--dectris", "dectris_examples", default=0, show_default=True,
              help="Also send this many hostile DECTRIS Stream V2 series through `serve --source dectris2://`.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def command(examples: int, seed: int, check_every: int, workdir: Path | None, dectris_examples: int,
            as_json: bool) -> None:
    """Fuzz a real daemon over ingest and control (Hypothesis): inputs, crashes, ping p99."""
    import signal
    import tempfile

    # SIGTERM unwinds like Ctrl-C, so the daemon subprocess is stopped, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise click.ClickException("bench fuzz needs Hypothesis: pip install 'cryoptycho[test]'") from None
    t0 = time.monotonic()
    last = [t0]

    def progress(fig: Figures) -> None:
        if not as_json and time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            click.echo(f"  {fig.inputs} inputs, {fig.rejected} rejected, {fig.crashes} crashes", err=True)

    with tempfile.TemporaryDirectory(prefix="cryoptycho-fuzz-") as tmp:
        figures = Figures()
        failure = None
        echo = EchoControl()
        try:
            fuzz(Path(workdir or tmp), examples, seed, check_every, progress, figures, echo)
            if dectris_examples:
                dectris_fuzz(Path(workdir or tmp), dectris_examples, seed, figures, progress, echo)
        except FuzzFailure as exc:
            failure = str(exc)
        finally:
            echo.close()
    out = figures.summary() | {"seconds": time.monotonic() - t0, "failure": failure}
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(f"inputs tried      {out['inputs']} ({out['ingest_messages']} ingest messages, "
                   f"{out['control_requests']} control requests; {out['rejected']} rejected by name, "
                   f"{out['accepted_scans']} fuzzed scans accepted)")
        click.echo(f"crashes           {out['crashes']}")
        click.echo(f"ping p50/p99/max  {out['ping_p50_ms']:.1f} / {out['ping_p99_ms']:.1f} / "
                   f"{out['ping_max_ms']:.1f} ms ({out['pings_over_50ms']} over 50 ms)")
        click.echo(f"host floor        {out['echo_ping_p50_ms']:.1f} / {out['echo_ping_p99_ms']:.1f} / "
                   f"{out['echo_ping_max_ms']:.1f} ms ({out['echo_pings_over_50ms']} over 50 ms): the same pings "
                   "to a process that only answers ping")
        click.echo(f"slowest ping      {out['slowest_ping_after']}")
        for note in out["slow_pings_after"][1:]:
            click.echo(f"                  {note}")
        click.echo(f"slow daemon steps {out['manager_slow_steps']} manager-loop steps over 50 ms (daemon log)")
        for note in out["manager_slowest_steps"]:
            click.echo(f"                  {note}")
        click.echo(f"valid scans       {out['valid_scans_completed']} completed with every frame")
        click.echo(f"time              {out['seconds']:.0f} s")
        if failure:
            click.echo(f"FAILED: {failure}")
    if failure:
        raise SystemExit(1)
