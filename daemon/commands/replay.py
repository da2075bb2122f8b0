"""`cryoptycho replay DATA.h5`: stream a recorded scan to a daemon at a chosen frame rate.

The reading side is :func:`read_source` (dataset, spool or result file → :class:`ReplaySource`,
through storage/open.py); the sending side :func:`replay` (source → Producer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from cryoptycho.daemon.storage.open import open_recorded
from cryoptycho.protocols.errors import DeliveryError, ProducerTimeout
from cryoptycho.protocols.faults import Faults
from cryoptycho.protocols.messages import ProbeModelSpec, ScanStart
from cryoptycho.protocols.producer import DEFAULT_INGEST, Producer, Receipt
from cryoptycho.protocols.security import ClientCurve


@dataclass
class ReplaySource:
    """One scan ready to send: its declaration, frames in the wire dtype, and positions."""

    start: ScanStart
    frames: np.ndarray  #: (K, M, M)
    positions_m: np.ndarray  #: (K, 2)


def read_source(
    path: str | Path, scan_id: str | None = None, stream_positions: bool = False
) -> ReplaySource:
    """Read a recorded scan: a dataset, spool or result file (daemon/storage/open.py); spooled
    frames are sent in frame-index order."""
    path = Path(path)
    rec = open_recorded(path)
    data = rec.data
    frames = _wire_frames(data.frames)
    pm = data.probe_model
    positions = np.asarray(data.positions, dtype=np.float64)
    start = ScanStart(
        scan_id=scan_id or rec.scan_id or path.stem,
        energy_eV=data.energy,
        frame_shape=data.frame_shape,
        frame_dtype=str(frames.dtype),
        expected_frames=len(frames),
        pixel_size_m=data.pixel_size,
        detector_pixel_angle_rad=data.detector_pixel_angle,
        probe=None if data.probe is None else np.asarray(data.probe, np.complex64),
        probe_model=None
        if pm is None or data.probe is not None
        else ProbeModelSpec(
            pm.kind, pm.semiangle, pm.defocus, pm.cs, pm.zones, pm.diameter, pm.seed
        ),
        positions_m=None if stream_positions else positions,
        mask=None if data.mask is None else np.asarray(data.mask, np.uint8),
        options=rec.options,
        metadata={**data.metadata, "replayed_from": str(path)},
    )
    return ReplaySource(start, frames, positions)


def _wire_frames(frames: np.ndarray) -> np.ndarray:
    """Counts in the narrowest wire dtype that holds them (frames are never rescaled)."""
    if frames.dtype.kind == "f":
        return frames.astype(np.float32, copy=False)
    top = int(frames.max()) if frames.size else 0
    if int(frames.min()) < 0:
        raise ValueError("frames contain negative counts")
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return frames.astype(dt, copy=False) if frames.dtype != dt else frames
    raise ValueError(f"counts up to {top} do not fit uint32")


def replay(source: ReplaySource, producer: Producer, rate: float = 0.0, batch: int = 64) -> Receipt:
    """Send the scan, paced to ``rate`` frames/s (0 = as fast as the daemon takes them).

    Returns the daemon's acknowledgement (``Producer.end_scan``): frames it holds and the rate
    from the first message to the acknowledgement of the last. Raises DeliveryError when the
    daemon does not hold every frame.
    """
    if batch < 1:
        raise ValueError("batch must be ≥ 1")
    start = source.start
    producer.start_scan(start)
    streamed = start.positions_streamed
    n = len(source.frames)
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        if rate > 0:
            # an absolute schedule, so per-batch jitter does not accumulate into drift
            delay = t0 + lo / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        producer.send_frames(
            source.frames[lo:hi],
            np.arange(lo, hi),
            positions_m=source.positions_m[lo:hi] if streamed else None,
        )
    return producer.end_scan(n)


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--endpoint", default=DEFAULT_INGEST, show_default=True, help="Daemon ingest (PULL) endpoint."
)
@click.option(
    "--rate", type=float, default=2000.0, show_default=True, help="Frames per second; 0 = unpaced."
)
@click.option("--batch", type=int, default=64, show_default=True, help="Frames per message.")
@click.option("--scan-id", default=None, help="Scan id (default: the file's stem).")
@click.option(
    "--compression", type=click.Choice(["none", "lz4", "bslz4"]), default="none", show_default=True
)
@click.option(
    "--stream-positions", is_flag=True, help="Send positions with the frames, not at scan start."
)
@click.option("--checksum", is_flag=True, help="Add a CRC-32 to every array part.")
@click.option(
    "--control",
    default=None,
    help="Daemon control endpoint, for the delivery acknowledgement [default: ingest port + 2].",
)
@click.option(
    "--no-confirm",
    is_flag=True,
    help="Do not wait for the daemon's acknowledgement (relays, bare PULL sockets).",
)
@click.option(
    "--timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds without progress (sending or acknowledgement) before giving up.",
)
@click.option(
    "--client-key",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="CURVE: this client's .key_secret file (needs --server-key).",
)
@click.option(
    "--server-key",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="CURVE: the daemon's public server.key file.",
)
@click.option(
    "--drop", type=float, default=0.0, help="Fault drill: drop this share of frames messages."
)
@click.option("--duplicate", type=float, default=0.0, help="Fault drill: duplicate this share.")
@click.option(
    "--reorder", type=float, default=0.0, help="Fault drill: swap this share with the next."
)
@click.option("--corrupt", type=float, default=0.0, help="Fault drill: corrupt this share.")
@click.option("--seed", type=int, default=0, help="Seed of the fault draws.")
def command(
    path: Path,
    endpoint: str,
    rate: float,
    batch: int,
    scan_id: str | None,
    compression: str,
    stream_positions: bool,
    checksum: bool,
    control: str | None,
    no_confirm: bool,
    timeout: float,
    client_key: Path | None,
    server_key: Path | None,
    drop: float,
    duplicate: float,
    reorder: float,
    corrupt: float,
    seed: int,
) -> None:
    """Stream the dataset file PATH to a daemon, as a microscope would.

    Returns once the daemon acknowledged every frame (through its control socket), and reports
    the frames it holds; exits with status 1, naming the frames it lacks, when it does not.
    """
    if (client_key is None) != (server_key is None):
        raise click.BadParameter("give both --client-key and --server-key, or neither")
    curve = ClientCurve(client_key, server_key) if client_key and server_key else None
    faults = None
    if drop or duplicate or reorder or corrupt:
        faults = Faults(drop=drop, duplicate=duplicate, reorder=reorder, corrupt=corrupt, seed=seed)
    try:
        source = read_source(path, scan_id, stream_positions)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    n = len(source.frames)
    lost: DeliveryError | None = None
    try:
        with Producer(
            endpoint,
            control=control,
            confirm=not no_confirm,
            send_timeout_s=timeout,
            compression=compression,
            checksum=checksum,
            curve=curve,
            hook=faults,
        ) as producer:
            try:
                receipt: Receipt | None = replay(source, producer, rate, batch)
            except DeliveryError as exc:
                if faults is None:
                    raise
                lost, receipt = exc, None  # a fault drill loses frames on purpose: report them
    except ValueError as exc:  # e.g. no control endpoint can be derived from --endpoint
        raise click.ClickException(str(exc)) from None
    except (DeliveryError, ProducerTimeout) as exc:
        raise click.ClickException(str(exc)) from None
    scan_id = source.start.scan_id
    if lost is not None:
        click.echo(f"scan {scan_id!r}: the daemon acknowledged {lost.acknowledged} of {n} frames "
                   f"({lost.unacknowledged} lost by the fault drill) at {endpoint}")
    elif receipt is not None and receipt.acknowledged is not None:
        click.echo(
            f"scan {scan_id!r}: the daemon acknowledged {receipt.acknowledged} of {n} frames in "
            f"{receipt.elapsed_s:.2f} s ({receipt.rate:.0f} frames/s end to end) at {endpoint}"
        )
    elif receipt is not None:
        click.echo(
            f"sent scan {scan_id!r}: {n} frames in {receipt.elapsed_s:.2f} s to {endpoint} "
            "(not acknowledged: --no-confirm)"
        )
    if faults is not None:
        click.echo("faults: " + ", ".join(f"{k}={v}" for k, v in sorted(faults.stats.items())))
