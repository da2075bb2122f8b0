"""`cryoptycho bench protocol`: receive-side cost of the wire protocol.

Decode + validate throughput (frames/s) of ``frames`` messages as the daemon sees them, for
uint16 frames of 64×64 and 96×96, raw and bitshuffle-LZ4, all measured side by side in one
run; plus encode throughput, the bytes on the wire, and the end-to-end rate of the SDK
Producer into a PULL socket that decodes, over TCP loopback (sender thread and receiver in one
process, so both share its cores). Frames are Poisson counts at a low dose (λ = 0.1 per pixel),
the regime the daemon is built for; compression ratios depend on it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import click
import numpy as np
import zmq
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import (
    Frames,
    ProbeModelSpec,
    RasterScan,
    ScanStart,
    decode,
    encode,
)
from cryoptycho.protocols.producer import Producer


def _time_per_call(fn: Any, seconds: float) -> float:
    """Mean seconds per call over at least ``seconds`` (after one warm-up call)."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return elapsed / calls


def _scan(scan_id: str, side: int, frames: int, **pattern: Any) -> ScanStart:
    """A 300 kV scan of ``frames`` uint16 side×side frames; ``pattern`` places them."""
    return ScanStart(
        scan_id,
        300e3,
        (side, side),
        "uint16",
        frames,
        pixel_size_m=1e-10,
        probe_model=ProbeModelSpec(),
        **pattern,
    )


def measure(
    side: int, batch: int, codec: str, seconds: float, dose: float = 0.1
) -> dict[str, float]:
    """Decode/encode rates (frames/s) and wire bytes per frame for one configuration."""
    n_scan = batch * 4
    scan = _scan("bench", side, n_scan, positions_m=np.zeros((n_scan, 2)))
    scans = {"bench": scan}
    limits = Limits()
    data = np.random.default_rng(0).poisson(dose, (batch, side, side)).astype(np.uint16)
    msg = Frames("bench", np.arange(batch, dtype=np.uint32), data, compression=codec)
    # the daemon receives bytes-like zmq frames; bytes stand in for them without socket noise
    parts = [
        bytes(memoryview(np.ascontiguousarray(p)).cast("B"))
        if isinstance(p, np.ndarray)
        else bytes(p)
        for p in encode(msg)
    ]
    out = decode(parts, limits, scans)
    if not np.array_equal(out.data, data):
        raise RuntimeError(f"round trip failed for {side}×{side} {codec}")
    t_dec = _time_per_call(lambda: decode(parts, limits, scans), seconds)
    t_enc = _time_per_call(lambda: encode(msg), seconds)
    wire = sum(len(p) for p in parts)
    return {
        "decode_fps": batch / t_dec,
        "encode_fps": batch / t_enc,
        "wire_bytes_per_frame": wire / batch,
        "raw_bytes_per_frame": data[0].nbytes,
    }


def measure_loopback(side: int, batch: int, codec: str, seconds: float, dose: float = 0.1) -> float:
    """Frames/s from ``Producer.send_frames`` to decoded messages on a PULL socket (TCP)."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    data = np.random.default_rng(1).poisson(dose, (batch, side, side)).astype(np.uint16)
    rounds = 1_000_000 // batch
    total = rounds * batch
    scan = _scan("loop", side, total, raster=RasterScan((rounds, batch), (1e-10, 1e-10)))
    stop = threading.Event()
    failure: list[BaseException] = []

    def send() -> None:
        try:
            with Producer(
                f"tcp://127.0.0.1:{port}",
                compression=codec,
                batch_frames=batch,
                send_timeout_s=10,
                context=ctx,
                confirm=False,  # a bare PULL socket, not a daemon: nobody acknowledges
            ) as producer:
                producer.start_scan(scan)
                for i in range(rounds):
                    if stop.is_set():
                        break
                    producer.send_frames(data, np.arange(i * batch, (i + 1) * batch))
                producer.abort("benchmark done")
        except BaseException as exc:  # noqa: BLE001 (re-raised in the measuring thread)
            failure.append(exc)

    sender = threading.Thread(target=send, name="bench-producer")
    sender.start()
    scans: dict[str, ScanStart] = {}
    received, t0 = 0, None
    try:
        while True:
            if not pull.poll(10_000):
                raise RuntimeError(f"loopback stalled: {failure[0] if failure else 'no message'}")
            msg = decode(pull.recv_multipart(copy=False), None, scans)
            if isinstance(msg, ScanStart):
                scans[msg.scan_id] = msg
                t0 = time.perf_counter()
                continue
            if not isinstance(msg, Frames):
                break
            received += len(msg.indices)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
    finally:
        stop.set()
        sender.join()
        pull.close()
        ctx.term()
    if failure and not isinstance(failure[0], zmq.ContextTerminated):
        raise failure[0]
    return received / elapsed


@click.command()
@click.option(
    "--batch",
    "batches",
    type=int,
    multiple=True,
    default=(64, 256),
    show_default=True,
    help="Frames per message (repeatable).",
)
@click.option(
    "--seconds", type=float, default=0.5, show_default=True, help="Timing window per case."
)
@click.option("--daemon-frames", type=click.IntRange(0, 10_000_000), default=65_536, show_default=True,
              help="Frames of one 96×96 scan sent end to end into a real daemon (spool and frame store "
                   "included, engine paused), per batch size and codec; 0 = skip.")
def command(batches: tuple[int, ...], seconds: float, daemon_frames: int) -> None:
    """Decode + validate throughput of frames messages (target ≥ 100,000 frames/s raw), and our
    protocol end to end into the daemon with its spool (target ≥ 50,000 frames/s, 96×96)."""
    rows = []
    for side in (64, 96):
        for batch in batches:
            for codec in ("none", "bslz4", "lz4"):
                r = measure(side, batch, codec, seconds)
                r["loopback_fps"] = measure_loopback(side, batch, codec, seconds)
                rows.append((side, batch, codec, r))
    click.echo(
        f"{'frame':>7} {'batch':>5} {'codec':>6} {'decode f/s':>12} {'encode f/s':>12} "
        f"{'wire B/frame':>12} {'ratio':>6} {'dec vs raw':>10} {'loopback f/s':>12}"
    )
    raw_rate = {(s, b): r["decode_fps"] for s, b, c, r in rows if c == "none"}
    for side, batch, codec, r in rows:
        click.echo(
            f"{side:>3}×{side:<3} {batch:>5} {codec:>6} {r['decode_fps']:>12,.0f} "
            f"{r['encode_fps']:>12,.0f} {r['wire_bytes_per_frame']:>12,.0f} "
            f"{r['raw_bytes_per_frame'] / r['wire_bytes_per_frame']:>6.1f} "
            f"{r['decode_fps'] / raw_rate[(side, batch)]:>10.3f} {r['loopback_fps']:>12,.0f}"
        )
    click.echo(
        "ratio = raw bytes / wire bytes; dec vs raw = decode rate relative to the raw case "
        "(same run, same process, one core); loopback = Producer → TCP → PULL + decode, "
        "sender and receiver threads in one process."
    )
    if not daemon_frames:
        return
    click.echo(f"\nend to end into the daemon, 96×96 uint16, engine paused ({daemon_frames:,} frames, "
               "producer in its own process):")
    click.echo(f"{'batch':>5} {'codec':>6} {'received/s':>11} {'stored/s':>10} {'CPU µs/frame':>13} "
               f"{'decode+validate µs':>19} {'spool µs':>9}")
    for batch in batches:
        stages = measure_spool(96, batch, seconds)
        for codec in ("none", "bslz4"):
            r = measure_daemon(96, batch, codec, daemon_frames)
            click.echo(f"{batch:>5} {codec:>6} {r['fps_received']:>11,.0f} {r['fps']:>10,.0f} "
                       f"{r['cpu_us_per_frame']:>13,.1f} "
                       f"{stages['decode_validate_us']:>19,.1f} {stages['spool_us']:>9,.1f}")
    click.echo("received/s = first message → every frame spooled and counted; stored/s = … and in the "
               "scan's frame store (wall); "
               "CPU = the daemon process, every thread; decode+validate and spool: one thread, per frame "
               "of a raw message (target ≥ 50,000 frames/s).")


def _producer_process(endpoint: str, control: str, side: int, batch: int, codec: str, total: int,
                      go: Any) -> None:
    """The instrument side in a process of its own: one scan of ``total`` frames, sent as fast
    as the daemon takes them (the data are made before the signal)."""
    data = np.random.default_rng(2).poisson(0.1, (batch, side, side)).astype(np.uint16)
    rounds = total // batch
    scan = _scan("e2e", side, rounds * batch, raster=RasterScan((rounds, batch), (1e-10, 1e-10)))
    ctx = zmq.Context()
    producer = Producer(endpoint, control=control, compression=codec, batch_frames=batch, send_timeout_s=60,
                        context=ctx)
    go.wait()
    producer.start_scan(scan)
    for i in range(rounds):
        producer.send_frames(data, np.arange(i * batch, (i + 1) * batch))
    # every message must leave before the process does (the measurement waits for them all)
    producer.close(linger_s=300)
    ctx.term()


def measure_daemon(side: int, batch: int, codec: str, total: int, timeout_s: float = 120.0) -> dict[str, float]:
    """Frames/s of one scan from a Producer process into a real daemon (:class:`BackgroundService`),
    engine paused: ``fps_received`` until every frame is spooled and counted (received, in the
    daemon's sense), ``fps`` until they are all in the scan's frame store too; and the daemon
    process's CPU µs per frame (every thread)."""
    import multiprocessing
    import tempfile
    from pathlib import Path

    from cryoptycho.daemon.bench.dectris import engine_paused
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService

    total = total // batch * batch
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp, engine_paused():
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                            metrics_enabled=False, spool_dir=Path(tmp) / "spool", results_dir=Path(tmp) / "res",
                            resolution_interval_s=0, drain_timeout_s=0)
        bg = BackgroundService(cfg)
        # spawn, not fork: a forked child shares the daemon's ZeroMQ context (its signalling
        # descriptors), and its exit swallowed the wake-ups of the daemon's ingest socket
        mp = multiprocessing.get_context("spawn")
        go = mp.Event()
        proc = mp.Process(target=_producer_process, args=(bg.service.endpoints["ingest"], bg.service.endpoints["control"],
                                                          side, batch, codec, total, go), daemon=True)
        try:
            proc.start()
            time.sleep(0.5)  # the producer connects and makes its frames before the clock starts
            t0, c0 = time.perf_counter(), time.process_time()
            go.set()
            scans = bg.service.scans
            t_received: float | None = None
            while True:  # cheap reads, 50 times a second: this loop shares the GIL with the daemon
                session = next(iter(scans.sessions.values()), None)
                worker = scans.running.get(session.scan_id) if session is not None else None
                received = session.ledger.received if session is not None else 0
                if received >= total and t_received is None:
                    t_received = time.perf_counter() - t0
                if received >= total and worker is not None and worker.queued_frames == 0:
                    break
                if time.perf_counter() - t0 > timeout_s or (not proc.is_alive() and proc.exitcode):
                    raise RuntimeError(f"{received} of {total} frames after {time.perf_counter() - t0:.0f} s "
                                       f"(producer exit code {proc.exitcode})")
                time.sleep(0.02)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            if proc.pid is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            bg.stop()
    assert t_received is not None
    return {"fps": total / elapsed, "fps_received": total / t_received, "cpu_us_per_frame": 1e6 * cpu / total}


def measure_spool(side: int, batch: int, seconds: float) -> dict[str, float]:
    """CPU µs per frame of the manager thread's per-message work: decode + validate, and the
    spool append (its whole chunks are compressed on the spool's threads, not counted here)."""
    import tempfile
    from pathlib import Path

    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.daemon.storage.spool import SpoolWriter

    n_scan = batch * 64
    scan = _scan("spool", side, n_scan, raster=RasterScan((64, batch), (1e-10, 1e-10)))
    data = np.random.default_rng(3).poisson(0.1, (batch, side, side)).astype(np.uint16)
    parts = [bytes(memoryview(np.ascontiguousarray(p)).cast("B")) if isinstance(p, np.ndarray) else bytes(p)
             for p in encode(Frames("spool", np.arange(batch, dtype=np.uint32), data))]
    declared = {"spool": scan}
    spec = spec_from_scan_start(scan)
    idx, pos = np.arange(batch, dtype=np.int64), np.zeros((batch, 2))
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        writer = SpoolWriter.create(Path(tmp), spec)
        try:
            t_dec = _cpu_per_call(lambda: decode(parts, None, declared), seconds)
            t_spool = _cpu_per_call(lambda: writer.append(data, idx, pos), seconds)
        finally:
            writer.close()
    return {"decode_validate_us": 1e6 * t_dec / batch, "spool_us": 1e6 * t_spool / batch}


def _cpu_per_call(fn: Any, seconds: float) -> float:
    fn()
    calls, t0, c0 = 0, time.perf_counter(), time.thread_time()
    while True:
        fn()
        calls += 1
        if time.perf_counter() - t0 >= seconds:
            return (time.thread_time() - c0) / calls
