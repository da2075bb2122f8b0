"""`cryoptycho bench protocol`: receive-side cost of the wire protocol.

Decode + validate throughput (frames/s) of ``frames`` messages as the daemon sees them, for
uint16 frames of 64×64 and 96×96, raw and bitshuffle-LZ4, all measured side by side in one
run; plus encode throughput and the bytes on the wire. Frames are Poisson counts at a low dose
(λ = 0.1 per pixel), the regime the daemon is built for; compression ratios depend on it.
"""

from __future__ import annotations

import time
from typing import Any

import click
import numpy as np
from cryoptycho.protocols.limits import Limits
from cryoptycho.protocols.messages import Frames, ProbeModelSpec, ScanStart, decode, encode


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


def measure(
    side: int, batch: int, codec: str, seconds: float, dose: float = 0.1
) -> dict[str, float]:
    """Decode/encode rates (frames/s) and wire bytes per frame for one configuration."""
    n_scan = batch * 4
    scan = ScanStart(
        "bench",
        300e3,
        (side, side),
        "uint16",
        n_scan,
        pixel_size_m=1e-10,
        probe_model=ProbeModelSpec(),
        positions_m=np.zeros((n_scan, 2)),
    )
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
def command(batches: tuple[int, ...], seconds: float) -> None:
    """Decode + validate throughput of frames messages (target ≥ 100,000 frames/s raw)."""
    rows = []
    for side in (64, 96):
        for batch in batches:
            for codec in ("none", "bslz4", "lz4"):
                rows.append((side, batch, codec, measure(side, batch, codec, seconds)))
    click.echo(
        f"{'frame':>7} {'batch':>5} {'codec':>6} {'decode f/s':>12} {'encode f/s':>12} "
        f"{'wire B/frame':>12} {'ratio':>6} {'dec vs raw':>10}"
    )
    raw_rate = {(s, b): r["decode_fps"] for s, b, c, r in rows if c == "none"}
    for side, batch, codec, r in rows:
        click.echo(
            f"{side:>3}×{side:<3} {batch:>5} {codec:>6} {r['decode_fps']:>12,.0f} "
            f"{r['encode_fps']:>12,.0f} {r['wire_bytes_per_frame']:>12,.0f} "
            f"{r['raw_bytes_per_frame'] / r['wire_bytes_per_frame']:>6.1f} "
            f"{r['decode_fps'] / raw_rate[(side, batch)]:>10.3f}"
        )
    click.echo(
        "ratio = raw bytes / wire bytes; dec vs raw = decode rate relative to the raw case "
        "(same run, same process, one core)."
    )
