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
@click.option("--daemon-codec", "daemon_codecs", type=click.Choice(["none", "bslz4", "lz4"]), multiple=True,
              default=("none", "bslz4"), show_default=True,
              help="Wire codecs of the end-to-end runs into the daemon (repeatable).")
@click.option("--live/--no-live", default=True, show_default=True,
              help="Also run the end-to-end case once more with the live engine running (CPU backend).")
@click.option("--decode/--no-decode", "decode_table", default=True, show_default=True,
              help="The decode/encode/loopback table (--no-decode: the daemon figures only).")
@click.option("--next-scan/--no-next-scan", default=True, show_default=True,
              help="Also measure each paused case as the daemon's next scan: after one of the same size, "
                   "sent and aborted first (its frame store's memory reused, frame_store_reuse_bytes).")
@click.option("--scan", "scans", type=click.Choice(["first", "next", "ahead"]), multiple=True,
              default=("first", "next", "ahead"), show_default=True,
              help="Which scans of each paused case to measure (repeatable; in this order): the daemon's first "
                   "scan; its next one (as --next-scan); the first scan of a daemon that faulted its frame "
                   "store's memory in at start (frame_store_warm_bytes = the scan's frame bytes). The daemons "
                   "run in this process one after the other, so only the first case meets a fresh process "
                   "(its allocator's memory included): measure one kind per run to compare first scans.")
def command(batches: tuple[int, ...], seconds: float, daemon_frames: int, daemon_codecs: tuple[str, ...],
            live: bool, decode_table: bool, next_scan: bool, scans: tuple[str, ...]) -> None:
    """Decode + validate throughput of frames messages (target ≥ 100,000 frames/s raw), and our
    protocol end to end into the daemon with its spool (target ≥ 50,000 frames/s, 96×96)."""
    if decode_table:
        _decode_table(batches, seconds)
    if not daemon_frames:
        return
    click.echo(f"\nend to end into the daemon, 96×96 uint16 ({daemon_frames:,} frames, producer in its own "
               "process):")
    roles = ("receive", "manager", "spool", "compress", "worker")
    click.echo(f"{'batch':>5} {'codec':>6} {'engine':>6} {'scan':>5} {'received/s':>11} {'stored/s':>10} "
               f"{'CPU µs/frame':>13}  " + " ".join(f"{r:>8}" for r in roles) + f" {'producer':>9} {'2-core cap':>10}")
    kinds = tuple(k for k in ("first", "next", "ahead") if k in scans and (next_scan or k != "next"))
    cases = [(batch, codec, True, kind) for batch in batches for codec in daemon_codecs for kind in kinds]
    if live:
        cases.append((max(batches), daemon_codecs[0], False, "first"))
    faults = []
    for batch, codec, paused, kind in cases:
        warm_bytes = daemon_frames // batch * batch * 96 * 96 * 2 if kind == "ahead" else 0
        r = measure_daemon(96, batch, codec, daemon_frames, paused=paused, warm=kind == "next", warm_bytes=warm_bytes)
        label = f"{batch:>5} {codec:>6} {'paused' if paused else 'live':>6} {kind:>5}"
        faults.append((label, r["faults"]))
        click.echo(f"{label} {r['fps_received']:>11,.0f} "
                   f"{r['fps']:>10,.0f} {r['cpu_us_per_frame']:>13,.1f}  "
                   + " ".join(f"{r['threads'].get(role, 0.0):>8,.1f}" for role in roles)
                   + f" {r['producer_cpu_us_per_frame']:>9,.1f} "
                   f"{2e6 / (r['cpu_us_per_frame'] + r['producer_cpu_us_per_frame']):>10,.0f}")
    click.echo("received/s = first message → every frame spooled (flushed) and counted; stored/s = … and in "
               "the engine's frame store (wall); CPU = the daemon process, every thread, µs per frame; by "
               "thread (µs per frame, Linux): receive = ZeroMQ's I/O threads (socket reads), manager = "
               "the service thread (recv, validate, decode, ledger), spool = the spool thread (HDF5 "
               "writes, commit, flush), compress = the spool's compression threads, worker = the "
               "scan's worker (frame store and engine add_frames; with the engine live, its steps too); "
               "producer = the sending process's CPU µs per frame; 2-core cap = 2 s of CPU per second "
               "÷ (daemon + producer CPU per frame): the rate two otherwise idle cores would allow at "
               "these costs; scan = the daemon's first scan, or its next one (after a scan of the same "
               "size: memory faulted in before is reused, see SERVICE.md \"Process settings\"), or "
               "ahead: the first scan of a daemon that faulted in its frame store's memory at start "
               "(frame_store_warm_bytes, waited for before the clock starts).")
    if any(f for _, f in faults):
        click.echo("page faults per frame by thread (first touches of fresh memory, 4 KiB pages; a 96×96 uint16 "
                   "frame spans 4.5):")
        for label, f in faults:
            click.echo(f"{label}  " + " ".join(f"{role} {f.get(role, 0.0):.2f}" for role in (*roles, "other")))
    click.echo(f"\ncost per stage, one thread, isolated, µs of CPU per frame (96×96 uint16, {max(batches)} "
               "frames per message):")
    for name, us in measure_stages(96, max(batches), min(daemon_frames, 32_768)).items():
        click.echo(f"  {name:<58} {us:>7.2f}")


def _decode_table(batches: tuple[int, ...], seconds: float) -> None:
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


def _producer_process(endpoint: str, control: str, side: int, batch: int, codec: str, total: int,
                      go: Any, cpu_s: Any, warm_go: Any = None, ready: Any = None) -> None:
    """The instrument side in a process of its own: one scan of ``total`` frames, sent as fast
    as the daemon takes them (the data are made before the signal). ``cpu_s``: a shared value
    that receives the process's CPU seconds from the signal until every message has left.
    ``warm_go``: first, on that signal, a scan of the same size (``e2e-warm``), then aborted.
    ``ready``: set once everything before the measured scan is done (imports, connection, data,
    the warm-up scan), so that the clock starts with the scan, not with this process's start."""
    data = np.random.default_rng(2).poisson(0.1, (batch, side, side)).astype(np.uint16)
    rounds = total // batch
    ctx = zmq.Context()
    producer = Producer(endpoint, control=control, compression=codec, batch_frames=batch, send_timeout_s=60,
                        context=ctx)
    if warm_go is not None:
        warm_go.wait()
        producer.start_scan(_scan("e2e-warm", side, rounds * batch,
                                  raster=RasterScan((rounds, batch), (1e-10, 1e-10))))
        for i in range(rounds):
            producer.send_frames(data, np.arange(i * batch, (i + 1) * batch))
        producer.abort("warm-up scan done")
    scan = _scan("e2e", side, rounds * batch, raster=RasterScan((rounds, batch), (1e-10, 1e-10)))
    if ready is not None:
        ready.set()
    go.wait()
    c0 = time.process_time()
    producer.start_scan(scan)
    for i in range(rounds):
        producer.send_frames(data, np.arange(i * batch, (i + 1) * batch))
    # every message must leave before the process does (the measurement waits for them all)
    producer.close(linger_s=300)
    ctx.term()
    cpu_s.value = time.process_time() - c0


def measure_daemon(side: int, batch: int, codec: str, total: int, timeout_s: float = 120.0,
                   paused: bool = True, warm: bool = False, warm_bytes: int = 0) -> dict[str, Any]:
    """Frames/s of one scan from a Producer process into a real daemon (:class:`BackgroundService`),
    engine paused unless ``paused`` is False: ``fps_received`` until every frame is spooled and
    counted (received, in the daemon's sense), ``fps`` until they are all in the engine's frame
    store too; the daemon process's CPU µs per frame (every thread), ``threads``: the same by
    thread role (:func:`thread_cpu`), ``faults``: minor page faults per frame by role
    (:func:`thread_stats`), and the producer process's CPU (it joins before the daemon stops;
    NaN if it did not finish). ``warm``: the measured scan follows one of the same size, sent
    and aborted before the clock starts, as in a daemon that has run scans before: its frame
    store's memory may be reused (``frame_store_reuse_bytes``, ``store_reused``), and the
    memory of its received messages may be too. ``warm_bytes``: the daemon's
    ``frame_store_warm_bytes``, faulted in before the clock starts (``warm_moved``: how many
    of them the scan's store took)."""
    import contextlib
    import multiprocessing
    import tempfile
    from pathlib import Path

    from cryoptycho.daemon.bench.dectris import engine_paused
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.gpu.framestore import MAPPINGS

    total = total // batch * batch
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as tmp, \
            (engine_paused() if paused else contextlib.nullcontext()):
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                            metrics_enabled=False, spool_dir=Path(tmp) / "spool", results_dir=Path(tmp) / "res",
                            resolution_interval_s=0, drain_timeout_s=0, frame_store_warm_bytes=warm_bytes)
        if not warm:
            MAPPINGS.set_keep_bytes(0)  # unmaps what earlier runs here left: the first scan's store is fresh
        bg = BackgroundService(cfg)
        # spawn, not fork: a forked child shares the daemon's ZeroMQ context (its signalling
        # descriptors), and its exit swallowed the wake-ups of the daemon's ingest socket
        mp = multiprocessing.get_context("spawn")
        go, ready, producer_cpu = mp.Event(), mp.Event(), mp.Value("d", float("nan"))
        warm_go = mp.Event() if warm else None
        proc = mp.Process(target=_producer_process, args=(bg.service.endpoints["ingest"], bg.service.endpoints["control"],
                                                          side, batch, codec, total, go, producer_cpu, warm_go, ready),
                          daemon=True)
        scans = bg.service.scans
        try:
            proc.start()
            if warm_go is not None:
                warm_go.set()
                _wait_for(lambda: _warm_scan_done(scans), timeout_s, proc, "the warm-up scan to end")
                # an aborted scan's close takes its frame store's rows (ScanManager._hand_over) and
                # lets go of them after: until then the store's memory is not free to reuse, and
                # the close's work would be charged to the measured scan
                scans.flush_disk()
                store_bytes = total * side * side  # uint8 rows: the bench's counts fit (FrameStore narrow)
                _wait_for(lambda: MAPPINGS.idle_bytes() >= store_bytes, timeout_s, proc,
                          "the warm-up scan's frame store to be free for reuse")
            # the producer imports, connects and makes its frames before the clock starts (a fixed
            # sleep here left up to ≈ 0.7 s of a loaded box's imports inside the measured window)
            _wait_for(ready.is_set, timeout_s, proc, "the producer to be ready")
            if bg.service.frame_store_warming is not None:
                bg.service.frame_store_warming.join(timeout_s)
            reused0, moved0 = MAPPINGS.reused, MAPPINGS.warm_moved
            t0, c0, th0, f0 = time.perf_counter(), time.process_time(), task_stats(), _process_faults()
            go.set()
            t_received: float | None = None
            while True:  # cheap reads, 50 times a second: this loop shares the GIL with the daemon
                session = scans.sessions.get("e2e")
                worker = scans.running.get(session.scan_id) if session is not None else None
                received = session.ledger.received if session is not None else 0
                if received >= total and t_received is None:
                    t_received = time.perf_counter() - t0
                engine = worker.engine if worker is not None else None
                if received >= total and engine is not None and engine.n_frames >= total:
                    break
                if time.perf_counter() - t0 > timeout_s or (not proc.is_alive() and proc.exitcode):
                    raise RuntimeError(f"{received} of {total} frames after {time.perf_counter() - t0:.0f} s "
                                       f"(producer exit code {proc.exitcode})")
                time.sleep(0.02)
            elapsed, cpu, th1 = time.perf_counter() - t0, time.process_time() - c0, task_stats()
            faulted = _process_faults() - f0
            store_reused = MAPPINGS.reused > reused0
            warm_moved = MAPPINGS.warm_moved - moved0
        finally:
            if proc.pid is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            bg.stop()
    assert t_received is not None
    spent = _stats_between(th0, th1)
    # a thread that ended before the end (the frame store's prefaulter, done with the store) is
    # in no row: the process's faults beyond the rows are its, counted as "other"
    other_cpu, other_faults = spent.get("other", (0.0, 0))
    spent["other"] = (other_cpu, other_faults + max(0, faulted - sum(n for _, n in spent.values())))
    threads = {role: 1e6 * cpu / total for role, (cpu, _) in spent.items()}
    faults = {role: n / total for role, (_, n) in spent.items()}
    return {"fps": total / elapsed, "fps_received": total / t_received, "cpu_us_per_frame": 1e6 * cpu / total,
            "threads": threads, "faults": faults, "producer_cpu_us_per_frame": 1e6 * producer_cpu.value / total,
            "store_reused": store_reused, "warm_moved": warm_moved}


def _process_faults() -> int:
    """Minor page faults of this process so far, threads that ended included (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _warm_scan_done(scans: Any) -> bool:
    """The warm-up scan ended and its worker (and with it its engine and frame store) is gone."""
    session = scans.sessions.get("e2e-warm")
    return session is not None and session.state.final and "e2e-warm" not in scans.running


def _wait_for(done: Any, timeout_s: float, proc: Any, what: str) -> None:
    t0 = time.perf_counter()
    while not done():
        if time.perf_counter() - t0 > timeout_s or (not proc.is_alive() and proc.exitcode):
            raise RuntimeError(f"no {what} after {time.perf_counter() - t0:.0f} s (producer exit code "
                               f"{proc.exitcode})")
        time.sleep(0.02)


#: thread name prefix → role in the ingest path (:func:`thread_cpu`)
_ROLES = (("ZMQbg/IO", "receive"), ("service", "manager"), ("spool-compress", "compress"), ("spool", "spool"),
          ("worker-", "worker"))


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, summed by role: ``receive``
    (ZeroMQ's I/O threads), ``manager`` (the service thread), ``spool`` (the spool thread),
    ``compress`` (its compression threads), ``worker`` (scan workers), ``other``. Read from
    /proc (Linux); empty elsewhere. Threads that ended are not counted."""
    return {role: cpu for role, (cpu, _) in thread_stats().items()}


def thread_stats() -> dict[str, tuple[float, int]]:
    """(CPU seconds, minor page faults) of this process's threads by role (:func:`thread_cpu`).
    A minor fault is a first touch of a page the process had not used: fresh memory, which
    the kernel zeroes and, in a VM, the host may have to back first."""
    return _stats_between({}, task_stats())


def task_stats() -> dict[int, tuple[str, float, int]]:
    """Thread id → (role, CPU seconds, minor page faults) of this process's threads (Linux)."""
    import os
    from pathlib import Path

    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float, int]] = {}
    for task in tasks.iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        # from field 3 (state) on: minflt is field 10, utime and stime are 14 and 15
        fields = stat[stat.rindex(")") + 2 :].split()
        tid = int(task.name)
        name = names.get(tid, comm)
        role = next((r for prefix, r in _ROLES if name.startswith(prefix)), "other")
        out[tid] = (role, (int(fields[11]) + int(fields[12])) / tick, int(fields[7]))
    return out


def _stats_between(before: dict[int, tuple[str, float, int]],
                   after: dict[int, tuple[str, float, int]]) -> dict[str, tuple[float, int]]:
    """(CPU seconds, faults) by role spent between two :func:`task_stats`, thread by thread:
    a thread that ended meanwhile is not counted (nor what it spent before it ended), and one
    that started counts from zero, so that a scan's worker is not charged with the CPU of an
    earlier scan's."""
    out: dict[str, tuple[float, int]] = {}
    for tid, (role, cpu, faults) in after.items():
        role0, cpu0, faults0 = before.get(tid, (role, 0.0, 0))
        if role0 != role or cpu0 > cpu:  # the id of an ended thread, given to a new one
            cpu0, faults0 = 0.0, 0
        c, f = out.get(role, (0.0, 0))
        out[role] = (c + cpu - cpu0, f + faults - faults0)
    return out


def measure_stages(side: int, batch: int, total: int) -> dict[str, float]:
    """Each stage of the ingest path alone, one scan of ``total`` frames in messages of
    ``batch`` raw frames: CPU µs per frame of the thread that runs it (the spool's compression
    threads: the rest of the process's CPU while the spool thread appends)."""
    import tempfile
    from pathlib import Path

    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.scan import engine_spec, spec_from_scan_start
    from cryoptycho.daemon.session import FrameLedger
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.gpu.engines import create_engine
    from cryoptycho.gpu.framestore import MAPPINGS, FrameStore

    rounds = max(8, total // batch)
    total = rounds * batch
    scan = _scan("stages", side, total, raster=RasterScan((rounds, batch), (1e-10, 1e-10)))
    data = np.random.default_rng(3).poisson(0.1, (batch, side, side)).astype(np.uint16)
    parts = [bytes(memoryview(np.ascontiguousarray(p)).cast("B")) if isinstance(p, np.ndarray) else bytes(p)
             for p in encode(Frames("stages", np.arange(batch, dtype=np.uint32), data))]
    declared, limits = {"stages": scan}, Limits()
    spec = spec_from_scan_start(scan)
    pos = np.asarray(spec.positions_m)
    idx = [np.arange(i * batch, (i + 1) * batch) for i in range(rounds)]
    out: dict[str, float] = {}

    def per_frame(fn: Any, frames: int = total) -> float:
        c0 = time.thread_time()
        fn()
        return 1e6 * (time.thread_time() - c0) / frames

    out["validate + decode (manager thread)"] = per_frame(
        lambda: [decode(parts, limits, declared) for _ in range(rounds)])
    packed = [bytes(memoryview(p).cast("B")) for p in encode(Frames("stages", np.arange(batch, dtype=np.uint32), data,
                                                                    compression="bslz4"))]
    out["validate + decode, bslz4 sent (manager thread)"] = per_frame(
        lambda: [decode(packed, limits, declared) for _ in range(rounds)])
    blob = decode(packed, limits, declared).wire_data
    ledger = FrameLedger(total)

    def count() -> None:
        for i in idx:
            ledger.admit(i)
            ledger.stored(len(i))

    out["ledger: admit + count as received"] = per_frame(count)
    for per_append, wire in ((1, None), (8, None), (8, blob)):
        with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
            writer = SpoolWriter.create(Path(tmp), spec)
            try:
                c0, t0 = time.process_time(), time.thread_time()
                for i in range(0, rounds, per_append):
                    js = range(i, min(i + per_append, rounds))
                    writer.append_many([(data, idx[j], pos[idx[j]]) for j in js], [wire for _ in js])
                own = time.thread_time() - t0
                pool = time.process_time() - c0 - own
            finally:
                writer.close()
        what = "one message per append" if per_append == 1 else f"{per_append} messages per append"
        if wire is not None:
            what += ", bslz4 sent: chunks as received"
        out[f"spool write: HDF5 rows, commit, flush ({what})"] = 1e6 * own / total
        out[f"spool compress: bitshuffle-LZ4 chunks, pool threads ({what})"] = 1e6 * pool / total
    keep = MAPPINGS.set_keep_bytes(0)  # a store in fresh memory (the daemons above left theirs)
    try:
        store = FrameStore((side, side), np.uint16, total)
    finally:
        MAPPINGS.set_keep_bytes(keep)
    fresh, touched = _store_stages(store, data, pos, idx)
    out["frame store append, fresh memory (first touch of its pages)"] = fresh
    out["frame store append, memory touched before"] = touched
    del store
    keep = MAPPINGS.set_keep_bytes(0)
    try:  # the engine's store: the bench's counts fit a byte (uint8 rows)
        store = FrameStore((side, side), np.uint16, total, narrow=True)
    finally:
        MAPPINGS.set_keep_bytes(keep)
    fresh, touched = _store_stages(store, data, pos, idx)
    out["frame store append, uint8 rows (narrow), fresh memory"] = fresh
    out["frame store append, uint8 rows (narrow), memory touched before"] = touched
    del store
    engine = create_engine(engine_spec(spec, data), ServiceConfig().options)
    engine.frame_store.frames[:] = 0  # touched: the page faults are the row above
    out["engine add_frames (checks, canvas, illumination, frame store; touched)"] = per_frame(
        lambda: [engine.add_frames(data, pos[i]) for i in idx])
    return out


def _store_stages(store: Any, data: np.ndarray, pos: np.ndarray, idx: list[np.ndarray]) -> tuple[float, float]:
    """CPU µs per frame of FrameStore.append into fresh memory, then into the same memory again."""
    out = []
    for _ in range(2):
        store.n = 0
        c0 = time.thread_time()
        for i in idx:
            store.append(data, pos[i])
        out.append(1e6 * (time.thread_time() - c0) / store.n)
    return out[0], out[1]
