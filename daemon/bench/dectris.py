"""`cryoptycho bench dectris`: DECTRIS Stream V2 ingest cost, stage by stage, in one process.

Images are what an ARINA sends: 192×192 uint16, bslz4 (tag 56500) in a CBOR message, with
Poisson counts in a bright-field disc and a dimmer dark field. Two doses: ``sparse`` (cryo
low dose, pixels mostly 0 or 1) and ``dense``. Measured side by side, interleaved in rounds so
that the load of a shared host falls on all stages alike:

* ``decode``: CBOR + bslz4 of one channel with our decoder (``decode_v2``) and, as the
  reference, ``cbor2.loads`` + DECTRIS' own ``dectris.compression.decompress`` when installed;
* ``codec``: bslz4 alone on the same payloads: ours (the decoder ``compression`` picks), our
  ``bitshuffle`` fallback, and the reference;
* ``bin``: crop and bin 192 → 96 (:class:`FrameReducer`, one frame at a time as it arrives);
* ``full``: what the bridge does per socket message, up to the encoded ingest messages: decode,
  series bookkeeping, bin, batch, then the Producer's validate + encode (the bytes are
  dropped instead of sent, so the socket and the daemon are not part of the figure).

End to end into a real daemon (``--daemon-frames``): a detector process streams a series into
a :class:`BackgroundService` (spool and frame store included), along the old path (the bridge:
decode, bin, re-encode our protocol, the ingest socket, decode again) and the new one (the
daemon's DECTRIS source: decode and bin once on worker threads or processes, spool the
detector's chunks as they are), with 1 and 2 decoding threads and worker processes, engine paused
and live, with the CPU time per frame of each thread of the daemon (by stage), of the worker
processes and of the detector; plus the CPU cost per frame of each stage of both paths measured
alone (``stages_cpu_us_per_frame``).

Target (issue 15): end to end into the daemon ≥ 20,000 frames/s on 2 cores, engine paused.
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import pstats
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import cbor2
import click
import numpy as np
import zmq
from cryoptycho.protocols import compression
from cryoptycho.protocols.dectris.binning import FrameReducer
from cryoptycho.protocols.dectris.bridge import (
    BridgeConfig,
    BridgeStats,
    SeriesConverter,
    dispatch,
    run_bridge,
)
from cryoptycho.protocols.dectris.decode import V2_MAGIC, decode_v2
from cryoptycho.protocols.dectris.sim import SimSender, SimSeries, v2_messages
from cryoptycho.protocols.messages import decode
from cryoptycho.protocols.producer import Producer

try:
    from dectris.compression import decompress as reference_decompress
except ImportError:  # the reference is optional (test extra); its columns are then null
    reference_decompress = None

TARGET_FPS = 20_000
CHANNEL = "threshold_1"
#: case → (counts per pixel in the bright-field disc, in the dark field)
DOSES = {"sparse": (0.5, 0.02), "dense": (20.0, 1.0)}


def make_frames(n: int, side: int, disc: float, dark: float, seed: int = 0) -> np.ndarray:
    """``n`` uint16 diffraction patterns: Poisson counts, a bright-field disc of radius side/5."""
    yy, xx = np.mgrid[:side, :side] - side // 2
    lam = np.where(yy**2 + xx**2 <= (side / 5) ** 2, disc, dark)
    return np.random.default_rng(seed).poisson(lam, (n, side, side)).astype(np.uint16)


def make_series(frames: np.ndarray, pixel_angle_rad: float = 1e-4, saturation_value: int | None = None) -> list[bytes]:
    """Stream V2 start, images, end of ``frames``, with a raster scan in ``user_data``; the start
    declares ``saturation_value`` when given (the binned frames are then uint16 when 4× it
    fits, else, as without it, uint32: binning keeps exact sums)."""
    n = frames.shape[0]
    user = {"cryoptycho": {"scan": {"kind": "raster", "shape": [1, n], "step_m": [1e-10, 1e-10]},
                           "detector_pixel_angle_rad": pixel_angle_rad}}
    return list(v2_messages(SimSeries(frames, compression="bslz4", user_data=user,
                                      saturation_value=saturation_value)))


def image_payload(raw: bytes) -> bytes:
    """The bslz4 bytes of an image's first channel, read with plain cbor2 (no tag hooks)."""
    return cbor2.loads(raw[len(V2_MAGIC):])["data"][CHANNEL].value[1].value.value[2]


def reference_decode(raw: bytes, shape: tuple[int, int]) -> np.ndarray:
    """DECTRIS' own decoder on one image message (what a reader built on their library does)."""
    assert reference_decompress is not None
    payload = image_payload(raw)
    return np.frombuffer(reference_decompress(payload, "bslz4", elem_size=2), np.uint16).reshape(shape)


def _config(side: int = 192, bin_: int = 2) -> BridgeConfig:
    return BridgeConfig(channel=CHANNEL, crop=side, bin=bin_, energy_eV=300e3)


class _Sink:
    """Producer hook that keeps nothing: messages end encoded, ready for the socket."""

    def __init__(self) -> None:
        self.messages = 0

    def process(self, msg: Any, parts: list[Any]) -> Iterable[list[Any]]:
        self.messages += 1
        return ()

    def flush(self) -> Iterable[list[Any]]:
        return ()


class FullPath:
    """The bridge's per-message work (``run_bridge``'s loop body) without its sockets."""

    def __init__(self, series: list[bytes], config: BridgeConfig) -> None:
        self.series, self.config = series, config
        self.sink = _Sink()
        # connect() is lazy: nothing listens, and the hook keeps every message off the socket
        self.producer = Producer("tcp://127.0.0.1:9", hook=self.sink, send_timeout_s=1, confirm=False)

    def run_series(self) -> int:
        """Feed one whole series; returns the images fed."""
        conv, stats = SeriesConverter(self.config), BridgeStats()
        channels = (self.config.channel,)
        encoded = self.sink.messages
        for raw in self.series:
            out = conv.feed(decode_v2(raw, channels))
            out += conv.flush(self.config.flush_interval_s)
            dispatch(self.producer, out, conv, stats)
        n = len(self.series) - 2
        batches = -(-n // self.config.frames_per_message)
        # every frame converted; scan start, the frames messages (more when a slow batch was
        # flushed part-full) and scan end encoded
        if stats.series_errors or conv.stats["frames_sent"] != n or self.sink.messages - encoded < batches + 2:
            raise RuntimeError(f"the bridge sent {conv.stats['frames_sent']} of {n} frames in "
                               f"{self.sink.messages - encoded} messages: {stats.to_dict()}")
        return n

    def close(self) -> None:
        self.producer.close(linger_s=0)


def _interleaved(stages: dict[str, Callable[[], int]], seconds: float, rounds: int,
                 cpu_clock: Callable[[], float] = time.thread_time) -> tuple[dict[str, float], dict[str, float]]:
    """(frames per wall-clock second, frames per CPU second of this thread) of each stage;
    each call returns the frames it did. Stages take turns, ``rounds`` times, each for
    ``seconds / rounds`` per turn, after one warm-up call. On a shared host the CPU figure is
    what a core of one's own would do; the wall figure is what this run got."""
    done = dict.fromkeys(stages, 0)
    wall = dict.fromkeys(stages, 0.0)
    cpu = dict.fromkeys(stages, 0.0)
    for fn in stages.values():
        fn()
    for _ in range(rounds):
        for name, fn in stages.items():
            t0, c0 = time.perf_counter(), cpu_clock()
            while True:
                done[name] += fn()
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / rounds:
                    break
            wall[name] += elapsed
            cpu[name] += cpu_clock() - c0
    return ({k: done[k] / wall[k] for k in stages},
            {k: done[k] / max(cpu[k], 1e-9) for k in stages})


def _over(items: list[Any], fn: Callable[[Any], Any]) -> Callable[[], int]:
    def run() -> int:
        for x in items:
            fn(x)
        return len(items)
    return run


def measure_case(frames: np.ndarray, seconds: float, rounds: int, bin_: int = 2) -> dict[str, Any]:
    """All stages for one set of frames; raises if any decoder disagrees with the frames."""
    n, side, _ = frames.shape
    series = make_series(frames)
    images = series[1:-1]
    payloads = [image_payload(raw) for raw in images]
    shape = (side, side)
    # correctness first: every decoder must give back the frames that were encoded
    for i, raw in enumerate(images):
        ours = decode_v2(raw, (CHANNEL,)).data[CHANNEL]
        if not np.array_equal(ours, frames[i]):
            raise RuntimeError(f"decode_v2 differs from the encoded frame {i}")
        if not np.array_equal(compression.bslz4_decompress(payloads[i], frames.dtype, shape, decoder="bitshuffle"), frames[i]):
            raise RuntimeError(f"the bitshuffle decoder differs from the encoded frame {i}")
        if reference_decompress is not None and not np.array_equal(reference_decode(raw, shape), frames[i]):
            raise RuntimeError(f"dectris.compression differs from the encoded frame {i}")
    reducer = FrameReducer.build(shape, frames.dtype, crop=side, bin=bin_)
    full = FullPath(series, _config(side, bin_))
    u16 = np.dtype(np.uint16)
    stages: dict[str, Callable[[], int]] = {
        "decode_ours": _over(images, lambda raw: decode_v2(raw, (CHANNEL,))),
        "codec_ours": _over(payloads, lambda p: compression.bslz4_decompress(p, u16, shape)),
        "codec_bitshuffle": _over(payloads, lambda p: compression.bslz4_decompress(p, u16, shape, decoder="bitshuffle")),
        "bin": _over(list(frames), reducer.reduce_frame),
        "full": full.run_series,
    }
    if reference_decompress is not None:
        stages["decode_reference"] = _over(images, lambda raw: reference_decode(raw, shape))
        stages["codec_reference"] = _over(payloads, lambda p: reference_decompress(p, "bslz4", elem_size=2))
    try:
        fps, fps_cpu = _interleaved(stages, seconds, rounds)
    finally:
        full.close()

    def ratio(stage: str, reference: str) -> float | None:
        # three significant figures: on a loaded host the full path can run at a few percent of
        # the reference's decoder, where three decimals kept only two figures (0.027 for 0.0275)
        return float(f"{fps_cpu[stage] / fps_cpu[reference]:.3g}") if reference in fps_cpu else None

    return {
        "frames": n,
        "frame_shape": [side, side],
        "binned_shape": [side // bin_, side // bin_],
        "compressed_bytes_per_frame": float(np.mean([len(p) for p in payloads])),
        "mean_count": float(frames.mean()),
        "fps": {k: round(v, 1) for k, v in fps.items()},
        "fps_cpu": {k: round(v, 1) for k, v in fps_cpu.items()},
        "ratio_to_reference": {
            "decode_ours": ratio("decode_ours", "decode_reference"),
            "codec_ours": ratio("codec_ours", "codec_reference"),
            "codec_bitshuffle": ratio("codec_bitshuffle", "codec_reference"),
            "full": ratio("full", "decode_reference"),
        },
        "decoded_equal_to_frames": True,
        "target_fps": TARGET_FPS,
        "target_met": fps["full"] >= TARGET_FPS,
        "target_met_cpu": fps_cpu["full"] >= TARGET_FPS,
    }


def measure_sockets(series: list[bytes], config: BridgeConfig, repeats: int = 3) -> float:
    """Frames/s (wall) of ``run_bridge`` end to end over TCP loopback: a simulated detector
    thread pushes the series as fast as it is taken, the bridge converts it, and a stand-in
    daemon thread pulls the ingest messages. All three share this process (and its cores);
    best of ``repeats`` series, from the bridge's start to its return."""
    ctx = zmq.Context()
    daemon = ctx.socket(zmq.PULL)
    port = daemon.bind_to_random_port("tcp://127.0.0.1")
    failures: list[BaseException] = []

    def take_scan() -> None:
        try:
            while daemon.poll(20_000):
                if decode(daemon.recv_multipart()).type in ("scan_end", "abort"):
                    return
            raise RuntimeError("the bridge sent nothing for 20 s")
        except Exception as exc:  # noqa: BLE001 — re-raised in the measuring thread
            failures.append(exc)

    best = 0.0
    try:
        for _ in range(repeats):
            with SimSender(2, context=ctx) as sender:
                taker = threading.Thread(target=take_scan, name="bench-daemon")
                pusher = threading.Thread(target=lambda: [sender.send_raw(m) for m in series],
                                          name="bench-detector", daemon=True)
                taker.start()
                stop = threading.Event()
                timer = threading.Timer(60.0, stop.set)  # a safety net for a stalled run
                timer.start()
                t0 = time.perf_counter()
                pusher.start()
                try:
                    stats = run_bridge(sender.url, f"tcp://127.0.0.1:{port}", config, stop,
                                       max_series=1, context=ctx, confirm=False)  # a stand-in PULL
                finally:
                    timer.cancel()
                elapsed = time.perf_counter() - t0
                taker.join(30)
                pusher.join(30)
            if failures:
                raise failures[0]
            if stats.frames_sent != len(series) - 2:
                raise RuntimeError(f"the bridge sent {stats.frames_sent} of {len(series) - 2} frames: "
                                   f"{stats.to_dict()}")
            best = max(best, stats.frames_sent / elapsed)
    finally:
        daemon.close(linger=0)
        ctx.term()
    return best


#: profile groups, by the source file a function lives in
_GROUPS = (
    ("protocols/dectris/decode", "cbor_decode"), ("cbor2", "cbor_decode"), ("fractions", "cbor_decode"),
    ("protocols/compression", "bslz4"), ("protocols/dectris/codec", "bslz4"), ("bitshuffle", "bslz4"),
    ("dectris.compression", "bslz4"),
    ("protocols/dectris/binning", "binning"),
    ("protocols/dectris/convert", "converter"), ("protocols/dectris/receiver", "converter"),
    ("protocols/producer", "producer_encode"), ("protocols/messages", "producer_encode"),
    ("protocols/validate", "producer_encode"), ("protocols/codec", "producer_encode"),
    ("protocols/wire", "producer_encode"), ("protocols/dectris/bridge", "producer_encode"),
)


def _group(func: tuple[str, int, str]) -> str | None:
    where = f"{func[0]} {func[2]}".replace("\\", "/")
    return next((g for key, g in _GROUPS if key in where), None)


def profile_shares(fn: Callable[[], Any]) -> dict[str, float]:
    """Share of ``fn``'s time per group. A function outside every group (a C builtin, NumPy)
    is charged to its callers' groups in proportion to the time each call site spent in it."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    memo: dict[Any, dict[str, float]] = {}

    def owner(func: Any, depth: int = 0) -> dict[str, float]:
        if func in memo:
            return memo[func]
        group = _group(func)
        if group is not None or depth > 12 or func not in stats or not stats[func][4]:
            memo[func] = {group or "other": 1.0}
            return memo[func]
        callers = stats[func][4]
        total = sum(c[2] for c in callers.values()) or 1.0
        share: dict[str, float] = {}
        for caller, c in callers.items():
            for g, w in owner(caller, depth + 1).items():
                share[g] = share.get(g, 0.0) + w * c[2] / total
        memo[func] = share
        return share

    totals: dict[str, float] = {}
    for func, (_, _, tottime, _, _) in stats.items():
        for g, w in owner(func).items():
            totals[g] = totals.get(g, 0.0) + tottime * w
    whole = sum(totals.values()) or 1.0
    return {g: round(t / whole, 3) for g, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def _profile_full(frames: np.ndarray, series: int = 3) -> dict[str, float]:
    full = FullPath(make_series(frames), _config())
    try:
        return profile_shares(lambda: [full.run_series() for _ in range(series)])
    finally:
        full.close()


def run(n: int, seconds: float, rounds: int, cases: Iterable[str], profile: bool,
        sockets: bool = True, daemon_frames: int = 0, daemon_rounds: int = 2, live: bool = True,
        processes: bool = True, saturation_value: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "reference": "dectris.compression" if reference_decompress is not None else None,
        "bslz4_decoder": compression.BSLZ4_DECODER,
        "cases": {},
    }
    for case in cases:
        disc, dark = DOSES[case]
        frames = make_frames(n, 192, disc, dark)
        out["cases"][case] = row = measure_case(frames, seconds, rounds)
        if sockets:
            row["fps"]["bridge_sockets"] = round(measure_sockets(make_series(frames), _config()), 1)
        if profile:
            row["profile_shares_full"] = _profile_full(frames)
        if daemon_frames:
            big = make_frames(daemon_frames, 192, disc, dark, seed=1)
            row["stages_cpu_us_per_frame"] = measure_stages(big[:512], seconds, rounds, saturation_value=saturation_value)
            row["daemon"] = measure_daemon_paths(big, daemon_rounds, live, processes=processes,
                                                 saturation_value=saturation_value)
            row["binned_dtype"] = FrameReducer.build((192, 192), big.dtype, crop=192, bin=2,
                                                     saturation_value=saturation_value).out_dtype.name
    return out


@click.command()
@click.option("--frames", "n", type=click.IntRange(1, 100_000), default=512, show_default=True,
              help="Images per series (distinct messages).")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Timing window per stage.")
@click.option("--rounds", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Stages take turns this many times within their window.")
@click.option("--case", "cases", type=click.Choice(sorted(DOSES)), multiple=True,
              default=("sparse", "dense"), show_default=True, help="Dose case (repeatable).")
@click.option("--profile/--no-profile", default=False, show_default=True,
              help="Also profile the full path (cProfile) and give time shares by stage.")
@click.option("--sockets/--no-sockets", default=True, show_default=True,
              help="Also run the bridge end to end over TCP loopback (wall clock).")
@click.option("--daemon-frames", type=click.IntRange(0, 200_000), default=4096, show_default=True,
              help="Frames per series end to end into a real daemon (spool and frame store included), "
                   "old path (bridge) and new (direct source, 1 and 2 decoding threads); 0 = skip.")
@click.option("--daemon-rounds", type=click.IntRange(1, 20), default=2, show_default=True,
              help="End-to-end runs of each path, interleaved (the best is reported); the first round "
                   "ends its scans (close of an ended scan), the second stops the daemon with them open "
                   "(close of an aborted scan), and so on.")
@click.option("--live/--no-live", default=True, show_default=True,
              help="Also run the direct path end to end with the live engine reconstructing.")
@click.option("--processes/--no-processes", default=True, show_default=True,
              help="Also run the direct path with 1 and 2 decoding worker processes.")
@click.option("--saturation-value", type=click.IntRange(1, 65534), default=None,
              help="End to end: the series' start declares this saturation value, as a detector does "
                   "(binned 2×2 frames are uint16 up to 16383, else uint32; default: none declared).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def command(n: int, seconds: float, rounds: int, cases: tuple[str, ...], profile: bool,
            sockets: bool, daemon_frames: int, daemon_rounds: int, live: bool, processes: bool,
            saturation_value: int | None, as_json: bool) -> None:
    """DECTRIS V2 ingest: decode + bin + enqueue frames/s, 192×192 bslz4 → 96×96, and end to end
    into the daemon (target ≥ 20,000 frames/s on 2 cores, engine paused)."""
    result = run(n, seconds, rounds, cases, profile, sockets, daemon_frames, daemon_rounds, live, processes,
                 saturation_value)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"bslz4 decoder: {result['bslz4_decoder']}; reference: {result['reference'] or 'not installed'}")
    stages = ("decode_ours", "decode_reference", "codec_ours", "codec_bitshuffle", "codec_reference", "bin", "full",
              "bridge_sockets")
    click.echo(f"{'case':>7} {'clock':>5} {'B/frame':>8} " + " ".join(f"{s:>16}" for s in stages)
               + "   full/ref  target")
    for case, row in result["cases"].items():
        for clock, key, met in (("wall", "fps", "target_met"), ("cpu", "fps_cpu", "target_met_cpu")):
            fps = row[key]
            cells = " ".join(f"{fps[s]:>16,.0f}" if s in fps else f"{'—':>16}" for s in stages)
            ratio = row["ratio_to_reference"]["full"] if clock == "cpu" else None
            click.echo(f"{case:>7} {clock:>5} {row['compressed_bytes_per_frame']:>8,.0f} {cells}   "
                       f"{'' if ratio is None else f'{ratio:8.3f}':>8}  {'met' if row[met] else 'missed'}")
        if "profile_shares_full" in row:
            click.echo("        full-path time shares: " + ", ".join(
                f"{g} {100 * s:.0f}%" for g, s in row["profile_shares_full"].items()))
        if "daemon" in row:
            click.echo(f"        end to end into the daemon ({row['binned_dtype']} binned frames), frames/s received / "
                       "stored (CPU µs per frame): " + ", ".join(
                f"{k} {v['fps_received']:,.0f} / {v['fps']:,.0f} ({v['cpu_us_per_frame']:,.0f})"
                for k, v in row["daemon"].items()))
            click.echo("        after the window, the close of the ended scan (its end sent; spool close, rows "
                       "from the frame store), CPU µs per frame of the daemon's process less its scan worker "
                       "(stored dtype): " + ", ".join(
                f"{k} {v['close_cpu_us_per_frame']:,.0f} ({v['close_binned_dtype']})"
                for k, v in row["daemon"].items() if "close_cpu_us_per_frame" in v))
            aborted = {k: v["close_aborted_cpu_us_per_frame"] for k, v in row["daemon"].items()
                       if "close_aborted_cpu_us_per_frame" in v}
            if aborted:
                click.echo("        the close of an aborted scan (the source stopped with it open: spool close, rows "
                           "from the frames its worker held at the abort, daemon stop), CPU µs per frame of the "
                           "daemon's process: "
                           + ", ".join(f"{k} {v:,.0f}" for k, v in aborted.items()))
            click.echo("        CPU µs/frame by stage: " + ", ".join(
                f"{k} {v:,.1f}" for k, v in row["stages_cpu_us_per_frame"].items()))
            for k, v in row["daemon"].items():
                click.echo(f"        {k} CPU µs/frame by thread: " + ", ".join(
                    f"{s} {u:,.1f}" for s, u in sorted(v["stages_us_per_frame"].items(), key=lambda kv: -kv[1])))
    click.echo("frames/s in one process, stages measured side by side in one run (interleaved rounds); "
               "wall = clock time, cpu = per CPU-second of the measuring thread (a core of its own); "
               "full/ref = full path ÷ (cbor2 + dectris.compression decode), CPU time; full = decode + "
               "bookkeeping + bin + batch + validate + encode, no socket; bridge_sockets = run_bridge end "
               "to end over TCP loopback, detector and daemon stand-ins in the same process, best series. "
               "End to end into the daemon: detector in its own process, daemon in this one, from the first "
               "message to every frame spooled and counted (received) / also in the frame store (stored); bridge = old path (decode, "
               "re-encode, ingest socket), direct_N = the daemon's DECTRIS source with N decoding threads, direct_Np with N worker processes; "
               "CPU by thread: the daemon process's threads by stage, decode_processes = the worker processes, "
               "detector_process = the simulated detector (it shares the cores), other = ZeroMQ's I/O threads and the rest; "
               "paused = no reconstruction step, live = the engine runs.")


# ----------------------------------------------------------------- end to end into the daemon


@contextlib.contextmanager
def engine_paused() -> Iterator[None]:
    """Workers take frames into their engine's frame store but run no reconstruction step
    (and wait for frames instead of spinning), so that ingest alone is measured."""
    from cryoptycho.daemon.worker import ScanWorker

    step, drain, preview = ScanWorker._step, ScanWorker._drain, ScanWorker._preview
    ScanWorker._step = lambda self, halves: None  # type: ignore[method-assign]
    ScanWorker._preview = lambda self, unpreviewed: None  # type: ignore[method-assign]
    ScanWorker._drain = lambda self, block: drain(self, True)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ScanWorker._step, ScanWorker._drain, ScanWorker._preview = step, drain, preview  # type: ignore[method-assign]


#: CPU seconds of the scan workers' threads when they ended (native id → name, seconds), for
#: :func:`_thread_cpu`: a worker that ends inside a measured interval is still told apart
_ENDED_WORKERS: dict[int, tuple[str, float]] = {}


@contextlib.contextmanager
def workers_cpu_kept() -> Iterator[None]:
    """Scan workers' threads note their CPU time as they end (:data:`_ENDED_WORKERS`)."""
    from cryoptycho.daemon.worker import ScanWorker

    run = ScanWorker._run

    def noting(self: Any) -> None:
        try:
            run(self)
        finally:
            _ENDED_WORKERS[threading.get_native_id()] = (threading.current_thread().name, time.thread_time())

    ScanWorker._run = noting  # type: ignore[method-assign]
    _ENDED_WORKERS.clear()
    try:
        yield
    finally:
        ScanWorker._run = run  # type: ignore[method-assign]
        _ENDED_WORKERS.clear()


def _detector(series: list[bytes], port: Any, go: Any, end: Any = None, end_wait_s: float = 300.0) -> None:
    """A simulated detector in a process of its own (as a real one is): bind PUSH, report the
    port, send the series when told; with ``end``, its last message (the series' end) only once
    ``end`` is set (none if it is not set within ``end_wait_s``)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    port.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    go.wait()
    for raw in series if end is None else series[:-1]:
        sock.send(raw, copy=False)
    if end is not None and end.wait(end_wait_s):
        sock.send(series[-1], copy=False)
    sock.close(linger=-1)
    ctx.term()


def measure_daemon(series: list[bytes], config: BridgeConfig, path: str, workers: int = 2,
                   paused: bool = True, timeout_s: float = 120.0, end: bool = True,
                   **source_options: Any) -> dict[str, Any]:
    """One series end to end into a real daemon (:class:`BackgroundService`, spool included):
    from the detector's first message until every frame is spooled and counted (``fps_received``)
    and until they are all in the scan's frame store too (``fps``). ``path``: ``direct`` (the daemon's DECTRIS source, ``workers`` decoding
    threads) or ``bridge`` (the old path: bridge → our protocol → the ingest socket).
    After that window, the scan's close: with ``end``, the series' end is sent then (the scan
    ends as a facility's does) and ``close_cpu_us_per_frame`` is this process's CPU from then
    until the scan's spool is closed, less its worker's threads (the final refinement, whose
    budget is ~0 here, and the result files: not the close) and the measuring thread; by thread
    in ``close_stages_us_per_frame``; ``close_binned_dtype``: the dtype the spool stored the
    binned frames in. Without ``end`` the series' end is not sent and the source is stopped with
    the scan open (aborted: its rows from the frames its worker held at the abort):
    ``close_aborted_cpu_us_per_frame``, the process's CPU from the window's end until the
    daemon stopped. Returns frames/s (wall), CPU µs per frame of
    this process (every thread) and, by stage (``stages_us_per_frame``), of each of its threads
    by name, of the source's decoding processes, and of the detector's process (which shares
    the cores). ``source_options`` go to the DECTRIS source (e.g. ``processes``)."""
    import multiprocessing
    import tempfile
    from pathlib import Path

    import h5py
    from cryoptycho.daemon.config import ServiceConfig
    from cryoptycho.daemon.service import BackgroundService
    from cryoptycho.daemon.storage.spool import DATA
    from cryoptycho.gpu.options import ReconOptions

    n = len(series) - 2
    if not end:
        series = series[:-1]
    # spawn, not fork: a forked child shares the parent's ZeroMQ contexts (their signalling
    # descriptors), and its exit can swallow the wake-ups of the daemon's sockets
    mp = multiprocessing.get_context("spawn")
    port_q, go, end_go = mp.Queue(), mp.Event(), (mp.Event() if end else None)
    proc = mp.Process(target=_detector, args=(series, port_q, go, end_go), daemon=True)
    proc.start()
    url = f"dectris2://127.0.0.1:{port_q.get(timeout=30)}"
    with tempfile.TemporaryDirectory(prefix="bench-dectris-") as tmp, \
            (engine_paused() if paused else contextlib.nullcontext()), workers_cpu_kept():
        cfg = ServiceConfig(ingest="tcp://127.0.0.1:0", publish="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                            metrics_enabled=False, spool_dir=Path(tmp) / "spool", results_dir=Path(tmp) / "res",
                            resolution_interval_s=0, drain_timeout_s=0,
                            # no final refinement to speak of: the close is measured, not it
                            refine_time_budget_s=1e-3, keep_spool=True,
                            # nor the parallax fit that precedes it (a 16,384-position row's
                            # fit would ask for tens of GiB)
                            options=ReconOptions(parallax=False))
        bg = BackgroundService(cfg)
        stop = threading.Event()
        failures: list[BaseException] = []
        sources: list[Any] = []

        def run_source() -> None:
            try:
                if path == "direct":
                    from cryoptycho.protocols.dectris.source import DectrisSource

                    source = DectrisSource(url, config, workers=workers, **source_options)
                    sources.append(source)
                    source.run(bg.service.direct, stop)
                else:
                    run_bridge(url, bg.service.endpoints["ingest"], config, stop,
                               control=bg.service.endpoints["control"])
            except BaseException as exc:  # noqa: BLE001 — re-raised by the measuring thread
                failures.append(exc)

        runner = threading.Thread(target=run_source, name=f"bench-{path}")
        closed: dict[str, Any] = {}
        try:
            runner.start()
            # the source's workers are started (processes take seconds on a loaded host) and
            # its PULL socket has connected before the detector starts sending
            deadline = time.perf_counter() + timeout_s
            while path == "direct" and not (sources and sources[0].ready.is_set()):
                if failures or time.perf_counter() > deadline:
                    raise RuntimeError(f"the DECTRIS source did not start: {failures}")
                time.sleep(0.02)
            time.sleep(0.3)
            t0, c0 = time.perf_counter(), time.process_time()
            cpu0, det0 = _thread_cpu(), _proc_cpu(proc.pid)
            work0 = _source_cpu(sources)
            go.set()
            scans = bg.service.scans
            t_received: float | None = None
            deadline = t0 + timeout_s
            while True:
                # cheap reads only, 50 times a second: this loop shares the GIL with the daemon
                session = next(iter(scans.sessions.values()), None)
                worker = scans.running.get(session.scan_id) if session is not None else None
                received = session.ledger.received if session is not None else 0
                if received >= n and t_received is None:
                    t_received = time.perf_counter() - t0
                if received >= n and worker is not None and worker.queued_frames == 0:
                    break
                if failures or time.perf_counter() > deadline:
                    raise RuntimeError(f"{path}: {received} of {n} frames after {timeout_s} s: {failures}")
                time.sleep(0.02)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            stages = _stage_cpu(_thread_cpu(), cpu0, cpu, n)
            work = _source_cpu(sources) - work0
            if work > 0:  # decoding outside the threads counted above (worker processes)
                stages["decode_processes"] = 1e6 * work / n
            stages["detector_process"] = 1e6 * (_proc_cpu(proc.pid) - det0) / n
            if end_go is not None:
                closed = _measure_ended_close(bg, session, end_go, n, timeout_s)
        finally:
            c1 = time.process_time()
            stop.set()
            runner.join(30)
            bg.stop()
            close = time.process_time() - c1
            proc.join(10)
        if "path" in closed:  # (kept: keep_spool)
            with h5py.File(closed.pop("path"), "r") as f:
                closed["close_binned_dtype"] = str(f[DATA]["data"].dtype)
    assert t_received is not None
    out = {"fps": n / elapsed, "fps_received": n / t_received, "cpu_us_per_frame": 1e6 * cpu / n,
           "stages_us_per_frame": stages, **closed}
    if end_go is None:
        # after the measured window: the scan's abort and its spool's close, which writes the binned
        # frames its worker held (or derives them from the detector's chunks), and the daemon's stop
        out["close_aborted_cpu_us_per_frame"] = 1e6 * close / n
    return out


def _measure_ended_close(bg: Any, session: Any, end: Any, n: int, timeout_s: float) -> dict[str, Any]:
    """Send the series' end (``end``: the detector's event) and measure the ended scan's close
    until its spool file is closed: CPU µs per frame of the daemon's process less the worker's
    threads (its final refinement and result files run beside the close, and are not it) and
    this measuring thread, and by thread. Returns those and the spool file's path."""
    scans = bg.service.scans
    spool = scans.spools.get(session.scan_id)
    if spool is None:
        raise RuntimeError(f"scan {session.scan_id} has no open spool to close")
    t0, c0, cpu0 = time.perf_counter(), time.process_time(), _thread_cpu()
    end.set()
    # the file is closed once its close is over (SpoolWriter.close; an h5py id no longer valid)
    while spool._f.id.valid:
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"the ended scan's spool was not closed after {timeout_s} s")
        time.sleep(0.02)
    stages = _stage_cpu(_thread_cpu(), cpu0, time.process_time() - c0, n)
    # (a worker thread that ended meanwhile is counted too: workers_cpu_kept)
    worker = sum(u for k, u in stages.items() if k in ("frame_store", "bench_poll", "scan_start"))
    return {"close_cpu_us_per_frame": sum(stages.values()) - worker, "close_stages_us_per_frame": stages,
            "close_wall_s": time.perf_counter() - t0, "path": spool.path}


#: thread name prefix → stage, for the CPU time of each thread of the daemon's process
_THREAD_STAGES = (
    ("bench-direct", "receive_convert"), ("bench-bridge", "bridge"), ("dectris-decode", "decode_threads"),
    ("service", "manager"), ("spool-compress", "spool_compress"), ("spool", "spool"),
    ("worker-", "frame_store"), ("scan-start", "scan_start"), ("MainThread", "bench_poll"),
)


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of every live Python thread of this process (its own clock), by native id,
    and of the scan workers' threads that ended (:func:`workers_cpu_kept`)."""
    out: dict[int, tuple[str, float]] = dict(_ENDED_WORKERS)
    for t in threading.enumerate():
        if t.ident is None or t.native_id is None:
            continue
        try:
            out[t.native_id] = (t.name, time.clock_gettime(time.pthread_getcpuclockid(t.ident)))
        except (OSError, ProcessLookupError):  # it ended meanwhile
            continue
    return out


def _stage_cpu(end: dict[int, tuple[str, float]], start: dict[int, tuple[str, float]], total: float,
               n: int) -> dict[str, float]:
    """CPU µs per frame of each stage of the daemon's process between two :func:`_thread_cpu`
    snapshots; ``other``: the rest of the process (ZeroMQ's I/O threads, threads that ended)."""
    stages: dict[str, float] = {}
    for tid, (name, cpu) in end.items():
        stage = next((s for prefix, s in _THREAD_STAGES if name.startswith(prefix)), "other_threads")
        stages[stage] = stages.get(stage, 0.0) + cpu - start.get(tid, (name, 0.0))[1]
    stages["other"] = max(0.0, total - sum(stages.values()))
    return {k: 1e6 * v / n for k, v in stages.items()}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process so far (Linux /proc; 0 elsewhere)."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _source_cpu(sources: list[Any]) -> float:
    """CPU seconds the source's decoding worker processes reported (0 for threads)."""
    return sum(getattr(s, "process_cpu_s", 0.0) for s in sources)


def measure_daemon_paths(frames: np.ndarray, rounds: int = 2, live: bool = True,
                         bridge: bool = True, processes: bool = True,
                         saturation_value: int | None = None) -> dict[str, Any]:
    """The old and the new path side by side, interleaved ``rounds`` times (best of each):
    bridge (before), direct with 1 and 2 decoding threads and 1 and 2 worker processes, engine
    paused; and direct with 2 threads and 2 processes while the live engine runs. Rounds take
    turns: the first (and every odd one) ends its scans (``close_cpu_us_per_frame``, the close
    of an ended scan), the second (every even one) stops the daemon with them open
    (``close_aborted_cpu_us_per_frame``); each close figure is the lowest of its rounds."""
    series = make_series(frames, saturation_value=saturation_value)
    config = _config(frames.shape[1])
    cases: dict[str, tuple[str, int, bool, bool]] = {
        "direct_1_paused": ("direct", 1, True, False),
        "direct_2_paused": ("direct", 2, True, False),
    }
    if processes:
        cases.update({"direct_1p_paused": ("direct", 1, True, True), "direct_2p_paused": ("direct", 2, True, True)})
    if bridge:
        cases = {"bridge_paused": ("bridge", 1, True, False), **cases}
    if live:
        cases["direct_2_live"] = ("direct", 2, False, False)
        if processes:
            cases["direct_2p_live"] = ("direct", 2, False, True)
    best: dict[str, dict[str, Any]] = {}
    closes: dict[str, dict[str, Any]] = {}
    for i in range(rounds):
        for name, (path, workers, paused, in_processes) in cases.items():
            r = measure_daemon(series, config, path, workers, paused, end=i % 2 == 0,
                               **({"processes": in_processes} if path == "direct" else {}))
            kept = closes.setdefault(name, {})
            for key in ("close_cpu_us_per_frame", "close_aborted_cpu_us_per_frame"):
                if key in r and (key not in kept or r[key] < kept[key]):
                    kept[key] = r[key]
                    if key == "close_cpu_us_per_frame":  # what goes with it
                        kept.update({k: r[k] for k in ("close_stages_us_per_frame", "close_wall_s",
                                                       "close_binned_dtype")})
            if name not in best or r["fps"] > best[name]["fps"]:
                best[name] = r
    best = {k: {**{m: v for m, v in r.items() if not m.startswith("close_")}, **closes[k]} for k, r in best.items()}
    return {k: {m: ({s: round(u, 1) for s, u in v.items()} if isinstance(v, dict)
                    else v if isinstance(v, str) else round(v, 1))
                for m, v in r.items()} for k, r in best.items()}


def measure_stages(frames: np.ndarray, seconds: float, rounds: int, batch: int = 64,
                   saturation_value: int | None = None) -> dict[str, float]:
    """CPU µs per frame of each stage of both paths (this process's CPU time, the spool's
    compression threads included), side by side (interleaved): new: ``decode_job`` (CBOR +
    bslz4 + bin: the workers' job; and its parts alone: ``job_cbor``, ``job_bslz4``, ``job_bin``,
    and ``binned_compress``, the binned frames' bslz4, which the spool does at the scan's end),
    ``spool_direct`` (the detector's chunks as they are; the binned frames derived from them, not written while the scan is open); old: ``bridge`` (decode + bin + encode our protocol), ``daemon_decode`` (the
    daemon's decode + validate of those messages), ``spool_filter`` (the binned frames only);
    both: ``frame_store`` (the engine takes the frames, its store in fresh memory, as in a
    daemon's first scan) and ``frame_store_reused`` (in memory an earlier store faulted in, as
    in its later scans); ``direct_total`` / ``direct_total_reused`` add either to the new path."""
    import tempfile
    from pathlib import Path

    from cryoptycho.daemon.scan import spec_from_scan_start
    from cryoptycho.daemon.storage.spool import SpoolWriter
    from cryoptycho.gpu import framestore
    from cryoptycho.gpu.options import ReconOptions
    from cryoptycho.gpu.stream import StreamingReconstructor
    from cryoptycho.protocols.dectris.codec import bslz4_batch, bslz4_batch_plan
    from cryoptycho.protocols.dectris.decode import split_plain_v2_image, split_v2_image
    from cryoptycho.protocols.dectris.source import SUB_BATCH, Decoder, DirectConverter
    from cryoptycho.protocols.messages import ScanStart, encode
    from cryoptycho.protocols.sources import DetectorFrames

    series = make_series(frames, saturation_value=saturation_value)
    config = _config(frames.shape[1])
    images = series[1:-1]
    jobs = [images[i:i + batch] for i in range(0, len(images), batch)]
    decoder = Decoder()
    conv = DirectConverter(config)
    conv.feed(decode_v2(series[0]))
    out: list[Any] = []
    for job in jobs:
        out += conv.feed_batch(decoder(job, CHANNEL, conv.plan.reducer if conv.plan else None))
    start = next(m for m in out if isinstance(m, ScanStart))
    direct = [m for m in out if isinstance(m, DetectorFrames)]
    reducer = conv.plan.reducer if conv.plan else None
    messages = [[bytes(memoryview(np.ascontiguousarray(p)).cast("B")) if isinstance(p, np.ndarray) else bytes(p)
                 for p in encode(m.frames)] for m in direct]
    spec = spec_from_scan_start(start)
    n = len(images)
    positions = [np.zeros((len(m.frames.indices), 2)) for m in direct]
    tmp = tempfile.TemporaryDirectory(prefix="bench-stages-")
    writers: dict[bool, SpoolWriter] = {}

    def spool(chunks: bool) -> int:
        """Appends to one spool file per variant (a scan's file is made once, not per batch)."""
        if chunks not in writers:
            spec.scan_id = f"stage-{int(chunks)}"
            writers[chunks] = SpoolWriter.create(Path(tmp.name), spec)
        writer = writers[chunks]
        for m, pos in zip(direct, positions):
            f = m.frames
            writer.append(f.data, np.asarray(f.indices, np.int64), pos, raw=m.raw if chunks else None,
                          reducer=m.reducer if chunks else None)
        return n

    reuse = framestore.MappingPool(keep_bytes=1 << 40)  # the reused stage's own: fresh stays fresh

    def frame_store(repeats: int = 4, reused: bool = False) -> int:
        """A scan's engine takes ``repeats`` series (its creation is part of the figure), its
        store in fresh memory (a daemon's first scan) or, ``reused``, in the memory of the
        previous such store (a daemon's later scans: ``frame_store_reuse_bytes``)."""
        if reused:
            fresh, framestore.MAPPINGS = framestore.MAPPINGS, reuse
            try:
                return frame_store(repeats)
            finally:
                framestore.MAPPINGS = fresh
        engine = StreamingReconstructor(
            frame_shape=spec.frame_shape, frame_dtype=np.dtype(spec.frame_dtype), pixel_size=spec.pixel_size_m,
            probe=spec.probe, options=ReconOptions(), mask=spec.mask, extent_m=spec.extent_m,
            expected_frames=repeats * n, energy_eV=spec.energy_eV)
        for _ in range(repeats):
            for m, pos in zip(direct, positions):
                engine.add_frames(m.frames.data, pos, peak=m.peak)  # as the daemon's worker does
        return repeats * n

    declared = {start.scan_id: start}
    full = FullPath(series, config)
    # the decoding job's parts alone: the CBOR split, bslz4 (SUB_BATCH frames a codec call, as
    # the job does), binning, and the compression of the binned frames (worker processes do it,
    # the spool's compression threads on decoding threads)
    payloads = [split_v2_image(raw, CHANNEL).payload.bslz4 for raw in images]
    shape, dtype = frames.shape[1:], frames.dtype
    binned = np.concatenate([m.frames.data for m in direct])
    work = np.empty((SUB_BATCH, *binned.shape[1:]), binned.dtype)

    def job_bslz4() -> int:
        for job in [payloads[i:i + batch] for i in range(0, n, batch)]:
            ok, block = bslz4_batch_plan(job, dtype, shape)
            assert ok.all()
            for i in range(0, len(job), SUB_BATCH):
                bslz4_batch(job[i:i + SUB_BATCH], dtype, shape, block)
        return n

    def job_bin() -> int:
        for i in range(0, n, SUB_BATCH):
            reducer.reduce_batch(frames[i:i + SUB_BATCH], out=work[:len(frames[i:i + SUB_BATCH])])
        return n

    def binned_compress() -> int:
        for frame in binned:
            compression.bslz4_compress(frame)
        return n

    stages: dict[str, Callable[[], int]] = {
        "decode_job": lambda: sum(len(decoder(job, CHANNEL, reducer)) for job in jobs),
        # (the job's own reading of an image as detectors send it; split_v2_image is for the rest)
        "job_cbor": lambda: sum(1 for raw in images if split_plain_v2_image(raw, CHANNEL)),
        "job_bslz4": job_bslz4,
        "job_bin": job_bin,
        "binned_compress": binned_compress,
        "spool_direct": lambda: spool(True),
        "bridge": full.run_series,
        "daemon_decode": lambda: sum(len(decode(parts, None, declared).indices) for parts in messages),
        "spool_filter": lambda: spool(False),
        "frame_store": frame_store,
        "frame_store_reused": lambda: frame_store(reused=True),
    }
    try:
        # the process's CPU time: the spool compresses on its own threads
        _, fps_cpu = _interleaved(stages, seconds, rounds, time.process_time)
    finally:
        full.close()
        for w in writers.values():
            w.close()
        tmp.cleanup()
    us = {k: round(1e6 / v, 1) for k, v in fps_cpu.items()}
    us["direct_total"] = round(us["decode_job"] + us["spool_direct"] + us["frame_store"], 1)
    us["direct_total_reused"] = round(us["decode_job"] + us["spool_direct"] + us["frame_store_reused"], 1)
    us["old_total"] = round(us["bridge"] + us["daemon_decode"] + us["spool_filter"] + us["frame_store"], 1)
    return us
