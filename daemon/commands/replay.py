"""`cryoptycho replay DATA.h5`: stream a recorded scan to a daemon at a chosen frame rate.

The reading and sending sides live in :mod:`cryoptycho.daemon.replay` (``read_source``,
``replay``); this module is the command line around them.
"""

from __future__ import annotations

from pathlib import Path

import click
from cryoptycho.daemon.replay import ReplaySource, read_source, replay
from cryoptycho.protocols.errors import DeliveryError, ProducerTimeout
from cryoptycho.protocols.faults import Faults
from cryoptycho.protocols.producer import DEFAULT_INGEST, Producer, Receipt
from cryoptycho.protocols.security import ClientCurve

__all__ = ["ReplaySource", "command", "read_source", "replay"]


@click.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--ingest",
    default=None,
    help=f"Daemon ingest (PULL) endpoint, as `serve --ingest` gives it [default: {DEFAULT_INGEST}].",
)
# the spelling before 2026-12-07: `serve`, `broker` and `dectris-bridge` call the same endpoint
# --ingest; kept working (with a warning) for the scripts and runbooks that use it
@click.option("--endpoint", default=None, hidden=True, help="Deprecated: --ingest.")
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
    "--drop", type=click.FloatRange(0, 1), default=0.0, help="Fault drill: drop this share of frames messages."
)
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, help="Fault drill: duplicate this share.")
@click.option(
    "--reorder", type=click.FloatRange(0, 1), default=0.0, help="Fault drill: swap this share with the next."
)
@click.option("--corrupt", type=click.FloatRange(0, 1), default=0.0, help="Fault drill: corrupt this share.")
@click.option("--seed", type=int, default=0, help="Seed of the fault draws.")
def command(
    path: Path,
    ingest: str | None,
    endpoint: str | None,
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
    endpoint = ingest_endpoint(ingest, endpoint)
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
    except ValueError as exc:  # e.g. no control endpoint can be derived from --ingest
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


def ingest_endpoint(ingest: str | None, endpoint: str | None) -> str:
    """The daemon's ingest endpoint from ``--ingest`` or its deprecated spelling ``--endpoint``
    (a warning on stderr); both given and different is a usage error."""
    if endpoint is None:
        # (not ``ingest or``: an empty --ingest, a script's unset "$ENDPOINT", sent the scan to the
        # default endpoint, a daemon on this host or nobody, and exited 0 without --confirm)
        return DEFAULT_INGEST if ingest is None else ingest
    click.echo("cryoptycho replay: --endpoint is deprecated, use --ingest (the name `serve`, `broker` and "
               "`dectris-bridge` give the same endpoint)", err=True)
    if ingest is not None and ingest != endpoint:
        raise click.BadParameter(f"--ingest {ingest} and --endpoint {endpoint} name different endpoints: "
                                 "give --ingest only", param_hint="--ingest")
    return endpoint
